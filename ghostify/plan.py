"""Replaying a conversion plan: each planned conv of a model swapped for a fresh Ghost module.

A plan is a list of per-layer rows (``ConversionResult.plan()``: name, s, d, primary kernel, the norm taken
in, gather, intrinsic count). ``convert`` makes one and replays it; ``load`` replays a saved one before loading
the weights; ``layer_times`` replays one row on a single layer to time it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .module import NORMS, GhostModule, conv_dim, intrinsic_count


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted attribute ``path`` of ``model`` (``nn.Module.set_submodule``, torch >= 2.5)."""
    if hasattr(model, "set_submodule"):
        model.set_submodule(path, module)
    else:  # torch 2.2 - 2.4
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def planned_module(n: int, s: int, width: int = 1, align: int = 1) -> Tuple[int, Optional[int]]:
    """A plan row's ``s`` and ``intrinsic`` for ``n`` outputs asked for at ratio ``s``: ``m`` from
    ``module.intrinsic_count`` (``intrinsic`` None when it is the default ``ceil(n / s)``), and ``s`` lowered to
    the runs of ghosts the other ``n - m`` channels fill, where ``m`` is so large (aligned, whole groups) that
    fewer than ``s - 1`` do: the module then computes no ghost it drops (32 outputs at s=4 aligned to 16 are
    16 intrinsic maps and one run of 16 ghosts: s=2)."""
    m = intrinsic_count(n, s, width, align)
    s = min(s, 1 + -(-(n - m) // m))
    return s, None if m == -(-n // s) else m


def apply_plan(model: nn.Module, plan: Iterable[Mapping[str, Any]],
               fill: bool = True) -> List[Tuple[str, nn.Module, GhostModule]]:
    """Swap each planned conv of ``model`` (in place) for a fresh ``GhostModule`` at all its paths.

    ``fill``: draw the new weights at random, as ``nn.Conv2d`` does; False leaves the convs' weights
    uninitialised (norms start as new) for a caller that writes every one (a loaded state dict, the ``copy``
    fit): drawing them is a large share of converting wide layers.

    A planned ``norm`` (the batch norm that alone reads the conv) is taken into the Ghost module, which then
    normalises its intrinsic maps before the cheap operation reads them (the GhostNet form, which folds
    exactly at deploy time); the norm's own paths become ``nn.Identity``.

    Returns:
        (name, original conv, new Ghost module) for every swapped layer.

    Raises:
        ValueError: a planned name is missing from ``model`` or is not a plain conv.
    """
    aliases: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    swapped = []
    for entry in plan:
        name = entry["name"]
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}; is it the architecture that was converted?") from None
        dim = conv_dim(conv)
        if dim is None:
            raise ValueError(f"layer {name!r} is a {type(conv).__name__}, not the conv that was converted")
        found = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size))
        planned = (entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"])) \
            if "kernel_size" in entry else found  # a row without the shapes (a plan written by hand)
        if planned != found:
            raise ValueError(f"layer {name!r} is a {type(conv).__name__} {found[0]}->{found[1]} with kernel "
                             f"{found[2]}, but the converted one was {planned[0]}->{planned[1]} with kernel "
                             f"{planned[2]}; is it the architecture that was converted?")
        norm = _planned_norm(model, entry.get("norm"), name, dim)
        inner = {} if norm is None else {"inner_bn": True, "norm_layer": partial(
            NORMS[dim], eps=norm.eps, momentum=norm.momentum)}
        ghost = GhostModule.from_conv(conv, s=entry["s"], d=entry["d"], primary_kernel=tuple(entry["primary_kernel"]),
                                      intrinsic_channels=entry.get("intrinsic"), **inner,
                                      **({} if fill else {"device": "meta"}))
        if not fill:
            ghost.to_empty(device=conv.weight.device)
            for module in ghost.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    module.reset_parameters()
        ghost.train(conv.training)
        if entry.get("gather", False):
            ghost.set_out_index(torch.arange(ghost.out_channels))
        for path in aliases[id(conv)]:
            set_module(model, path, ghost)
        for path in aliases[id(norm)] if norm is not None else ():
            set_module(model, path, nn.Identity())
        swapped.append((name, conv, ghost))
    return swapped


def _planned_norm(model: nn.Module, path: Optional[str], name: str, dim: int) -> Optional[nn.Module]:
    if path is None:
        return None
    try:
        norm = model.get_submodule(path)
    except AttributeError:
        norm = None
    if type(norm) is not NORMS[dim]:
        raise ValueError(f"layer {name!r} takes in the batch norm {path!r}, but the model has "
                         f"{type(norm).__name__ if norm is not None else 'nothing'} there; "
                         "is it the architecture that was converted?")
    return norm
