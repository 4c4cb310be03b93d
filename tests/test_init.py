"""Initialisers: copy is exact where ghosts are exact, keeps channel order through folds and gathers; calibrate
beats copy on a trained model; calibration data is checked before any work; fitted models round-trip."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ghostify
from ghostify import GhostModule


def _ghost_filters(n: int, c: int, k: int, d: int, generator: torch.Generator, stride: int = 1) -> torch.Tensor:
    """``n`` shuffled k x k filters: half random on a centred core, half a random d x d cheap op (taps ``stride``
    input pixels apart, as on a strided conv's output) applied to one of those."""
    margin = stride * (d // 2)
    base = torch.zeros(n // 2, c, k, k)
    base[:, :, margin: k - margin, margin: k - margin] = torch.randn(n // 2, c, k - 2 * margin, k - 2 * margin,
                                                                   generator=generator)
    cheap = torch.randn(n // 2, d, d, generator=generator)
    ghosts = sum(cheap[:, uy, ux, None, None, None] *
                 torch.roll(base, (stride * (uy - d // 2), stride * (ux - d // 2)), dims=(2, 3))
                 for uy in range(d) for ux in range(d))
    return torch.cat([base, ghosts])[torch.randperm(n, generator=generator)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, optionally with an identity shortcut around the second pair."""

    def __init__(self, weight: torch.Tensor, residual: bool):
        super().__init__()
        n, c = weight.shape[:2]
        self.stem = nn.Conv2d(3, c, 1, bias=False)
        self.conv1 = nn.Conv2d(c, n, weight.shape[2], padding=weight.shape[2] // 2, bias=False)
        self.conv1.weight.data.copy_(weight)
        self.bn1, self.relu = nn.BatchNorm2d(n), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(n, n, 3, padding=1, bias=False), nn.BatchNorm2d(n)
        self.residual = residual

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(self.stem(x))))
        return self.bn2(self.conv2(y)) + (y if self.residual else 0)


def _settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm statistics that match the model's own outputs (a few train-mode passes), then eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    with torch.no_grad():
        for batch in x.split(4):
            model.train()(batch)
    return model.eval()


@pytest.mark.parametrize("k, stride, primary_kernel", [(5, 1, None), (5, 2, None), (3, 1, 1), (7, 1, 5)])
def test_copy_reproduces_a_layer_whose_filters_are_ghosts(k, stride, primary_kernel):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 12, k, stride=stride, padding=k // 2, bias=False)
    d = 1 if primary_kernel == 1 else 3
    conv.weight.data.copy_(_ghost_filters(12, 6, k, d, g, stride))
    if primary_kernel == 1:  # ghosts are scaled copies of filters that only use the centre tap
        conv.weight.data[:, :, [0, 2]] = 0
        conv.weight.data[:, :, :, [0, 2]] = 0
    model = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), conv)
    x = F.pad(torch.randn(2, 3, 12, 12, generator=g), (4, 4, 4, 4))  # a zero margin: no border effect
    ghost = ghostify.convert(model, s=2, d=d, primary_kernel=primary_kernel, init="copy", example_inputs=x)
    assert isinstance(ghost[1], GhostModule)
    with torch.no_grad():
        assert _relative(ghost(x), model(x)) < 1e-5
    assert ghost.ghostify_result.replaced[0].error < 1e-10


@pytest.mark.parametrize("s", [2, 3])
def test_copy_scaled_copies_with_bias_exact_everywhere(s):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 8, 3, 3, generator=g)
    scale = torch.randn(4, s - 1, generator=g)
    weight = torch.cat([base] + [scale[:, j, None, None, None] * base for j in range(s - 1)])
    order = torch.randperm(len(weight), generator=g)
    conv = nn.Conv2d(8, len(weight), 3, padding=1)
    conv.weight.data.copy_(weight[order])
    bias = torch.randn(4, generator=g)
    conv.bias.data.copy_(torch.cat([bias] + [scale[:, j] * bias + 0.3 for j in range(s - 1)])[order])
    model = nn.Sequential(nn.Conv2d(3, 8, 1), conv)
    x = torch.randn(2, 3, 9, 9, generator=g)
    ghost = ghostify.convert(model, s=s, d=1, example_inputs=x)
    with torch.no_grad():
        assert _relative(ghost(x), model(x)) < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_copy_keeps_channel_order_through_bn_relu_conv_and_residual(residual):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 6, 3, 3, generator=g)
    weight = torch.cat([base, torch.randn(8, 1, 1, 1, generator=g) * base])[torch.randperm(16, generator=g)]
    x = torch.randn(16, 3, 10, 10, generator=g)
    model = _settled(Chain(weight, residual), x)
    ghost = ghostify.convert(model, s=2, d=1, include="conv1", example_inputs=x)
    (row,) = ghost.ghostify_result.replaced
    assert row.gather == residual  # folded into bn1 and conv2 unless the shortcut reads the output too
    assert row.error < 1e-10  # measured after bn1, before the in-place ReLU changes its output
    with torch.no_grad():
        assert _relative(ghost(x), model(x)) < 1e-5
    if not residual:
        assert not torch.equal(ghost.conv2.weight, model.conv2.weight)  # the permutation went into the reader


def test_copy_is_closer_than_random_and_reports_errors(digits_model):
    model, x = digits_model
    held_out = x[-300:]
    with torch.no_grad():
        reference = model(held_out).argmax(1)
    agreement = {}
    for init in ("random", "copy"):
        ghost = ghostify.convert(model, s=2, init=init, example_inputs=x[:64])
        with torch.no_grad():
            agreement[init] = (ghost(held_out).argmax(1) == reference).float().mean().item()
        layers = ghostify.report(model, ghost, (x[:1],)).to_dict()["layers"]
        assert all((layer["reconstruction_error"] is None) == (init == "random") for layer in layers)
    assert agreement["copy"] > agreement["random"] + 0.25, agreement


def test_calibrate_lowers_every_layer_error_on_a_trained_model(digits_model):
    model, x = digits_model
    calibration, held_out = x[:256], x[-300:]
    errors, outputs, agreement = {}, {}, {}
    with torch.no_grad():
        reference = model(held_out)
    for init in ("copy", "calibrate"):
        extra = {"calibration_data": calibration} if init == "calibrate" else {}
        # align=1: every layer at s = 4 (aligned, the 32-wide layers would keep 16 intrinsic maps, as at s = 2)
        ghost = ghostify.convert(model, s=4, init=init, example_inputs=calibration[:64], align=1, **extra)
        errors[init] = [row.error for row in ghost.ghostify_result.replaced]
        with torch.no_grad():
            out = ghost(held_out)
        outputs[init] = _relative(out, reference)
        agreement[init] = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert len(errors["copy"]) == 3
    assert all(c < p for c, p in zip(errors["calibrate"], errors["copy"])), errors
    assert outputs["calibrate"] < outputs["copy"]
    # s=4 and no training: calibrate keeps most of the original's predictions, copy alone does not (measured
    # 61-81% against 16-26%, depending on how the small net trained; chance is 10%)
    assert agreement["calibrate"] > max(0.5, agreement["copy"] + 0.2), agreement


def test_calibrated_model_round_trips_bit_identically(tmp_path, digits_model):
    model, x = digits_model
    ghost = ghostify.convert(model, init="calibrate", calibration_data=[(x[:32], None), (x[32:64], None)]).eval()
    assert [row.gather for row in ghost.ghostify_result.replaced] == [False, False, False]  # the last one: into fc
    ghostify.save(ghost, tmp_path / "g.pt")
    loaded = ghostify.load(tmp_path / "g.pt", model=model).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x[:8]), ghost(x[:8]))


class Untouchable(nn.Module):
    """A model whose forward must not run: calibration data is checked first."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        raise AssertionError("work started before the calibration data was checked")


@pytest.mark.parametrize("data, error, message", [
    (torch.randn(4, 1, 8, 8), ValueError, r"shape \(N, 3, 8, 8\), got \(4, 1, 8, 8\)"),
    (torch.randn(4, 8, 8), ValueError, r"shape \(N, 3, 8, 8\), got \(4, 8, 8\)"),
    (torch.zeros(0, 3, 8, 8), ValueError, "empty"),
    ([], ValueError, "empty"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), ValueError, "floating point"),
    ("images/", TypeError, "tensor or an iterable"),
    ([[1, 2]], TypeError, "item of type int"),
    (None, ValueError, "need calibration_data"),
])
def test_bad_calibration_data_is_refused_before_any_work(data, error, message):
    with pytest.raises(error, match=message):
        ghostify.convert(Untouchable(), init="calibrate", calibration_data=data, example_inputs=torch.randn(1, 3, 8, 8))


class TwoEyes(nn.Module):
    """Two inputs, each through its own conv stack, joined by a linear head."""

    def __init__(self):
        super().__init__()
        self.left, self.right = (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                               nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24),
                                               nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()) for _ in range(2))
        self.head = nn.Linear(48, 10)

    def forward(self, a, b):
        return self.head(torch.cat([self.left(a), self.right(b)], 1))


def test_calibrate_a_model_with_two_inputs(digits_model):
    _, x = digits_model
    torch.manual_seed(0)
    model = TwoEyes()
    with torch.no_grad():  # settle the batch norms on the data
        model.train()(x[:256], x[:256].flip(3))
    model.eval()
    pairs = [(x[:128], x[:128].flip(3), None), (x[128:256], x[128:256].flip(3), None)]  # (inputs..., target)
    errors = {}
    for init in ("copy", "calibrate"):
        extra = {"calibration_data": pairs} if init == "calibrate" else {}
        ghost = ghostify.convert(model, s=4, include="*.3", init=init, example_inputs=(x[:64], x[:64].flip(3)),
                                 **extra)
        errors[init] = {row.name: row.error for row in ghost.ghostify_result.replaced}
    assert sorted(errors["calibrate"]) == ["left.3", "right.3"]
    assert all(errors["calibrate"][name] < 0.5 * errors["copy"][name] for name in errors["copy"]), errors
    with pytest.raises(TypeError, match="takes 2 inputs"):  # one tensor for two inputs: refused before any work
        ghostify.convert(model, init="calibrate", calibration_data=x, example_inputs=(x[:1], x[:1]))


def test_calibration_data_without_calibrate_is_refused():
    with pytest.raises(ValueError, match="only used by init='calibrate'"):
        ghostify.convert(Untouchable(), calibration_data=torch.randn(2, 3, 8, 8))


def test_choose_keeps_the_maps_the_ghosts_were_made_from():
    """Output maps whose second half are depthwise 3x3 filterings of the first (weaker than the maps they
    come from, and only partly invertible): the first half must be intrinsic, every ghost paired with its
    source, nothing lost. (A swap rule that forgot an intrinsic map's own value once swapped each pair.)"""
    from ghostify.init.calibrate import map_pairing
    from ghostify.init.fit import choose, unexplained

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), GhostModule(8, 16, 3, padding=1)).eval()
    with torch.no_grad():
        y = model(torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(0)))
    pairing = map_pairing(GhostModule(2, 2, 1, d=3), y, torch.ones(16), torch.Generator().manual_seed(0))
    choice = choose([pairing], 2)
    assert sorted(choice.intrinsic.tolist()) == list(range(8))
    assert torch.equal(choice.ghost, choice.intrinsic + 8)
    assert unexplained(pairing, choice) < 1e-4
