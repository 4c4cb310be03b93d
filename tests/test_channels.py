"""Coupled channels: converted layers leave no output gather where the layers around them can absorb the channel
order; layers writing into one tensor share one choice; the outputs are those of the gathered model."""

import pytest
import torch
import torchvision
from conftest import NormAct
from torch import fx, nn
from torchvision.ops.misc import FrozenBatchNorm2d

import ghostify
from ghostify.init import channels


def _gathered(model: nn.Module, **kwargs) -> nn.Module:
    """The same conversion with every layer keeping its output gather (nothing absorbed by its neighbours)."""
    apply = channels.Coupling.apply
    channels.Coupling.apply = lambda self, orders, ghosts: None
    try:
        return ghostify.convert(model, **kwargs)
    finally:
        channels.Coupling.apply = apply


def _settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm statistics of the model's own activations, and non-trivial affine parameters; eval mode."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.5, 0.5, generator=generator)
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _scaled_copies(n: int, c: int, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``n`` 3x3 filters in which channel ``order[n//2 + j]`` is a scaled copy of channel ``order[j]``."""
    base = torch.randn(n // 2, c, 3, 3, generator=generator)
    weight = torch.cat([base, torch.randn(n // 2, 1, 1, 1, generator=generator) * base])
    return weight[order.argsort()]


class Stage(nn.Module):
    """Three residual blocks writing into one stream, the last read by a linear classifier."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, n, 3, padding=1, bias=False)
        self.convs = nn.ModuleList(nn.Conv2d(n, n, 3, padding=1, bias=False) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(n) for _ in range(4))
        self.fc = nn.Linear(n * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bns[0](self.stem(x)))
        for conv, bn in zip(self.convs, self.bns[1:]):
            x = torch.relu(x + bn(conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


def test_writers_of_one_stream_share_one_choice_and_stay_exact():
    """Every writer has the same ghost structure under one channel order, which only a shared choice can keep
    exact; the stream's channels are then stored in that order, read by the next convs and the classifier."""
    generator = torch.Generator().manual_seed(0)
    model = Stage()
    order = torch.randperm(8, generator=generator)
    for conv in model.convs:
        conv.weight.data.copy_(_scaled_copies(8, 8, order, generator))
    x = torch.randn(16, 3, 10, 10, generator=generator)
    model = _settled(model, x)
    ghost = ghostify.convert(model, s=2, d=1, example_inputs=x[:2])
    rows = ghost.ghostify_result.replaced
    assert [row.name for row in rows] == ["convs.0", "convs.1", "convs.2"]
    assert not any(row.gather for row in rows)
    assert max(row.error for row in rows) < 1e-10
    with torch.no_grad():
        assert torch.allclose(ghost(x), model(x), atol=1e-4)
    assert not torch.equal(ghost.fc.weight, model.fc.weight)  # the classifier reads the stream's new order
    assert not torch.equal(ghost.stem.weight, model.stem.weight)  # the stem writes into the stream in it


def test_output_layer_keeps_its_gather_with_the_reason_and_round_trips(tmp_path):
    model = _settled(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)),
                     torch.randn(8, 3, 12, 12))
    x = torch.randn(2, 3, 12, 12)
    ghost = ghostify.convert(model, include_stem=True, example_inputs=x).eval()
    first, last = ghost.ghostify_result.replaced
    assert (first.gather, first.gather_reason) == (False, None)
    assert last.gather and last.gather_reason == "reaches the model's output"
    assert "+gather" in ghostify.report(model, ghost, (x,)).layers[1].replacement
    ghostify.save(ghost, tmp_path / "g.pt")
    loaded = ghostify.load(tmp_path / "g.pt", model=model).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), ghost(x))


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x)[:, :4]).sum()


def test_op_that_mixes_channels_keeps_the_gather():
    ghost = ghostify.convert(Sliced(), include="conv1", include_stem=True, example_inputs=torch.randn(1, 3, 9, 9))
    (row,) = ghost.ghostify_result.replaced
    assert row.gather and "getitem" in row.gather_reason


def test_coupled_layers_with_different_s_keep_gathers():
    model = _settled(Stage(), torch.randn(8, 3, 10, 10))
    ghost = ghostify.convert(model, s={"convs.1": 4, "*": 2}, d=1, example_inputs=torch.randn(1, 3, 10, 10))
    reasons = {row.name: row.gather_reason for row in ghost.ghostify_result.replaced}
    assert all(reason and "other s (2, 4)" in reason for reason in reasons.values()), reasons


FAMILIES = ["resnet18", "resnet50", "vgg16", "densenet121", "mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small",
            "regnet_x_400mf", "regnet_y_400mf"]


@pytest.mark.parametrize("name", FAMILIES)
def test_torchvision_model_has_no_gather_and_matches_the_gathered_model(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = _settled(torchvision.models.get_model(name), torch.randn(4, 3, 64, 64))
    ghost = ghostify.convert(model, s=2, example_inputs=x[:1]).eval()
    kept = [(row.name, row.gather_reason) for row in ghost.ghostify_result.replaced if row.gather]
    assert not kept
    reference = _gathered(model, s=2, example_inputs=x[:1]).eval()
    assert sum(row.gather for row in reference.ghostify_result.replaced) > 0  # there was an order to absorb
    deployed = ghostify.deploy(ghost)
    assert isinstance(deployed, fx.GraphModule)
    assert all(getattr(module, "out_index", None) is None for module in deployed.modules())
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(ghost(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        assert torch.allclose(deployed(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "densenet121", "mobilenet_v2"])
def test_calibrated_model_has_no_gather_and_matches_the_gathered_model(name):
    """``calibrate`` refits every layer with its own channel choice; the order is still absorbed everywhere."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    model = _settled(torchvision.models.get_model(name), torch.randn(4, 3, 64, 64))
    options = {"s": 2, "example_inputs": x[:1], "init": "calibrate", "calibration_data": x}
    ghost = ghostify.convert(model, **options).eval()
    assert not [row.name for row in ghost.ghostify_result.replaced if row.gather]
    reference = _gathered(model, **options).eval()
    deployed = ghostify.deploy(ghost)
    assert not any("index_select" in str(node.target) for node in deployed.graph.nodes)
    with torch.no_grad():
        expected = reference(x[:2])
        assert torch.allclose(ghost(x[:2]), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        assert torch.allclose(deployed(x[:2]), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


class Wrapped(nn.Module):
    """A traceable ResNet-18 body behind data-dependent control flow, as a detection model's backbone sits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        if x.sum() > -1e9:  # torch.fx cannot trace the whole model
            x = x * 1
        return self.head(self.body(x).mean((2, 3)))


def test_a_model_that_does_not_trace_is_grouped_within_the_parts_that_do():
    """Inside the traced part, each conv takes in its norm, and only the layers whose stream reaches the part's
    output keep gathers; the others' orders are absorbed inside it, and the model computes what the same
    conversion with every gather kept computes."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = _settled(Wrapped(), torch.randn(4, 3, 64, 64))
    ghost = ghostify.convert(model, s=2, example_inputs=x[:1]).eval()
    result = ghost.ghostify_result
    assert result.method == "hooks"
    norms = {row.name: row.norm for row in result.replaced}  # the GhostNet form, as if the model traced
    assert norms["body.4.0.conv1"] == "body.4.0.bn1" and isinstance(ghost.body[4][0].bn1, nn.Identity)
    assert all(norms.values())
    kept = {row.name: row.gather_reason for row in result.replaced if row.gather}
    assert sorted(kept) == ["body.7.0.conv2", "body.7.0.downsample.0", "body.7.1.conv2"]  # layer4's stream
    assert set(kept.values()) == {"reaches the output of body"}
    reference = _gathered(model, s=2, example_inputs=x[:1]).eval()
    assert sum(row.gather for row in reference.ghostify_result.replaced) == len(result.replaced)
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(ghost(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        assert torch.allclose(ghostify.deploy(ghost)(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_detection_model_keeps_gathers_only_at_its_backbones_outputs_and_outside_it():
    """torchvision's Faster R-CNN does not trace; its backbone with the feature pyramid does (the README's
    count of gathers)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                                 min_size=128, max_size=128).eval()
    ghost = ghostify.convert(model, example_inputs=([torch.rand(3, 128, 128)],))
    rows = ghost.ghostify_result.replaced
    kept = {row.name: row.gather_reason for row in rows if row.gather}
    assert len(rows) == 63 and len(kept) == 7
    assert not [name for name in kept if name.startswith("backbone.body.")]  # the ResNet: none
    assert sorted(name for name, why in kept.items() if why == "reaches the output of backbone") == [
        f"backbone.fpn.layer_blocks.{i}.0" for i in range(4)]


def test_frozen_batch_norms_take_the_channel_order_and_fold():
    """torchvision's FrozenBatchNorm2d (its detection backbones' norm) is a per-channel layer like a batch norm:
    no gather, the same outputs as with every gather kept, and deploy folds each one."""
    generator = torch.Generator().manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval()
    frozen = [module for module in model.modules() if isinstance(module, FrozenBatchNorm2d)]
    for norm in frozen:  # non-trivial statistics, so a wrong order or fold shows in the outputs
        for buffer, low in ((norm.weight, 0.5), (norm.bias, -0.5), (norm.running_mean, -0.5), (norm.running_var, 0.5)):
            buffer.uniform_(low, low + 1, generator=generator)
    x = torch.randn(2, 3, 64, 64)
    ghost = ghostify.convert(model, s=2, example_inputs=x[:1]).eval()
    assert not [row.name for row in ghost.ghostify_result.replaced if row.gather]
    reference = _gathered(model, s=2, example_inputs=x[:1]).eval()
    deployed = ghostify.deploy(ghost)
    assert len(deployed.ghostify_deploy.folded) == len(frozen)
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(ghost(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        assert torch.allclose(deployed(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_training_mode_model_is_grouped_as_it_runs_in_eval():
    """Inception-v3 in training mode has an auxiliary branch that does not run in eval mode (and fails at
    224x224); the channel analysis traces the eval graph, so every layer still shares a gather-free order."""
    model = torchvision.models.inception_v3(init_weights=False)
    assert model.training
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 224, 224))
    assert not [row.name for row in ghost.ghostify_result.replaced if row.gather]


class SpatialMean(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> mean over time -> linear: the mean keeps channels in place."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean(-1))


def test_spatial_mean_before_a_linear_is_absorbed():
    model = SpatialMean().eval()
    x = torch.randn(4, 2, 50)
    ghost = ghostify.convert(model, example_inputs=x).eval()
    assert [(row.name, row.gather) for row in ghost.ghostify_result.replaced] == [("body.3", False)]
    assert not torch.equal(ghost.fc.weight, model.fc.weight)  # the order went into the classifier
    reference = _gathered(model, example_inputs=x).eval()  # the same fit, kept in order by a gather
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), reference(x), rtol=1e-4, atol=1e-5)


def test_norms_with_their_own_forward_take_the_channel_order():
    """ResNet-18 with ``NormAct`` norms: every layer's order is absorbed by the norm functions' own statistics
    (no gather), with the same outputs as with every gather kept; a norm whose statistics are read twice is not
    per channel."""
    model = _settled(torchvision.models.resnet18(norm_layer=NormAct), torch.randn(8, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    ghost = ghostify.convert(model, example_inputs=x[:1]).eval()
    assert not [row.name for row in ghost.ghostify_result.replaced if row.gather]
    with torch.no_grad():
        expected = _gathered(model, example_inputs=x[:1]).eval()(x)
        assert torch.allclose(ghost(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    names = [row.name for row in ghost.ghostify_result.replaced]  # each layer's norm, for the fits' weights
    coupling = channels.couple(model, names, (x[:1],))
    assert [type(coupling.bn[name]) for name in names] == [NormAct] * len(names)
    assert all(coupling.bn[name] is model.get_submodule(name.replace("conv", "bn").replace("downsample.0",
                                                                                        "downsample.1"))
               for name in names)

    class TwiceRead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 16, 3, padding=1), NormAct(16)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(self.norm(self.conv(torch.relu(x)))) + torch.mul(x.mean(), self.norm.running_mean).sum()

    twice = _settled(TwiceRead(), torch.randn(8, 3, 16, 16))
    ghost = ghostify.convert(twice, include_stem=True, example_inputs=x[:1, :, :16, :16])
    rows = {row.name: row for row in ghost.ghostify_result.replaced}
    assert rows["conv"].gather and "batch_norm" in rows["conv"].gather_reason


class FnLinear(nn.Linear):
    """A linear layer with its own forward that calls ``F.linear`` (timm's ``Linear``); torch.fx traces into it."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_linear_with_its_own_forward_takes_the_channel_order():
    """The last conv's order is absorbed by the input weights of the ``F.linear`` call that reads it, also across
    a flatten of its spatial positions."""
    model = _settled(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.AvgPool2d(4), nn.Flatten(), FnLinear(16 * 4, 10)), torch.randn(8, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    ghost = ghostify.convert(model, example_inputs=x[:1]).eval()
    assert [row.name for row in ghost.ghostify_result.replaced] == ["3"]
    assert not ghost.ghostify_result.replaced[0].gather
    with torch.no_grad():
        expected = _gathered(model, example_inputs=x[:1]).eval()(x)
        assert torch.allclose(ghost(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
