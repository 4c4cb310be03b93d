"""ghostify.deploy: folded, cat-free inference form with the converted model's outputs."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import NormAct
from torch import nn

import ghostify
from ghostify import models as zoo
from ghostify.deployment import DeployedGhost

SMALL = torch.randn(2, 3, 64, 64)


def with_random_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows in the outputs."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def assert_same_outputs(reference: nn.Module, deployed: nn.Module, x: torch.Tensor = SMALL) -> None:
    with torch.no_grad():
        expected, actual = reference(x), deployed(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("name, s, d", [
    ("resnet18", 2, 3), ("resnet50", 4, 1), ("vgg11_bn", 3, 5), ("mobilenet_v3_small", 3, 3),
    ("efficientnet_b0", 2, 3),
])
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_deploy_torchvision_models_keep_outputs(name, s, d, runtime):
    original = torchvision.models.get_model(name)
    ghost = with_random_statistics(ghostify.convert(original, s=s, d=d, example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost, runtime=runtime)
    assert deployed.ghostify_deploy.method == "fx"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) or runtime == "onnxruntime"
    assert_same_outputs(ghost, deployed)


@pytest.mark.parametrize("absorb_norm", [True, False])
def test_deploy_folds_every_ghost_norm_in_resnet(absorb_norm):
    ghost = with_random_statistics(ghostify.convert(torchvision.models.resnet18(), example_inputs=SMALL[:1],
                                                    absorb_norm=absorb_norm))
    deployed = ghostify.deploy(ghost)
    replaced = len(ghost.ghostify_result.replaced)
    deployed_ghosts = [m for m in deployed.modules() if isinstance(m, DeployedGhost)]
    assert len(deployed.ghostify_deploy.ghosts) == len(deployed_ghosts) == replaced
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    # the GhostNet form folds into its two convs; the linear form needs an affine on the intrinsic maps
    assert all(m.folded_norm != absorb_norm and (m.scale is None) == absorb_norm for m in deployed_ghosts)
    assert deployed.ghostify_deploy.memory_format == "channels_last"
    assert_same_outputs(ghost, deployed)


def test_deploy_folds_norms_with_their_own_forward():
    """A norm whose forward calls ``F.batch_norm`` and then its activation (timm's ``BatchNormAct2d``) folds
    into the conv or Ghost module before it, in the original and the converted model; the activation stays."""
    original = with_random_statistics(torchvision.models.resnet18(norm_layer=NormAct))
    norms = [name for name, module in original.named_modules() if isinstance(module, NormAct)]
    for model in (original, ghostify.convert(original, example_inputs=SMALL[:1]).eval()):
        deployed = ghostify.deploy(model)
        assert sorted(fold.split(" -> ")[0] for fold in deployed.ghostify_deploy.folded) == sorted(norms)
        assert not [node for node in deployed.graph.nodes if node.target is torch.nn.functional.batch_norm]
        assert_same_outputs(model, deployed)
    # the norms' ``x.ndim`` checks are dropped, so each Ghost module takes the ReLU after it as its epilogue
    assert not [node for node in deployed.graph.nodes if node.target is torch._assert]
    assert deployed.ghostify_deploy.epilogues == len(model.ghostify_result.replaced)


class ChecksValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        torch._assert(x.dim() == 4, "a 4-D input")
        y = self.conv(x)
        torch._assert(torch.isfinite(y).all(), "finite outputs")
        return y


def test_deploy_drops_shape_checks_and_keeps_value_checks():
    model = ChecksValues().eval()
    deployed = ghostify.deploy(model)
    checks = [node for node in deployed.graph.nodes if node.target is torch._assert]
    assert [node.args[1] for node in checks] == ["finite outputs"]
    assert_same_outputs(model, deployed)


# one model per torchvision family with dense convs to convert, each with another (s, d)
FORM_CASES = [("alexnet", 2, 1), ("vgg11_bn", 3, 3), ("resnet50", 4, 5), ("resnext50_32x4d", 5, 7),
              ("densenet121", 2, 7), ("googlenet", 3, 1), ("mobilenet_v2", 4, 3), ("mnasnet0_5", 5, 5),
              ("efficientnet_b0", 2, 5), ("shufflenet_v2_x0_5", 3, 7), ("squeezenet1_1", 4, 1),
              ("regnet_y_400mf", 5, 3), ("inception_v3", 2, 3)]


@pytest.mark.parametrize("name, s, d", FORM_CASES)
def test_ghost_form_deploys_to_the_converted_models_outputs(name, s, d):
    """Norms (and ReLUs) taken into the Ghost modules fold into their two convs: no norm or affine remains."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96) if name == "inception_v3" else SMALL
    original = torchvision.models.get_model(name)
    ghost = with_random_statistics(ghostify.convert(original, s=s, d=d, example_inputs=x[:1]))
    has_norms = any(isinstance(m, nn.BatchNorm2d) for m in original.modules())
    assert any(row.norm for row in ghost.ghostify_result.replaced) == has_norms  # AlexNet, SqueezeNet have none
    deployed = ghostify.deploy(ghost)
    assert all(m.scale is None for m in deployed.modules() if isinstance(m, DeployedGhost))
    # every ghost run is a multiplier-1 depthwise conv, the kind CPU runtimes have fast kernels for
    cheap = [run[0] for m in deployed.modules() if isinstance(m, DeployedGhost) for run in m.cheap]
    assert cheap and all(c.groups == c.in_channels == c.out_channels for c in cheap)
    assert_same_outputs(ghost, deployed, x)


def test_deploy_trimmed_ghost_module_and_original_model():
    """n not divisible by s: the cheap conv's extra channels get an identity norm and are cut."""
    model = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                          nn.Conv2d(10, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7))
    ghost = with_random_statistics(ghostify.convert(model, s=3, d=3, include_stem=True, example_inputs=SMALL[:1]))
    assert_same_outputs(ghost, ghostify.deploy(ghost))
    assert_same_outputs(with_random_statistics(model), ghostify.deploy(model))


def test_deploy_ghostnet_inner_norms_fold():
    ghost = with_random_statistics(zoo.get_model("ghostnet_050"))
    deployed = ghostify.deploy(ghost)
    assert_same_outputs(ghost, deployed)


class DataDependent(nn.Module):
    """The identity, through data-dependent control flow: torch.fx cannot trace what holds it."""

    def forward(self, x):
        return x if x.sum() > -1e9 else -x


class Untraceable(nn.Module):
    """No part of it traces, so deploy folds pairs inside Sequentials."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1),
                                  nn.BatchNorm2d(16), nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.body(x)


def test_deploy_untraceable_model_falls_back_to_sequentials():
    """(Ghost module, BN) pairs of the linear form fold inside the Sequential."""
    ghost = with_random_statistics(ghostify.convert(Untraceable(), s=2, include_stem=True, absorb_norm=False,
                                                    example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost)
    assert deployed.ghostify_deploy.method == "sequential"
    assert len(deployed.ghostify_deploy.folded) == 2
    assert_same_outputs(ghost, deployed)


class GhostThenNorm(nn.Module):
    """A Ghost module whose cheap operation ends in a ReLU (so the BN after it cannot fold), then a foldable
    Ghost + BN pair; ``traceable=False`` adds data-dependent control flow."""

    def __init__(self, traceable: bool):
        super().__init__()
        self.body = nn.Sequential(ghostify.GhostModule(3, 8, 3, padding=1, activation_layer=nn.ReLU), nn.BatchNorm2d(8),
                                  ghostify.GhostModule(8, 16, 3, padding=1, s=3), nn.BatchNorm2d(16),
                                  *([] if traceable else [DataDependent()]))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("traceable", [True, False])
def test_deploy_folds_the_same_pairs_traced_or_not(traceable):
    model = with_random_statistics(GhostThenNorm(traceable))
    deployed = ghostify.deploy(model)
    assert deployed.ghostify_deploy.method == ("fx" if traceable else "sequential")
    assert [entry.split(" -> ")[1] for entry in deployed.ghostify_deploy.folded] == ["body.2"]
    assert_same_outputs(model, deployed)


class TracedBody(nn.Module):
    """A ResNet-18 body that traces behind data-dependent control flow that does not, as a detection model's
    backbone sits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
        self.gate = DataDependent()

    def forward(self, x):
        return self.body(self.gate(x)).flatten(1)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_deploy_untraceable_model_deploys_its_traced_parts_as_graphs(runtime):
    ghost = with_random_statistics(ghostify.convert(TracedBody(), example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost, runtime=runtime)
    result = deployed.ghostify_deploy
    assert result.method == "fx parts" and isinstance(deployed.body, torch.fx.GraphModule)
    assert len(result.ghosts) == len(ghost.ghostify_result.replaced) and "body.1 -> body.0" in result.folded
    alone = ghostify.deploy(ghost.body, runtime=runtime).ghostify_deploy  # the body as a model of its own
    # a ReLU or add + ReLU after each; in onnxruntime only those whose shortcut is a projection's parts, in
    # layer2 and layer3 (layer4's modules keep their gathers: the body's output is the model's)
    assert result.epilogues == alone.epilogues == (14 if runtime == "torch" else 2)
    assert result.parts_shortcuts == alone.parts_shortcuts == 2
    assert_same_outputs(ghost, deployed)


def test_deploy_returns_new_model_and_refuses_training_mode():
    ghost = ghostify.convert(torchvision.models.resnet18(), example_inputs=SMALL[:1])
    with pytest.raises(RuntimeError, match="eval"):
        ghostify.deploy(ghost)
    ghost.eval()
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    ghostify.deploy(ghost)
    assert all(torch.equal(before[k], v) for k, v in ghost.state_dict().items())
    assert type(ghost.layer1[0].conv1).__name__ == "GhostModule"
    with pytest.raises(ValueError, match="runtime"):
        ghostify.deploy(ghost, runtime="tensorrt")


def test_resnet_epilogues_take_every_residual_add_and_relu():
    """In a ResNet-50 each Ghost module's ReLU, and each block's shortcut addition, are done as its halves are
    written: the deployed graph keeps only the stem's ReLU."""
    ghost = with_random_statistics(ghostify.convert(torchvision.models.resnet50(), example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost)
    assert deployed.ghostify_deploy.epilogues == 16 * 3  # conv1, conv2 (ReLU) and conv3 (+ shortcut, ReLU)
    assert deployed.ghostify_deploy.parts_shortcuts == 4  # each stage's projection, added in parts
    left = [node.target for node in deployed.graph.nodes if node.op != "call_module" and node.op != "placeholder"]
    assert not any("add" in str(target) for target in left)
    assert_same_outputs(ghost, deployed)
    out = deployed(SMALL)  # outside torch.no_grad(): the deploy form is inference-only, its weights frozen
    assert not out.requires_grad and not any(p.requires_grad for p in deployed.parameters())
    with torch.no_grad():
        assert torch.equal(out, deployed(SMALL))


class Projection(nn.Module):
    """A block of Ghost modules whose shortcut is a projection; their ratios say how each splits its output."""

    def __init__(self, s_conv: int, s_project: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = ghostify.GhostModule(16, 48, 3, padding=1, s=s_conv, inner_bn=True)
        self.project = ghostify.GhostModule(16, 48, 1, s=s_project, inner_bn=True)
        self.head = nn.Conv2d(48, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(F.relu(self.conv(x) + self.project(x)))


@pytest.mark.parametrize("runtime", ["torch", "inductor", "onnxruntime"])
@pytest.mark.parametrize("s_project, parts", [(2, 1), (3, 0)])
def test_projection_shortcut_comes_in_parts_when_split_alike(runtime, s_project, parts):
    """A shortcut that is a Ghost module's output, split like the module it is added to, is added part by
    part; split otherwise (16 + 16 + 16 against 24 + 24), it is concatenated first. Same outputs either way."""
    model = with_random_statistics(Projection(2, s_project))
    deployed = ghostify.deploy(model, runtime=runtime, compile=False)
    assert deployed.ghostify_deploy.parts_shortcuts == parts
    assert deployed.ghostify_deploy.epilogues == (1 if runtime != "onnxruntime" else parts)
    assert_same_outputs(model, deployed)


class BroadcastShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.gate, self.head = nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(self.bn(self.conv(y)) + self.gate(y)))  # a one-channel shortcut, broadcast


def test_epilogue_with_a_broadcast_shortcut_keeps_outputs():
    ghost = with_random_statistics(ghostify.convert(BroadcastShortcut(), example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost)
    assert deployed.ghostify_deploy.epilogues == 1
    assert_same_outputs(ghost, deployed)


def test_inductor_runtime_compiles_the_ghost_form_with_the_same_outputs():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 8, 1))
    ghost = with_random_statistics(ghostify.convert(model, example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost, runtime="inductor")
    assert deployed.ghostify_deploy.epilogues == 1 and hasattr(deployed, "_orig_mod")  # compiled
    with torch.inference_mode():
        assert_same_outputs(ghost, deployed, SMALL.contiguous(memory_format=torch.channels_last))
    functional = ghostify.deploy(ghost, runtime="inductor", compile=False)
    assert not hasattr(functional, "_orig_mod")
    assert_same_outputs(ghost, functional)


class Activations(nn.Module):
    """Conv + BN + each activation an epilogue takes (as a module, as a function), and SiLU after a shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(6))
        self.bns = nn.ModuleList(nn.BatchNorm2d(16) for _ in range(6))
        self.acts = nn.ModuleList([nn.ReLU6(inplace=True), nn.SiLU(inplace=True), nn.Hardswish()])
        self.head = nn.Conv2d(16, 4, 1)  # reads the last output: no Ghost module keeps a gather

    def forward(self, x):
        x = self.stem(x)
        for conv, bn, act in zip(self.convs, self.bns, self.acts):
            x = act(bn(conv(x)))
        x = F.relu6(self.bns[3](self.convs[3](x)))
        x = F.hardswish(self.bns[4](self.convs[4](x)))
        return self.head(F.silu(x + self.bns[5](self.convs[5](x))))


@pytest.mark.parametrize("runtime", ["torch", "inductor"])
def test_epilogues_take_relu6_silu_and_hardswish(runtime):
    """Each activation after a Ghost module, also after its shortcut, is done as the module's halves are
    written (for inductor: pointwise inputs of the cat), with the converted model's outputs."""
    ghost = with_random_statistics(ghostify.convert(Activations(), example_inputs=SMALL[:1]))
    deployed = ghostify.deploy(ghost, runtime=runtime, compile=False)
    names = [m.activation for m in deployed.modules() if isinstance(m, DeployedGhost)]
    assert names == ["relu6", "silu", "hardswish", "relu6", "hardswish", "silu", None]  # the head: nothing after it
    assert deployed.ghostify_deploy.epilogues == 6
    left = [node.target for node in deployed.graph.nodes if node.op == "call_function"]
    assert not left  # no activation, no addition left in the graph
    assert_same_outputs(ghost, deployed, SMALL * 4)  # inputs wide enough to reach ReLU6's upper clip
