"""Which layers ``convert`` converts, and at which s, when asked for speed: the layers that make the whole
model faster in a runtime (``keep_faster``), or each layer's s from a FLOPs or latency budget (``budgeted``);
and each module's intrinsic map count (``set_intrinsic``)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import budget
from .latency import layer_times, model_times
from .plan import planned_module
from .result import Replaced, Skipped, Timing, WholeModel, milliseconds

FASTER = 0.1  # with convert(runtime=...) and no tensor inputs, a Ghost module must be this much faster, timed alone
WHOLE_FASTER = 0.03  # and the whole model this much faster than the original, or nothing is converted


def keep_faster(model: nn.Module, rows: List[Replaced], runtime: str, batch: int,
                inputs) -> Tuple[List[Replaced], List[Skipped], Optional[WholeModel]]:
    """Split ``rows`` into the layers that make the model faster in ``runtime`` as Ghost modules and the
    others; also a note of the whole-model times.

    Each layer is timed alone (``layer_times``), then the whole model (``model_times``, interleaved): as it is,
    and with the layers at least 20% or ``FASTER`` faster, or no slower, alone converted, and with every layer;
    the fastest wins if it is ``WHOLE_FASTER`` faster than the original (less is timing noise on a shared
    machine, and the conversion costs accuracy). Layers alone miss what their neighbours pay or gain in the
    whole model: on MobileNetV2 in onnxruntime layers 10% faster alone summed to a slower model, and on
    ResNet-50 layers under 10% faster alone were faster in the whole model. Without tensor inputs to time the whole
    model with, the layers ``FASTER`` or more faster alone are converted.
    """
    times = layer_times(model, [asdict(row) for row in rows], runtime=runtime, batch=batch, progress=True)
    for row, (dense_ms, ghost_ms) in zip(rows, times):
        row.dense_ms, row.ghost_ms = dense_ms, ghost_ms
    candidates: List[Tuple[Optional[float], List[Replaced]]] = []  # (cut on ghost / conv time alone, layers)
    for cut in (0.8, 1 - FASTER, 1.0, None):
        chosen = _faster_alone(rows, cut)
        if chosen and all(chosen != other for _, other in candidates):
            candidates.append((cut, chosen))
    where = f"in {runtime} (batch {batch})"
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        cut, note = 1 - FASTER, None
        why = f"not {FASTER:.0%} faster as a Ghost module {where}"
    else:
        original_ms, *whole = model_times(model, [[asdict(row) for row in chosen] for _, chosen in candidates],
                                          [x.shape[1:] for x in inputs], runtime=runtime, batch=batch,
                                          progress=True)
        best = min(range(len(whole)), key=whole.__getitem__)
        none = whole[best] > (1 - WHOLE_FASTER) * original_ms
        cut = 0.0 if none else candidates[best][0]
        note = WholeModel(runtime, batch, original_ms, [Timing(_cut_label(cut), len(chosen), ms, ms / original_ms)
                                                        for (cut, chosen), ms in zip(candidates, whole)],
                          None if none else best)
        why = (f"the whole model was not {WHOLE_FASTER:.0%} faster {where} with Ghost modules" if none else
               f"the whole model ran fastest {where} with only layers {_cut_label(cut)}")
    faster = _faster_alone(rows, cut)
    slower = [Skipped(row.name, type(model.get_submodule(row.name)).__name__,
                      f"{why}: alone, {milliseconds(row.ghost_ms)} ms as a Ghost module vs "
                      f"{milliseconds(row.dense_ms)} ms as a conv")
              for row in rows if row not in faster]
    return faster, slower, note


def _faster_alone(rows: List[Replaced], cut: Optional[float]) -> List[Replaced]:
    """The rows whose Ghost module took at most ``cut`` of the conv's time, timed alone; None: every row."""
    return [row for row in rows if cut is None or row.ghost_ms <= cut * row.dense_ms]


def _cut_label(cut: Optional[float]) -> str:
    return "every layer" if cut is None else "no slower alone" if cut == 1 else f"at least {1 - cut:.0%} faster alone"


def budgeted(model: nn.Module, rows: List[Replaced], norms: Dict[str, Optional[str]], inputs, batches,
              target_flops, target_latency, runtime, batch, align,
              widths: Mapping[str, int]) -> Tuple[List[Replaced], List[Skipped], Optional[WholeModel]]:
    """``rows`` with each layer's s from the budget (``budget.plan``), the layers it keeps as convs, and, for a
    latency budget, a note of the whole model's time with the plan: measured interleaved with the original's
    after each search, the plan searched again when it misses (``budget.plan``'s ``measure``), and a warning
    when the last one still does. No note without tensor inputs to time the whole model with."""
    measured: List[Tuple[float, Timing]] = []  # per plan: the original's ms, and the plan's

    def measure(ratios: Mapping[str, Optional[int]]) -> float:
        trial = [replace(row, s=ratios[row.name]) for row in rows if ratios[row.name]]
        set_intrinsic(trial, widths, align)
        original_ms, planned_ms = model_times(model, [[asdict(row) for row in trial]], [x.shape[1:] for x in inputs],
                                              runtime=runtime, batch=batch, progress=True)
        label = "the budget's plan" if not measured else "searched again as the whole model missed"
        measured.append((original_ms, Timing(label, len(trial), planned_ms, planned_ms / original_ms)))
        return planned_ms / original_ms

    timed = target_latency is not None and all(isinstance(x, torch.Tensor) for x in inputs)
    chosen = budget.plan(model, [asdict(row) for row in rows], norms, inputs, target_flops=target_flops,
                         target_latency=target_latency, runtime=runtime, batch=batch, batches=batches,
                         align=align, measure=measure if timed else None, progress=True)
    unit = "FLOPs" if target_flops is not None else f"latency ({runtime}, batch {batch})"
    converted, kept = [], []
    for row in rows:
        option = chosen[row.name]
        if option.s is None:
            kept.append(Skipped(row.name, type(model.get_submodule(row.name)).__name__,
                                f"kept as a conv: the budget's plan meets the {unit} budget with less loss "
                                "elsewhere"))
            continue
        row.s = option.s
        row.why = f"{unit} budget: s={option.s}, loss {option.error:.3g} ({budget.error_source(batches)})"
        converted.append(row)
    if not measured:
        return converted, kept, None
    (original_ms, last), searches = measured[-1], len(measured)
    if last.fraction > target_latency:
        warnings.warn(f"the budgeted model measured {last.fraction:.2f} of the original's time in {runtime} (batch "
                      f"{batch}), above target_latency={target_latency:g}, after {searches} "
                      f"plan{'s' if searches > 1 else ''}: its layers timed alone do not add up to the whole "
                      "model's time", UserWarning, stacklevel=4)
    return converted, kept, WholeModel(runtime, batch, original_ms, [timing for _, timing in measured],
                                       searches - 1, target_latency)


def set_intrinsic(rows: List[Replaced], widths: Mapping[str, int], align: int) -> None:
    """Each row's intrinsic map count: whole groups of the grouped conv that reads it (``widths``), parts on
    ``align``-channel blocks where its width allows, and its ``s`` lowered where that many intrinsic maps leave
    fewer runs of ghosts (``plan.planned_module``)."""
    for row in rows:
        row.s, row.intrinsic = planned_module(row.out_channels, row.s, widths.get(row.name, 1), align)


def intrinsic_notes(rows: List[Replaced], asked: Mapping[str, int], align: int) -> Dict[str, str]:
    """Notes naming the layers with parts off the ``align``-channel blocks, and those built with a smaller s
    than ``asked``."""
    unaligned, lowered = [], []
    for row in rows:
        m = row.intrinsic or -(-row.out_channels // row.s)
        if m % align or row.out_channels % align:
            unaligned.append(row.name)
        if row.s < asked[row.name]:
            lowered.append(f"{row.name} (s={asked[row.name]} -> {row.s}, m={m})")
    notes = {}
    if unaligned and align > 1:
        notes["unaligned"] = (f"{len(unaligned)} of {len(rows)} layers have parts off the {align}-channel blocks "
                              f"(their width is not a multiple of {align}, or no multiple of {align} intrinsic maps "
                              f"fits): {', '.join(unaligned[:3])}" + (" ..." if len(unaligned) > 3 else ""))
    if lowered:
        notes["lowered s"] = (f"{len(lowered)} layers have so many intrinsic maps (multiples of {align} channels, or "
                              "whole groups of a grouped conv that reads them) that fewer runs of ghosts fill the "
                              "rest, so they use a smaller s and compute no ghost they would drop (align=1 keeps "
                              f"ceil(n / s)): {', '.join(lowered[:3])}" + (" ..." if len(lowered) > 3 else ""))
    return notes
