"""dtype and device follow the model: a float64 or half model converts, counts, calibrates, deploys and exports
with its own dtype, and gives what the float32 model gives (same weights), within the dtype's precision."""

import copy

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import main


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference(settled_resnet18):
    """A float32 ResNet-18 with settled batch norms, its conversion, and inputs."""
    model, x = settled_resnet18
    return model, ghostify.convert(model, example_inputs=x[:1]).eval(), x[:8]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_convert_report_deploy_follow_the_dtype(reference, dtype):
    """The Ghost model in ``dtype`` is as close to its float32 twin (same weights) as the original model is."""
    model32, _, x = reference
    model = copy.deepcopy(model32).to(dtype)
    twin32 = copy.deepcopy(model).float()  # the same weights, in float32
    twin = ghostify.convert(twin32, example_inputs=x[:1]).eval()
    ghost = ghostify.convert(model).eval()  # default example inputs: made in the model's dtype
    assert all(p.dtype == dtype for p in ghost.parameters())
    with torch.no_grad():
        floor = _relative(model(x.to(dtype)), twin32(x))  # what the dtype alone costs the original
        expected = twin(x)
        assert _relative(ghost(x.to(dtype)), expected) < 3 * floor + 1e-6
        assert _relative(ghostify.deploy(ghost)(x.to(dtype)), expected) < 3 * floor + 1e-6
    summary = ghostify.report(model, ghost, (x[:1].to(dtype),))
    assert summary.conv_flops_after == ghostify.report(twin32, twin, (x[:1],)).conv_flops_after


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_saved_model_loads_in_its_own_dtype(reference, dtype, tmp_path):
    """From its MODEL name and into a float32 architecture alike: the file's dtype, bit for bit."""
    model32, ghost32, x = reference
    ghost = copy.deepcopy(ghost32).to(dtype)
    ghost.ghostify_result.source = {"kind": "torchvision", "name": "resnet18"}
    ghostify.save(ghost, tmp_path / "g.pt")
    for loaded in (ghostify.load(tmp_path / "g.pt"), ghostify.load(tmp_path / "g.pt", model=model32)):
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x.to(dtype)), ghost(x.to(dtype)))


def test_calibrate_a_float64_model_matches_float32(reference):
    model32, _, x = reference
    model64 = copy.deepcopy(model32).double()
    errors = {}
    for model in (model32, model64):
        ghost = ghostify.convert(model, s=4, init="calibrate", calibration_data=x, example_inputs=x[:1])
        errors[next(model.parameters()).dtype] = [row.error for row in ghost.ghostify_result.replaced]
    assert errors[torch.float64] == pytest.approx(errors[torch.float32], rel=1e-2, abs=1e-4)


def test_onnx_export_of_float64_is_refused_clearly(reference, tmp_path):
    _, ghost32, _ = reference
    with pytest.raises(ValueError, match="float32 and float16"):
        ghostify.export(copy.deepcopy(ghost32).double(), tmp_path / "g.onnx", input_size=(3, 64, 64))
    assert not (tmp_path / "g.onnx").exists()
    done = ghostify.export(copy.deepcopy(ghost32).half(), tmp_path / "h.onnx", input_size=(3, 64, 64))
    assert done.max_abs_diff < 1e-2


def test_cli_device_is_checked_and_followed(tmp_path):
    runner = CliRunner()
    args = ["convert", "resnet18", "--input-size", "3", "32", "32", "-o", str(tmp_path / "g.pt")]
    if not torch.cuda.is_available():
        result = runner.invoke(main, args + ["--device", "cuda"])
        assert result.exit_code == 2 and "torch sees no CUDA device" in result.stderr
    result = runner.invoke(main, args + ["--device", "nonsense"])
    assert result.exit_code == 2 and "--device must be a torch device" in result.stderr
    assert runner.invoke(main, args + ["--device", "cpu"]).exit_code == 0
