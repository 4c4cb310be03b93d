"""``export``: write a model's deploy form as ONNX, TorchScript or a ``torch.export`` program (.pt2).

The written files need neither ghostify nor the model's Python classes to run: ONNX runs in onnxruntime,
TorchScript loads with ``torch.jit.load`` and .pt2 with ``torch.export.load``. Every export is loaded
back and run against the PyTorch deploy form; the largest difference is returned, absolute and relative.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .deployment import deploy
from .files import atomic_write
from .trace import input_sizes, placement, random_inputs, run_or_explain

FORMATS = ("onnx", "torchscript", "pt2")
ONNX_OPSET = 17


@contextmanager
def _quiet_exporters():
    """Silence what torch's exporters say about themselves, never what they say about the model.

    Hidden: deprecation notices of the exporters, torch.export's weight-grouping note when saving, and tracer
    warnings raised inside ghostify's deploy forms (static channel-count checks). Shown: everything else,
    above all a ``TracerWarning`` from the model's own code, which means a data-dependent branch or value was
    frozen into the file.
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"ghostify\.")
        yield


@dataclass
class ExportResult:
    """What ``export`` wrote and how closely the file reproduces the PyTorch deploy form."""

    path: str
    format: str
    input_shape: Tuple  # the example's shape; one per input for a model with several
    dynamic_batch: bool
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff over the largest output magnitude: meaningful for tiny outputs too

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def require_onnx():
    """Import and return onnxruntime, or explain how to install the optional extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX export and the onnxruntime benchmark need onnx and onnxruntime: "
                          "pip install 'ghostify[onnx]'") from None
    return onnxruntime


def onnx_session(path: str, threads: int = 0):
    """An onnxruntime CPU session for ``path`` (``threads`` = 0: onnxruntime's default).

    Its threads spin while a run lasts, as onnxruntime's default session does (a model of many small nodes
    would otherwise wait for a thread to wake at each), and stop when the run returns: ``bench`` runs two
    sessions in turn, and a session's threads spinning idle on the cores the other needs made the timings up
    to 2x slower and erratic (MobileNetV2, batch 1, 2 cores).
    """
    ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _input_names(count: int) -> List[str]:
    """ONNX input names: ``input``, or ``input_0``, ``input_1``, ... for several."""
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def write_onnx(model: nn.Module, path: str, examples: Tuple[torch.Tensor, ...], dynamic_batch: bool) -> None:
    """``torch.onnx.export`` (TorchScript-based exporter: it runs offline and keeps Conv/Concat as they are)."""
    require_onnx()
    inputs = _input_names(len(examples))
    axes = {name: {0: "batch"} for name in [*inputs, "output"]} if dynamic_batch else None
    with _quiet_exporters():
        torch.onnx.export(model, examples, path, dynamo=False, opset_version=ONNX_OPSET, input_names=inputs,
                          output_names=["output"], dynamic_axes=axes)


def _write_torchscript(model: nn.Module, path: str, examples: Tuple[torch.Tensor, ...]) -> None:
    with _quiet_exporters():
        traced = torch.jit.trace(model, examples, check_trace=False)
    traced.save(path)


def _write_pt2(model: nn.Module, path: str, examples: Tuple[torch.Tensor, ...], dynamic_batch: bool) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = tuple({0: batch} for _ in examples) if dynamic_batch else None
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name; atomic_write hands us a temp name
    with _quiet_exporters():
        program = torch.export.export(model, examples, dynamic_shapes=shapes)
        torch.export.save(program, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def _run_file(path: str, fmt: str, xs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    if fmt == "onnx":
        session = onnx_session(path)
        feed = {spec.name: x.cpu().numpy() for spec, x in zip(session.get_inputs(), xs)}
        return torch.from_numpy(session.run(None, feed)[0])
    with _quiet_exporters():
        return torch.jit.load(path)(*xs) if fmt == "torchscript" else torch.export.load(path).module()(*xs)


def export(model: nn.Module, path: str, format: str = "onnx", *, input_size=None, dynamic_batch: bool = False,
           overwrite: bool = True) -> ExportResult:
    """Export ``ghostify.deploy(model)`` to ``path`` and check the file against it.

    Args:
        model: a converted (or any) model in eval mode; it is not modified.
        path: the file to write (atomically).
        format: ``"onnx"``, ``"torchscript"`` or ``"pt2"``.
        input_size: C, H, W of the example input (C, L for a 1-D model; C, D, H, W for a 3-D one), or one such
            size per input of a model with several; default: the sizes the model was converted at
            (``input_sizes``).
        dynamic_batch: let the batch size vary in the exported file (checked with batch 1 and 3).
        overwrite: replace ``path`` if it exists.

    Raises:
        ValueError: unknown ``format`` or a bad ``input_size``.
        RuntimeError: ``model`` is in training mode.
        ImportError: ONNX export without onnx / onnxruntime installed.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    sizes = input_sizes(model, input_size)
    if format == "onnx":
        require_onnx()
        dtype, _ = placement(model)
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"ONNX export of a {dtype} model: onnxruntime's CPU kernels run float32 and float16 "
                             "convolutions only; export model.float() instead")
    deployed = deploy(model, runtime="onnxruntime" if format == "onnx" else "inductor", compile=False)
    examples = random_inputs(deployed, *[(2 if dynamic_batch else 1, *size) for size in sizes])
    with torch.no_grad():
        run_or_explain(deployed, examples, "input_size")
        if format == "onnx":
            atomic_write(path, lambda temp: write_onnx(deployed, temp, examples, dynamic_batch), overwrite)
        elif format == "torchscript":
            atomic_write(path, lambda temp: _write_torchscript(deployed, temp, examples), overwrite)
        else:
            atomic_write(path, lambda temp: _write_pt2(deployed, temp, examples, dynamic_batch), overwrite)
        diff = relative = 0.0
        for batch in ((1, 3) if dynamic_batch else (1,)):
            xs = random_inputs(deployed, *[(batch, *size) for size in sizes])
            expected = deployed(*xs)
            error = float((_run_file(os.fspath(path), format, xs).to(expected) - expected).abs().max())
            scale = float(expected.abs().max())
            diff = max(diff, error)
            relative = max(relative, error / scale if scale > 0 else 0.0 if error == 0 else math.inf)
    shapes = [tuple(x.shape) for x in examples]
    return ExportResult(os.fspath(path), format, shapes[0] if len(shapes) == 1 else tuple(shapes), dynamic_batch,
                        diff, relative)
