"""A layer read by a grouped conv (RegNet, ResNeXt) chooses its ghosts in whole groups, so the grouped conv
absorbs the channel order and no gather is left; its module then has ``width * ceil(groups / s)`` intrinsic
maps. Where the grouped conv's outputs cannot move, the groups stay in place."""

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify.init.fit import Grain, Pairing, choose, filter_pairing, pairs, unexplained


class GroupedBlock(nn.Module):
    """dense conv -> BN -> ReLU -> grouped conv -> BN -> ReLU -> dense conv (+ pool and classifier)."""

    def __init__(self, n: int = 16, groups: int = 4, head: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, n, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(n)
        self.b = nn.Conv2d(n, n, 3, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(n)
        self.c = nn.Conv2d(n, 8, 1)
        self.head = head

    def forward(self, x):
        y = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(self.stem(x)))))))
        return self.c(y).mean((2, 3)) if self.head else y


def _planted(model: GroupedBlock, pairs, generator: torch.Generator) -> GroupedBlock:
    """Make group ``b`` of ``model.a``'s filters scaled copies of group ``a``'s, in a shuffled order, for each
    ``(a, b)`` in ``pairs``; BN statistics settled on random inputs."""
    width = model.b.in_channels // model.b.groups
    weight = model.a.weight.data
    for a, b in pairs:
        shuffle = torch.randperm(width, generator=generator)
        scale = torch.rand(width, 1, 1, 1, generator=generator) + 0.5
        weight[b * width:(b + 1) * width] = scale * weight[a * width:(a + 1) * width][shuffle]
    for bn in (model.bn_a, model.bn_b):
        bn.momentum = None
        bn.weight.data.uniform_(0.5, 1.5, generator=generator)
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 8, 8, generator=generator))
    return model.eval()


def test_whole_groups_are_paired_and_reproduced_exactly():
    """Groups 2 and 3 copy groups 0 and 1 (channels shuffled): the choice finds that pairing, and the
    converted layer reproduces the original with no gather while the grouped conv reads a new order."""
    generator = torch.Generator().manual_seed(0)
    model = _planted(GroupedBlock(), [(0, 3), (1, 2)], generator)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    ghost = ghostify.convert(model, s=2, d=1, include="a", example_inputs=x[:1]).eval()
    (row,) = ghost.ghostify_result.replaced
    assert (row.gather, row.intrinsic) == (False, None)  # 2 of 4 groups: ceil(16 / 2) is whole groups already
    assert row.error < 1e-10
    groups = torch.tensor(row.order).view(4, 4) // 4
    assert torch.equal(groups, groups[:, :1].expand(4, 4))  # every run of 4 outputs is one original group
    assert sorted(groups[:, 0].tolist()[:2]) in ([0, 1], [0, 2], [1, 3], [2, 3])  # one of each copied pair
    assert not torch.equal(ghost.b.weight, model.b.weight)  # the grouped conv took the order
    with torch.no_grad():
        assert torch.allclose(ghost(x), model(x), atol=1e-5)
        assert torch.allclose(ghostify.deploy(ghost)(x), model(x), atol=1e-5)


def test_an_odd_number_of_groups_widens_the_module_to_whole_groups(tmp_path):
    """5 groups of 4 at s=2: 3 whole groups are intrinsic (12 maps, not ceil(20 / 2) = 10), 2 are ghosts."""
    generator = torch.Generator().manual_seed(1)
    model = _planted(GroupedBlock(20, 5), [(4, 0), (1, 3)], generator)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    ghost = ghostify.convert(model, s=2, d=1, include="a", example_inputs=x[:1]).eval()
    (row,) = ghost.ghostify_result.replaced
    assert (row.gather, row.intrinsic, ghost.a.intrinsic_channels) == (False, 12, 12)
    assert row.error < 1e-10
    with torch.no_grad():
        assert torch.allclose(ghost(x), model(x), atol=1e-5)
    ghostify.save(ghost, tmp_path / "g.pt")
    loaded = ghostify.load(tmp_path / "g.pt", model=GroupedBlock(20, 5)).eval()
    assert loaded.a.intrinsic_channels == 12
    with torch.no_grad():
        assert torch.equal(loaded(x), ghost(x))


def test_groups_stay_in_place_when_the_grouped_output_reaches_the_model_output():
    """The grouped conv's outputs are the model's: its groups cannot move, so group 1 must be the ghosts of
    group 0, within-group order still free. Planted that way, it is exact."""
    generator = torch.Generator().manual_seed(2)
    model = _planted(GroupedBlock(8, 2, head=False), [(0, 1)], generator)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    ghost = ghostify.convert(model, s=2, d=1, include="a", example_inputs=x[:1]).eval()
    (row,) = ghost.ghostify_result.replaced
    assert not row.gather and row.error < 1e-10
    assert sorted(row.order[:4]) == [0, 1, 2, 3] and sorted(row.order[4:]) == [4, 5, 6, 7]
    with torch.no_grad():
        assert torch.allclose(ghost(x), model(x), atol=1e-5)


class Concatenated(nn.Module):
    """A grouped conv reading the concatenation of two convs' outputs: its groups span both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(12, 4, 1, groups=4)

    def forward(self, x):
        return self.grouped(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))


def test_a_grouped_conv_reading_a_concatenation_keeps_gathers_with_the_reason():
    x = torch.randn(2, 3, 8, 8)
    model = Concatenated().eval()
    ghost = ghostify.convert(model, include_stem=True, example_inputs=x).eval()
    reasons = [row.gather_reason for row in ghost.ghostify_result.replaced]
    assert len(reasons) == 2 and all("read by grouped conv grouped (groups=4)" in r for r in reasons), reasons


def _pairing(weight: torch.Tensor) -> Pairing:
    """The 1x1 filter problem: candidate ``i`` explains target ``t`` by a multiple of its filter."""
    cross = (weight @ weight.T)[:, :, None]
    gram = weight.square().sum(1)[:, None, None]
    energy = weight.square().sum(1)
    return Pairing(cross, gram, energy, torch.ones(len(weight)))


def test_choose_in_groups_finds_the_planted_families():
    """6 groups of 3, s = 3: groups 3 and 4 copy group 0, groups 1 and 2 copy group 5 (channels shuffled). The
    group choice keeps whole groups and makes one of each family intrinsic, exactly; kept in place it
    cannot."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 3, 20, generator=generator)
    base[3] = 2 * base[0][[2, 0, 1]]
    base[4] = -base[0][[1, 2, 0]]
    base[1] = 0.5 * base[5]
    base[2] = 3 * base[5][[2, 1, 0]]
    pairing = _pairing(base.reshape(18, 20))
    choice = choose([pairing], 3, grain=Grain(3))
    assert len(choice.intrinsic) == 6 and len(choice.ghost) == 12
    family = {0: "a", 3: "a", 4: "a", 1: "b", 2: "b", 5: "b"}
    assert sorted(family[g] for g in (choice.intrinsic // 3).unique().tolist()) == ["a", "b"]  # copies are mutual
    runs = choice.order.view(6, 3) // 3
    assert torch.equal(runs, runs[:, :1].expand(6, 3))  # whole groups in every run of the module's outputs
    assert unexplained(pairing, choice) < 1e-5  # float32 products and the ridge
    fixed = choose([pairing], 3, grain=Grain(3, fixed=True))
    assert torch.equal(fixed.order // 3, torch.arange(6).repeat_interleave(3))  # every group in place
    assert unexplained(pairing, fixed) > 0.1  # group 2 made from group 0: not a copy


def test_groups_kept_in_place_pair_only_each_ghost_group_with_its_intrinsic_group():
    """1x1 filters, 4 groups of 4 kept in place, s = 2: ghost groups 2 and 3 are shuffled, scaled copies of
    groups 0 and 1. Only those two pairs of groups are multiplied (the other products stay 0: pairing costs
    n * width, not n * n) and the matching within each recovers its shuffle exactly."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 6, 1, 1, generator=generator)
    for a, b in ((0, 2), (1, 3)):
        shuffle = torch.randperm(4, generator=generator)
        weight[4 * b:4 * b + 4] = (torch.rand(4, 1, 1, 1, generator=generator) + 0.5) * weight[4 * a:4 * a + 4][shuffle]
    grain = Grain(4, fixed=True)
    runs = pairs(16, 2, 8, grain)
    assert runs == [(slice(0, 4), slice(8, 12)), (slice(4, 8), slice(12, 16))]
    pairing, _ = filter_pairing(weight, (1, 1), (1, 1), (1, 1), 3, torch.ones(16), runs)
    full, _ = filter_pairing(weight, (1, 1), (1, 1), (1, 1), 3, torch.ones(16))
    assert torch.count_nonzero(pairing.cross[:8, :8]) == 0 and torch.count_nonzero(pairing.cross[8:]) == 0
    assert torch.allclose(pairing.cross[4:8, 12:16], full.cross[4:8, 12:16])
    choice = choose([pairing], 2, grain=grain, m=8)
    assert torch.equal(choice.intrinsic, torch.arange(8))
    assert unexplained(full, choice) < 1e-5


@pytest.mark.parametrize("name", ["regnet_x_400mf", "regnet_y_400mf"])
@pytest.mark.parametrize("init", ["copy", "calibrate"])
def test_regnet_has_no_gather_in_its_deploy_graph(name, init):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(8, 3, 64, 64)
    ghost = ghostify.convert(model, s=2, example_inputs=x[:1], init=init,
                             **({"calibration_data": x} if init == "calibrate" else {})).eval()
    assert not [row.name for row in ghost.ghostify_result.replaced if row.gather]
    assert any(row.intrinsic for row in ghost.ghostify_result.replaced)  # some layers widened to whole groups
    deployed = ghostify.deploy(ghost)
    targets = {str(node.target) for node in deployed.graph.nodes}
    assert not any("index_select" in target or "gather" in target for target in targets)
    assert all(getattr(module, "out_index", None) is None for module in deployed.modules())
    with torch.no_grad():
        assert torch.allclose(deployed(x[:2]), ghost(x[:2]), rtol=1e-4, atol=1e-4)
