"""``bench``: latency of an original model and its converted copy, both in their deploy form, in one run.

Both models get the same treatment (``ghostify.deploy`` for the runtime: BN folded, channels-last
weights, compiled the same way for inductor, exported to ONNX for onnxruntime). Runs are interleaved
(original, converted, original, ...) so load from other processes hits both alike, and the median of the
repeats is reported.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .deployment import RUNTIMES
from .epilogue import ACTIVATIONS, follows
from .plan import apply_plan
from .progress import progress as progress_display
from .trace import GhostLeafTracer, evaluating, input_sizes, random_inputs


@dataclass
class BenchRow:
    """Median latency of one batch size in one runtime, in milliseconds per batch."""

    runtime: str
    batch: int
    original_ms: float
    converted_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.converted_ms

    def images_per_s(self, which: str) -> float:
        return self.batch * 1000.0 / getattr(self, f"{which}_ms")


@dataclass
class BenchResult:
    """Latency rows plus the FLOPs ratio (conv + linear multiply-adds, original / converted) beside them."""

    name: str
    flops_ratio: float
    threads: int
    repeats: int
    input_sizes: List[Tuple[int, ...]] = field(default_factory=list)  # per sample, one per model input
    rows: List[BenchRow] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            out["speedup"] = row.speedup
        return data

    def __rich__(self):
        from rich.table import Table

        sizes = ", ".join("x".join(map(str, size)) for size in self.input_sizes)
        table = Table(title=f"{self.name}, input {sizes} per sample: median of {self.repeats}, {self.threads} "
                            "thread(s)")
        for column in ("runtime", "batch", "original ms", "converted ms", "original img/s", "converted img/s",
                       "speed-up", "FLOPs ratio (conv + linear)"):
            table.add_column(column, justify="left" if column == "runtime" else "right")
        for row in self.rows:
            table.add_row(row.runtime, str(row.batch), f"{row.original_ms:.1f}", f"{row.converted_ms:.1f}",
                          f"{row.images_per_s('original'):.1f}", f"{row.images_per_s('converted'):.1f}",
                          f"{row.speedup:.2f}x", f"{self.flops_ratio:.2f}x")
        return table


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave torch's setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved(runners: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1,
                step: Optional[Callable[[], None]] = None) -> List[float]:
    """Median wall time in ms of each runner, running them in turn ``repeats`` times after ``warmup``."""
    for _ in range(warmup):
        for run in runners:
            run()
    times: List[List[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for run, out in zip(runners, times):
            start = time.perf_counter()
            run()
            out.append((time.perf_counter() - start) * 1000.0)
        if step is not None:
            step()
    return [statistics.median(t) for t in times]


def _torch_runner(model: nn.Module, xs: Tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    xs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs)

    def run():
        with torch.inference_mode():
            out = model(*xs)
        if xs[0].is_cuda:  # CUDA runs asynchronously: time the work, not the launch
            torch.cuda.synchronize(xs[0].device)
        return out

    return run


def _onnx_runners(models: Sequence[nn.Module], xs: Tuple[torch.Tensor, ...], threads: int,
                  folder: str) -> List[Callable[[], Any]]:
    from .exporting import onnx_session, write_onnx

    runners = []
    for index, model in enumerate(models):
        path = os.path.join(folder, f"model{index}.onnx")
        with torch.no_grad():
            write_onnx(model, path, xs, dynamic_batch=False)
        session = onnx_session(path, threads)
        feed = {spec.name: x.cpu().numpy() for spec, x in zip(session.get_inputs(), xs)}
        runners.append(lambda session=session, feed=feed: session.run(None, feed))
    return runners


def _runners(models: Sequence[nn.Module], xs: Tuple[torch.Tensor, ...], runtime: str, threads: int,
             folder: str) -> List[Callable[[], Any]]:
    """One callable per deployed model running it on the inputs ``xs`` in ``runtime``."""
    if runtime == "onnxruntime":
        return _onnx_runners(models, xs, threads, folder)
    return [_torch_runner(m, xs) for m in models]


def _check(runtime: str, batches: Sequence[int], repeats: int) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not batches or min(batches) < 1 or repeats < 1:
        raise ValueError(f"batches and repeats must be >= 1, got batches={list(batches)}, repeats={repeats}")
    if runtime == "onnxruntime":
        from .exporting import require_onnx

        require_onnx()


class _Unit(nn.Module):
    """One layer (a conv or a Ghost module, with the norm it takes in) and what follows it in its model: a
    residual addition (of a fixed random shortcut) and/or an activation, which a deployed Ghost module takes in."""

    def __init__(self, layer: nn.Module, shortcut: Optional[torch.Tensor], activation: Optional[str]) -> None:
        super().__init__()
        self.layer, self.activation = layer, activation
        self.register_buffer("shortcut", shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)  # a new tensor: the addition and activation work in place, as CNNs' own code does
        if self.shortcut is not None:
            y += self.shortcut
        return ACTIVATIONS[self.activation](y, inplace=True) if self.activation else y


def _units(model: nn.Module, entry: Dict[str, Any], batch: int, after: Tuple[bool, Optional[str]]):
    """The planned layer of ``model`` as a conv unit and as a Ghost unit, and a random input for both;
    ``after``: the residual addition and activation that follow it (``epilogue.follows``)."""
    layers = [copy.deepcopy(model.get_submodule(entry["name"]))]
    if entry.get("norm"):
        layers.append(copy.deepcopy(model.get_submodule(entry["norm"])))
    dense = nn.Sequential(*layers)
    ghost = copy.deepcopy(dense)
    apply_plan(ghost, [{**entry, "name": "0", "norm": "1" if entry.get("norm") else None, "gather": False}])
    weight = dense[0].weight
    factory = {"dtype": weight.dtype, "device": weight.device}
    add, activation = after
    shortcut = torch.randn(batch, *entry["output_shape"][1:], **factory) if add else None
    x = torch.randn(batch, *entry["input_shape"][1:], **factory)
    return [_Unit(layer, shortcut, activation).eval() for layer in (dense, ghost)], x


def layer_times(model: nn.Module, plan: Sequence[Dict[str, Any]], *, runtime: str = "torch", batch: int = 1,
                threads: Optional[int] = None, repeats: int = 15,
                progress: bool = False) -> List[Tuple[float, float]]:
    """For each plan row, ``(conv ms, Ghost ms)``: the layer timed alone against the Ghost module the plan makes
    of it, both in ``runtime``'s deploy form, interleaved, on a random input of the layer's real shape at
    ``batch``. Each unit includes the norm the plan takes in and the residual addition and/or activation that
    follow the layer in ``model`` (which a deployed Ghost module writes with its output).

    Args:
        model: the original model (not modified).
        plan: ``ConversionResult.plan()`` rows with ``input_shape`` and ``output_shape`` (``asdict`` of the
            ``Replaced`` rows ``convert`` makes).

    A lookup table in NetAdapt's sense: each layer alone, not a profile of the whole model. Layers alike (the
    same modules, plan, input shape and what follows them: a ResNet stage's repeated blocks) are timed once and
    share the figures, so twins never get different decisions from timing noise.
    """
    from .deployment import deploy

    _check(runtime, [batch], repeats)
    threads = threads or torch.get_num_threads()
    try:
        graph = fx.GraphModule(model, GhostLeafTracer().trace(model))
    except Exception:  # noqa: BLE001 - untraceable: time the layers without what follows them
        graph = None
    times: List[Tuple[float, float]] = []
    with torch_threads(threads), tempfile.TemporaryDirectory() as folder, \
            progress_display("timing {description}", show=progress) as bar:
        task = bar.add_task(f"layers ({runtime}, batch {batch})", total=len(plan)) if bar else None
        timed: Dict[Tuple, Tuple[float, float]] = {}
        for entry in plan:
            after = follows(graph, entry["name"], entry.get("norm")) if graph is not None else (False, None)
            key = _signature(model, entry, after)
            if key not in timed:
                units, x = _units(model, entry, batch, after)
                runners = _runners([deploy(unit, runtime=runtime) for unit in units], (x,), runtime, threads, folder)
                timed[key] = tuple(interleaved(runners, repeats, warmup=2))
            times.append(timed[key])
            if bar:
                bar.advance(task)
    return times


def _signature(model: nn.Module, entry: Dict[str, Any], after: Tuple[bool, Optional[str]]) -> Tuple:
    """What a layer's timing depends on: its conv and norm as configured (their repr, not their weights), the
    Ghost module planned for it, its input shape (which with the conv fixes the output's) and what follows it."""
    norm = entry.get("norm")
    return (repr(model.get_submodule(entry["name"])), repr(model.get_submodule(norm)) if norm else None,
            entry["s"], entry["d"], tuple(entry["primary_kernel"]), entry.get("intrinsic"),
            tuple(entry["input_shape"][1:]), after)


def model_times(model: nn.Module, plans: Sequence[Sequence[Dict[str, Any]]], sizes: Sequence[Sequence[int]], *,
                runtime: str = "torch", batch: int = 1, threads: Optional[int] = None, repeats: int = 15,
                progress: bool = False) -> List[float]:
    """Median ms of one batch through ``model`` and through a copy of it with each plan applied, each in
    ``runtime``'s deploy form, interleaved in one run; the original's first. The copies' Ghost modules are
    fresh (random weights: the time does not depend on them). Inputs are random, of the per-sample ``sizes``.

    The whole model, where ``layer_times`` times layers alone: it sees what a Ghost module costs its
    neighbours (onnxruntime's layout changes, caches) and what a runtime fuses across layers.
    """
    from .deployment import deploy

    _check(runtime, [batch], repeats)
    threads = threads or torch.get_num_threads()
    xs = random_inputs(model, *[(batch, *size) for size in sizes])
    versions = []
    with evaluating(model):
        for plan in [[], *plans]:
            version = copy.deepcopy(model) if plan else model  # copies made here are in eval mode too
            apply_plan(version, [{**row, "gather": False} for row in plan])
            versions.append(deploy(version, runtime=runtime))
    with torch_threads(threads), tempfile.TemporaryDirectory() as folder, \
            progress_display("timing {description}", show=progress) as bar:
        task = bar.add_task(f"whole models ({runtime}, batch {batch})", total=repeats) if bar else None
        runners = _runners(versions, xs, runtime, threads, folder)
        return interleaved(runners, repeats, warmup=2, step=(lambda: bar.advance(task)) if bar else None)


def flops_ratio(original: nn.Module, converted: nn.Module, sizes: Sequence[Sequence[int]]) -> float:
    """Conv + linear multiply-adds of ``original`` over ``converted`` (the paper's convention) on inputs of the
    per-sample ``sizes``."""
    from .count import Counts

    inputs = random_inputs(original, *[(1, *size) for size in sizes])
    return Counts(original, inputs).conv_linear_flops / Counts(converted, inputs).conv_linear_flops


def bench(original: nn.Module, converted: nn.Module, *, batches: Sequence[int] = (1, 16), runtime: str = "torch",
          threads: Optional[int] = None, repeats: int = 10, warmup: int = 2,
          input_size=None, name: str = "model", progress: bool = False) -> BenchResult:
    """Time ``original`` against ``converted``, both deployed, at each batch size.

    Args:
        original, converted: the two models; copied and deployed, not modified.
        batches: batch sizes to time.
        runtime: ``"torch"`` (eager, channels-last), ``"inductor"`` (``torch.compile`` with freezing, both
            models compiled the same way; the warm-up runs compile them) or ``"onnxruntime"`` (CPU provider).
        threads: intra-op threads for both runtimes (default: torch's current setting).
        repeats: timed runs per model and batch size; the median is reported.
        warmup: untimed runs first.
        input_size: C, H, W of each sample (C, L or C, D, H, W), or one such size per input of a model with
            several; default: the sizes ``converted`` was converted at (``trace.input_sizes``).
        name: the model's name in the result.
        progress: show a rich progress bar on stderr.

    Raises:
        ValueError: unknown runtime, or a batch / repeat count below 1.
        RuntimeError: a model is in training mode.
        ImportError: runtime ``"onnxruntime"`` without onnxruntime installed.
    """
    from .deployment import deploy

    _check(runtime, batches, repeats)
    threads = threads or torch.get_num_threads()
    models = [deploy(m, runtime=runtime) for m in (original, converted)]
    sizes = input_sizes(converted, input_size)
    result = BenchResult(name, flops_ratio(original, converted, sizes), threads, repeats, list(sizes))
    with torch_threads(threads), tempfile.TemporaryDirectory() as folder, \
            progress_display("timing {description}", show=progress) as bar:
        task = bar.add_task(f"{name} ({runtime})", total=len(batches) * repeats) if bar else None
        step = (lambda: bar.advance(task)) if bar else None
        for batch in batches:
            xs = random_inputs(original, *[(batch, *size) for size in sizes])
            runners = _runners(models, xs, runtime, threads, folder)
            original_ms, converted_ms = interleaved(runners, repeats, warmup, step)
            result.rows.append(BenchRow(runtime, batch, original_ms, converted_ms))
    return result

