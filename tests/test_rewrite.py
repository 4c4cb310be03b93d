"""convert(): the policy, the two analysis paths, per-layer settings, validation, and no mutation."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ghostify
from ghostify import GhostModule, trace


def _reasons(model):
    return {item.name: item.reason for item in model.ghostify_result.skipped}


def _replaced(model):
    return [item.name for item in model.ghostify_result.replaced]


class Mixed(nn.Module):
    """A stem, a dense conv, a depthwise, a grouped, a transposed, a 1-D conv, a narrow conv, a functional conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dense = nn.Conv2d(16, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.narrow = nn.Conv2d(16, 1, 1)
        self.line = nn.Conv1d(1, 4, 3, padding=1)
        self.unused = nn.Conv2d(16, 16, 1)
        self.kernel = nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x):
        x = self.grouped(self.depthwise(self.dense(self.stem(x))))
        y = self.narrow(self.up(x))
        z = self.line(y.flatten(2)).view(y.shape[0], 4, y.shape[2], y.shape[3])
        return F.conv2d(z, self.kernel, padding=1, groups=4)


def test_rewrite_mixed_policy_reasons():
    ghost = ghostify.convert(Mixed(), example_inputs=torch.randn(1, 3, 8, 8))
    assert _replaced(ghost) == ["dense", "line"]  # a Conv1d inside a 2-D network converts too
    assert ghost.line.dim == 1 and ghost.line.cheap_conv.kernel_size == (3,)
    reasons = _reasons(ghost)
    assert "stem" in reasons["stem"]
    assert "depthwise" in reasons["depthwise"]
    assert "grouped" in reasons["grouped"]
    assert "transposed" in reasons["up"]
    assert "fewer than s=2" in reasons["narrow"]
    assert "never runs" in reasons["unused"]
    assert any("functional" in reason for reason in reasons.values())
    assert ghost.ghostify_result.method == "fx"


class SqueezeExcite(nn.Module):
    """A squeeze-and-excite pair of 1x1 convs on the pooled vector; then, at the boundaries of the rule, a 1x1
    conv on a single position a strided conv made (not pooled) and one on a pooled 2x2 map."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.down, self.tail, self.head = nn.Conv2d(16, 16, 3, stride=8, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(
            16, 16, 1)

    def forward(self, x):
        x = self.body(self.stem(x))
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.tail(self.down(x)).flatten(1) + self.head(F.adaptive_avg_pool2d(x, 2)).mean((2, 3))


class Untraceable(nn.Module):
    """``inner`` behind data-dependent control flow, which symbolic tracing cannot follow."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if x.sum() > -1e9 else x


def test_rewrite_keeps_convs_that_read_a_pooled_vector():
    ghost = ghostify.convert(SqueezeExcite(), example_inputs=torch.randn(1, 3, 8, 8))
    assert _replaced(ghost) == ["body", "down", "tail", "head"]
    assert all("pooled vector" in _reasons(ghost)[name] for name in ("fc1", "fc2"))
    wrapped = ghostify.convert(Untraceable(SqueezeExcite()), example_inputs=torch.randn(1, 3, 8, 8))
    assert wrapped.ghostify_result.method == "hooks"  # seen in the part that traces
    assert _replaced(wrapped) == ["inner." + name for name in _replaced(ghost)]
    se = ghostify.convert(torchvision.models.mobilenet_v3_small(), init="random")
    kept = [name for name, reason in _reasons(se).items() if "pooled vector" in reason]
    assert len(kept) == 2 * sum(".fc1" in name for name in kept) and kept
    assert not any(".fc" in name for name in _replaced(se))


def test_rewrite_include_stem_converts_it():
    ghost = ghostify.convert(Mixed(), include_stem=True, example_inputs=torch.randn(1, 3, 8, 8))
    assert isinstance(ghost.stem, GhostModule)


def test_rewrite_never_mutates_input():
    model = torchvision.models.resnet18().train()
    before = copy.deepcopy(model.state_dict())
    structure = repr(model)
    ghostify.convert(model, s=3, example_inputs=torch.randn(2, 3, 64, 64))
    assert repr(model) == structure
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched too


def test_rewrite_keeps_classes_paths_and_modes():
    model = torchvision.models.resnet18(num_classes=7)
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 64, 64))
    assert type(ghost) is torchvision.models.ResNet
    assert isinstance(ghost.layer1[0].conv1, GhostModule) and isinstance(ghost.fc, nn.Linear)
    assert isinstance(ghost.conv1, nn.Conv2d)
    assert ghost.training and ghost.layer1[0].conv1.training
    ghost.eval()
    assert not ghost.layer1[0].conv1.primary_conv.training
    assert ghost(torch.randn(2, 3, 64, 64)).shape == (2, 7)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.body

    def forward(self, x):
        return self.alias(self.body(self.stem(x)))


def test_rewrite_shared_conv_replaced_once_at_every_path():
    ghost = ghostify.convert(Shared(), example_inputs=torch.randn(1, 3, 8, 8))
    assert isinstance(ghost.body, GhostModule) and ghost.body is ghost.alias
    (row,) = ghost.ghostify_result.replaced
    assert row.calls == 2 and row.aliases == ["alias"]


class Branchy(nn.Module):
    """Data-dependent control flow: symbolic tracing fails, the hook fallback takes over."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.a(x) if x.sum() > -1e9 else self.b(x)


def test_rewrite_untraceable_model_uses_hooks():
    ghost = ghostify.convert(Branchy(), example_inputs=torch.randn(1, 3, 8, 8))
    assert ghost.ghostify_result.method == "hooks"
    assert _replaced(ghost) == ["a"]
    assert "stem" in _reasons(ghost)["stem"] and "never runs" in _reasons(ghost)["b"]
    assert ghost(torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)


def _clip_(sizes, x):
    """Changes the list it is given, as torchvision's Swin3D window helper does."""
    sizes[0] = min(sizes[0], x.shape[-1])
    return x


torch.fx.wrap("_clip_")  # a call in the traced graph, with the module's list as a constant argument


class ChangesAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.sizes = [64]

    def forward(self, x):
        return self.a(_clip_(self.sizes, self.stem(x)))


def test_rewrite_model_that_changes_a_list_it_is_given_is_traced():
    """torch.fx keeps constant lists immutable in its graph; the analysis passes them as the traced code does."""
    ghost = ghostify.convert(ChangesAList(), example_inputs=torch.randn(1, 3, 8, 8))
    assert ghost.ghostify_result.method == "fx" and _replaced(ghost) == ["a"]


class ReadsAWeight(nn.Module):
    """A conv whose weight the model's own code reads (timm's EdgeNeXt makes its positional encoding in the
    dtype of its projection's weight)."""

    def __init__(self):
        super().__init__()
        self.stem, self.body, self.projection = (nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                                 nn.Conv2d(16, 16, 1))

    def forward(self, x):
        grid = torch.ones_like(x[:, :1]).expand(-1, 16, -1, -1).to(self.projection.weight.dtype)
        return self.body(self.stem(x)) + self.projection(grid)


def test_rewrite_leaves_a_conv_whose_weight_the_model_reads():
    model = ReadsAWeight().eval()
    x = torch.randn(2, 3, 8, 8)
    ghost = ghostify.convert(model, example_inputs=x[:1])
    assert _replaced(ghost) == ["body"]
    assert _reasons(ghost)["projection"] == ("the model's code reads projection.weight, which a Ghost module does "
                                             "not have")
    assert ghost(x).shape == model(x).shape


def test_rewrite_model_whose_traced_graph_fails_uses_hooks(monkeypatch):
    """Where running the traced graph fails but the model runs, the analysis runs the model with hooks."""
    def fail(self, node):
        raise RuntimeError("a traced graph that does not run")

    monkeypatch.setattr(trace.ShapeRecorder, "run_node", fail)
    x = torch.randn(1, 3, 8, 8)
    model = ChangesAList().eval()
    ghost = ghostify.convert(model, example_inputs=x).eval()
    assert ghost.ghostify_result.method == "hooks" and _replaced(ghost) == ["a"]
    with torch.no_grad():
        assert ghost(x).shape == model(x).shape == (1, 8, 8, 8)


def test_rewrite_include_exclude_and_per_layer_settings():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    ghost = ghostify.convert(model, s={"layer4.*": 4}, d={"*downsample*": 1}, exclude=["layer1.*"], example_inputs=x)
    rows = {row.name: row for row in ghost.ghostify_result.replaced}
    assert not any(name.startswith("layer1.") for name in rows)
    assert "excluded by pattern 'layer1.*'" in _reasons(ghost)["layer1.0.conv1"]
    assert rows["layer4.0.conv1"].s == 4 and rows["layer3.0.conv1"].s == 2
    assert rows["layer2.0.downsample.0"].d == 1 and rows["layer2.0.conv1"].d == 3
    only = ghostify.convert(model, include="layer2.0.conv1", example_inputs=x)
    assert _replaced(only) == ["layer2.0.conv1"]
    assert _reasons(only)["layer2.0.conv2"] == "not matched by include"


def test_rewrite_unmatched_pattern_warns():
    with pytest.warns(UserWarning, match="exclude pattern 'nope.*' matches no convolution"):
        ghostify.convert(Shared(), exclude="nope.*", example_inputs=torch.randn(1, 3, 8, 8))


def test_rewrite_primary_kernel_that_cannot_fit_is_skipped_with_reason():
    class Valid(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.body = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.body(self.stem(x))

    ghost = ghostify.convert(Valid(), primary_kernel=1, example_inputs=torch.randn(1, 3, 8, 8))
    assert "cannot keep the output size" in _reasons(ghost)["body"]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"s": 1}, ValueError, "s must be an integer >= 2"),
    ({"d": 4}, ValueError, "d must be an odd integer"),
    ({"primary_kernel": 0}, ValueError, "primary_kernel must be positive"),
    ({"s": {"layer*": 0}}, ValueError, "s must be an integer >= 2, got 0"),
    ({"init": "magic"}, ValueError, "init must be one of"),
    ({"example_inputs": [1, 2]}, TypeError, "example_inputs must be a tensor"),
    ({"example_inputs": torch.randn(1, 5, 8, 8)}, ValueError, "fails on inputs of shape"),
])
def test_rewrite_bad_arguments_raise_clear_errors(kwargs, error, message):
    kwargs.setdefault("example_inputs", torch.randn(1, 3, 8, 8))
    with pytest.raises(error, match=message):
        ghostify.convert(Shared(), **kwargs)


def test_rewrite_rejects_models_without_convolutions():
    with pytest.raises(ValueError, match=r"has no convolution layer \(nn.Conv1d, nn.Conv2d or nn.Conv3d\)"):
        ghostify.convert(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), example_inputs=torch.randn(1, 3, 2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ghostify.convert("resnet18")


def test_rewrite_leaves_existing_ghost_modules_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GhostModule(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1))
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert _replaced(ghost) == ["2"]
    assert _reasons(ghost)["1.primary.0"] == "already part of a Ghost module"


def test_rewrite_takes_in_the_following_norm():
    """conv -> BN becomes one Ghost module in the GhostNet form (its cheap op reads normalised maps); the BN's
    paths become Identity; a BN that is not the conv's only reader stays."""
    model = torchvision.models.resnet18().eval()
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 64, 64)).eval()
    rows = {row.name: row for row in ghost.ghostify_result.replaced}
    assert rows["layer1.0.conv1"].norm == "layer1.0.bn1"
    assert rows["layer2.0.downsample.0"].norm == "layer2.0.downsample.1"
    assert type(ghost.layer1[0].bn1) is nn.Identity and type(ghost.layer2[0].downsample[1]) is nn.Identity
    primary_norm, cheap_norm = ghost.layer1[0].conv1.inner_norms
    assert primary_norm.eps == model.layer1[0].bn1.eps and cheap_norm.num_features == 32
    linear = ghostify.convert(model, example_inputs=torch.randn(1, 3, 64, 64), absorb_norm=False)
    assert linear.layer1[0].conv1.inner_norms is None and type(linear.layer1[0].bn1) is nn.BatchNorm2d


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(self.bn(y)) + y.mean()


def test_rewrite_keeps_a_norm_that_is_not_the_only_reader():
    ghost = ghostify.convert(SharedOutput(), include_stem=True, example_inputs=torch.randn(1, 3, 8, 8))
    assert ghost.ghostify_result.replaced[0].norm is None and type(ghost.bn) is nn.BatchNorm2d
