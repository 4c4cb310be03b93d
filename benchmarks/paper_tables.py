"""The paper's parameter and FLOP figures (Tables 3-7) beside ghostify's, with the % difference.

Every network is built with ghostify's zoo or torchvision, converted with ``ghostify.convert`` and counted
with ``ghostify.Counts``. Each figure is also worked out by hand (``arithmetic``: forward hooks on the
*original* network and the Ghost module's formulas), a cross-check that does not go through fvcore or the
converted model. FLOPs are multiply-adds of convolutions and linear layers (the paper's convention).

Conventions that reproduce the paper (``/work/notes/paper_tables_readme.md`` explains how they were found):
CIFAR (Tables 3-5) converts every conv, the stem included; ResNet-50 (Table 6) keeps its 7x7 stem, as the
authors' Ghost-ResNet code does; the primary conv keeps each conv's own kernel; linear layers stay and count.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/paper_tables.py             # the tables (about 10 s)
    OMP_NUM_THREADS=1 python benchmarks/paper_tables.py --explain   # plus the conventions that were ruled out
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torchvision
from torch import nn

import ghostify
from ghostify.models import get_model, list_models, model_input_size

TOLERANCE = 0.05


@dataclass(frozen=True)
class Setting:
    """One network as built and counted: a model name and, for Ghost versions, how it was converted."""

    model: str
    s: Optional[int] = None  # None: count the model as it is
    d: int = 3
    include_stem: bool = False


@dataclass(frozen=True)
class Row:
    """One line of a paper table: its figures, and which of them the paper's own reference code contradicts."""

    table: str
    label: str
    setting: Setting
    params: float
    flops: float
    disagrees: Tuple[str, ...] = ()  # "params" / "flops": checked against the arithmetic, not the paper

    @property
    def id(self) -> str:
        return f"table{self.table}-{self.label}".replace(" ", "_").replace("=", "")


def _cifar(s: int, d: int) -> Setting:
    return Setting("cifar_vgg16", s, d, include_stem=True)


ROWS: List[Row] = [
    Row("7", "GhostNet 0.5x", Setting("ghostnet_050"), 2.6e6, 42e6),
    Row("7", "GhostNet 1.0x", Setting("ghostnet_100"), 5.2e6, 141e6),
    Row("7", "GhostNet 1.3x", Setting("ghostnet_130"), 7.3e6, 226e6),
    Row("3", "VGG-16 d=1", _cifar(2, 1), 7.6e6, 157e6),
    Row("3", "VGG-16 d=3", _cifar(2, 3), 7.7e6, 158e6),
    Row("3", "VGG-16 d=5", _cifar(2, 5), 7.7e6, 160e6),
    Row("3", "VGG-16 d=7", _cifar(2, 7), 7.7e6, 163e6),
    Row("4", "VGG-16 s=2", _cifar(2, 3), 7.7e6, 158e6),
    Row("4", "VGG-16 s=3", _cifar(3, 3), 5.2e6, 107e6),
    Row("4", "VGG-16 s=4", _cifar(4, 3), 4.0e6, 80e6),
    Row("4", "VGG-16 s=5", _cifar(5, 3), 3.3e6, 65e6),
    Row("5", "VGG-16", Setting("cifar_vgg16"), 15e6, 313e6),
    Row("5", "Ghost-VGG-16 s=2", _cifar(2, 3), 7.7e6, 158e6),
    Row("5", "ResNet-56", Setting("cifar_resnet56"), 0.85e6, 125e6),
    Row("5", "Ghost-ResNet-56 s=2", Setting("cifar_resnet56", 2, 3, include_stem=True), 0.43e6, 63e6),
    Row("6", "ResNet-50", Setting("resnet50"), 25.6e6, 4.1e9),
    Row("6", "Ghost-ResNet-50 s=2", Setting("resnet50", 2, 3), 13.0e6, 2.2e9, disagrees=("params",)),
    Row("6", "Ghost-ResNet-50 s=4", Setting("resnet50", 4, 3), 6.5e6, 1.2e9, disagrees=("params",)),
]


def build(name: str) -> nn.Module:
    """A freshly initialised network from ghostify's zoo or torchvision, in eval mode."""
    torch.manual_seed(0)
    model = get_model(name) if name in list_models() else torchvision.models.get_model(name, weights=None)
    return model.eval()


def example_input(name: str) -> torch.Tensor:
    size = model_input_size(name) if name in list_models() else (3, 224, 224)
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0))


def arithmetic(model: nn.Module, x: torch.Tensor, s: Optional[int], d: int = 3, include_stem: bool = False,
               intrinsic: str = "ceil") -> Tuple[float, float]:
    """(params, conv + linear multiply-adds) of ``model`` after replacing its dense convs by Ghost modules.

    Worked out from the original network: a ``c -> n`` conv with a ``k x k`` kernel and an ``H x W`` output
    becomes ``m`` intrinsic maps (``c * m * k * k`` weights) plus ``m * (s - 1)`` depthwise ``d x d`` ghosts,
    each costing its weights times ``H * W``. ``intrinsic="ceil"`` takes ``m = ceil(n / s)`` (the authors'
    code and ghostify; surplus ghosts are computed, then dropped), ``"exact"`` takes ``m = n / s`` (Eq. 4-5).
    ``s=None`` counts the network as it is. The stem is the conv that reads the input tensor itself. A batch
    norm that reads a conv's output is taken into the Ghost module, as norms after both of its convs (``m * s``
    channels, as in the authors' code).
    """
    calls: List[Tuple[nn.Module, bool, torch.Size]] = []
    normed: set = set()
    outputs = {}

    def hook(module, inputs, output):
        if isinstance(module, nn.BatchNorm2d):
            if id(inputs[0]) in outputs:
                normed.add(outputs[id(inputs[0])])
            return
        calls.append((module, inputs[0] is x, output.shape))
        outputs[id(output)] = module

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()

    params, flops, replaced = float(sum(p.numel() for p in model.parameters())), 0.0, set()
    for module, is_stem, shape in calls:
        if isinstance(module, nn.Linear):
            flops += module.in_features * math.prod(shape)
            continue
        c, n, (kh, kw) = module.in_channels, module.out_channels, module.kernel_size
        area = shape[0] * math.prod(shape[2:])  # output positions, over the batch
        dense = module.groups == 1 and type(module) is nn.Conv2d and (include_stem or not is_stem)
        if s is None or not dense or n < s:
            flops += c // module.groups * kh * kw * n * area
            continue
        m = math.ceil(n / s) if intrinsic == "ceil" else n / s
        flops += (c * m * kh * kw + m * (s - 1) * d * d) * area
        if module not in replaced:  # a conv called twice is one set of weights
            replaced.add(module)
            bias = 0 if module.bias is None else m * s - n  # primary and cheap convs both carry a bias
            norm = 2 * (m * s - n) if module in normed else 0  # weight and bias of the surplus ghosts' norm
            params += c * m * kh * kw + m * (s - 1) * d * d - module.weight.numel() + bias + norm
    return params, flops


@dataclass(frozen=True)
class Measured:
    params: int
    flops: int  # conv + linear multiply-adds (``Counts.conv_linear_flops``)
    flops_total: int  # fvcore's total, batch norm and pooling included
    arithmetic: Tuple[float, float]


@lru_cache(maxsize=None)
def measure(setting: Setting) -> Measured:
    """Build, convert (when ``setting.s`` is set) and count one network; cached per setting."""
    model, x = build(setting.model), example_input(setting.model)
    if setting.s is None:
        net = model
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = ghostify.convert(model, s=setting.s, d=setting.d, include_stem=setting.include_stem,
                                   example_inputs=x, init="random", align=1)  # the paper's m = ceil(n / s)
    counts = ghostify.Counts(net, (x,))
    return Measured(counts.params, counts.conv_linear_flops, counts.flops,
                    arithmetic(model, x, setting.s, setting.d, setting.include_stem))


def diff(ours: float, paper: float) -> float:
    """Relative difference of ours from the paper's figure, in percent."""
    return 100.0 * (ours - paper) / paper


def print_tables(rows: List[Row]) -> None:
    head = (f"{'table':<5} {'network':<21} {'params (M)':>10} {'paper':>6} {'diff':>7}   "
            f"{'FLOPs (M)':>9} {'paper':>6} {'diff':>7}   arithmetic")
    print(head)
    print("-" * len(head))
    for row in rows:
        got = measure(row.setting)
        same = (got.params, got.flops) == tuple(int(round(v)) for v in got.arithmetic)
        cells = []
        for what, ours, paper in (("params", got.params, row.params), ("flops", got.flops, row.flops)):
            mark = "*" if what in row.disagrees else ("!" if abs(diff(ours, paper)) > 100 * TOLERANCE else " ")
            cells.append(f"{ours / 1e6:>{10 if what == 'params' else 9}.3f} {paper / 1e6:>6.5g} "
                         f"{diff(ours, paper):>+6.1f}%{mark}")
        print(f"{row.table:<5} {row.label:<21} {cells[0]}  {cells[1]}  {'same' if same else 'DIFFERS'}")
    print("FLOPs: multiply-adds of conv + linear layers. *: the paper disagrees with its own reference code "
          "(see notes); !: more than 5% off.")


def print_explanations() -> None:
    """The conventions that were tried and ruled out, each with the figures it gives."""
    print("\nstem converted or not (FLOPs, M; the paper's CIFAR figures are truncated, ImageNet's rounded):")
    for row in ROWS:
        if row.setting.s is None or row.table == "7":
            continue
        alt = Setting(row.setting.model, row.setting.s, row.setting.d, not row.setting.include_stem)
        a, b = measure(row.setting).flops, measure(alt).flops
        print(f"  table {row.table} {row.label:<21} paper {row.flops / 1e6:>6.5g}  "
              f"stem {'on ' if row.setting.include_stem else 'off'} {a / 1e6:8.2f}  "
              f"stem {'off' if row.setting.include_stem else 'on '} {b / 1e6:8.2f}")
    print("\nm = ceil(n/s) (ghostify, reference code) vs m = n/s exactly (params M / FLOPs M):")
    for s in (3, 4, 5):
        model, x = build("cifar_vgg16"), example_input("cifar_vgg16")
        ceil, exact = arithmetic(model, x, s, 3, True), arithmetic(model, x, s, 3, True, intrinsic="exact")
        print(f"  VGG-16 s={s}: ceil {ceil[0] / 1e6:.3f} / {ceil[1] / 1e6:.2f}   exact {exact[0] / 1e6:.3f} / "
              f"{exact[1] / 1e6:.2f}")
    print("\nGhost-ResNet-56 with d=1 instead of d=3 (params M / FLOPs M; paper 0.43 / 63):")
    got = measure(Setting("cifar_resnet56", 2, 1, include_stem=True))
    print(f"  d=1: {got.params / 1e6:.3f} / {got.flops / 1e6:.2f}")
    print("\nfvcore's total (batch norm and pooling included) instead of conv + linear (FLOPs M):")
    for row in ROWS:
        if row.table in ("7", "5"):
            got = measure(row.setting)
            print(f"  {row.label:<21} paper {row.flops / 1e6:>6.5g}  conv+linear {got.flops / 1e6:8.2f} "
                  f"({diff(got.flops, row.flops):+.1f}%)  fvcore total {got.flops_total / 1e6:8.2f} "
                  f"({diff(got.flops_total, row.flops):+.1f}%)")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=sorted({row.table for row in ROWS}), help="only this table")
    parser.add_argument("--explain", action="store_true", help="also print the conventions that were ruled out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # fvcore's tracing calls torch.jit.script
    print_tables([row for row in ROWS if args.table in (None, row.table)])
    if args.explain:
        print_explanations()


if __name__ == "__main__":
    main()
