"""The before/after report: totals, one row per replaced layer, and the layers left alone with reasons.

``Report.to_dict()`` feeds ``--json``; ``Report.__rich__()`` renders the tables. FLOPs are multiply-adds
(one multiply-add = one FLOP, the paper's and fvcore's convention), counted by fvcore for one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .count import Counts
from .module import GhostModule
from .result import layer_count
from .trace import _shape, random_inputs

UNIT = "FLOPs are multiply-adds (1 multiply-add = 1 FLOP, as in the paper and fvcore)"


def format_count(value: Optional[float]) -> str:
    """Human-readable count: 4.11G, 25.56M, 9.2K; '-' for missing."""
    if value is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


def _ratio(before: Optional[float], after: Optional[float]) -> Optional[float]:
    return before / after if before and after else None


def theoretical_ratio(c: int, k: Tuple[int, ...], s: int, d: int, primary_kernel: Tuple[int, ...]) -> float:
    """Paper Eq. 4: speed-up of a Ghost module over the conv, c*k*k / (c*k'*k'/s + (s-1)*d*d/s) in 2-D (and
    the same with one kernel size per spatial dimension in 1-D and 3-D)."""
    return c * math.prod(k) / (c * math.prod(primary_kernel) / s + (s - 1) * d ** len(k) / s)


@dataclass
class LayerRow:
    """One replaced conv: what it was, what replaced it, and its counts before and after."""

    name: str
    original: str
    replacement: str
    output_shape: Optional[Tuple[int, ...]]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    ratio: Optional[float]
    theoretical_ratio: float
    reconstruction_error: Optional[float] = None
    gather_reason: Optional[str] = None
    dense_ms: Optional[float] = None  # timed alone (``convert(runtime=...)``), as a conv and as a Ghost module
    ghost_ms: Optional[float] = None
    why: Optional[str] = None  # a budget's reason for this layer's s


@dataclass
class Report:
    """Counts for one model, or for an original and its converted form."""

    model: str
    input_shapes: List[Optional[Tuple[int, ...]]]  # None: an input that is not a tensor (a list of images)
    flops_before: int
    params_before: int
    conv_flops_before: int
    flops_after: Optional[int] = None
    params_after: Optional[int] = None
    conv_flops_after: Optional[int] = None
    method: Optional[str] = None
    layers: List[LayerRow] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    notes: Dict[str, Any] = field(default_factory=dict)  # how the conversion was done (``ConversionResult.notes``)

    @property
    def flops_ratio(self) -> Optional[float]:
        return _ratio(self.flops_before, self.flops_after)

    @property
    def params_ratio(self) -> Optional[float]:
        return _ratio(self.params_before, self.params_after)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready data; the unit of every FLOP figure is the multiply-add."""
        data = asdict(self)
        data.update(flops_ratio=self.flops_ratio, params_ratio=self.params_ratio, unit="multiply-adds")
        return data

    def __rich_console__(self, console, options):
        yield self.renderable(options.max_width)

    def renderable(self, width: int = 220):
        """The report as rich tables fitted to ``width`` columns: per-layer columns that do not fit are left
        out, least informative first (the JSON always has them all)."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        shapes = ", ".join("x".join(map(str, shape)) if shape is not None else "(not a tensor)"
                           for shape in self.input_shapes)
        totals = Table()
        columns = ("", "before", "after", "ratio") if self.flops_after is not None else ("", "count")
        for column in columns:
            totals.add_column(column, justify="right" if column else "left")
        for label, before, after in (("FLOPs", self.flops_before, self.flops_after),
                                     ("FLOPs, conv + linear only", self.conv_flops_before, self.conv_flops_after),
                                     ("params", self.params_before, self.params_after)):
            ratio = _ratio(before, after)
            cells = (format_count(before), format_count(after), f"{ratio:.2f}x" if ratio else "-")
            totals.add_row(label, *cells[: len(columns) - 1])
        parts: List[Any] = [Text(f"{self.model}, input {shapes}. {UNIT}.", style="bold"), totals]
        if self.layers:
            cells = _layer_cells(self.layers)
            shown = _fit_columns(cells, width)
            hidden = len(cells) - len(shown)
            layers = Table(title=f"{layer_count(len(self.layers))} replaced ({self.method} analysis)",
                           caption=f"{hidden} columns left out to fit {width} columns; --json has them all"
                           if hidden else None)
            for column in shown:
                layers.add_column(column, justify="left" if column in ("layer", "was", "now") else "right",
                                  no_wrap=column != "layer", overflow="fold")
            for index in range(len(self.layers)):
                layers.add_row(*[cells[column][index] for column in shown])
            parts.append(layers)
        gathers = [row for row in self.layers if row.gather_reason]
        if gathers:
            table = Table(title=f"{len(gathers)} layers keep an output gather (a copy per call)")
            for column in ("layer", "why its channel order cannot be absorbed"):
                table.add_column(column)
            for row in gathers:
                table.add_row(row.name, row.gather_reason)
            parts.append(table)
        if self.skipped:
            skipped = Table(title=f"{len(self.skipped)} convolution{'s' if len(self.skipped) != 1 else ''} left as "
                                  f"{'they are' if len(self.skipped) != 1 else 'it is'}")
            for column in ("layer", "type", "reason"):
                skipped.add_column(column)
            for item in self.skipped:
                skipped.add_row(item["name"], item["kind"], item["reason"])
            parts.append(skipped)
        parts += [Text(f"{key}: {note}", style="dim") for key, note in self.notes.items()]
        return Group(*parts)


# per-layer columns, most informative first: the order in which they are kept when the terminal is narrow
_PRIORITY = ("layer", "ratio", "FLOPs after", "rel. MSE", "ms conv->ghost", "FLOPs before", "now", "params after",
             "was", "params before", "output", "r_s (Eq. 4)")
_ORDER = ("layer", "was", "now", "output", "FLOPs before", "FLOPs after", "params before", "params after", "ratio",
          "r_s (Eq. 4)", "ms conv->ghost", "rel. MSE")


def _layer_cells(rows: Sequence[LayerRow]) -> Dict[str, List[str]]:
    """Each per-layer column's cells as text (``rel. MSE`` only when some layer has one)."""
    cells = {
        "layer": [row.name for row in rows],
        "was": [row.original for row in rows],
        "now": [row.replacement for row in rows],
        "output": ["x".join(map(str, row.output_shape[1:])) if row.output_shape else "-" for row in rows],
        "FLOPs before": [format_count(row.flops_before) for row in rows],
        "FLOPs after": [format_count(row.flops_after) for row in rows],
        "params before": [format_count(row.params_before) for row in rows],
        "params after": [format_count(row.params_after) for row in rows],
        "ratio": [f"{row.ratio:.2f}x" if row.ratio else "-" for row in rows],
        "r_s (Eq. 4)": [f"{row.theoretical_ratio:.2f}x" for row in rows],
    }
    if any(row.reconstruction_error is not None for row in rows):
        cells["rel. MSE"] = [_error(row.reconstruction_error) for row in rows]
    if any(row.ghost_ms is not None for row in rows):
        cells["ms conv->ghost"] = ["-" if row.ghost_ms is None else f"{row.dense_ms:.3g}->{row.ghost_ms:.3g}"
                                   for row in rows]
    return cells


def _fit_columns(cells: Dict[str, List[str]], width: int) -> List[str]:
    """The columns, in table order, that fit ``width`` when added by priority (the layer name always fits:
    it folds onto more lines when it must)."""
    def need(column: str) -> int:  # the widest cell, plus padding and a border
        return max(len(text) for text in [column, *cells[column]]) + 3

    kept, used = ["layer"], 1 + min(need("layer"), 24)
    for column in _PRIORITY[1:]:
        if column in cells and used + need(column) <= width:
            kept.append(column)
            used += need(column)
    return [column for column in _ORDER if column in kept]


def _error(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _describe(row) -> Tuple[str, str]:
    k, pk, stride = row.kernel_size, row.primary_kernel, row.stride
    original = f"Conv{len(k)}d {row.in_channels}->{row.out_channels} {'x'.join(map(str, k))}"
    if any(step != 1 for step in stride):
        original += f" stride {stride[0]}" if len(set(stride)) == 1 else f" stride {'x'.join(map(str, stride))}"
    if row.norm:
        original += " + BN"
    gather = " +gather" if row.gather else ""
    wider = f" m={row.intrinsic}" if row.intrinsic else ""  # more intrinsic maps than ceil(n / s)
    return original, f"Ghost s={row.s} d={row.d} k={'x'.join(map(str, pk))}{wider}{gather}"


def _is_ghost(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), GhostModule)
    except AttributeError:
        return False


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models have the same modules, by path and class, and parameters of the same shapes (a
    conversion that replaced nothing): one count then serves both, and a large model is traced once."""
    return ([(name, type(module)) for name, module in a.named_modules()]
            == [(name, type(module)) for name, module in b.named_modules()]
            and [(name, p.shape) for name, p in a.named_parameters()]
            == [(name, p.shape) for name, p in b.named_parameters()])


def report(
    original: nn.Module,
    converted: Optional[nn.Module] = None,
    example_inputs: Optional[Sequence[torch.Tensor]] = None,
    name: Optional[str] = None,
) -> Report:
    """Count FLOPs and parameters of ``original`` and, when given, of its ``converted`` form.

    Args:
        original: the model before conversion (or the only model to count).
        converted: the model ``ghostify.convert`` returned.
        example_inputs: inputs to count on (default: the shapes the conversion used, else 1x3x224x224).
        name: the model's name in the table title (default: its class name).
    """
    result = getattr(converted, "ghostify_result", None)
    if example_inputs is None:
        shapes = result.input_shapes if result is not None else [(1, 3, 224, 224)]
        if None in shapes:
            raise ValueError("the conversion ran on non-tensor inputs; pass example_inputs to report")
        example_inputs = random_inputs(original, *shapes)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    before = Counts(original, tuple(example_inputs))
    out = Report(name or type(original).__name__, [_shape(x) for x in example_inputs], before.flops,
                 before.params, before.conv_linear_flops)
    if converted is None:
        return out
    after = before if _same_structure(original, converted) else Counts(converted, tuple(example_inputs))
    out.flops_after, out.params_after, out.conv_flops_after = after.flops, after.params, after.conv_linear_flops
    if result is not None:
        out.method = result.method
        out.skipped = [asdict(item) for item in result.skipped]
        out.notes = dict(result.notes)  # text, or a WholeModel: its text drawn, its fields in the JSON
        # each per-module table read once (every query checks that the model has not changed since counting)
        flops_before, flops_after = before.flops_by_module, after.flops_by_module
        params_before, params_after = before.params_by_module, after.params_by_module
        for row in result.replaced:
            if _is_ghost(original, row.name):  # converted before ``original``: not a change made here
                continue
            was, now = _describe(row)
            taken = [row.name] + ([row.norm] if row.norm else [])  # the Ghost module took the norm in
            flops = (sum(flops_before.get(n, 0) for n in taken), flops_after.get(row.name, 0))
            out.layers.append(LayerRow(
                row.name, was, now, row.output_shape, *flops,
                sum(params_before.get(n, 0) for n in taken), params_after.get(row.name, 0), _ratio(*flops),
                theoretical_ratio(row.in_channels, row.kernel_size, row.s, row.d, row.primary_kernel),
                row.error, row.gather_reason, row.dense_ms, row.ghost_ms, row.why,
            ))
    return out
