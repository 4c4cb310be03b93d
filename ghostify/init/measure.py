"""Per-layer reconstruction error: how far each converted layer's output is from the original layer's.

Both models run on the same inputs; each converted layer sees the converted model's own inputs, so the
error includes what the layers before it changed. The figure is the relative MSE: the squared error over
the original output's variance (per channel, so constant offsets do not count as signal),
``||y_converted - y_original||^2 / ||y_original - mean||^2``, over all the layer's calls. Where a batch norm
directly reads the layer, it is measured after that batch norm, which the initialisers also adjust (or which
the Ghost module has taken in).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..trace import evaluating


def record(model: nn.Module, names: Sequence[str], sink: Callable[[str, torch.Tensor], None], inputs) -> None:
    """Run ``model`` (eval mode, no grad) on each positional-argument tuple in ``inputs`` and call
    ``sink(name, output)`` for every call of each named module. Clone an output to keep it: a later in-place
    op (``ReLU(inplace=True)``) changes it."""
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: sink(name, out)) for name in names]
    try:
        with evaluating(model):
            for args in inputs:
                model(*args)
    finally:
        for handle in handles:
            handle.remove()


def layer_errors(original: nn.Module, converted: nn.Module, pairs: Dict[str, str],
                 inputs: Sequence[Tuple[torch.Tensor, ...]]) -> Dict[str, float]:
    """Relative MSE of modules of ``converted`` against modules of ``original``.

    Args:
        pairs: converted module path -> original module path to compare it with; each converted module must
            output the original channel order (a gather, not yet folded).
        inputs: positional-argument tuples to run both models on.
    """
    targets: Dict[str, List[torch.Tensor]] = {name: [] for name in pairs}
    by_original = {theirs: ours for ours, theirs in pairs.items()}
    record(original, list(by_original), lambda name, out: targets[by_original[name]].append(out.clone()),
            inputs)  # a clone: later in-place ops change the output
    sums = {name: [0.0, 0.0, 0] for name in pairs}

    def compare(name: str, out: torch.Tensor) -> None:
        total = sums[name]
        target = targets[name][total[2]]
        total[0] += (out.double() - target.double()).square().sum().item()
        target = target.double()
        if target[:, 0].numel() > 1:  # one value per channel (a single 1x1 map) has no variance to compare with
            target = target - target.mean([0, *range(2, target.dim())], keepdim=True)
        total[1] += target.square().sum().item()
        total[2] += 1

    record(converted, list(pairs), compare, inputs)
    return {name: total[0] / total[1] if total[1] else 0.0 for name, total in sums.items()}
