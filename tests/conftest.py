"""Test settings (one torch thread per xdist worker, so parallel workers do not fight over the cores), the
small trained model several behaviours are checked on, its calibrated conversions' held-out error, and a
calibrating CLI run's notes."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


class NormAct(nn.BatchNorm2d):
    """A batch norm with its own forward: ``F.batch_norm`` on its statistics (after checking the input is 4-D),
    then a ReLU, as timm's ``BatchNormAct2d`` (the norm of most timm CNNs) does; torch.fx traces into it."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return torch.relu(x)


@pytest.fixture(scope="session")
def settled_resnet18():
    """A random torchvision ResNet-18 in eval mode, its batch norms' statistics taken from random 64x64 inputs
    (as trained weights have them), and those inputs. Shared: copy it before changing it."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


@pytest.fixture(scope="session")
def digits_model():
    """A small CNN trained briefly on scikit-learn's real handwritten digits (16x16, 3 channels), and the images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = F.interpolate(torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1, size=16,
                      mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(120):
        index = torch.randint(len(y), (64,))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), x


@pytest.fixture(scope="session")
def calibrated_error(digits_model):
    """Convert the digits CNN at s = 4 with ``calibrate`` on ``calibration`` and ``options``: the converted model
    and the relative error of its logits against the original's on 300 images it was not fitted on."""
    import ghostify

    model, x = digits_model
    held_out = x[-300:]
    with torch.no_grad():
        reference = model(held_out)

    def run(calibration: torch.Tensor, **options):
        ghost = ghostify.convert(model, s=4, init="calibrate", calibration_data=calibration,
                                 example_inputs=calibration[:1], align=1, **options)
        with torch.no_grad():
            return ghost, ((ghost(held_out) - reference).norm() / reference.norm()).item()

    return run


@pytest.fixture
def calibrated_notes(tmp_path):
    """Run ``ghostify convert resnet18 --init calibrate`` (8 random 32x32 inputs) with extra options; its JSON notes."""
    from click.testing import CliRunner

    from ghostify.cli import main

    torch.save(torch.randn(8, 3, 32, 32), tmp_path / "calib.pt")

    def run(*options: str) -> dict:
        output = tmp_path / f"ghost{len(list(tmp_path.iterdir()))}.pt"
        result = CliRunner().invoke(main, ["convert", "resnet18", "--input-size", "3", "32", "32", "--init",
                                           "calibrate", "--calib-data", str(tmp_path / "calib.pt"), "--json", "-o",
                                           str(output), *options])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["notes"]

    return run
