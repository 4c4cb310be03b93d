"""Conv1d and Conv3d: audio and video CNNs convert, count, initialise, deploy, export and save like 2-D ones."""

import itertools

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ghostify


def _macs(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


class M5(nn.Module):
    """An M5-style audio classifier on a raw waveform (Dai et al. 2017): four Conv1d + BN + ReLU + pool."""

    def __init__(self, classes: int = 10):
        super().__init__()
        widths = [(1, 32, 80, 4), (32, 32, 3, 1), (32, 64, 3, 1), (64, 64, 3, 1)]
        self.features = nn.Sequential(*itertools.chain.from_iterable(
            (nn.Conv1d(c, n, k, stride=stride, padding=k // 2 if k == 3 else 0), nn.BatchNorm1d(n), nn.ReLU(),
             nn.MaxPool1d(4)) for c, n, k, stride in widths))
        self.pool, self.fc = nn.AdaptiveAvgPool1d(1), nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def audio():
    """An M5 with settled batch norms, and waveforms: sums of random tones, 1 s at 4 kHz."""
    torch.manual_seed(0)
    t = torch.arange(4000) / 4000
    freqs = torch.rand(48, 3, 1) * 800 + 50
    x = torch.sin(2 * torch.pi * freqs * t).sum(1, keepdim=True) + 0.05 * torch.randn(48, 1, 4000)
    model = M5()
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


def test_audio_cnn_converts_cheaper_with_same_outputs_shape(audio):
    model, x = audio
    ghost = ghostify.convert(model, example_inputs=x[:1]).eval()
    result = ghost.ghostify_result
    assert [row.name for row in result.replaced] == ["features.4", "features.8", "features.12"]
    assert all(row.norm is not None and not row.gather for row in result.replaced)  # BN taken in, no gathers
    assert ghost(x[:2]).shape == model(x[:2]).shape
    summary = ghostify.report(model, ghost, (x[:1],))
    assert summary.conv_flops_after == _macs(ghost, x[:1]) < _macs(model, x[:1])
    assert all(layer.ratio > 1.7 for layer in summary.layers)  # the 80-tap stem stays, as in 2-D
    assert summary.layers[0].original.startswith("Conv1d 32->32 3")


def test_audio_cnn_calibrate_beats_copy_and_deploys_exactly(audio, tmp_path):
    model, x = audio
    calibration, held_out = x[:32], x[32:]
    outputs = {}
    for init in ("copy", "calibrate"):
        extra = {"calibration_data": calibration} if init == "calibrate" else {}
        ghost = ghostify.convert(model, s=3, init=init, example_inputs=x[:1], **extra).eval()
        with torch.no_grad():
            outputs[init] = _relative(ghost(held_out), model(held_out))
    assert outputs["calibrate"] < outputs["copy"] and outputs["calibrate"] < 0.3, outputs
    with torch.no_grad():
        deployed = ghostify.deploy(ghost)
        torch.testing.assert_close(deployed(held_out), ghost(held_out), rtol=1e-4, atol=1e-5)
    ghostify.save(ghost, tmp_path / "m5.pt")
    with torch.no_grad():
        assert torch.equal(ghostify.load(tmp_path / "m5.pt", model=model).eval()(held_out), ghost(held_out))
    done = ghostify.export(ghost, tmp_path / "m5.onnx", input_size=(1, 4000))
    assert done.max_abs_diff < 1e-4


@pytest.mark.parametrize("dim", [1, 3])
def test_copy_is_exact_where_ghosts_are_exact(dim):
    """Half the filters are, by construction, a depthwise d-tap op applied to the other half: copy finds them."""
    g = torch.Generator().manual_seed(dim)
    n, c, k, d = 8, 4, 5, 3
    core = [slice(d // 2, k - d // 2)] * dim
    base = torch.zeros(n // 2, c, *[k] * dim)
    base[(slice(None), slice(None), *core)] = torch.randn(n // 2, c, *[k - 2 * (d // 2)] * dim, generator=g)
    cheap = torch.randn(n // 2, *[d] * dim, generator=g)
    ghosts = sum(cheap[(slice(None), *u)].view(-1, 1, *[1] * dim) *
                 torch.roll(base, [a - d // 2 for a in u], dims=list(range(2, 2 + dim)))
                 for u in itertools.product(range(d), repeat=dim))
    weight = torch.cat([base, ghosts])[torch.randperm(n, generator=g)]
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dim](c, n, k, padding=k // 2, bias=False)
    conv.weight.data.copy_(weight)
    model = nn.Sequential(nn.Identity(), conv)
    x = torch.nn.functional.pad(torch.randn(2, c, *[7] * dim, generator=g), [4] * (2 * dim))  # no border effect
    ghost = ghostify.convert(model, s=2, d=d, include_stem=True, example_inputs=x)
    assert ghost.ghostify_result.replaced[0].error < 1e-10
    with torch.no_grad():
        assert _relative(ghost(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18"])
def test_video_models_convert_deploy_and_count(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    ghost = ghostify.convert(model, example_inputs=x).eval()
    result = ghost.ghostify_result
    assert [s.reason for s in result.skipped] == ["stem conv (sees the raw input); include_stem=True (--include-stem) "
                                                  "converts it"]
    assert not any(row.gather for row in result.replaced)
    assert _macs(ghost, x) < 0.6 * _macs(model, x)
    with torch.no_grad():
        assert ghost(x).shape == model(x).shape
        deployed = ghostify.deploy(ghost)
        torch.testing.assert_close(deployed(x), ghost(x), rtol=1e-4, atol=1e-5)


def test_cli_takes_one_to_three_spatial_sizes(tmp_path):
    from click.testing import CliRunner

    from ghostify.cli import main

    factory = tmp_path / "nets.py"
    factory.write_text("import torch.nn as nn\n\n"
                       "def audio():\n    return nn.Sequential(nn.Conv1d(1, 8, 9, stride=4), nn.ReLU(),"
                       " nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16))\n\n"
                       "def video():\n    return nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 16, 3))\n")
    runner = CliRunner()
    for factory_name, size in (("audio", ["1", "400"]), ("video", ["3", "6", "16", "16"])):
        out = tmp_path / f"{factory_name}.pt"
        result = runner.invoke(main, ["convert", f"{factory}:{factory_name}", "--input-size", *size, "-o", str(out)])
        assert result.exit_code == 0, result.stderr
        loaded = ghostify.load(out, trust_source=True)
        assert loaded.ghostify_result.input_shapes == [(1, *map(int, size))]
        assert isinstance(loaded[2], ghostify.GhostModule) and loaded[2].dim == len(size) - 1
        onnx = tmp_path / f"{factory_name}.onnx"
        result = runner.invoke(main, ["export", str(out), "--trust-source", "-o", str(onnx)])
        assert result.exit_code == 0 and "max abs diff" in result.stdout, result.stderr
