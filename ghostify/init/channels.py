"""Where a converted layer's outputs go, so its channel order can be fixed at no cost, and what follows it.

A fitted Ghost module makes the original channels in another order. When every path from the layer's output
runs through per-channel layers (batch norm, activations, pooling) into dense convolutions, the
permutation is folded into those layers' weights (zero inference cost); otherwise the module keeps an
``out_index`` gather. The layer's directly following batch norm, if any, tells how much each channel matters
and absorbs mean corrections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..module import GhostModule
from ..trace import GhostLeafTracer

_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                nn.Tanh, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.elu, F.hardswish, torch.sigmoid,
                          torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


@dataclass
class Consumers:
    """What reads one converted layer's output.

    Attributes:
        bn: the batch norm that is the layer's only reader (run once), or None.
        fold: batch norms and dense convs (or Ghost modules) to permute instead of gathering; None when the
            output reaches anything else (an addition, a concatenation, the model output, a shared layer).
    """

    bn: Optional[nn.BatchNorm2d] = None
    fold: Optional[List[nn.Module]] = None


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """``source`` is ``node``'s first argument and no other argument is a graph value."""
    return bool(node.args) and node.args[0] is source and not any(
        isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))


def _per_channel(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PER_CHANNEL)
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS
    return node.op == "call_method" and node.target in _PER_CHANNEL_METHODS


def _fold_targets(source: fx.Node, modules: Dict[str, nn.Module], runs: Dict[int, int]) -> Optional[List[nn.Module]]:
    """Modules whose channels can absorb a permutation of ``source``'s output, or None."""
    found: List[nn.Module] = []
    for user in source.users:
        module = modules.get(user.target) if user.op == "call_module" else None
        if not _only_input(user, source) or (module is not None and runs[id(module)] != 1 and
                                               not isinstance(module, _PER_CHANNEL)):
            return None
        if isinstance(module, GhostModule) or (type(module) is nn.Conv2d and module.groups == 1):
            found.append(module)
            continue
        if isinstance(module, nn.BatchNorm2d):
            found.append(module)
        elif not _per_channel(user, modules):
            return None
        more = _fold_targets(user, modules, runs)
        if more is None:
            return None
        found += more
    return found


def consumers(model: nn.Module, names: List[str]) -> Dict[str, Consumers]:
    """Readers of each named Ghost module of ``model``; plain ``Consumers()`` when the model does not trace."""
    try:
        graph = fx.GraphModule(model, GhostLeafTracer().trace(model)).graph
    except Exception:  # noqa: BLE001 - untraceable Python: every layer keeps its gather
        return {name: Consumers() for name in names}
    modules = dict(model.named_modules(remove_duplicate=False))
    runs: Dict[int, int] = {}
    nodes: Dict[str, List[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            runs[id(modules[node.target])] = runs.get(id(modules[node.target]), 0) + 1
            nodes.setdefault(node.target, []).append(node)
    found = {}
    for name in names:
        calls = [n for target, group in nodes.items() if modules[target] is modules[name] for n in group]
        if len(calls) != 1:
            found[name] = Consumers()
            continue
        users = list(calls[0].users)
        first = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        bn = first if isinstance(first, nn.BatchNorm2d) and runs[id(first)] == 1 else None
        found[name] = Consumers(bn, _fold_targets(calls[0], modules, runs))
    return found


def fold(ghost: GhostModule, order: torch.Tensor, targets: List[nn.Module]) -> None:
    """Drop ``ghost``'s gather: its output ``j`` is original channel ``order[j]``; permute the readers to match."""
    with torch.no_grad():
        for module in targets:
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
                    if tensor is not None:
                        tensor.copy_(tensor[order])
            else:
                conv = module.primary_conv if isinstance(module, GhostModule) else module
                conv.weight.copy_(conv.weight[:, order])
    ghost.set_out_index(None)
