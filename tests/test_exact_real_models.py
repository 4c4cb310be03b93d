"""Values, not only shapes, on real architectures: with filters built so that every converted layer is exactly
a Ghost module (half its filters scaled copies of the other half, d = 1), ``copy`` must reproduce each layer
and the whole network. A wrong channel order, a wrong fold or a wrong permutation of a reader shows at once."""

import pytest
import torch
import torchvision
from conftest import NormAct
from torch import nn

import ghostify


def _exact_ghost_filters(model: nn.Module, generator: torch.Generator) -> None:
    """Rewrite every dense conv (beyond the stem) of ``model``, in place, as an exact s = 2, d = 1 Ghost layer.

    Layers with the same width share which channels are intrinsic and which copies which (layers writing into
    one tensor must share a channel choice), each with its own filters and copy scales. A layer read by a
    grouped conv (RegNet's ``f.a``, read by ``f.b``) copies whole groups, ``ceil(groups / 2)`` of them intrinsic.
    """
    structure = {}
    named = dict(model.named_modules())
    widths = {name.replace(".f.b.", ".f.a."): module.in_channels // module.groups for name, module in named.items()
              if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels}
    convs = [(name, m) for name, m in named.items() if isinstance(m, nn.Conv2d) and m.groups == 1]
    for name, conv in convs[1:]:
        n, width = conv.out_channels, widths.get(name, 1)
        if (n, width) not in structure:
            groups = torch.randperm(n // width, generator=generator)
            m = -(-len(groups) // 2)
            source = torch.randperm(m, generator=generator)[: len(groups) - m]  # one ghost group each
            channels = torch.arange(n).view(-1, width)
            ghosts, copied = channels[groups[m:]].flatten(), channels[groups[:m][source]]
            if width > 1:  # shuffled within each copied group
                copied = copied.gather(1, torch.stack([torch.randperm(width, generator=generator) for _ in source]))
            structure[n, width] = (ghosts, copied.flatten())
        ghosts, copied = structure[n, width]
        weight = torch.randn(conv.weight.shape, generator=generator) / conv.weight[0].numel() ** 0.5
        scale = (torch.rand(len(ghosts), generator=generator) + 0.5) * torch.sign(torch.randn(len(ghosts),
                                                                                              generator=generator))
        weight[ghosts] = scale.view(-1, 1, 1, 1) * weight[copied]
        conv.weight.data.copy_(weight)


def _settle(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch norm statistics of ``model`` on ``x`` (so that the norms neither blow up nor vanish)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the passes
    with torch.no_grad():
        model.train()
        for batch in x.split(4):
            model(batch)
    return model.eval()


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("resnet50", 64), ("vgg11_bn", 32), ("densenet121", 64),
                                        ("mobilenet_v2", 64), ("googlenet", 64), ("regnet_x_400mf", 64),
                                        ("resnet18 with NormAct", 64)])
def test_copy_reproduces_exact_ghost_layers_inside_real_models(name, size):
    """``resnet18 with NormAct``: timm's kind of norm, a batch norm and activation with their own forward."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = (torchvision.models.resnet18(norm_layer=NormAct) if name.endswith("NormAct")
             else torchvision.models.get_model(name))
    _exact_ghost_filters(model, generator)
    x = torch.randn(16, 3, size, size, generator=generator)
    _settle(model, x)
    ghost = ghostify.convert(model, s=2, d=1, example_inputs=x[:4]).eval()
    rows = ghost.ghostify_result.replaced
    assert len(rows) >= 5
    assert max(row.error for row in rows) < 1e-6, [(row.name, row.error) for row in rows if row.error >= 1e-6]
    with torch.no_grad():
        expected, actual = model(x), ghost(x)
        assert ((actual - expected).norm() / expected.norm()).item() < 1e-4
        deployed = ghostify.deploy(ghost)
        assert ((deployed(x) - expected).norm() / expected.norm()).item() < 1e-4
