"""Save and load converted models without pickled code.

A file holds plain data only (it loads under ``torch.load(..., weights_only=True)``): the source model's
spec, the conversion result (its per-layer plan) and the state_dict. Loading rebuilds the source
architecture, replays the plan and loads the weights. Writes are atomic: a temp file in the same folder,
renamed into place, so a failure or Ctrl-C never leaves a partial file.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import nn

from .rewrite import ConversionResult, Replaced, Skipped, apply_plan

FORMAT = "ghostify"
VERSION = 1


def atomic_write(path: str, write, overwrite: bool = True) -> None:
    """Call ``write(temp_path)`` and rename the result onto ``path``; nothing is left behind on failure."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder does not exist: {folder}")
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def save(model: nn.Module, path: str, *, overwrite: bool = True) -> None:
    """Write a model returned by ``ghostify.convert`` (or ``ghostify.load``) to ``path``.

    Raises:
        TypeError: ``model`` was not made by ``ghostify.convert``.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    result = getattr(model, "ghostify_result", None)
    if not isinstance(result, ConversionResult):
        raise TypeError(f"ghostify.save stores models made by ghostify.convert; got a plain {type(model).__name__}")
    payload = {"format": FORMAT, "version": VERSION, "result": result.to_dict(), "state_dict": model.state_dict()}
    atomic_write(path, lambda temp: torch.save(payload, temp), overwrite=overwrite)


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt, truncated or foreign: all bad input
        raise ValueError(f"{path} is not a readable ghostify file (corrupt, truncated or foreign): "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ghostify file (no ghostify header); was it written by ghostify.save?")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has ghostify format version {payload.get('version')!r}; "
                         f"this ghostify reads {VERSION}")
    return payload


def _result_from_dict(data: Dict[str, Any]) -> ConversionResult:
    data = dict(data)
    data["replaced"] = [Replaced(**row) for row in data["replaced"]]
    data["skipped"] = [Skipped(**row) for row in data["skipped"]]
    return ConversionResult(**data)


def load(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild a converted model saved by ``ghostify.save``.

    Args:
        path: the file.
        model: the original architecture, needed when the model was converted from a Python object rather
            than a MODEL string; it is copied, not modified.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a ghostify file, or the weights do not fit the rebuilt architecture.
    """
    from .sources import build

    payload = _read(os.fspath(path))
    try:
        result = _result_from_dict(payload["result"])
        state = payload["state_dict"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is a damaged ghostify file: {error}") from None
    if model is not None:
        rebuilt = copy.deepcopy(model)
    elif result.source is not None:
        rebuilt = build(result.source)
    else:
        raise ValueError(f"{path} was converted from a Python object, not a MODEL name; rebuild it with "
                         "ghostify.load(path, model=<the original architecture>)")
    apply_plan(rebuilt, result.plan())
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(error)
        raise ValueError(f"the weights in {path} do not fit the rebuilt {type(rebuilt).__name__}: {detail}") from None
    rebuilt.ghostify_result = result
    return rebuilt
