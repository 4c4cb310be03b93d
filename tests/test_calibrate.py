"""Calibration from the command line: a .pt tensor file or an image folder, and clear one-line errors."""

import json

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import main
from ghostify.init.data import load_calibration

SMALL = ["--input-size", "3", "32", "32"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _images(folder, count):
    from PIL import Image

    folder.mkdir()
    for i in range(count):
        pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


def test_cli_calibrate_from_tensor_file_reports_errors(tmp_path):
    torch.save(torch.randn(12, 3, 32, 32), tmp_path / "calib.pt")
    out = tmp_path / "g.pt"
    result = invoke("convert", "resnet18", *SMALL, "--init", "calibrate", "--calib-data", tmp_path / "calib.pt",
                    "--calib-samples", 8, "--json", "-o", out)
    assert result.exit_code == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    progress = [line for line in result.stderr.splitlines() if line.startswith("calibrating")]
    steps = len(layers) + 1  # and the head, fc
    assert f"[{steps}/{steps}, " in progress[-1], progress  # plain lines: stderr is not a terminal
    assert "fit error - [0/" in progress[0], progress[0]  # nothing measured yet: "-", not "nan"
    assert all(layer["reconstruction_error"] is not None for layer in layers)
    assert ghostify.load(out).ghostify_result.init == "calibrate"


def test_image_folder_is_resized_and_normalised(tmp_path):
    batches = load_calibration(_images(tmp_path / "imgs", 5), (3, 16, 16), samples=3)
    x = torch.cat([inputs for inputs, in batches])
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() < 0 < x.max()  # ImageNet mean and std applied


@pytest.mark.parametrize("args, text", [
    (["--init", "calibrate"], "needs --calib-data"),
    (["--init", "calibrate", "--calib-data", "missing.pt"], "no such calibration file"),
    (["--calib-data", "{tensor}"], "--calib-data is only used with --init calibrate"),
    (["--runtime-batch", "4"], "--runtime-batch is only used with --runtime, got no --runtime"),
    (["--init", "calibrate", "--calib-data", "{wrong}"], "shape (N, 3, 32, 32), got (4, 1, 32, 32)"),
    (["--init", "calibrate", "--calib-data", "{folder}"], "no images"),
])
def test_cli_bad_calibration_is_one_line(tmp_path, args, text):
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "tensor.pt")
    torch.save(torch.randn(4, 1, 32, 32), tmp_path / "wrong.pt")
    (tmp_path / "empty").mkdir()
    paths = {"{tensor}": tmp_path / "tensor.pt", "{wrong}": tmp_path / "wrong.pt", "{folder}": tmp_path / "empty"}
    result = invoke("convert", "resnet18", *SMALL, *[paths.get(a, a) for a in args], "-o", tmp_path / "g.pt")
    assert result.exit_code == 2, result.output
    assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "g.pt").exists()
