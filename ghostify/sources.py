"""MODEL strings -> ``nn.Module``: torchvision names, ghostify's zoo, ``timm:NAME``, ``module:factory`` and
``path/to/file.py:factory`` (``parse`` also recognises files written by ``ghostify.save``, which
``serialization.load_model`` loads).

A built model carries its spec as ``model.ghostify_source`` (plain data), so a converted copy can be saved
and rebuilt later without pickling code.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

Spec = Dict[str, Any]
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar")  # a MODEL string naming a file


def torchvision_names() -> List[str]:
    """torchvision's classification model names."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def zoo_names() -> List[str]:
    """ghostify's own model names (the paper's networks)."""
    from . import models

    return models.list_models()


def _zoo_input_size(name: str) -> Tuple[int, int, int]:
    from . import models

    return tuple(models.model_input_size(name))


def parse(text: str) -> Spec:
    """Turn a MODEL string into a spec; raises ValueError for unknown names, with close matches."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"MODEL must be a non-empty string, got {text!r}")
    if text.startswith("timm:"):
        return {"kind": "timm", "name": text[len("timm:"):]}
    if os.path.isfile(text):
        return {"kind": "ghostify_file", "path": os.path.abspath(text)}
    target, _, factory = text.rpartition(":")
    if target and factory:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise ValueError(f"no such Python file: {target}")
            return {"kind": "file", "path": os.path.abspath(target), "factory": factory}
        return {"kind": "module", "module": target, "factory": factory}
    if text in zoo_names():
        return {"kind": "zoo", "name": text}
    if text in torchvision_names():
        return {"kind": "torchvision", "name": text}
    if "/" in text or os.sep in text or os.path.splitext(text)[1].lower() in FILE_SUFFIXES:
        raise ValueError(f"no such file: {text}")
    close = difflib.get_close_matches(text, zoo_names() + torchvision_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `ghostify models` lists the names"
    raise ValueError(f"unknown model {text!r}{hint}")


def describe(spec: Spec) -> str:
    """The MODEL string ``parse`` reads as ``spec``."""
    if spec.get("kind") == "timm":
        return f"timm:{spec['name']}"
    if spec.get("kind") in ("module", "file"):
        return f"{spec.get('module', spec.get('path'))}:{spec['factory']}"
    return str(spec.get("name", spec.get("path")))


def _call_factory(module: Any, spec: Spec) -> nn.Module:
    where = describe(spec)
    if not hasattr(module, spec["factory"]):
        raise ValueError(f"{where}: {spec.get('module', spec.get('path'))} has no {spec['factory']!r}")
    obj = getattr(module, spec["factory"])
    if not callable(obj):
        raise ValueError(f"{where} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}() returned {type(model).__name__}, not an nn.Module")
    return model


def build(spec: Spec) -> nn.Module:
    """Build the (randomly initialised) model a spec names; the spec is attached as ``ghostify_source``."""
    kind = spec.get("kind")
    if kind == "torchvision":
        import torchvision

        model = torchvision.models.get_model(spec["name"])
    elif kind == "zoo":
        from . import models

        model = models.get_model(spec["name"])
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError("timm models need timm: pip install timm") from None
        if not timm.is_model(spec["name"]):
            close = difflib.get_close_matches(spec["name"], timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown timm model {spec['name']!r}{hint}")
        model = timm.create_model(spec["name"], pretrained=False)
    elif kind == "module":
        try:
            module = importlib.import_module(spec["module"])
        except ImportError as error:
            raise ValueError(f"cannot import {spec['module']!r}: {error}") from None
        model = _call_factory(module, spec)
    elif kind == "file":
        loader = importlib.util.spec_from_file_location(f"ghostify_user_{abs(hash(spec['path']))}", spec["path"])
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except SyntaxError as error:
            raise ValueError(f"{spec['path']} has a syntax error at line {error.lineno}: {error.msg}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"no such Python file: {spec['path']}") from None
        model = _call_factory(module, spec)
    else:
        raise ValueError(f"cannot build a model from source {spec!r}")
    model.ghostify_source = dict(spec)
    return model


def read_data(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    Errors name the file and what is wrong with it; they never pass on torch's advice to retry with
    ``weights_only=False``, which would run whatever code a hostile file names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds pickled Python objects, or is corrupt, truncated or not a torch file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such {what}: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        text = str(error)
        if "can still be loaded" in text or "Unsupported global" in text:
            raise ValueError(f"{path} holds pickled Python objects, not only tensors; ghostify reads a {what} as "
                             "data and never runs code from a file (save tensors or a state_dict)") from None
        raise ValueError(f"{path} is not a readable {what} (corrupt, truncated or not written by torch.save)") from None


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts put the weights


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model``: a state_dict, or a training checkpoint holding one under
    ``CHECKPOINT_KEYS``; the ``module.`` prefix of a model saved inside ``DataParallel`` / DDP is dropped."""
    state = read_data(path, "weights file")
    if isinstance(state, dict):
        state = next((state[key] for key in CHECKPOINT_KEYS if isinstance(state.get(key), dict)), state)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    if state and all(isinstance(key, str) and key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"weights in {path} do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state)


def default_input_size(spec: Spec) -> Tuple[int, int, int]:
    """The C, H, W a spec's model expects by default (224x224 RGB unless the zoo says otherwise)."""
    if spec.get("kind") == "zoo":
        return _zoo_input_size(spec["name"])
    return (3, 224, 224)
