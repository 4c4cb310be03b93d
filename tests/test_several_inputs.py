"""A model called with several tensors: export, bench and the CLI's report/export take every input, at the sizes
it was converted at, and check values against the converted model."""

import json

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import main

MODEL_SOURCE = '''
import torch
from torch import nn


class TwoInputs(nn.Module):
    """An image branch and a one-channel branch of another size, joined before the head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                               nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(64, 5)

    def forward(self, x, y):
        return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(y).mean((2, 3))], 1))


def build():
    torch.manual_seed(0)
    return TwoInputs().eval()
'''
SIZES = ((3, 16, 16), (1, 12, 12))


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("several") / "two.py"
    path.write_text(MODEL_SOURCE)
    return f"{path}:build"


@pytest.fixture(scope="module")
def models(factory):
    from ghostify.sources import build, parse

    model = build(parse(factory))
    inputs = tuple(torch.randn(1, *size) for size in SIZES)
    return model, ghostify.convert(model, example_inputs=inputs).eval()


def test_export_takes_every_input_at_its_converted_size(models, tmp_path):
    _, ghost = models
    done = ghostify.export(ghost, tmp_path / "two.ts", "torchscript")
    assert done.input_shape == ((1, *SIZES[0]), (1, *SIZES[1])) and done.max_abs_diff < 1e-4
    inputs = tuple(torch.randn(2, *size) for size in SIZES)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "two.ts"))(*inputs), ghost(*inputs), atol=1e-4)


def test_onnx_export_names_each_input(models, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, ghost = models
    ghostify.export(ghost, tmp_path / "two.onnx", "onnx", dynamic_batch=True)
    session = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert [spec.name for spec in session.get_inputs()] == ["input_0", "input_1"]
    inputs = tuple(torch.randn(3, *size) for size in SIZES)
    out = session.run(None, {f"input_{i}": x.numpy() for i, x in enumerate(inputs)})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), ghost(*inputs), atol=1e-4)


def test_bench_times_every_input(models):
    model, ghost = models
    result = ghostify.bench(model, ghost, batches=(2,), repeats=1)
    counted = ghostify.report(model, ghost, tuple(torch.randn(1, *size) for size in SIZES))
    assert result.flops_ratio == pytest.approx(counted.conv_flops_before / counted.conv_flops_after)
    assert len(result.rows) == 1 and result.rows[0].converted_ms > 0


def test_cli_report_and_export_use_the_recorded_sizes(models, factory, tmp_path):
    model, ghost = models
    path = tmp_path / "two.pt"
    ghostify.save(ghost, path)
    runner = CliRunner()
    report = runner.invoke(main, ["report", str(path), "--arch", factory, "--json"])
    assert report.exit_code == 0, report.output
    counted = ghostify.report(model, ghost, tuple(torch.randn(1, *size) for size in SIZES))
    data = json.loads(report.output)
    assert (data["flops_before"], data["flops_after"]) == (counted.flops_before, counted.flops_after)
    export = runner.invoke(main, ["export", str(path), "--arch", factory, "--format", "torchscript", "-o",
                                  str(tmp_path / "two.ts")])
    assert export.exit_code == 0, export.output
    assert "input 1x3x16x16, 1x1x12x12" in export.output
    one = runner.invoke(main, ["report", str(path), "--arch", factory, "--input-size", "3", "16", "16"])
    assert one.exit_code == 2 and "takes 2 inputs" in one.output


class ImageAndVector(torch.nn.Module):
    """An image and a feature vector (no spatial dimensions), joined before the head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 + 4, 2)

    def forward(self, x, v):
        return self.fc(torch.cat([self.b(torch.relu(self.a(x))).mean((2, 3)), v], 1))


def test_an_input_of_any_shape_the_model_ran_on_is_taken_as_recorded(tmp_path):
    model = ImageAndVector().eval()
    ghost = ghostify.convert(model, example_inputs=(torch.randn(1, 3, 16, 16), torch.randn(1, 4))).eval()
    done = ghostify.export(ghost, tmp_path / "iv.ts", "torchscript")
    assert done.input_shape == ((1, 3, 16, 16), (1, 4)) and done.max_abs_diff < 1e-5
    assert ghostify.bench(model, ghost, batches=(1,), repeats=1).rows[0].converted_ms > 0
