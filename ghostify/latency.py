"""``bench``: latency of an original model and its converted copy, both in their deploy form, in one run.

Both models get the same treatment (``ghostify.deploy`` for the runtime: BN folded, channels-last
weights, compiled the same way for inductor, exported to ONNX for onnxruntime). Runs are interleaved
(original, converted, original, ...) so load from other processes hits both alike, and the median of the
repeats is reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .deployment import RUNTIMES
from .progress import progress as progress_display
from .trace import random_inputs


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
    rows: List[BenchRow] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            out["speedup"] = row.speedup
        return data

    def __rich__(self):
        from rich.table import Table

        table = Table(title=f"{self.name}: median of {self.repeats}, {self.threads} thread(s)")
        for column in ("runtime", "batch", "original ms", "converted ms", "original img/s", "converted img/s",
                       "speed-up", "FLOPs ratio"):
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


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            out = model(x)
        if x.is_cuda:  # CUDA runs asynchronously: time the work, not the launch
            torch.cuda.synchronize(x.device)
        return out

    return run


def _onnx_runners(models: Sequence[nn.Module], x: torch.Tensor, threads: int, folder: str) -> List[Callable[[], Any]]:
    from .exporting import onnx_session, write_onnx

    runners = []
    for index, model in enumerate(models):
        path = os.path.join(folder, f"model{index}.onnx")
        with torch.no_grad():
            write_onnx(model, path, x, dynamic_batch=False)
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: x.cpu().numpy()}
        runners.append(lambda session=session, feed=feed: session.run(None, feed))
    return runners


def flops_ratio(original: nn.Module, converted: nn.Module, input_size: Sequence[int]) -> float:
    """Conv + linear multiply-adds of ``original`` over ``converted`` (the paper's convention)."""
    from .count import Counts

    inputs = random_inputs(original, (1, *input_size))
    return Counts(original, inputs).conv_linear_flops / Counts(converted, inputs).conv_linear_flops


def bench(original: nn.Module, converted: nn.Module, *, batches: Sequence[int] = (1, 16), runtime: str = "torch",
          threads: Optional[int] = None, repeats: int = 10, warmup: int = 2,
          input_size: Tuple[int, int, int] = (3, 224, 224), name: str = "model",
          progress: bool = False) -> BenchResult:
    """Time ``original`` against ``converted``, both deployed, at each batch size.

    Args:
        original, converted: the two models; copied and deployed, not modified.
        batches: batch sizes to time.
        runtime: ``"torch"`` (eager, channels-last), ``"inductor"`` (``torch.compile`` with freezing, both
            models compiled the same way; the warm-up runs compile them) or ``"onnxruntime"`` (CPU provider).
        threads: intra-op threads for both runtimes (default: torch's current setting).
        repeats: timed runs per model and batch size; the median is reported.
        warmup: untimed runs first.
        progress: show a rich progress bar on stderr.

    Raises:
        ValueError: unknown runtime, or a batch / repeat count below 1.
        RuntimeError: a model is in training mode.
        ImportError: runtime ``"onnxruntime"`` without onnxruntime installed.
    """
    from .deployment import deploy

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not batches or min(batches) < 1 or repeats < 1:
        raise ValueError(f"batches and repeats must be >= 1, got batches={list(batches)}, repeats={repeats}")
    if runtime == "onnxruntime":
        from .exporting import require_onnx

        require_onnx()
    threads = threads or torch.get_num_threads()
    models = [deploy(m, runtime=runtime) for m in (original, converted)]
    result = BenchResult(name, flops_ratio(original, converted, input_size), threads, repeats)
    with torch_threads(threads), tempfile.TemporaryDirectory() as folder, \
            progress_display("timing {description}", show=progress) as bar:
        task = bar.add_task(f"{name} ({runtime})", total=len(batches) * repeats) if bar else None
        step = (lambda: bar.advance(task)) if bar else None
        for batch in batches:
            (x,) = random_inputs(original, (batch, *input_size))
            if runtime != "onnxruntime":
                runners = [_torch_runner(m, x) for m in models]
            else:
                runners = _onnx_runners(models, x, threads, folder)
            original_ms, converted_ms = interleaved(runners, repeats, warmup, step)
            result.rows.append(BenchRow(runtime, batch, original_ms, converted_ms))
    return result

