"""Epilogues: the activation and residual addition after a deployed Ghost module, done while its halves are
written into the output, instead of a ``cat`` and then more passes over the whole tensor.

A Ghost module's output is ``cat([intrinsic, ghosts])``; in a ResNet it is then added to the shortcut and
rectified. Eager PyTorch cannot make a convolution write into a slice of another tensor, so the ``cat`` is a
copy; but element-wise ops can: ``aten._add_relu.out`` reads a half and its slice of the shortcut and writes
the rectified sum straight into the output's slice, one pass instead of three (``cat``, add, ReLU). For
``torch.compile`` the same epilogue is written functionally, ``cat([relu(intrinsic + r1), relu(ghosts + r2)])``:
Inductor computes pointwise inputs of a ``cat`` straight into its buffer. The activations taken are the
element-wise ones CNNs put after a conv: ReLU, ReLU6 (MobileNets), SiLU (EfficientNets) and Hardswish. In
eager PyTorch only ReLU is written per half; the others' kernels, writing into a slice of the output,
measured no faster than ``cat`` and the activation in place, which is what they do there. A shortcut that is
another Ghost module's output, split alike (a ResNet's projection), is handed over in parts: never concatenated.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .module import layout
from .trace import module_calls

# the activations an epilogue takes, by name; each takes ``inplace``
ACTIVATIONS: Dict[str, Callable[..., torch.Tensor]] = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu,
                                                       "hardswish": F.hardswish}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
_ACTIVATION_CALLS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", "relu": "relu", "relu_": "relu",
                     F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


Residual = Union[torch.Tensor, List[torch.Tensor], None]


def assemble(parts: Sequence[torch.Tensor], residual: Residual, activation: Optional[str],
             functional: bool) -> torch.Tensor:
    """``cat(parts, 1)``, plus ``residual`` when given, through ``activation`` (an ``ACTIVATIONS`` name) when
    given; one pass per part where the form allows it. ``residual`` may come as parts of the same widths
    (another Ghost module's, see ``fuse_epilogues``): then it is never concatenated."""
    act = ACTIVATIONS[activation] if activation else None
    widths = [part.shape[1] for part in parts]
    first = parts[0]
    if isinstance(residual, list):  # widths checked by ``fuse_epilogues``
        shortcuts, per_part = residual, True
    else:
        per_part = residual is None or (residual.dim() == first.dim() and residual.shape[1] == sum(widths)
                                        and residual.shape[2:] == first.shape[2:])  # not a broadcast shortcut
        shortcuts = [None] * len(parts) if residual is None else residual.split(widths, 1) if per_part else None
    if functional and per_part:
        outs = [part if r is None else part + r for part, r in zip(parts, shortcuts)]
        return torch.cat([act(out) if act else out for out in outs], 1)
    if not functional and per_part and activation in (None, "relu"):
        out = torch.empty((first.shape[0], sum(widths), *first.shape[2:]), dtype=first.dtype,
                          device=first.device, memory_format=layout(first))
        fused = first.device.type == "cpu" and first.dtype in (torch.float32, torch.float64)  # _add_relu's kernel
        for part, r, target in zip(parts, shortcuts, out.split(widths, 1)):
            if r is not None and act and fused:
                torch.ops.aten._add_relu.out(part, r, out=target)
            elif r is not None:
                torch.add(part, r, out=target)
                if act:
                    target.clamp_min_(0)
            elif act:
                torch.clamp_min(part, 0, out=target)
            else:
                target.copy_(part)
        return out
    # a broadcast shortcut, or eager with another activation: its kernels writing into a slice of the output
    # measured no faster than ``cat`` and the activation in place
    out = torch.cat(list(parts), 1)
    if residual is not None:
        out = out + residual
    return act(out, inplace=True) if act else out


def _activation(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The ``ACTIVATIONS`` name of what ``node`` computes, if it is such an activation of one tensor."""
    if node.op == "call_module":
        return _ACTIVATION_MODULES.get(type(modules.get(node.target)))
    if node.op in ("call_function", "call_method") and len(node.all_input_nodes) == 1:
        return _ACTIVATION_CALLS.get(node.target)
    return None


def _is_add(node: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and node.target in _ADDS and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[List[fx.Node], Optional[fx.Node], Optional[str]]:
    """What alone reads ``node``: the residual addition and/or activation after it, its shortcut, the activation
    that ends it (a name) or None."""
    chain, residual, user = [], None, _only_user(node)
    if user is not None and _is_add(user) and user.args.count(node) == 1:
        residual = user.args[1] if user.args[0] is node else user.args[0]
        chain.append(user)
        user = _only_user(user)
    activation = _activation(user, modules) if user is not None else None
    if activation:
        chain.append(user)
    return chain, residual, activation


def follows(gm: fx.GraphModule, name: str, norm: Optional[str] = None) -> Tuple[bool, Optional[str]]:
    """(residual addition, activation name or None): what a Ghost module made of layer ``name`` (and the
    ``norm`` it takes in) would take as its epilogue in ``gm``; (False, None) for a layer called more than once."""
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None or module_calls(gm.graph)[name] != 1:
        return False, None
    if norm is not None:
        node = _only_user(node)
        if node is None or node.op != "call_module" or node.target != norm:
            return False, None
    _, residual, activation = _chain(node, modules)
    return residual is not None, activation


def fuse_epilogues(gm: fx.GraphModule, widths: Callable[[nn.Module], Optional[List[int]]],
                   parts_only: bool = False) -> int:
    """Give each call of a module that ``widths`` accepts (a deployed Ghost module, called once; ``widths``
    gives its parts' widths, None for other modules) whose output only goes into a residual addition and/or
    an activation that epilogue: the call takes the shortcut as a second argument, the module's
    ``activation`` is set, and it returns the finished tensor. A shortcut that is another such module's
    output, read by nothing else and split alike (a ResNet's projection shortcut), comes as its parts
    (``parts_out``), so it is added part by part and never concatenated. With ``parts_only``, only such
    epilogues are fused (onnxruntime: a shortcut split by ``Slice`` costs more than it saves). Returns how
    many were fused."""
    modules, calls = dict(gm.named_modules()), module_calls(gm.graph)
    fused = 0
    for node in list(gm.graph.nodes):
        if (node.op != "call_module" or widths(modules[node.target]) is None or calls[node.target] != 1
                or len(node.args) != 1 or node.kwargs):
            continue
        chain, residual, activation = _chain(node, modules)
        if not chain:
            continue
        source = modules[residual.target] if residual is not None and residual.op == "call_module" else None
        parts = (source is not None and calls[residual.target] == 1 and _only_user(residual) is chain[0]
                 and widths(source) == widths(modules[node.target]))
        if parts_only and not parts:
            continue
        modules[node.target].activation = activation
        if parts:
            source.parts_out = True
        with gm.graph.inserting_after(chain[-1]):
            call = gm.graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        chain[-1].replace_all_uses_with(call)
        for dead in reversed([node] + chain):
            gm.graph.erase_node(dead)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused
