"""Initialisers: how a new Ghost module's weights start, given the conv it replaces.

``"random"`` keeps the fresh initialisation that ``GhostModule.from_conv`` gives (PyTorch's Conv2d default).
``"copy"`` (data-free) builds each module from the original filters (``datafree``); ``"calibrate"`` then
refits every layer, in run order, to the original model's outputs on calibration inputs (``calibrate``).
Both leave each module's outputs in the original channel order: folded into the readers' weights where
``channels`` finds that possible, else by an ``out_index`` gather; and both record each layer's
reconstruction error (``measure``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..module import GhostModule
from .calibrate import calibrate
from .channels import consumers, fold
from .data import check_calibration
from .datafree import copy_layer
from .measure import layer_errors

if TYPE_CHECKING:
    from ..rewrite import ConversionResult

METHODS = ("random", "copy", "calibrate")

__all__ = ["METHODS", "check_init", "check_calibration", "initialise", "layer_errors"]


def check_init(init: str) -> str:
    """Validate an initialiser name."""
    if init not in METHODS:
        raise ValueError(f"init must be one of {', '.join(METHODS)}, got {init!r}")
    return init


def initialise(
    init: str,
    swapped: List[Tuple[str, nn.Conv2d, GhostModule]],
    result: "ConversionResult",
    model: Optional[nn.Module] = None,
    original: Optional[nn.Module] = None,
    batches: Optional[Sequence[torch.Tensor]] = None,
    example_inputs: Sequence[torch.Tensor] = (),
) -> None:
    """Set the weights of each ``(name, conv, ghost)`` in ``swapped`` (modules of ``model``) by method ``init``.

    Args:
        result: gets each layer's reconstruction error and whether it keeps a gather.
        model: the converted model; ``original``: the model it was converted from (only read).
        batches: calibration inputs, for ``"calibrate"`` (see ``check_calibration``).
        example_inputs: inputs the ``copy`` errors are measured on.
    """
    check_init(init)
    if init == "random" or not swapped:
        return
    if any(conv.weight.is_meta for _, conv, _ in swapped):
        result.notes["init"] = f"init={init!r} skipped: the weights are on the meta device"
        return
    readers = consumers(model, [name for name, _, _ in swapped])
    means = {name: r.bn.running_mean.clone() for name, r in readers.items() if r.bn is not None}
    orders = {name: copy_layer(conv, ghost, readers[name].bn).order for name, conv, ghost in swapped}
    if init == "calibrate":
        once = {row.name for row in result.replaced if row.calls == 1}  # shared layers keep the copy fit
        orders.update(calibrate(model, original, [item for item in swapped if item[0] in once], readers, means,
                                batches))
    measured = [(batches[0],)] if init == "calibrate" else [tuple(example_inputs)]
    paths = {id(module): path for path, module in model.named_modules()}
    measured_at = {name: paths[id(readers[name].bn)] if readers[name].bn is not None else name
                   for name, _, _ in swapped}
    errors = layer_errors(original, model, list(measured_at.values()), measured)
    rows = {row.name: row for row in result.replaced}
    for name, conv, ghost in swapped:
        if readers[name].fold is not None:
            fold(ghost, orders[name], readers[name].fold)
        rows[name].gather = ghost.out_index is not None
        rows[name].error = errors[measured_at[name]]
    result.notes["error_inputs"] = "first calibration batch" if init == "calibrate" else "example inputs"
