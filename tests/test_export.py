"""ghostify.export and the `export` / `bench` commands: files that run without ghostify, same outputs."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import main
from ghostify.sources import build

SIZE = (3, 64, 64)

LOAD_WITHOUT_GHOSTIFY = """
import sys, numpy, torch
path, fmt, inp, out = sys.argv[1:]
x = torch.load(inp)
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
elif fmt == "torchscript":
    y = torch.jit.load(path)(x)
else:
    y = torch.export.load(path).module()(x)
assert "ghostify" not in sys.modules
torch.save(y, out)
"""


@pytest.fixture(scope="module")
def ghost():
    model = ghostify.convert(build({"kind": "torchvision", "name": "resnet18"}), s=2, d=3,
                             example_inputs=torch.randn(1, *SIZE)).eval()
    for module in model.modules():  # non-trivial statistics so a wrong fold shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_export_loads_without_ghostify_and_matches(ghost, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path = tmp_path / f"model.{fmt}"
    result = ghostify.export(ghost, path, fmt, input_size=SIZE, dynamic_batch=True)
    assert result.max_abs_diff < 1e-3 and result.max_rel_diff < 1e-5 and result.path == str(path)
    x = torch.randn(3, *SIZE)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_GHOSTIFY, str(path), fmt, str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        expected = ghost(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-4)


def test_export_rejects_bad_format_and_keeps_existing_file(ghost, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        ghostify.export(ghost, tmp_path / "m.x", "tflite")
    existing = tmp_path / "m.pt2"
    existing.write_text("keep")
    with pytest.raises(FileExistsError):
        ghostify.export(ghost, existing, "pt2", input_size=SIZE, overwrite=False)
    assert existing.read_text() == "keep"


def test_cli_export_prints_diff(ghost, tmp_path):
    pytest.importorskip("onnxruntime")
    saved = tmp_path / "ghost.pt"
    ghostify.save(ghost, saved)
    out = tmp_path / "ghost.onnx"
    result = CliRunner().invoke(main, ["export", str(saved), "--format", "onnx", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "max abs diff vs PyTorch" in result.stdout and out.exists()


class FrozenBranch(torch.nn.Module):
    """A model whose forward branches on a tensor's value: a trace freezes the branch taken."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.mean() > -1e9 else -y


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_shows_tracer_warnings_about_the_model_only(ghost, fmt, tmp_path):
    with pytest.warns(torch.jit.TracerWarning) as caught:  # the model's own frozen branch is shown
        ghostify.export(FrozenBranch().eval(), tmp_path / "frozen", fmt, input_size=SIZE)
    assert all("test_export" in w.filename for w in caught if w.category is torch.jit.TracerWarning)
    with warnings.catch_warnings(record=True) as caught:  # a converted torchvision model: nothing to say
        warnings.simplefilter("always")
        ghostify.export(ghost, tmp_path / "ghost", fmt, input_size=SIZE)
    assert [str(w.message) for w in caught] == []


def test_cli_prints_each_warning_once_with_its_kind(tmp_path):
    factory = tmp_path / "frozen.py"
    factory.write_text("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                       "        super().__init__()\n        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)\n"
                       "    def forward(self, x):\n        y = self.conv(x)\n"
                       "        return y if y.mean() > -1e9 else -y\n\ndef build():\n    return Net()\n")
    result = CliRunner().invoke(main, ["export", f"{factory}:build", "--format", "torchscript", "-o",
                                       str(tmp_path / "n.ts"), "--input-size", *map(str, SIZE)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(lines) == 2 and "is not a ghostify file: exporting the original model" in lines[0], lines
    assert lines[1].startswith("warning (TracerWarning): Converting a tensor to a Python"), lines


def test_cli_bench_json(tmp_path):
    result = CliRunner().invoke(main, ["bench", "resnet18", "--batch", "1", "--batch", "2", "--repeats", "1",
                                       "--threads", "1", "--input-size", "3", "32", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [row["batch"] for row in data["rows"]] == [1, 2] and data["input_sizes"] == [[3, 32, 32]]
    assert data["flops_ratio"] > 1.5 and all(row["speedup"] > 0 for row in data["rows"])


def test_cli_bench_bad_runtime_is_one_line():
    result = CliRunner().invoke(main, ["bench", "resnet18", "--runtime", "tvm"])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("s", [2, 4])
def test_onnx_of_converted_resnet50_is_only_convs_concats_and_the_originals_ops(tmp_path, s):
    """Copy-initialised ResNet-50: no gather, no slice, no batch norm left for onnxruntime to run, and every
    grouped conv is depthwise with one output per input (onnxruntime's fast depthwise kernels need that)."""
    import onnx
    from onnx import numpy_helper

    model = ghostify.convert(build({"kind": "torchvision", "name": "resnet50"}), s=s,
                             example_inputs=torch.randn(1, *SIZE)).eval()
    result = ghostify.export(model, tmp_path / "g.onnx", "onnx", input_size=SIZE)
    graph = onnx.load(tmp_path / "g.onnx").graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"Slice", "Gather", "BatchNormalization", "Mul"}, ops
    assert {"Conv", "Concat"} <= ops
    # the four projection shortcuts are added to their blocks' last modules part by part, never concatenated
    assert sum(node.op_type == "Concat" for node in graph.node) == 52 - 4
    weights = {init.name: numpy_helper.to_array(init).shape for init in graph.initializer}
    groups = {node.input[1]: next((a.i for a in node.attribute if a.name == "group"), 1)
              for node in graph.node if node.op_type == "Conv"}
    depthwise = [name for name, group in groups.items() if group > 1]
    assert len(depthwise) == 52 * (s - 1)  # ResNet-50's 52 converted convs, s - 1 ghost runs each
    assert all(weights[name][0] == groups[name] for name in depthwise)
    assert result.max_abs_diff < 1e-3


class DataDependent(torch.nn.Module):
    """Two convs behind data-dependent control flow: the model does not trace, so its layers keep gathers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        return self.b(x) if x.mean() > -1e9 else x


def test_onnx_export_of_a_gathered_module_is_a_gather(tmp_path):
    """A Ghost module that keeps a gather exports as Concat + Gather: no scatter of a buffer whose shape the
    export would freeze (a file thousands of times larger, fixed to the export's input size)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ghost = ghostify.convert(DataDependent(), example_inputs=torch.randn(1, 3, 16, 16)).eval()
    assert ghost.ghostify_result.replaced[0].gather
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the model's own branch is frozen, as it says
        result = ghostify.export(ghost, tmp_path / "g.onnx", "onnx", input_size=(3, 64, 64), dynamic_batch=True)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "g.onnx")).graph.node}
    assert "Gather" in ops and not ops & {"ScatterElements", "ScatterND"}, ops
    assert result.max_abs_diff < 1e-4


def test_export_reports_the_difference_relative_to_the_output_scale(monkeypatch, tmp_path):
    """A file whose outputs are off by a fixed fraction of the largest output reports that fraction, however
    small the outputs are (a random-weight network's can be 1e-9, where any absolute difference looks fine)."""
    from ghostify import exporting

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-9)
        model[0].bias.zero_()

    def off_by_a_quarter(path, fmt, xs):
        out = exporting.deploy(model, runtime="inductor", compile=False)(*xs)
        return out + 0.25 * out.abs().max()

    monkeypatch.setattr(exporting, "_run_file", off_by_a_quarter)
    result = ghostify.export(model, tmp_path / "m.pt2", "pt2", input_size=(3, 8, 8))
    assert result.max_abs_diff < 1e-8
    assert result.max_rel_diff == pytest.approx(0.25, rel=1e-5)


def test_onnx_sessions_spin_only_while_a_run_lasts(tmp_path):
    """Spinning threads while a run lasts (onnxruntime's default), stopped when it returns, so that two sessions
    timed in turn do not spin on each other's cores."""
    from ghostify.exporting import onnx_session

    model = build({"kind": "torchvision", "name": "resnet18"}).eval()
    ghostify.export(model, str(tmp_path / "m.onnx"), "onnx", input_size=(3, 32, 32))
    options = onnx_session(str(tmp_path / "m.onnx"), threads=2).get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    try:
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: onnxruntime's default, which spins
        spinning = "1"
    assert spinning == "1"
