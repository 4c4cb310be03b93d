"""Epilogues: the ReLU and residual addition after a deployed Ghost module, done while its two halves are
written into the output, instead of a ``cat`` and then more passes over the whole tensor.

A Ghost module's output is ``cat([intrinsic, ghosts])``; in a ResNet it is then added to the shortcut and
rectified. Eager PyTorch cannot make a convolution write into a slice of another tensor, so the ``cat`` is a
copy; but element-wise ops can: ``aten._add_relu.out`` reads a half and its slice of the shortcut and writes
the rectified sum straight into the output's slice, one pass instead of three (``cat``, add, ReLU). For
``torch.compile`` the same epilogue is written functionally, ``cat([relu(intrinsic + r1), relu(ghosts + r2)])``:
Inductor computes pointwise inputs of a ``cat`` straight into its buffer.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .module import layout
from .trace import module_calls

_RELUS = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


def assemble(parts: Sequence[torch.Tensor], residual: Optional[torch.Tensor], relu: bool,
             functional: bool) -> torch.Tensor:
    """``cat(parts, 1)``, plus ``residual`` when given, rectified when ``relu``; one pass per part."""
    widths = [part.shape[1] for part in parts]
    first = parts[0]
    if residual is not None and (residual.dim() != first.dim() or residual.shape[1] != sum(widths)
                                 or residual.shape[2:] != first.shape[2:]):
        out = torch.cat(list(parts), 1) + residual  # a broadcast shortcut: no per-half split
        return torch.relu(out) if relu else out
    shortcuts = [None] * len(parts) if residual is None else residual.split(widths, 1)
    if functional:
        outs = [part if r is None else part + r for part, r in zip(parts, shortcuts)]
        return torch.cat([torch.relu(out) if relu else out for out in outs], 1)
    out = torch.empty((first.shape[0], sum(widths), *first.shape[2:]), dtype=first.dtype, device=first.device,
                      memory_format=layout(first))
    for part, r, target in zip(parts, shortcuts, out.split(widths, 1)):
        if r is not None and relu and part.device.type == "cpu" and part.dtype in (torch.float32, torch.float64):
            torch.ops.aten._add_relu.out(part, r, out=target)
        elif r is not None and relu:  # the fused kernel is CPU float32/float64 only
            torch.add(part, r, out=target).clamp_min_(0)
        elif r is not None:
            torch.add(part, r, out=target)
        elif relu:
            torch.clamp_min(part, 0, out=target)
        else:
            target.copy_(part)
    return out


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    return node.op in ("call_function", "call_method") and node.target in _RELUS and len(node.all_input_nodes) == 1


def _is_add(node: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and node.target in _ADDS and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[List[fx.Node], Optional[fx.Node], bool]:
    """What alone reads ``node``: the residual addition and/or ReLU after it, its shortcut, whether a ReLU ends it."""
    chain, residual, user = [], None, _only_user(node)
    if user is not None and _is_add(user) and user.args.count(node) == 1:
        residual = user.args[1] if user.args[0] is node else user.args[0]
        chain.append(user)
        user = _only_user(user)
    relu = user is not None and _is_relu(user, modules)
    if relu:
        chain.append(user)
    return chain, residual, relu


def follows(gm: fx.GraphModule, name: str, norm: Optional[str] = None) -> Tuple[bool, bool]:
    """(residual addition, ReLU): what a Ghost module made of layer ``name`` (and the ``norm`` it takes in)
    would take as its epilogue in ``gm``; (False, False) for a layer called more than once."""
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None or module_calls(gm.graph)[name] != 1:
        return False, False
    if norm is not None:
        node = _only_user(node)
        if node is None or node.op != "call_module" or node.target != norm:
            return False, False
    _, residual, relu = _chain(node, modules)
    return residual is not None, relu


def fuse_epilogues(gm: fx.GraphModule, accepts: Callable[[nn.Module], bool]) -> int:
    """Give each call of a module that ``accepts`` (a deployed Ghost module, called once) whose output only
    goes into a residual addition and/or a ReLU that epilogue: the call takes the shortcut as a second
    argument, the module is marked ``relu``, and it returns the finished tensor. Returns how many were fused."""
    modules, calls = dict(gm.named_modules()), module_calls(gm.graph)
    fused = 0
    for node in list(gm.graph.nodes):
        if (node.op != "call_module" or not accepts(modules[node.target]) or calls[node.target] != 1
                or len(node.args) != 1 or node.kwargs):
            continue
        chain, residual, relu = _chain(node, modules)
        if not chain:
            continue
        modules[node.target].relu = relu
        with gm.graph.inserting_after(chain[-1]):
            call = gm.graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        chain[-1].replace_all_uses_with(call)
        for dead in reversed([node] + chain):
            gm.graph.erase_node(dead)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused
