"""The CLI through click's CliRunner, plus one real subprocess run of the installed console script."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ghostify
from ghostify.cli import main

SMALL = ["--input-size", "3", "64", "64"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if lines[0].startswith("error:"):
        assert len(lines) == 1


def test_convert_writes_file_and_prints_report(tmp_path):
    out = tmp_path / "ghost.pt"
    result = invoke("convert", "resnet18", "--s", 2, "--d", 3, *SMALL, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "FLOPs" in result.stdout and "layer1.0.conv1" in result.stdout and "multiply-adds" in result.stdout
    model = ghostify.load(out)
    assert type(model.layer1[0].conv1).__name__ == "GhostModule"


def test_convert_form_linear_keeps_the_norm(tmp_path):
    for form, norm in (("ghostnet", "Identity"), ("linear", "BatchNorm2d")):
        out = tmp_path / f"{form}.pt"
        assert invoke("convert", "resnet18", *SMALL, "--form", form, "--init", "random", "-o", out).exit_code == 0
        assert type(ghostify.load(out).layer1[0].bn1).__name__ == norm


def test_convert_json_is_the_only_stdout(tmp_path):
    result = invoke("convert", "resnet18", *SMALL, "--s", 4, "--json", "-o", tmp_path / "g.pt")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["flops_after"] < data["flops_before"] and data["layers"][0]["replacement"].startswith("Ghost s=4")


def test_existing_output_kept_unless_force(tmp_path):
    out = tmp_path / "g.pt"
    out.write_bytes(b"precious")
    assert_one_line_error(invoke("convert", "resnet18", *SMALL, "-o", out), "exists; pass --force to replace it")
    assert out.read_bytes() == b"precious"
    assert invoke("convert", "resnet18", *SMALL, "--force", "-o", out).exit_code == 0
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize("args, text", [
    (["resnet5"], "did you mean resnet50"),
    (["resnet18", "--d", "2"], "Invalid value for '--d': must be an odd integer >= 1, got 2"),
    (["resnet18", "--s", "1"], "Invalid value for '--s': 1 is not in the range x>=2"),
    (["resnet18", "--primary-kernel", "0"], "primary_kernel must be positive"),
    (["resnet18", "--input-size", "5", "64", "64"], "fails on inputs of shape (1, 5, 64, 64)"),
    (["resnet18", "--input-size", "3", "-64", "64"], "needs 2 to 4 positive integers (C L, C H W or C D H W), got "
                                                     "'3 -64 64'"),
    (["no_such_module_xyz:factory"], "cannot import 'no_such_module_xyz'"),
    (["missing_file.py:factory"], "no such Python file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, text):
    out = tmp_path / "g.pt"
    assert_one_line_error(invoke("convert", *args, *([] if "--input-size" in args else SMALL), "-o", out), text)
    assert os.listdir(tmp_path) == []


def test_weights_loaded_first_and_mismatch_is_clear(tmp_path):
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "g.pt"
    assert invoke("convert", "resnet18", *SMALL, "--weights", tmp_path / "w.pth", "-o", out).exit_code == 0
    fc = ghostify.load(out).fc  # its inputs come in the converted stream's channel order
    assert torch.equal(fc.bias, source.fc.bias) and not torch.equal(fc.weight, source.fc.weight)
    assert torch.equal(fc.weight.sort(1).values, source.fc.weight.sort(1).values)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "wrong.pth")
    result = invoke("convert", "resnet18", *SMALL, "--weights", tmp_path / "wrong.pth", "-o", tmp_path / "x.pt")
    assert_one_line_error(result, "do not fit ResNet: unexpected layer1.2")
    assert not (tmp_path / "x.pt").exists()


def test_report_plain_model_and_ghostify_file(tmp_path):
    plain = json.loads(invoke("report", "resnet18", *SMALL, "--json").stdout)
    assert plain["flops_after"] is None and plain["params_before"] == 11_689_512
    out = tmp_path / "g.pt"
    invoke("convert", "resnet18", *SMALL, "-o", out)
    saved = json.loads(invoke("report", out, "--json").stdout)
    assert saved["flops_before"] == plain["flops_before"] and saved["flops_after"] < saved["flops_before"]
    assert saved["input_shapes"] == [[1, 3, 64, 64]]


def test_module_and_file_factories(tmp_path):
    factory = tmp_path / "mynet.py"
    factory.write_text("import torchvision\n\ndef build():\n    return torchvision.models.resnet18(num_classes=3)\n")
    for model in ("torchvision.models:resnet18", f"{factory}:build"):
        out = tmp_path / "g.pt"
        result = invoke("convert", model, *SMALL, "--force", "-o", out)
        assert result.exit_code == 0, result.stderr
        assert type(ghostify.load(out, trust_source=True).layer2[0].conv1).__name__ == "GhostModule"


@pytest.fixture
def code_file(tmp_path):
    """(path, marker): a file converted from evil.py:build, whose import writes the marker (removed again)."""
    marker, evil = tmp_path / "marker", tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom torch import nn\n\n\ndef build():\n"
                    "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),\n"
                    "                         nn.Conv2d(8, 16, 3, padding=1))\n")
    path = tmp_path / "ghost.pt"
    result = invoke("convert", f"{evil}:build", "--input-size", 3, 16, 16, "--init", "random", "--json", "-o", path)
    assert result.exit_code == 0 and marker.exists(), result.stderr
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("command, args", [
    ("report", []), ("export", ["-o", "out.onnx"]), ("bench", []), ("convert", ["-o", "out.pt"]),
])
def test_code_built_file_needs_trust_source(tmp_path, code_file, command, args):
    path, marker = code_file
    result = invoke(command, path, *[tmp_path / a if a.startswith("out") else a for a in args])
    assert_one_line_error(result, "--trust-source")
    assert len(result.stderr.strip().splitlines()) == 1 and "evil.py:build" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.pt").exists()


def test_trust_source_rebuilds_code_built_file(code_file):
    path, marker = code_file
    result = invoke("report", path, "--json", "--trust-source")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert marker.exists() and data["flops_after"] < data["flops_before"] and data["input_shapes"] == [[1, 3, 16, 16]]
    result = invoke("bench", path, "--batch", 1, "--repeats", 1, "--json", "--trust-source")
    assert result.exit_code == 0, result.stderr


def test_timm_without_timm_is_clear(tmp_path):
    try:
        import timm  # noqa: F401
    except ImportError:
        assert_one_line_error(invoke("convert", "timm:resnet18", "-o", tmp_path / "g.pt"), "pip install timm")
    else:
        assert_one_line_error(invoke("convert", "timm:not_a_model_xyz", "-o", tmp_path / "g.pt"), "unknown timm")


def test_models_lists_names():
    result = invoke("models")
    assert result.exit_code == 0
    names = result.stdout.split()
    assert "resnet50" in names and "vit_b_16" in names


def test_debug_shows_traceback(tmp_path):
    result = invoke("--debug", "convert", "resnet18", "--primary-kernel", "0", *SMALL, "-o", tmp_path / "g.pt")
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


def test_console_script_in_subprocess(tmp_path):
    exe = shutil.which("ghostify", path=os.path.dirname(sys.executable)) or shutil.which("ghostify")
    command = [exe] if exe else [sys.executable, "-m", "ghostify"]
    out = tmp_path / "g.pt"
    run = subprocess.run(command + ["convert", "resnet18", *SMALL, "--json", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["params_after"] < 11_689_512 and out.exists()
    bad = subprocess.run(command + ["convert", "resnet18", "--d", "4", "-o", str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: Invalid value for '--d': must be an odd integer >= 1, "
                                                         "got 4 (see '") and len(bad.stderr.splitlines()) == 1


def test_closed_stdout_stops_quietly():
    """``ghostify models | head -1``: the reader stops early; no error message, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "ghostify", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes a line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and err == b"", err


def test_missing_output_folder_fails_before_any_work(tmp_path):
    result = invoke("convert", "resnet18", *SMALL, "-o", tmp_path / "no" / "such" / "g.pt")
    assert_one_line_error(result, "folder does not exist")


def test_convert_align_sets_the_intrinsic_counts(tmp_path):
    """resnet18 at s = 3: 64-wide layers get 32 intrinsic maps by default (16-channel blocks), 22 with --align 1."""
    counts = {}
    for align in (None, 1):
        out = tmp_path / f"align{align}.pt"
        extra = [] if align is None else ["--align", align]
        assert invoke("convert", "resnet18", *SMALL, "--s", 3, "--init", "random", *extra, "-o", out).exit_code == 0
        counts[align] = ghostify.load(out).layer1[0].conv1.intrinsic_channels
    assert counts == {None: 32, 1: 22}
    assert_one_line_error(invoke("convert", "resnet18", *SMALL, "--align", 0, "-o", tmp_path / "x.pt"), "--align")
