"""What ``convert`` did: each conv replaced (with its plan) or skipped (with the reason), and notes; attached
to the converted model as ``model.ghostify_result`` and saved with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class Replaced:
    """A conv that became a Ghost module."""

    name: str
    s: int
    d: int
    primary_kernel: Tuple[int, ...]
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    input_shape: Optional[Tuple[int, ...]] = None
    output_shape: Optional[Tuple[int, ...]] = None
    aliases: List[str] = field(default_factory=list)
    calls: int = 1
    norm: Optional[str] = None
    gather: bool = False
    gather_reason: Optional[str] = None
    error: Optional[float] = None
    dense_ms: Optional[float] = None  # with convert(runtime=...): the layer alone, as a conv and as a Ghost module
    ghost_ms: Optional[float] = None
    why: Optional[str] = None  # with a budget: why this s
    order: Optional[List[int]] = None  # original channel of each output (the order readers absorbed); None: unknown
    intrinsic: Optional[int] = None  # m, when more than ceil(n / s) (whole groups, aligned parts)


@dataclass
class Skipped:
    """A conv left as it is, and why."""

    name: str
    kind: str
    reason: str


def milliseconds(value: float) -> str:
    """Milliseconds to three significant figures, trailing zeros kept below 100 (7.00 beside 6.74)."""
    return f"{value:.3g}" if value >= 100 else f"{value:#.3g}"


def layer_count(count: int) -> str:
    return f"{count} layer" + ("" if count == 1 else "s")


@dataclass
class Timing:
    """One version of the model timed whole: which layers it converted, how many, its ms, and that as a
    fraction of the original's ms in the same interleaved run."""

    layers: str
    count: int
    ms: float
    fraction: float


@dataclass
class WholeModel:
    """The whole model timed against the original in ``runtime`` at ``batch`` (``convert(runtime=...)``, latency
    budgets): each version tried, in order, and the index of the one converted (None: nothing converted).
    A conversion note: ``str`` is its text, the report's JSON has the fields."""

    runtime: str
    batch: int
    original_ms: float
    tried: List[Timing]
    chosen: Optional[int]
    target: Optional[float] = None  # a latency budget's fraction of the original's time

    def __str__(self) -> str:
        budget = self.target is not None
        versions = "; ".join(f"{layer_count(t.count)} ({t.layers}) {milliseconds(t.ms)} ms"
                             + (f", {t.fraction:.2f} of it" if budget else "") for t in self.tried)
        if self.chosen is None:
            end = "nothing converted"
        elif budget:
            end = f"converted: {'the last' if len(self.tried) > 1 else 'that'} (target {self.target:g})"
        else:
            best = self.tried[self.chosen]
            end = f"converted: {layer_count(best.count)}, {1 / best.fraction:.2f}x faster"
        return (f"in {self.runtime} (batch {self.batch}): the original {milliseconds(self.original_ms)} ms; "
                f"{versions}; {end}")


@dataclass
class ConversionResult:
    """What ``convert`` did; attached to the converted model as ``model.ghostify_result``."""

    method: str
    replaced: List[Replaced]
    skipped: List[Skipped]
    input_shapes: List[Optional[Tuple[int, ...]]]
    init: str = "random"
    source: Optional[Dict[str, Any]] = None
    notes: Dict[str, Any] = field(default_factory=dict)  # text, or a ``WholeModel``

    def plan(self) -> List[Dict[str, Any]]:
        """The per-layer settings that rebuild the converted architecture from the original one."""
        return [{"name": r.name, "s": r.s, "d": r.d, "primary_kernel": list(r.primary_kernel), "norm": r.norm,
                 "gather": r.gather, "intrinsic": r.intrinsic, "in_channels": r.in_channels,
                 "out_channels": r.out_channels, "kernel_size": list(r.kernel_size)} for r in self.replaced]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
