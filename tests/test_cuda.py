"""On a CUDA device, convert, calibrate, deploy, export and bench give what they give on the CPU (skipped where
torch sees no CUDA device)."""

import copy

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ghostify
from ghostify.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.fixture(scope="module")
def reference():
    """A ResNet-18 with settled batch norms on the CPU, a copy on the GPU, and inputs."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare at float32 precision
    return model, copy.deepcopy(model).cuda(), x


@pytest.mark.parametrize("init", ["copy", "calibrate"])
def test_conversion_on_cuda_matches_the_cpu(reference, init):
    cpu_model, gpu_model, x = reference
    data = {"calibration_data": x} if init == "calibrate" else {}
    on_cpu = ghostify.convert(cpu_model, init=init, example_inputs=x[:1], **data).eval()
    on_gpu = ghostify.convert(gpu_model, init=init, example_inputs=x[:1].cuda(), **data).eval()
    assert all(p.is_cuda for p in on_gpu.parameters()) and all(b.is_cuda for b in on_gpu.buffers())
    assert next(gpu_model.parameters()).is_cuda  # the input model stays where it was
    with torch.no_grad():
        expected, got = on_cpu(x), on_gpu(x.cuda())
        assert _relative(got, expected) < 1e-3
        # the conversion is as close to the original on the GPU as on the CPU
        assert _relative(got, gpu_model(x.cuda())) == pytest.approx(_relative(expected, cpu_model(x)), rel=0.05)
    errors = {row.name: row.error for row in on_cpu.ghostify_result.replaced}
    for row in on_gpu.ghostify_result.replaced:
        assert row.error == pytest.approx(errors[row.name], rel=0.05, abs=1e-4)


@pytest.mark.parametrize("runtime", ["torch", "inductor"])
def test_deploy_on_cuda_keeps_the_outputs(reference, runtime):
    _, gpu_model, x = reference
    ghost = ghostify.convert(gpu_model, example_inputs=x[:1].cuda()).eval()
    deployed = ghostify.deploy(ghost, runtime=runtime)
    with torch.no_grad():
        assert _relative(deployed(x.cuda()), ghost(x.cuda())) < 1e-4


def test_export_and_bench_from_cuda(reference, tmp_path):
    cpu_model, gpu_model, x = reference
    ghost = ghostify.convert(gpu_model, example_inputs=x[:1].cuda()).eval()
    done = ghostify.export(ghost, tmp_path / "g.onnx", input_size=(3, 64, 64))
    assert done.max_abs_diff < 1e-3
    result = ghostify.bench(gpu_model, ghost, batches=(2,), repeats=2, input_size=(3, 64, 64))
    on_cpu = ghostify.bench(cpu_model, ghostify.convert(cpu_model, example_inputs=x[:1]).eval(), batches=(2,),
                            repeats=1, input_size=(3, 64, 64))
    assert result.flops_ratio == pytest.approx(on_cpu.flops_ratio)
    assert result.rows[0].original_ms > 0 and result.rows[0].converted_ms > 0


def test_cli_on_cuda(tmp_path):
    runner = CliRunner()
    out = tmp_path / "g.pt"
    size = ["--input-size", "3", "64", "64"]
    result = runner.invoke(main, ["convert", "resnet18", "--device", "cuda", "-o", str(out), *size])
    assert result.exit_code == 0, result.output
    loaded = ghostify.load(out)  # saved from the GPU, loads on the CPU
    assert all(not p.is_cuda for p in loaded.parameters())
    result = runner.invoke(main, ["bench", "resnet18", str(out), "--device", "cuda", "--batch", "2",
                                  "--repeats", "2", *size, "--json"])
    assert result.exit_code == 0, result.output


def test_reconstruct_on_cuda_improves_on_copy(reference):
    _, gpu_model, x = reference
    x = x.cuda()
    copied = ghostify.convert(gpu_model, example_inputs=x[:1]).eval()
    tuned = ghostify.convert(gpu_model, init="reconstruct", calibration_data=x, reconstruct_steps=20).eval()
    assert all(p.is_cuda for p in tuned.parameters())
    with torch.no_grad():
        target = gpu_model(x)
        assert _relative(tuned(x), target) < 0.5 * _relative(copied(x), target)


def test_finetune_on_cuda_with_amp_and_features(reference):
    _, gpu_model, x = reference
    student = ghostify.convert(gpu_model, example_inputs=x[:1].cuda()).eval()
    with torch.no_grad():
        labels = gpu_model(x.cuda()).argmax(1).cpu()
        before = (student(x.cuda()).argmax(1).cpu() == labels).float().mean()
    tuned = ghostify.finetune(student, gpu_model, (x, labels), epochs=2, batch_size=8, amp=True,
                              feature_weight=1.0, keep_best=False)
    assert all(p.is_cuda for p in tuned.parameters())
    with torch.no_grad():
        agree = (tuned.eval()(x.cuda()).argmax(1).cpu() == labels).float().mean()
    assert agree > before + 0.4  # the teacher's top-1 on its inputs, learnt in two epochs (0 -> 1 on the CPU)
