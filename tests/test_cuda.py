"""On a CUDA device, convert, calibrate, deploy, export and bench give what they give on the CPU (skipped where
torch sees no CUDA device)."""

import copy

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import main
from ghostify.models import get_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def full_float32():
    """Compare at float32 precision: cuDNN's default TF32 convolutions round to about 1e-3."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.fixture(scope="module")
def reference(settled_resnet18):
    """A ResNet-18 with settled batch norms on the CPU, a copy on the GPU, and inputs."""
    model, x = settled_resnet18
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


def test_analyze_on_cuda_matches_the_cpu(reference):
    cpu_model, gpu_model, x = reference
    on_cpu = ghostify.analyze(cpu_model, x, tables=["layer1.0"])
    on_gpu = ghostify.analyze(gpu_model, x.cuda(), tables=["layer1.0"])
    assert [layer.name for layer in on_gpu.layers] == [layer.name for layer in on_cpu.layers]
    for a, b in zip(on_gpu.layers, on_cpu.layers):
        assert a.errors == pytest.approx(b.errors, rel=0.05, abs=1e-3)
    pairs, expected = on_gpu.tables[0].pairs, on_cpu.tables[0].pairs
    assert [pair[:2] for pair in pairs] == [pair[:2] for pair in expected]
    assert [pair[2] for pair in pairs] == pytest.approx([pair[2] for pair in expected], rel=1e-4)


def test_target_flops_with_calibration_data_on_cuda_plans_as_on_the_cpu(reference):
    cpu_model, gpu_model, x = reference
    plans = []
    for model, data in ((cpu_model, x), (gpu_model, x.cuda())):
        ghost = ghostify.convert(model, target_flops=0.5, init="calibrate", calibration_data=data,
                                 example_inputs=data[:1])
        plans.append({row.name: row.s for row in ghost.ghostify_result.replaced})
    assert plans[0] == plans[1]


@pytest.mark.parametrize("dim", [1, 3])
def test_conv1d_and_conv3d_on_cuda_match_the_cpu(dim):
    torch.manual_seed(0)
    conv, norm = {1: (torch.nn.Conv1d, torch.nn.BatchNorm1d), 3: (torch.nn.Conv3d, torch.nn.BatchNorm3d)}[dim]
    model = torch.nn.Sequential(conv(3, 16, 3, padding=1), norm(16), torch.nn.ReLU(),
                                conv(16, 32, 3, padding=1), norm(32), torch.nn.ReLU(),
                                conv(32, 32, 3, padding=1), norm(32), torch.nn.ReLU())
    x = torch.randn(8, 3, *[12] * dim)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    outputs = []
    for device in ("cpu", "cuda"):
        placed, data = copy.deepcopy(model).to(device), x.to(device)
        ghost = ghostify.convert(placed, init="calibrate", calibration_data=data).eval()
        with torch.no_grad():
            assert _relative(ghostify.deploy(ghost)(data), ghost(data)) < 1e-4
            outputs.append(ghost(data))
    assert _relative(outputs[1], outputs[0]) < 1e-3


def test_zoo_ghostnet_deploys_on_cuda():
    model = get_model("ghostnet_100").cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        assert _relative(ghostify.deploy(model)(x), model(x)) < 1e-4


def test_reconstruct_network_on_cuda(reference):
    _, gpu_model, x = reference
    x = x.cuda()
    blocks = ghostify.convert(gpu_model, init="reconstruct", calibration_data=x, reconstruct_steps=10).eval()
    whole = ghostify.convert(gpu_model, init="reconstruct", calibration_data=x, reconstruct_steps=10,
                             reconstruct_network=True).eval()
    with torch.no_grad():
        target = gpu_model(x)
        assert _relative(whole(x), target) < _relative(blocks(x), target) * 1.05
