"""Calibration's peak memory does not grow with depth: ``Frontier`` moves the calibration batches through the
model keeping only the values still to be read, so a model four times deeper needs about as much memory.
Measured in fresh processes (peak resident set size during ``convert``), on a deep stack of conv blocks whose
activations on the calibration set (33.5 MB per value) dwarf everything else."""

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, resource, sys
import torch
from torch import nn
import ghostify

torch.manual_seed(0)
layers = [nn.Conv2d(3, 32, 3, padding=1)]
for _ in range(int(sys.argv[1])):
    layers += [nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
images = torch.randn(256, 3, 32, 32)
with torch.no_grad():
    model(images)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ghost = ghostify.convert(model, s=2, init="calibrate", calibration_data=images, example_inputs=images[:1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown": (after - before) * 1024, "layers": len(ghost.ghostify_result.replaced)}))
"""
VALUE = 256 * 32 * 32 * 32 * 4  # bytes of one block output over the calibration set


def _peak_growth(depth: int) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(depth)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_calibration_peak_memory_does_not_grow_with_depth():
    shallow, deep = _peak_growth(4), _peak_growth(16)
    assert (shallow["layers"], deep["layers"]) == (4, 16)
    # keeping every block's values would add 12 blocks x 3 values x 2 models x 33.5 MB (about 2.4 GB)
    assert deep["grown"] - shallow["grown"] < 3 * VALUE, (shallow, deep)
