"""The command line's promises on bad input and odd situations: one line on stderr, exit 2, nothing written,
outputs checked before any work, a warning when a result cannot be what the user meant."""

import errno
import os

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ghostify
from ghostify import serialization
from ghostify.cli import main

SMALL = ["--input-size", "3", "32", "32"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, text):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert text in result.stderr, result.stderr
    assert "weights_only" not in result.stderr


@pytest.mark.parametrize("args, text", [
    (["convert"], "Missing argument 'MODEL'"),
    (["convert", "resnet18", "--s", "two", "-o", "x.pt"], "'two' is not a valid integer"),
    (["no_such_command"], "No such command"),
    (["convert", "resnet18", "--target-latency", "0.9", "-o", "x.pt"], "--target-latency is only used with --runtime"),
    (["convert", "resnet18", "--target-flops", "0.5", "--target-latency", "0.9", "--runtime", "torch", "-o", "x.pt"],
     "give --target-flops or --target-latency, not both"),
    (["convert", "resnet18", "--target-flops", "0.5", "--target-latency", "0.9", "-o", "x.pt"],
     "give --target-flops or --target-latency, not both"),
])
def test_usage_errors_are_one_line(args, text):
    assert_one_line_error(invoke(*args), text)


def test_output_that_is_not_a_regular_file_is_refused_before_any_work(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    monkeypatch.setattr(serialization, "build", lambda spec: pytest.fail("work started"))
    assert_one_line_error(invoke("convert", "resnet18", *SMALL, "--force", "-o", fifo), "not a regular file")
    assert os.path.exists(fifo) and not os.path.isfile(fifo)


def test_unwritable_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "build", lambda spec: pytest.fail("work started"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    assert_one_line_error(invoke("convert", "resnet18", *SMALL, "-o", tmp_path / "g.pt"), "permission denied")


@pytest.mark.parametrize("failure, text", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456"), "full?"),
])
def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure, text):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", fail)
    assert_one_line_error(invoke("convert", "resnet18", *SMALL, "-o", tmp_path / "g.pt"), text)
    assert os.listdir(tmp_path) == []


def test_unreadable_inputs_are_one_line(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    result = invoke("convert", "resnet18", *SMALL, "--init", "calibrate", "--calib-data", images, "-o", tmp_path / "a")
    assert_one_line_error(result, "cannot read calibration image")
    assert "broken.png" in result.stderr

    (tmp_path / "broken.py").write_text("def build(:\n    pass\n")
    assert_one_line_error(invoke("convert", f"{tmp_path / 'broken.py'}:build", "-o", tmp_path / "b"), "syntax error")

    torch.save({"weights": torchvision.models.resnet18()}, tmp_path / "pickled.pth")  # a module: pickled code
    result = invoke("convert", "resnet18", "--weights", tmp_path / "pickled.pth", *SMALL, "-o", tmp_path / "c")
    assert_one_line_error(result, "holds pickled Python objects")
    assert not {"a", "b", "c"} & set(os.listdir(tmp_path))


def test_export_at_a_size_the_model_rejects_is_one_line(tmp_path):
    ghost = tmp_path / "g.pt"
    assert invoke("convert", "resnet18", *SMALL, "-o", ghost).exit_code == 0
    result = invoke("export", ghost, "--input-size", "5", "32", "32", "-o", tmp_path / "g.onnx")
    assert_one_line_error(result, "fails on inputs of shape (1, 5, 32, 32)")
    assert not (tmp_path / "g.onnx").exists()


def test_report_and_bench_at_a_size_the_model_rejects_are_one_line(tmp_path):
    ghost = tmp_path / "g.pt"
    assert invoke("convert", "resnet18", *SMALL, "-o", ghost).exit_code == 0
    for args in (["report", "resnet18"], ["report", ghost], ["bench", "resnet18", ghost, "--batch", "1",
                                                               "--repeats", "1"]):
        assert_one_line_error(invoke(*args, "--input-size", "1", "32", "32"), "fails on inputs of shape (1, 1, 32, 32)")


def test_bench_refuses_s_and_d_for_a_model_it_does_not_convert(tmp_path):
    ghost = tmp_path / "g.pt"
    assert invoke("convert", "resnet18", *SMALL, "-o", ghost).exit_code == 0
    for args in (["resnet18", ghost], [ghost]):
        result = invoke("bench", *args, "--s", "4", "--batch", "1", "--repeats", "1")
        assert_one_line_error(result, f"--s is only used with a MODEL that bench converts itself, got the ghostify "
                                      f"file {ghost}")


@pytest.mark.parametrize("path", ["missing.pt", "./missing.pt", "no/such/folder/model.pth"])
def test_a_missing_file_is_said_to_be_missing(path):
    assert_one_line_error(invoke("report", path), f"no such file: {path}")


def test_bench_refuses_a_file_converted_from_another_model(tmp_path):
    ghost = tmp_path / "g.pt"
    assert invoke("convert", "resnet18", *SMALL, "-o", ghost).exit_code == 0
    assert_one_line_error(invoke("bench", "resnet34", ghost, "--batch", 1, "--repeats", 1, *SMALL),
                          "was converted from resnet18, not resnet34")


def test_useless_results_warn(tmp_path):
    result = invoke("convert", "resnet18", *SMALL, "--s", 100000, "-o", tmp_path / "g.pt")
    assert result.exit_code == 0 and "warning: no convolution was converted" in result.stderr
    result = invoke("export", "resnet18", *SMALL, "-o", tmp_path / "r.onnx")
    assert result.exit_code == 0 and "is not a ghostify file: exporting the original model" in result.stderr
    torch.save(torch.randn(5, 3, 32, 32), tmp_path / "few.pt")
    result = invoke("convert", "resnet18", *SMALL, "--init", "calibrate", "--calib-data", tmp_path / "few.pt",
                    "--calib-samples", 64, "-o", tmp_path / "c.pt")
    assert result.exit_code == 0 and "holds 5 calibration inputs, fewer than --calib-samples 64" in result.stderr
    lines = result.stderr.splitlines()  # said before the work it is about, once
    warned = [i for i, line in enumerate(lines) if "fewer than --calib-samples" in line]
    assert len(warned) == 1 and warned[0] < min(i for i, line in enumerate(lines) if line.startswith("calibrating"))


def test_file_from_a_python_object_works_with_arch(tmp_path):
    model = torchvision.models.resnet18()
    path = tmp_path / "g.pt"
    ghostify.save(ghostify.convert(model, example_inputs=torch.randn(1, 3, 32, 32)), path)
    assert_one_line_error(invoke("export", path, "-o", tmp_path / "g.onnx"), "converted from a Python object")
    result = invoke("report", path, "--arch", "resnet18", "--json")
    assert result.exit_code == 0, result.stderr
    assert '"flops_before"' in result.stdout
    assert invoke("export", path, "--arch", "resnet18", "-o", tmp_path / "g.onnx").exit_code == 0


def test_convert_of_a_ghostify_file_keeps_its_input_size(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert invoke("convert", "resnet18", "--input-size", 3, 40, 40, "--include", "layer1.*", "-o", first).exit_code == 0
    assert invoke("convert", first, "--include", "layer2.*", "-o", second).exit_code == 0
    loaded = ghostify.load(second)
    assert loaded.ghostify_result.input_shapes == [(1, 3, 40, 40)]
    assert isinstance(loaded.layer1[0].conv1, ghostify.GhostModule)  # the first conversion is kept
    assert isinstance(loaded.layer2[0].conv1, ghostify.GhostModule)


def test_file_factory_path_is_stored_relative_so_the_pair_can_move(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "net.py").write_text("import torchvision\n\ndef build():\n    return torchvision.models.resnet18()\n")
    assert invoke("convert", f"{folder / 'net.py'}:build", *SMALL, "-o", folder / "g.pt").exit_code == 0
    stored = torch.load(folder / "g.pt", weights_only=True)["result"]["source"]["path"]
    assert stored == "net.py"
    moved = tmp_path / "moved"
    folder.rename(moved)
    loaded = ghostify.load(moved / "g.pt", trust_source=True)
    assert loaded.ghostify_result.source["path"] == str(moved / "net.py")
