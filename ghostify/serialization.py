"""Save and load converted models without pickled code.

A file holds plain data only (it loads under ``torch.load(..., weights_only=True)``): the source model's
spec, the conversion result (its per-layer plan) and the state_dict. Loading rebuilds the source
architecture, replays the plan and loads the weights. Loading never runs code a file names: a spec that
points at Python code (``module:factory``, ``file.py:factory``) is only built with ``trust_source=True``.
Writes are atomic (``files.atomic_write``): a failure or Ctrl-C never leaves a partial file.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from .files import atomic_write
from .module import GhostModule
from .plan import apply_plan
from .result import ConversionResult, Replaced, Skipped, Timing, WholeModel
from .sources import build, describe, load_weights, parse, read_data

FORMAT = "ghostify"
VERSION = 2  # 2: ghosts of s > 2 modules ordered ghost-major (1: per intrinsic map; still read, see _upgrade)
NAMED_SOURCES = frozenset({"torchvision", "zoo", "timm"})  # registered names: building one runs no file's code
CODE_SOURCES = frozenset({"module", "file"})  # building these imports and runs the code they name


def save(model: nn.Module, path: str, *, overwrite: bool = True) -> None:
    """Write a model returned by ``ghostify.convert`` (or ``ghostify.load``) to ``path``.

    Raises:
        TypeError: ``model`` was not made by ``ghostify.convert``.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    result = getattr(model, "ghostify_result", None)
    if not isinstance(result, ConversionResult):
        raise TypeError(f"ghostify.save stores models made by ghostify.convert; got a plain {type(model).__name__}")
    data = result.to_dict()
    data["source"] = _relocate(data["source"], os.path.dirname(os.path.abspath(path)), relative=True)
    payload = {"format": FORMAT, "version": VERSION, "result": data, "state_dict": model.state_dict()}
    atomic_write(path, lambda temp: torch.save(payload, temp), overwrite=overwrite)


def _relocate(source: Optional[Dict[str, Any]], folder: str, relative: bool) -> Optional[Dict[str, Any]]:
    """A ``file.py:factory`` spec's path made relative to the saved file's folder (so the pair can move
    together), or back to absolute on loading; other specs unchanged."""
    if not isinstance(source, dict) or source.get("kind") != "file" or not isinstance(source.get("path"), str):
        return source
    path = source["path"]
    path = os.path.relpath(path, folder) if relative else os.path.normpath(os.path.join(folder, path))
    return {**source, "path": path}


def _read(path: str) -> Dict[str, Any]:
    payload = read_data(path, "ghostify file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ghostify file (no ghostify header); was it written by ghostify.save?")
    if payload.get("version") not in (1, VERSION):
        raise ValueError(f"{path} has ghostify format version {payload.get('version')!r}; "
                         f"this ghostify reads 1 and {VERSION}")
    return payload


def _upgrade(model: nn.Module) -> None:
    """Give the Ghost modules of a version-1 file their version-1 outputs in today's module.

    Version 1 ordered an s > 2 module's ghosts per intrinsic map (map ``i``'s ghosts at ``i * (s-1) + k``);
    now they are ghost-major (``k * m + i``). The cheap rows are reordered to match and the module gathers
    its outputs back into the old order, which its readers' weights assume (exact, but slower: convert
    again to drop the gather).
    """
    for ghost in model.modules():
        if not isinstance(ghost, GhostModule) or ghost.s == 2:
            continue
        m, s, n = ghost.intrinsic_channels, ghost.s, ghost.out_channels
        new = torch.arange(m * (s - 1))
        old_row = (new % m) * (s - 1) + new // m  # the version-1 row of each ghost-major ghost
        with torch.no_grad():
            for tensor in list(ghost.cheap.parameters()) + list(ghost.cheap.buffers()):
                if tensor.dim() > 0 and len(tensor) == len(new):
                    tensor.copy_(tensor[old_row.to(tensor.device)].clone())
        place = torch.cat([torch.arange(m), m + old_row.argsort()])  # old map -> today's map
        old_index = ghost.out_index.cpu() if ghost.out_index is not None else torch.arange(n)
        ghost.set_out_index(place[old_index])


def _result_from_dict(data: Dict[str, Any]) -> ConversionResult:
    data = dict(data)
    data["replaced"] = [Replaced(**row) for row in data["replaced"]]
    data["skipped"] = [Skipped(**row) for row in data["skipped"]]
    data["notes"] = {key: WholeModel(**{**note, "tried": [Timing(**t) for t in note["tried"]]})
                     if isinstance(note, dict) else note for key, note in data.get("notes", {}).items()}
    return ConversionResult(**data)


def build_source(source: Any, path: str, trust_source: bool = False) -> nn.Module:
    """Build the original architecture a file's source spec names, never running code the file chose.

    A file is data, so only specs on an allow-list are built from it: torchvision, zoo and timm names. A spec
    naming Python code (``module:factory``, ``file.py:factory``) would import and run that code, so it is
    built only when the caller trusts the file; any other kind is refused.

    Raises:
        ValueError: the spec names code and ``trust_source`` is False, or it is not a spec ghostify builds
            (None: the model was converted from a Python object).
    """
    if source is None:
        raise ValueError(f"{path} was converted from a Python object, not a MODEL name; rebuild it with "
                         "ghostify.load(path, model=<the original architecture>) (CLI: --arch MODEL)")
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind in NAMED_SOURCES or (trust_source and kind in CODE_SOURCES):
        return build(source)
    if kind in CODE_SOURCES:
        raise ValueError(f"{path} was converted from code ({describe(source)!r}); loading it would import and run "
                         "that code. Pass the architecture (ghostify.load(path, model=...), CLI: --arch MODEL) or, if "
                         "you trust the file, trust_source=True (CLI: --trust-source)")
    raise ValueError(f"{path} names an architecture source ghostify does not build ({source!r}); "
                     "pass the architecture: ghostify.load(path, model=...)")


def load(path: str, model: Optional[nn.Module] = None, *, trust_source: bool = False) -> nn.Module:
    """Rebuild a converted model saved by ``ghostify.save``.

    The architecture is rebuilt from the file's spec when it is a torchvision, zoo or timm name, in the dtype
    the file's weights have (on the CPU, or where ``model`` is). A file
    converted from code (``module:factory``, ``file.py:factory``) needs ``model`` or ``trust_source=True``:
    loading a file must not import and run code the file names.

    Args:
        path: the file.
        model: the original architecture, needed when the model was converted from a Python object rather
            than a MODEL string; it is copied, not modified, and the file's spec is then ignored.
        trust_source: build a spec that names Python code, importing and running it; only for trusted files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a ghostify file, its spec names code and neither ``model`` nor
            ``trust_source`` is given, or the weights do not fit the rebuilt architecture.
    """
    payload = _read(os.fspath(path))
    try:
        result = _result_from_dict(payload["result"])
        result.source = _relocate(result.source, os.path.dirname(os.path.abspath(path)), relative=False)
        state = payload["state_dict"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is a damaged ghostify file: {error}") from None
    rebuilt = copy.deepcopy(model) if model is not None else build_source(result.source, path, trust_source)
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}
    if len(dtypes) == 1:  # the model as it was saved (float64, half), not as a fresh build makes it
        rebuilt.to(dtypes.pop())
    apply_plan(rebuilt, result.plan(), fill=False)
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(error)
        raise ValueError(f"the weights in {path} do not fit the rebuilt {type(rebuilt).__name__}: {detail}") from None
    if payload["version"] == 1:
        _upgrade(rebuilt)
    rebuilt.ghostify_result = result
    return rebuilt


def load_model(text: str, weights: Optional[str] = None, trust_source: bool = False,
               arch: Optional[str] = None) -> nn.Module:
    """Build the model a MODEL string names; a ghostify file loads as its converted model.

    ``trust_source`` goes to ``load``: a ghostify file converted from code (``module:factory``,
    ``file.py:factory``) is rebuilt by running that code only when it is True. ``arch`` (a MODEL string)
    names a ghostify file's original architecture instead of its record (needed for a file converted from a
    Python object). A MODEL string itself naming code is the caller's choice and is built as asked.
    """
    spec = parse(text)
    if spec["kind"] == "ghostify_file":
        original = build(parse(arch)) if arch is not None else None
        return load(spec["path"], original, trust_source=trust_source)
    if arch is not None:
        raise ValueError(f"--arch names the architecture of a ghostify file, but {text!r} is not one")
    model = build(spec)
    if weights is not None:
        load_weights(model, weights)
    return model
