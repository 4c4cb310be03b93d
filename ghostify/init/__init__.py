"""Initialisers: how a new Ghost module's weights start, given the conv it replaces.

``"random"`` keeps the fresh initialisation that ``GhostModule.from_conv`` gives (PyTorch's conv default).
``"copy"`` (data-free) builds each module from the original filters (``datafree``); ``"calibrate"`` then
refits every layer, in run order, to the original model's outputs on calibration inputs (``calibrate``);
``"reconstruct"`` then tunes each block of layers jointly on its output error (``reconstruct``).
All leave each module's outputs in the original channel order at no cost where ``channels`` finds the
order can be absorbed by the layers around it (layers writing into one tensor then share one channel
choice), else by an ``out_index`` gather; and all record each layer's reconstruction error (``measure``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from ..module import GhostModule
from .blockwise import STEPS as RECONSTRUCT_STEPS
from .blockwise import find_blocks, held_out, output_error, reconstruct, summary
from .calibrate import calibrate, refit_heads
from .channels import Coupling, Group, couple, layer_grains
from .data import check_calibration, mirrored
from .datafree import copy_layer, filter_problem
from .fit import WIDE, Choice, blocks, choose
from .measure import layer_errors

METHODS = ("random", "copy", "calibrate", "reconstruct")
DATA_METHODS = ("calibrate", "reconstruct")  # the initialisers that need calibration data
ERROR_SAMPLES = 16  # calibration inputs the reported per-layer errors are measured on

__all__ = ["DATA_METHODS", "METHODS", "RECONSTRUCT_STEPS", "Fitted", "Initialised", "check_init", "check_calibration",
           "grouped_widths", "initialise", "layer_errors"]


@dataclass
class Fitted:
    """What initialisation measured for one layer: its reconstruction error, whether (and why) its output
    keeps a gather back to the original channel order, and the original channel of each output."""

    error: Optional[float] = None
    gather: bool = False
    gather_reason: Optional[str] = None
    order: Optional[List[int]] = None


@dataclass
class Initialised:
    """What ``initialise`` did: per-layer ``Fitted`` records and notes for the conversion result."""

    layers: Dict[str, Fitted] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)


def check_init(init: str) -> str:
    """Validate an initialiser name."""
    if init not in METHODS:
        raise ValueError(f"init must be one of {', '.join(METHODS)}, got {init!r}")
    return init


def _blocked_by_ratio(group: Group, layers: Mapping[str, Any]) -> None:
    ratios = sorted({layers[name].s for name in group.members})
    if group.blocked is None and len(ratios) > 1:
        group.blocked = f"writes into a tensor with layers of other s ({', '.join(map(str, ratios))})"


def _check_grain(group: Group, items: Mapping[str, Tuple[nn.Module, GhostModule]]) -> None:
    """Block a group read by a grouped conv whose modules were not built in its whole groups (``intrinsic``)."""
    if group.blocked is None and group.grain is not None:
        for name in group.members:
            ghost = items[name][1]
            if ghost.intrinsic_channels % group.grain.width:
                group.blocked = (f"read by a grouped conv (groups of {group.grain.width}) but built with "
                                 f"{ghost.intrinsic_channels} intrinsic maps, not whole groups")
                return


def grouped_widths(model: nn.Module, layers: Mapping[str, Any], example_inputs: Sequence[torch.Tensor],
                   parts: Optional[Sequence[Tuple[str, fx.Graph]]] = None) -> Dict[str, int]:
    """The group width of the grouped conv that reads each layer to convert (``layers``: plans by name, of
    ``model`` before conversion), where the layer can then choose in whole groups (``fit.Grain``); a model
    without grouped convs is not traced (``parts``: see ``channels.couple``)."""
    grouped = any(isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.in_channels
                  for module in model.modules())
    if not grouped or not layers:
        return {}
    groups = couple(model, list(layers), example_inputs, parts).groups
    for group in groups:
        _blocked_by_ratio(group, layers)
    return {name: grain.width for name, grain in layer_grains(groups).items()}


def _reconstruct(model: nn.Module, original: nn.Module, once: Sequence[str], layers: Mapping[str, Any],
                 batches: Sequence[Tuple[torch.Tensor, ...]], heads: Sequence[str], steps: int,
                 seconds: Optional[float], network: bool, mix: float) -> str:
    """Tune the calibrated ``model``'s blocks (``blockwise.reconstruct``), refit its ``heads`` on what the tuned
    blocks give them, and keep all that only if the model's output error on the held-out calibration inputs
    fell (else the calibrated weights); returns the note saying what happened."""
    found = find_blocks(model, once, tuple(x[:1] for x in batches[0]))
    norms = {name: layers[name].norm for name in found if name in layers and layers[name].norm}
    check = held_out(batches)
    before = None if check is None else output_error(model, original, check)
    saved = copy.deepcopy(model.state_dict()) if before is not None else None
    done = reconstruct(model, original, found, batches, steps, seconds, norms, network, mix)
    note = summary(done)
    if not any(after < before for before, after in done.values()):
        return note
    if heads:
        refit_heads(model, original, heads, batches)
    if before is not None:
        after = output_error(model, original, check)
        note += f"; model output error on the held-out inputs {before:.4f} -> {after:.4f}"
        if not after < before:
            model.load_state_dict(saved)
            note += ": the calibrated weights kept"
    return note


def initialise(
    init: str,
    swapped: List[Tuple[str, nn.Module, GhostModule]],
    layers: Mapping[str, Any],
    model: Optional[nn.Module] = None,
    original: Optional[nn.Module] = None,
    batches: Optional[Sequence[Tuple[torch.Tensor, ...]]] = None,
    example_inputs: Sequence[torch.Tensor] = (),
    reconstruct_steps: int = RECONSTRUCT_STEPS,
    reconstruct_seconds: Optional[float] = None,
    reconstruct_network: bool = False,
    reconstruct_mix: float = 0.0,
    refit_head: bool = True,
    mirror: bool = True,
    parts: Optional[Sequence[Tuple[str, fx.Graph]]] = None,
) -> Initialised:
    """Set the weights of each ``(name, conv, ghost)`` in ``swapped`` (modules of ``model``) by method ``init``.

    Layers that write into one tensor (``channels.couple``) get one shared channel choice, so that the whole
    group's channel order is absorbed by the layers around it; a group that reaches something needing the
    original order keeps gathers, and the reason is recorded per layer.

    Args:
        layers: each swapped layer's plan by name (a ``result.Replaced``: ``s``, ``norm``, ``calls``).
        model: the converted model; ``original``: the model it was converted from (only read).
        batches: calibration inputs, for ``"calibrate"`` and ``"reconstruct"`` (see ``check_calibration``).
        example_inputs: inputs the analysis and the ``copy`` errors run on.
        reconstruct_steps, reconstruct_seconds: Adam steps per block, and a time budget for all blocks
            (``"reconstruct"``).
        reconstruct_network: after the blocks, tune all Ghost modules together on the model's output.
        reconstruct_mix: QDrop's probability of taking a block's tuning input from the original model.
        refit_head: with calibration data, refit the linear layers after the last Ghost module
            (``calibrate.heads``), after the blocks with ``"reconstruct"``.
        mirror: with calibration data, also fit on mirror images of the inputs where a layer sees fewer output
            positions than its filters have weights (``data.mirrored``).
        parts: the model's traced graphs with shapes (``trace.Analysis.parts``), which saves tracing it again.

    Returns:
        Each layer's measured error and gather, and notes on how they were measured (or why nothing was done).
    """
    check_init(init)
    if init == "random" or not swapped:
        return Initialised()
    if any(conv.weight.is_meta for _, conv, _ in swapped):
        return Initialised(notes={"init": f"init={init!r} skipped: the weights are on the meta device"})
    coupling = couple(model, [name for name, _, _ in swapped], example_inputs, parts)
    for group in coupling.groups:
        _blocked_by_ratio(group, layers)
    # the batch norm after each layer: the converted model's, or the original's when the Ghost module took it in
    means = {name: bn.running_mean.clone() for name, bn in coupling.bn.items() if bn is not None}
    bns = {name: original.get_submodule(layers[name].norm) if layers[name].norm else bn
           for name, bn in coupling.bn.items()}
    choices = _copy_groups(coupling, swapped, bns, layers)
    notes = {}
    grains = layer_grains(coupling.groups)
    wide = _wide_note(swapped, grains)
    if wide:
        notes["wide layers"] = wide
    refitted: List[str] = []
    if init in DATA_METHODS:
        once = {name for name, row in layers.items() if row.calls == 1}  # shared layers keep the copy fit
        shared = {name: group.members for group in coupling.groups if group.blocked is None
                  and len(group.members) > 1 for name in group.members}
        fitted_on, copies, why = mirrored(batches, [layers[name] for name in once]) if mirror else (batches, 1, None)
        if copies > 1:
            notes["mirror"] = (f"fitted on {copies} versions of each calibration input (the input and its mirror "
                               f"images): {why}")
        fits, refitted = calibrate(model, original, [item for item in swapped if item[0] in once], bns, means,
                                   fitted_on, shared, {name: ghost for name, _, ghost in swapped}, grains,
                                   head=refit_head)
        choices.update(fits)
        if refitted:
            notes["head"] = (f"{', '.join(refitted)} (nn.Linear after the last Ghost module) refitted to the "
                             "original's outputs, to correct what the Ghost modules still miss")
    if init == "reconstruct":
        notes["reconstruct"] = _reconstruct(model, original, sorted(once), layers, batches, refitted,
                                            reconstruct_steps, reconstruct_seconds, reconstruct_network,
                                            reconstruct_mix)
    data = init in DATA_METHODS
    measured = [tuple(x[:ERROR_SAMPLES] for x in batches[0])] if data else [tuple(example_inputs)]
    errors = _errors(original, model, coupling, swapped, layers, measured)
    coupling.apply({name: choice.order for name, choice in choices.items()},
                   {name: ghost for name, _, ghost in swapped})
    fitted = {}
    for name, _, ghost in swapped:
        gathered = ghost.out_index is not None  # then the outputs are back in the original's order
        reason = coupling.group_of(name).blocked if gathered else None
        order = list(range(ghost.out_channels)) if gathered else choices[name].order.tolist()
        fitted[name] = Fitted(errors[name], gathered, reason, order)
    on = (f"the first {len(measured[0][0])} calibration inputs" if data else
          "the example inputs (random ones unless given: the figure means little for random inputs or weights)")
    return Initialised(fitted, {"rel. MSE": f"each layer's output error, relative to the original layer's output "
                                            f"energy, on {on}", **notes})


def _copy_groups(coupling: Coupling, swapped: List[Tuple[str, nn.Module, GhostModule]],
                 bns: Mapping[str, Optional[nn.Module]], layers: Mapping[str, Any]) -> Dict[str, Choice]:
    """The data-free fit (``copy``) of every swapped layer, one channel choice per group that shares one (a
    blocked group's layers choose alone); returns each layer's choice."""
    items = {name: (conv, ghost) for name, conv, ghost in swapped}
    choices: Dict[str, Choice] = {}
    for group in coupling.groups:
        _check_grain(group, items)
        grain = group.grain if group.blocked is None else None
        for names in [group.members] if group.blocked is None else [[name] for name in group.members]:
            problems = [filter_problem(*items[name], bns[name], grain) for name in names]
            choice = choose([pairing for pairing, _ in problems], layers[names[0]].s, grain=grain,
                            m=items[names[0]][1].intrinsic_channels)
            for name, problem in zip(names, problems):
                copy_layer(*items[name], bns[name], problem, choice)
                choices[name] = choice
    return choices


def _wide_note(swapped: List[Tuple[str, nn.Module, GhostModule]], grains: Mapping[str, Any]) -> Optional[str]:
    """A note naming the layers wide enough to choose their ghosts within runs of channels (``fit.blocks``)."""
    wide = [name for name, conv, ghost in swapped
            if len(blocks(conv.out_channels, ghost.s, ghost.intrinsic_channels, grains.get(name))) > 1]
    if not wide:
        return None
    return (f"{len(wide)} layers wider than {WIDE} channels chose each ghost's intrinsic map within its run of "
            f"channels, not the whole layer (faster): {', '.join(wide[:3])}" + (" ..." if len(wide) > 3 else ""))


def _errors(original: nn.Module, model: nn.Module, coupling: Coupling,
            swapped: List[Tuple[str, nn.Module, GhostModule]], layers: Mapping[str, Any],
            measured: Sequence[Tuple[torch.Tensor, ...]]) -> Dict[str, float]:
    """Each swapped layer's relative output error against the original's on ``measured``, read after its batch
    norm (also when the Ghost module took the norm in)."""
    paths = {id(module): path for path, module in model.named_modules()}
    measured_at = {name: paths[id(coupling.bn[name])] if coupling.bn[name] is not None else name
                   for name, _, _ in swapped}
    errors = layer_errors(original, model, {ours: layers[name].norm or ours for name, ours in measured_at.items()},
                          measured)
    return {name: errors[ours] for name, ours in measured_at.items()}
