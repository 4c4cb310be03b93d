"""``align``: intrinsic maps and ghost runs on multiples of a channel block where a layer's width allows it;
the fit, the outputs and the saved plan follow the wider module, and the layers left unaligned are named."""

import pytest
import torch
from torch import nn

import ghostify
from ghostify.module import GhostModule, intrinsic_count


@pytest.mark.parametrize("n, s, width, align, expected", [
    (144, 2, 1, 16, 80),   # 72 is off the block: 80 intrinsic + 64 ghosts
    (256, 2, 1, 16, 128),  # already on it
    (64, 3, 1, 16, 32),    # ceil(64 / 3) = 22 -> 32
    (24, 2, 1, 16, 12),    # 24 is no multiple of 16: unaligned
    (16, 2, 1, 16, 8),     # 16 intrinsic maps would leave no ghost
    (144, 2, 1, 1, 72),    # align 1: ceil(n / s)
    (400, 2, 16, 1, 208),  # 25 groups of 16: 13 whole groups
    (104, 2, 8, 16, 56),   # groups of 8, width no multiple of 16: whole groups only
    (96, 4, 8, 16, 32),    # both: multiples of 16 and of 8
])
def test_intrinsic_count(n, s, width, align, expected):
    m = intrinsic_count(n, s, width, align)
    assert m == expected
    assert -(-n // s) <= m < n and m % width == 0


class Planted(nn.Module):
    """conv(3 -> 48) -> BN -> ReLU -> conv(48 -> 24) -> BN -> mean -> linear; the 48-wide conv is an exact
    s = 2, d = 1 Ghost layer (24 filters and 24 scaled copies)."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48)
        self.b, self.bn_b = nn.Conv2d(48, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)
        base = torch.randn(24, 3, 3, 3, generator=generator)
        weight = torch.cat([base, (torch.rand(24, 1, 1, 1, generator=generator) + 0.5) * base])
        self.a.weight.data.copy_(weight[torch.randperm(48, generator=generator)])

    def forward(self, x):
        y = self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))
        return self.fc(y.mean((2, 3)))


def _settled(model: nn.Module, generator: torch.Generator) -> nn.Module:
    for bn in (model.bn_a, model.bn_b):
        bn.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 8, 8, generator=generator))
    return model.eval()


def test_aligned_module_is_wider_exact_and_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    model = _settled(Planted(generator), generator)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    ghost = ghostify.convert(model, s=2, d=1, include_stem=True, align=16, example_inputs=x[:1]).eval()
    rows = {row.name: row for row in ghost.ghostify_result.replaced}
    assert (rows["a"].intrinsic, ghost.a.intrinsic_channels) == (32, 32)  # 24 would be off the 16-channel block
    assert (rows["b"].intrinsic, ghost.b.intrinsic_channels) == (None, 12)  # 24 wide: cannot align
    assert rows["a"].error < 1e-10 and not rows["a"].gather  # the planted copies are still found
    assert ghostify.report(model, ghost, (x[:1],)).layers[0].replacement.endswith(" m=32")
    note = ghost.ghostify_result.notes["unaligned"]
    assert note.startswith("1 of 2 layers") and "b" in note.split(": ")[-1]
    exact = ghostify.convert(model, s=2, d=1, include="a", include_stem=True, align=16, example_inputs=x[:1]).eval()
    assert exact.a.intrinsic_channels == 32
    with torch.no_grad():
        assert torch.allclose(exact(x), model(x), atol=1e-5)
        assert torch.allclose(ghostify.deploy(ghost)(x), ghost(x), atol=1e-5)
    ghostify.save(ghost, tmp_path / "g.pt")
    loaded = ghostify.load(tmp_path / "g.pt", model=Planted(torch.Generator().manual_seed(1))).eval()
    assert loaded.a.intrinsic_channels == 32
    with torch.no_grad():
        assert torch.equal(loaded(x), ghost(x))


def test_align_one_keeps_ceil_n_over_s_and_no_note():
    generator = torch.Generator().manual_seed(0)
    model = _settled(Planted(generator), generator)
    ghost = ghostify.convert(model, s=2, include_stem=True, align=1, example_inputs=torch.randn(1, 3, 8, 8))
    assert [m.intrinsic_channels for m in ghost.modules() if isinstance(m, GhostModule)] == [24, 12]
    assert "unaligned" not in ghost.ghostify_result.notes


@pytest.mark.parametrize("align", [0, -16, 2.5, True])
def test_bad_align_is_refused(align):
    with pytest.raises(ValueError, match="align must be a positive integer"):
        ghostify.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), align=align)


def test_module_refuses_an_intrinsic_count_out_of_range():
    with pytest.raises(ValueError, match=r"intrinsic_channels must be in \[ceil\(n / s\), n\) = \[8, 16\)"):
        GhostModule(4, 16, 3, intrinsic_channels=16)


class Narrow(nn.Module):
    """A stem, then two 32-wide convs: at s=4 aligned to 16, 16 intrinsic maps leave one run of ghosts."""

    def __init__(self):
        super().__init__()
        self.stem, self.b, self.c = (nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                                     nn.Conv2d(32, 32, 3, padding=1))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.stem(x)))))


def test_alignment_that_leaves_fewer_ghost_runs_lowers_s():
    """A higher s never costs more than a lower one: a module whose aligned intrinsic maps leave fewer runs of
    ghosts than s - 1 uses the smaller s (computing no ghost it would drop), and the note says so."""
    model, x = Narrow(), torch.randn(1, 3, 16, 16)
    flops = {}
    for s in (2, 4):
        ghost = ghostify.convert(model, s=s, example_inputs=x, init="random")
        flops[s] = ghostify.report(model, ghost, (x,)).flops_after
        assert [(row.s, ghost.get_submodule(row.name).cheap_conv.out_channels) for row in
                ghost.ghostify_result.replaced] == [(2, 16), (2, 16)]
    assert flops[4] == flops[2]
    assert "b (s=4 -> 2, m=16)" in ghost.ghostify_result.notes["lowered s"]
    paper = ghostify.convert(model, s=4, example_inputs=x, init="random", align=1)
    assert [row.s for row in paper.ghostify_result.replaced] == [4, 4]
    assert "lowered s" not in paper.ghostify_result.notes
    assert ghostify.report(model, paper, (x,)).flops_after < flops[2]
