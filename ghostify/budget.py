"""Per-layer ratios from a budget: each convertible layer stays a conv or becomes a Ghost module with s = 2..5,
chosen to meet a FLOPs or latency budget while losing the least of the original layers' outputs.

Every option of a layer has a cost (multiply-adds, or milliseconds timed in a runtime: ``latency.layer_times``)
and an error (0 for the conv): with calibration inputs, how far the model's output moves when that layer
alone outputs its ghost approximation (``output_errors``); without, the share of the layer's filters the
data-free fit ``copy`` makes cannot reproduce (``fit_errors``). Picking one option per layer to meet the budget with
the least summed error is a multiple-choice knapsack (AMC and AIMET pick per-layer ratios under a MACs budget
too, with a learned agent and a greedy threshold); at this size it is solved exactly by dynamic programming
over the budget (``search``). Any reachable budget is met; an unreachable one is refused, with the fraction
that is reachable, before any fitting.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .count import Counts
from .init.channels import Group, couple, layer_grains
from .init.datafree import bn_gain
from .init.fit import Grain, choose, explained, filter_pairing, unexplained
from .init.measure import record
from .latency import layer_times, model_times
from .module import intrinsic_count
from .plan import planned_module
from .progress import progress as progress_display
from .redundancy import IMAGES, RATIOS, ghost_maps, layer_errors
from .trace import evaluating

OUTPUT_IMAGES = 16  # calibration inputs ``output_errors`` runs the model on, once per layer and ratio
REPLANS = 2  # times a latency plan is searched again when its whole model misses the target


@dataclass(frozen=True)
class Option:
    """One choice for a layer: ``s`` (None: stay a conv), its cost and its error."""

    s: Optional[int]
    cost: float
    error: float


def conv_flops(entry: Mapping, s: Optional[int], m: Optional[int] = None) -> float:
    """Multiply-adds of a planned layer at batch 1 as a conv (``s`` None) or as a Ghost module with ratio ``s``
    and ``m`` intrinsic maps (default ``ceil(n / s)``): the primary conv, then the depthwise cheap conv over
    all ``m * (s - 1)`` ghosts it computes, as fvcore counts."""
    positions = math.prod(entry["output_shape"][2:]) * entry.get("calls", 1)
    n, c, kernel = entry["out_channels"], entry["in_channels"], entry["kernel_size"]
    if s is None:
        return positions * n * c * math.prod(kernel)
    m = -(-n // s) if m is None else m
    return positions * (m * c * math.prod(entry["primary_kernel"]) + m * (s - 1) * entry["d"] ** len(kernel))


def _module(entry: Mapping, s: int, grain: Optional[Grain], align: int) -> Tuple[int, Optional[int]]:
    """The ``s`` and ``intrinsic`` ``convert`` builds a layer with when asked for ratio ``s`` (``planned_module``)."""
    return planned_module(entry["out_channels"], s, grain.width if grain else 1, align)


def fit_errors(conv: nn.Module, norm: Optional[nn.Module], entry: Mapping, ratios: Sequence[int] = RATIOS,
               grain: Optional[Grain] = None, align: int = 1) -> Dict[int, float]:
    """The data-free error of making ``conv`` a Ghost module at each ratio (its channel choice as ``copy`` makes
    it, in whole groups with a ``grain``, with ``convert``'s intrinsic map count for ``align``, weighted through
    the norm that follows, if any)."""
    pairing, _ = filter_pairing(conv.weight.detach().float().cpu(), entry["primary_kernel"], conv.dilation,
                                conv.stride, entry["d"], bn_gain(norm, conv.out_channels))
    fraction = explained(pairing)
    n, width = conv.out_channels, grain.width if grain else 1
    return {s: unexplained(pairing, choose([pairing], s, grain=grain, m=intrinsic_count(n, s, width, align)),
                           fraction) for s in ratios if s <= n}


def map_errors(model: nn.Module, entries: Sequence[Mapping], norms: Mapping[str, Optional[str]],
               batches: Sequence[Tuple[torch.Tensor, ...]],
               ratios: Sequence[int] = RATIOS) -> Dict[str, Dict[int, float]]:
    """The error of each planned layer at each ratio from its original output maps on (at most ``IMAGES``)
    calibration inputs (``redundancy.layer_errors``): the feature-map redundancy the paper builds on,
    measured; the data-free filter fit (``fit_errors``) is only a proxy for it."""
    errors: Dict[str, Dict[int, float]] = {}
    by_name = {entry["name"]: entry for entry in entries}

    def visit(name: str, y: torch.Tensor) -> None:
        norm = model.get_submodule(norms[name]) if norms.get(name) else None
        errors[name] = layer_errors(y, by_name[name]["d"], bn_gain(norm, y.shape[1]), ratios)

    inputs = [torch.cat([batch[i] for batch in batches])[:IMAGES] for i in range(len(batches[0]))]
    record(model, list(by_name), visit, [inputs])
    return errors


def output_errors(model: nn.Module, entries: Sequence[Mapping], norms: Mapping[str, Optional[str]],
                  batches: Sequence[Tuple[torch.Tensor, ...]], ratios: Sequence[int] = RATIOS,
                  images: int = OUTPUT_IMAGES, progress: bool = False) -> Dict[str, Dict[int, float]]:
    """Per planned layer and ratio, how far the model's output moves (relative squared error on ``images``
    calibration inputs) when that layer alone outputs its ghost approximation (``redundancy.ghost_maps`` of its
    original maps). Unlike a layer's own loss, this counts what the layers after it make of its error; a layer
    that runs more than once keeps its own loss (``map_errors``)."""
    inputs = [torch.cat([batch[i] for batch in batches])[:images] for i in range(len(batches[0]))]
    maps: Dict[str, torch.Tensor] = {}
    record(model, [entry["name"] for entry in entries], lambda name, y: maps.__setitem__(name, y.detach().clone()),
           [inputs])  # a clone: a later in-place op would change the map
    with evaluating(model):
        reference = _flat(model(*inputs))
    errors = map_errors(model, [e for e in entries if e.get("calls", 1) > 1], norms, batches, ratios)
    with progress_display("measuring {description}", show=progress) as bar:
        task = bar.add_task("each layer's ghosts at the output", total=len(entries)) if bar else None
        for entry in entries:
            name, y = entry["name"], maps.pop(entry["name"])
            if entry["name"] not in errors:
                norm = model.get_submodule(norms[name]) if norms.get(name) else None
                gain = bn_gain(norm, y.shape[1])
                errors[name] = {s: _moved(model, name, ghost_maps(y, entry["d"], gain, s), inputs, reference)
                                for s in ratios if s <= y.shape[1]}
            if bar:
                bar.advance(task)
    return errors


def _flat(output) -> torch.Tensor:
    """Every tensor in a model's output (a tensor, or tuples, lists and dicts of them) as one float64 vector."""
    if isinstance(output, torch.Tensor):
        return output.detach().flatten().double()
    parts = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    flat = [_flat(part) for part in parts]
    return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)


def _moved(model: nn.Module, name: str, replacement: torch.Tensor, inputs, reference: torch.Tensor) -> float:
    """Relative squared change of the model's outputs when module ``name`` outputs ``replacement``."""
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, output: replacement)
    try:
        with evaluating(model):
            moved = _flat(model(*inputs))
    finally:
        handle.remove()
    return ((moved - reference).square().sum() / reference.square().sum().clamp_min(1e-30)).item()


def search(options: Mapping[Hashable, Sequence[Option]], budget: float, steps: int = 4000) -> Dict[Hashable, Option]:
    """One option per key, total cost <= ``budget``, least total error.

    A multiple-choice knapsack, solved by dynamic programming over the budget cut into ``steps`` parts (costs
    rounded down to parts, each path's real cost kept so the answer fits), then what is left is spent
    greedily (``_fill``).

    Raises:
        ValueError: even the cheapest option of every key costs more than ``budget``.
    """
    cheapest = {key: min(opts, key=lambda o: (o.cost, o.error)) for key, opts in options.items()}
    if sum(o.cost for o in cheapest.values()) > budget:
        raise ValueError(f"unreachable: the cheapest options cost {sum(o.cost for o in cheapest.values()):.4g}, "
                         f"over the budget of {budget:.4g}")
    unit = max(budget, 1e-30) / steps
    error, cost = np.full(steps + 1, np.inf), np.zeros(steps + 1)  # per total size: the best path's error, cost
    error[0] = 0.0
    picks = []
    for opts in options.values():
        new_error, new_cost = np.full(steps + 1, np.inf), np.zeros(steps + 1)
        pick = np.zeros(steps + 1, dtype=np.int64)
        for index, option in enumerate(opts):
            size = int(option.cost // unit)  # rounded down: no path that fits is lost; real costs are kept
            if size > steps:
                continue
            candidate = np.full(steps + 1, np.inf)
            candidate[size:] = error[: steps + 1 - size] + option.error
            better = candidate < new_error
            new_error[better], pick[better] = candidate[better], index
            new_cost[size:][better[size:]] = cost[: steps + 1 - size][better[size:]] + option.cost
        error, cost = new_error, new_cost
        picks.append(pick)
    fits = np.isfinite(error) & (cost <= budget * (1 + 1e-12))
    if not fits.any():  # rounding kept only paths a little over a tight budget
        return _fill(options, cheapest, budget)
    size, chosen = int(np.flatnonzero(fits)[np.argmin(error[fits])]), {}
    for (key, opts), pick in zip(reversed(list(options.items())), reversed(picks)):
        chosen[key] = opts[pick[size]]
        size -= int(chosen[key].cost // unit)
    return _fill(options, chosen, budget)


def _fill(options: Mapping[Hashable, Sequence[Option]], chosen: Dict[Hashable, Option],
          budget: float) -> Dict[Hashable, Option]:
    """Spend what is left of ``budget`` on the upgrades that save the most error per cost, one at a time."""
    chosen = dict(chosen)
    left = budget - sum(o.cost for o in chosen.values())
    while True:
        upgrades = [((now.error - o.error) / max(o.cost - now.cost, 1e-30), name, o)
                    for name, now in chosen.items() for o in options[name]
                    if o.error < now.error and 0 <= o.cost - now.cost <= left]
        if not upgrades:
            return chosen
        _, name, option = max(upgrades, key=lambda u: u[0])
        left -= option.cost - chosen[name].cost
        chosen[name] = option


def _errors(model: nn.Module, entries: Sequence[Mapping], norms: Mapping[str, Optional[str]],
            progress: bool, grains: Mapping[str, Grain], align: int) -> Dict[str, Dict[int, float]]:
    """``fit_errors`` of every planned layer."""
    errors = {}
    with progress_display("fitting {description}", show=progress) as bar, torch.no_grad():
        task = bar.add_task("each layer at s = 2..5", total=len(entries)) if bar else None
        for entry in entries:
            norm = model.get_submodule(norms[entry["name"]]) if norms.get(entry["name"]) else None
            errors[entry["name"]] = fit_errors(model.get_submodule(entry["name"]), norm, entry,
                                               grain=grains.get(entry["name"]), align=align)
            if bar:
                bar.advance(task)
    return errors


def _groups(model: nn.Module, entries: Sequence[Mapping], inputs: Sequence[torch.Tensor]) -> List[Group]:
    """The planned layers that write into one tensor, which must share s to share a channel order (else their
    Ghost modules keep gathers), and how grouped convs reading them constrain it: ``init.channels`` groups."""
    return couple(model, [entry["name"] for entry in entries], inputs).groups


def _costs(model: nn.Module, entries: Sequence[Mapping], inputs: Sequence[torch.Tensor], target_flops: Optional[float],
           runtime: Optional[str], batch: int,
           grains: Mapping[str, Grain], align: int) -> Tuple[Dict[str, Dict[Optional[int], float]], float]:
    """Each layer's cost as a conv (key None) and at each ratio, and the original model's total: FLOPs when
    ``target_flops`` is given, else ms in ``runtime``."""
    ratios = {entry["name"]: [s for s in RATIOS if s <= entry["out_channels"]] for entry in entries}
    if target_flops is not None:
        total = Counts(model, tuple(inputs)).conv_linear_flops
        def flops(entry: Mapping, s: Optional[int]) -> float:  # as convert builds the layer at ratio s
            return conv_flops(entry, None) if s is None else conv_flops(entry, *_module(entry, s, grains.get(
                entry["name"]), align))

        return {e["name"]: {s: flops(e, s) for s in [None, *ratios[e["name"]]]} for e in entries}, total
    asked = [(entry, s) for entry in entries for s in ratios[entry["name"]]]
    variants = []
    for entry, s in asked:  # timed as convert would build it (a smaller s where alignment leaves fewer ghosts)
        built, intrinsic = _module(entry, s, grains.get(entry["name"]), align)
        variants.append({**entry, "s": built, "intrinsic": intrinsic})
    times = layer_times(model, variants, runtime=runtime, batch=batch, progress=True)
    costs: Dict[str, Dict[Optional[int], float]] = {}
    dense: Dict[str, List[float]] = {}
    for (entry, s), (conv_ms, ghost_ms) in zip(asked, times):
        costs.setdefault(entry["name"], {})[s] = ghost_ms
        dense.setdefault(entry["name"], []).append(conv_ms)
    for name, samples in dense.items():
        costs[name][None] = statistics.median(samples)
    (total,) = model_times(model, [], [x.shape[1:] for x in inputs], runtime=runtime, batch=batch)
    return costs, total


def plan(model: nn.Module, entries: Sequence[Mapping], norms: Mapping[str, Optional[str]],
         inputs: Sequence[torch.Tensor], *, target_flops: Optional[float] = None,
         target_latency: Optional[float] = None, runtime: Optional[str] = None, batch: int = 1,
         batches: Optional[Sequence[Tuple[torch.Tensor, ...]]] = None, align: int = 1,
         measure: Optional[Callable[[Mapping[str, Optional[int]]], float]] = None,
         progress: bool = False) -> Dict[str, Option]:
    """Each planned layer's option under a budget: ``target_flops`` of the original's conv + linear
    multiply-adds, or ``target_latency`` of its latency in ``runtime`` at ``batch`` (layers timed alone, the
    rest of the model as measured). Layers that write into one tensor get one option.

    ``measure``, given each layer's s (None: the conv), times the whole model with them and returns its time
    as a fraction of the original's. With it, a plan whose whole model misses the target is searched again
    for at most what it cost less what it missed by, up to ``REPLANS`` times or while a cheaper plan exists:
    layers timed alone need not add up to the whole model. The plan returned is the last one measured.

    Args:
        entries: ``Replaced`` rows as dicts (name, channels, kernels, d, output shape, calls).
        norms: the norm after each layer (its gain weighs the fit error), or None.
        batches: calibration inputs: errors measured at the model's output (``output_errors``) instead of on
            the layers' filters (``fit_errors``).
        align: ``convert``'s ``align``, which the modules' intrinsic map counts follow.

    Raises:
        ValueError: the budget cannot be met even with every layer at s = 5.
    """
    target = target_flops if target_flops is not None else target_latency
    found = _groups(model, entries, inputs)
    grains = layer_grains(found)
    costs, total = _costs(model, entries, inputs, target_flops, runtime, batch, grains, align)
    fixed = total - sum(cost[None] for cost in costs.values())
    groups = [group.members for group in found]
    shared = {tuple(group): [s for s in costs[group[0]] if all(s in costs[name] for name in group)]
              for group in groups}
    cheapest = fixed + sum(min(sum(costs[name][s] for name in group) for s in ratios)
                           for group, ratios in shared.items())
    if cheapest > target * total and target_flops is not None:
        raise ValueError(f"target_flops={target} is unreachable: with every convertible layer at its cheapest ratio "
                         f"the model keeps {cheapest / total:.4g} of its FLOPs; ask for more"
                         + (f" (or align=1, CLI: --align 1: intrinsic maps in multiples of {align} channels cost more)"
                            if align > 1 else ""))
    if cheapest > target * total:
        raise ValueError(f"target_latency={target} is unreachable in {runtime} at batch {batch}: with every "
                         f"convertible layer at its fastest option, timed alone, the model keeps "
                         f"{cheapest / total:.3f} of its time; give a larger target_latency, or time at a larger "
                         "batch (runtime_batch; CLI: --target-latency, --runtime-batch), where Ghost modules gain more")
    errors = output_errors(model, entries, norms, batches, progress=progress) if batches else \
        _errors(model, entries, norms, progress, grains, align)
    options = {group: [Option(s, sum(costs[n][s] for n in group), sum(errors[n][s] if s else 0.0 for n in group))
                       for s in ratios] for group, ratios in shared.items()}
    chosen = search(options, target * total - fixed)
    for attempt in range(REPLANS + 1 if measure is not None else 0):
        missed = measure({name: option.s for group, option in chosen.items() for name in group}) - target
        limit = sum(option.cost for option in chosen.values()) - missed * total  # what this plan cost, less that
        if missed <= 0 or attempt == REPLANS or limit < cheapest - fixed:
            break
        chosen = search(options, limit)
    return {name: Option(option.s, costs[name][option.s], errors[name][option.s] if option.s else 0.0)
            for group, option in chosen.items() for name in group}


def error_source(batches) -> str:
    """What ``plan``'s errors are measured on, for reports."""
    return "model output moved, on calibration inputs" if batches else "share lost, data-free filter fit"
