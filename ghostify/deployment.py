"""``deploy``: an inference-only copy of a (converted) model with batch norms folded away.

A Ghost module in the GhostNet form (the default: its inner norms read each conv) folds exactly into
``Conv(+bias)``, ``depthwise Conv(+bias)`` and a concatenation. In the linear form the BN after the module
folds per output channel: into the cheap conv for the ghost channels and into a per-channel affine for the
intrinsic ones (not into the primary conv, whose raw output the cheap conv reads, zero padding included).
A BN after a plain conv folds into it, as in ``torch.nn.utils.fusion``. One rule (``_fold``) decides which
pairs fold, whether the model is traced or, when torch.fx cannot trace it, walked by ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from .epilogue import Residual, assemble, fuse_epilogues
from .module import GhostModule, channels_last, conv_dim
from .plan import set_module
from .trace import (
    NORM_FUNCTIONS,
    RUNNING_NORMS,
    GhostLeafTracer,
    module_calls,
    module_of_call,
    shape_query,
    traceable_parts,
)

RUNTIMES = ("torch", "onnxruntime", "inductor")


def _fuse_sequential(block: nn.Sequential) -> nn.Sequential:
    """A copy of ``Sequential(conv[, bn][, act])`` with the BN folded into the conv."""
    layers = list(block)
    if len(layers) >= 2 and conv_dim(layers[0]) is not None and isinstance(layers[1], RUNNING_NORMS):
        layers = [fuse_conv_bn_eval(layers[0], layers[1])] + layers[2:]
    return nn.Sequential(*[copy.deepcopy(layer) for layer in layers])


def _out_index(ghost: GhostModule) -> Optional[torch.Tensor]:
    """The module's output gather (maps of [intrinsic, ghosts] -> output channels), if it has one."""
    return getattr(ghost, "out_index", None)


def _runs(cheap: nn.Sequential, m: int, count: int) -> nn.ModuleList:
    """The first ``count`` runs of ``m`` channels of a depthwise ``cheap`` block, each its own ``m``-channel
    depthwise conv (+ what follows it): multiplier-1 depthwise convs reading the intrinsic maps directly."""
    conv, rest = cheap[0], list(cheap)[1:]
    runs = nn.ModuleList()
    for k in range(count):
        part = type(conv)(m, m, conv.kernel_size, padding=conv.padding, groups=m, bias=conv.bias is not None,
                          dtype=conv.weight.dtype, device=conv.weight.device)
        part.weight = nn.Parameter(conv.weight.detach()[k * m:(k + 1) * m].clone(), requires_grad=False)
        if conv.bias is not None:
            part.bias = nn.Parameter(conv.bias.detach()[k * m:(k + 1) * m].clone(), requires_grad=False)
        runs.append(nn.Sequential(part, *[copy.deepcopy(layer) for layer in rest]))
    return runs


class DeployedGhost(nn.Module):
    """Inference form of a ``GhostModule`` and the BatchNorm that follows it (if any).

    Output: ``[intrinsic * scale + shift, ghosts_1, ..., ghosts_{s-1}][:, :n]``, each ghost run a multiplier-1
    depthwise conv of the intrinsic maps with the BN's part already folded in; runs no output channel uses
    are dropped. Built by ``DeployedGhost.deploy``; not trainable.
    """

    def __init__(self, primary: nn.Sequential, cheap: nn.ModuleList, out_channels: int,
                 scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                 out_index: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.primary, self.cheap = primary, cheap
        self.out_channels = out_channels
        self.folded_norm = scale is not None
        per_channel = (-1, *[1] * (primary[0].weight.dim() - 2))
        self.register_buffer("scale", None if scale is None else scale.reshape(per_channel))
        self.register_buffer("shift", None if shift is None else shift.reshape(per_channel))
        self.register_buffer("out_index", None if out_index is None else out_index.clone())
        self.activation: Optional[str] = None  # set by ``epilogue.fuse_epilogues``: done here, after any shortcut
        self.functional = False  # write the epilogue for torch.compile rather than with out= ops
        self.parts_out = False  # set by ``epilogue.fuse_epilogues``: return the parts, another one's shortcut

    @classmethod
    def deploy(cls, ghost: GhostModule, norm: Optional[nn.Module] = None) -> "DeployedGhost":
        """A new module equal to ``norm(ghost(x))`` (or ``ghost(x)``) in eval mode; inputs are not modified.

        Raises:
            RuntimeError: ``ghost`` or ``norm`` is in training mode.
            ValueError: ``norm`` cannot be folded (no running statistics, wrong width, or the cheap
                operation ends in an activation).
        """
        for module in (ghost, norm):
            if module is not None and module.training:
                raise RuntimeError(f"deploy needs eval mode; call .eval() on the {type(module).__name__} first")
        primary, cheap = _fuse_sequential(ghost.primary), _fuse_sequential(ghost.cheap)
        m, n = ghost.intrinsic_channels, ghost.out_channels
        index = _out_index(ghost)
        runs = ghost.s - 1 if index is not None else -(-(n - m) // m)  # a gather may read any ghost
        if norm is None:
            return cls(primary, _runs(cheap, m, runs), n, out_index=index)
        if norm.running_mean is None or norm.running_mean.numel() != ghost.out_channels or len(cheap) != 1:
            raise ValueError(f"cannot fold {norm} into a Ghost module with {ghost.out_channels} outputs and "
                             f"cheap operation {ghost.cheap}; leave the norm in place")
        used = torch.arange(n) if index is None else index.cpu()
        if used.unique().numel() != n:
            raise ValueError("a Ghost module that repeats output maps cannot take a folded norm; leave it in place")
        # per map of [intrinsic, ghosts]: the stats of the output channel it becomes; identity for unused maps
        stats = [norm.running_mean, norm.running_var, norm.weight, norm.bias]
        identity = [0.0, 1.0 - norm.eps, 1.0, 0.0]
        maps = []
        for value, default in zip(stats, identity):
            per_map = torch.full((m * ghost.s,), default, dtype=norm.running_var.dtype, device=norm.running_var.device)
            if value is not None:  # a norm without affine parameters keeps the identity weight and bias
                per_map[used] = value.detach()
            maps.append(per_map)
        conv = cheap[0]
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, maps[0][m:], maps[1][m:], norm.eps,
                                                      maps[2][m:], maps[3][m:])
        # intrinsic maps: the same fold applied to a 1x1 identity "conv" gives the per-channel affine
        ones = torch.ones(m, 1, *[1] * ghost.dim, dtype=conv.weight.dtype, device=conv.weight.device)
        scale, shift = fuse_conv_bn_weights(ones, None, maps[0][:m], maps[1][:m], norm.eps, maps[2][:m], maps[3][:m])
        return cls(primary, _runs(cheap, m, runs), n, scale.detach(), shift.detach(), index)

    def widths(self) -> Optional[List[int]]:
        """The widths of the parts the output is assembled from; None when it is gathered."""
        if self.out_index is not None:
            return None
        m = self.primary[0].out_channels
        runs = [m] * (1 + len(self.cheap))
        runs[-1] -= sum(runs) - self.out_channels
        return runs

    def forward(self, x: torch.Tensor, residual: Residual = None) -> Union[torch.Tensor, List[torch.Tensor]]:
        intrinsic = self.primary(x)
        parts = [intrinsic] + [run(intrinsic) for run in self.cheap]
        if self.scale is not None:
            parts[0] = torch.addcmul(self.shift, intrinsic, self.scale)
        if self.out_index is not None:
            return torch.cat(parts, dim=1).index_select(1, self.out_index)
        extra = sum(part.shape[1] for part in parts) - self.out_channels
        if extra:
            parts[-1] = parts[-1][:, : parts[-1].shape[1] - extra]
        if self.parts_out:
            return parts
        if self.activation or residual is not None:
            return assemble(parts, residual, self.activation, self.functional)
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, folded_norm={self.folded_norm}, activation={self.activation}"


@dataclass
class DeployResult:
    """What ``deploy`` did; attached to the deployed model as ``ghostify_deploy``."""

    method: str
    folded: List[str] = field(default_factory=list)
    ghosts: List[str] = field(default_factory=list)
    epilogues: int = 0
    parts_shortcuts: int = 0
    memory_format: str = "contiguous"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _fold(producer: nn.Module, norm: nn.Module, fold_ghosts: bool) -> Optional[nn.Module]:
    """``producer`` (a plain conv, or a Ghost module when ``fold_ghosts``) with the BN ``norm`` after it folded
    in, or None when the pair does not fold; the one rule both deploy paths use."""
    if not isinstance(norm, RUNNING_NORMS) or norm.running_mean is None:
        return None
    if conv_dim(producer) is not None and producer.out_channels == norm.running_mean.numel():
        return fuse_conv_bn_eval(producer, norm)
    if isinstance(producer, GhostModule) and fold_ghosts:
        try:
            return DeployedGhost.deploy(producer, norm)
        except ValueError:  # e.g. an activation inside the cheap operation: the norm stays where it is
            return None
    return None


def _graphs(model: nn.Module) -> Tuple[nn.Module, List[Tuple[str, fx.GraphModule, nn.Module]]]:
    """``model`` as a ``GraphModule`` if it traces; else ``model`` with its largest parts that trace and hold a
    conv turned into ``GraphModule``s (``trace.traceable_parts``: a detection model's backbone). Also each
    graph with the path prefix of its modules and the module it was traced from."""
    try:
        gm = fx.GraphModule(model, GhostLeafTracer().trace(model), class_name=type(model).__name__)
        return gm, [("", gm, model)]
    except Exception:  # noqa: BLE001 - any tracing failure: look for parts that trace
        pass
    convs = [name for name, module in model.named_modules()
             if conv_dim(module) is not None or isinstance(module, GhostModule)]
    graphs = []
    for path, part, graph in traceable_parts(model, convs):
        gm = fx.GraphModule(part, graph, class_name=type(part).__name__)
        set_module(model, path, gm)
        graphs.append((path + ".", gm, part))
    return model, graphs


def _norm_call(gm: fx.GraphModule, root: nn.Module, node: fx.Node) -> Optional[str]:
    """The norm module of ``root`` (the module ``gm`` was traced from) that ``node`` runs, called once: a norm
    module's call, or a batch norm function on one norm's tensors alone in eval mode (a norm with its own
    forward, as timm's ``BatchNormAct2d``, whose activation then stays in the graph)."""
    if node.op == "call_module":
        return node.target if isinstance(gm.get_submodule(node.target), RUNNING_NORMS) else None
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return None if training is not False else module_of_call(root, gm.graph, node, NORM_FUNCTIONS, RUNNING_NORMS)


def _fold_graph(gm: fx.GraphModule, root: nn.Module, result: DeployResult, fold_ghosts: bool,
                prefix: str = "") -> None:
    """Fold each BN (``_norm_call``) that is the only reader of a conv / Ghost module called once, in the traced
    graph of ``root`` (whose module paths sit under ``prefix`` in the model)."""
    modules, calls = dict(gm.named_modules()), module_calls(gm.graph)
    for node in list(gm.graph.nodes):
        norm = _norm_call(gm, root, node) if node.args else None
        prev = node.args[0] if norm is not None else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and calls[prev.target] == 1
                and [user for user in prev.users if not shape_query(user)] == [node]
                and (node.op != "call_module" or calls[node.target] == 1)):
            continue
        new = _fold(modules[prev.target], root.get_submodule(norm), fold_ghosts)
        if new is None:
            continue
        if isinstance(new, DeployedGhost):
            result.ghosts.append(prefix + prev.target)
        set_module(gm, prev.target, new)
        modules[prev.target] = new
        node.replace_all_uses_with(prev)
        tensors = node.all_input_nodes[1:]
        gm.graph.erase_node(node)
        for unused in (tensor for tensor in tensors if not tensor.users):  # a norm function's statistics
            gm.graph.erase_node(unused)
        result.folded.append(f"{prefix}{norm} -> {prefix}{prev.target}")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _fold_sequentials(model: nn.Module, result: DeployResult, fold_ghosts: bool, traced: Tuple[str, ...] = ()) -> None:
    """Fallback for models torch.fx cannot trace: fold (conv | Ghost, BN) pairs that sit next to each other
    in an ``nn.Sequential``, outside the parts under the path prefixes ``traced`` (there a graph, not the
    Sequential, says what runs after what)."""
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential) or (name + ".").startswith(traced):
            continue
        keys = list(seq._modules)
        for first, second in zip(keys, keys[1:]):
            new = _fold(seq._modules[first], seq._modules[second], fold_ghosts)
            if new is None:
                continue
            if isinstance(new, DeployedGhost):
                result.ghosts.append(f"{name}.{first}".lstrip("."))
            seq._modules[first], seq._modules[second] = new, nn.Identity()
            result.folded.append(f"{name}.{second} -> {name}.{first}".replace(" .", " ").lstrip("."))


_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
                operator.or_, operator.not_}


def _drop_shape_checks(gm: fx.GraphModule) -> None:
    """Remove ``torch._assert`` calls that check only tensors' shapes (timm's norms assert ``x.ndim == 4``), and
    shape queries nothing reads: an inference graph needs neither, and they would keep a module's output from
    taking its epilogue (``fuse_epilogues`` wants a single reader). Checks that read tensor values stay."""
    for check in [node for node in gm.graph.nodes if node.op == "call_function" and node.target is torch._assert]:
        dead, frontier = [check], list(check.all_input_nodes)
        while frontier:
            node = frontier.pop()
            if node in dead or not all(user in dead for user in node.users):
                continue
            if not (shape_query(node) or node.op == "call_function" and node.target in _COMPARISONS):
                break
            dead.append(node)
            if not shape_query(node):  # a shape query's input is the tensor checked, which stays
                frontier += node.all_input_nodes
        else:
            for node in dead:
                gm.graph.erase_node(node)
    for node in [node for node in gm.graph.nodes if shape_query(node) and not node.users]:
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _drop_identities(gm: fx.GraphModule) -> None:
    """Remove ``nn.Identity`` calls (where norms taken into Ghost modules were)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _channels_last(model: nn.Module) -> None:
    """Store 4-D (2-D conv) weights channels-last and 5-D (3-D conv) weights channels-last-3d, in place;
    ``Module.to(memory_format=...)`` refuses a model that has both kinds, or any 5-D weight."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = channels_last(tensor.data)


def deploy(model: nn.Module, *, runtime: str = "torch", compile: bool = True) -> nn.Module:
    """Return an inference-only copy of ``model`` with BNs folded and Ghost modules in their fast form.

    Args:
        model: a model from ``ghostify.convert`` (or any model: plain conv + BN pairs fold too), in eval mode;
            it is copied, never modified.
        runtime: where the result will run. ``"torch"`` (eager): BNs after Ghost modules folded too, conv
            weights in channels-last order (oneDNN's fastest on CPU; activations follow the weights), and a
            residual addition and activation after a Ghost module done in the module (``epilogue``).
            ``"inductor"``: the same form with a functional epilogue, compiled with ``torch.compile`` and
            freezing (``dynamic=False``: one compilation per input shape, on the first call). ``"onnxruntime"``:
            epilogues only where the shortcut is another Ghost module's parts (no ``Slice``), and, for the
            linear Ghost form, the BN after it kept (onnxruntime runs Conv -> Concat -> BatchNormalization
            faster than a per-channel affine, which breaks its blocked layout). Outputs are the same.
        compile: for ``"inductor"``, False returns the form written for ``torch.compile`` uncompiled (plain
            functional ops: what ``export`` writes for TorchScript and ``torch.export``).

    Returns:
        A ``torch.fx.GraphModule`` (or, for a model torch.fx cannot trace, a copy of the model's own class;
        for ``"inductor"``, that compiled) whose outputs equal ``model``'s in eval mode within float
        tolerance, with ``ghostify_deploy`` (a ``DeployResult``) listing the folded norms.

    Raises:
        RuntimeError: ``model`` is in training mode.
        ValueError: unknown ``runtime``.

    Example:
        >>> fast = ghostify.deploy(ghostify.convert(torchvision.models.resnet50()).eval())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if model.training:
        raise RuntimeError("deploy folds batch norms with their running statistics and needs eval mode; "
                           "call model.eval() first")
    deployed, graphs = _graphs(copy.deepcopy(model))
    result = DeployResult("fx" if isinstance(deployed, fx.GraphModule) else "fx parts" if graphs else "sequential")
    for prefix, gm, root in graphs:
        _drop_shape_checks(gm)
        _fold_graph(gm, root, result, fold_ghosts=runtime != "onnxruntime", prefix=prefix)
    if not isinstance(deployed, fx.GraphModule):  # outside the traced parts
        _fold_sequentials(deployed, result, runtime != "onnxruntime", tuple(prefix for prefix, _, _ in graphs))
    for name, module in list(deployed.named_modules()):
        if isinstance(module, GhostModule) and (runtime != "onnxruntime" or module.inner_norms is not None):
            set_module(deployed, name, DeployedGhost.deploy(module))
            result.ghosts.append(name)
    for _, gm, _ in graphs:
        _drop_identities(gm)
        result.epilogues += fuse_epilogues(gm, lambda m: m.widths() if isinstance(m, DeployedGhost) else None,
                                           parts_only=runtime == "onnxruntime")
    for module in deployed.modules():
        if isinstance(module, DeployedGhost):
            module.functional = runtime != "torch"
            result.parts_shortcuts += module.parts_out
    if runtime != "onnxruntime":
        _channels_last(deployed)
        result.memory_format = "channels_last"
    deployed.eval().requires_grad_(False)  # inference only; the epilogue's out= ops cannot record gradients
    if runtime == "inductor" and compile:
        deployed = torch.compile(deployed, dynamic=False, options={"freezing": True})
    for attr in ("ghostify_result", "ghostify_source"):
        if hasattr(model, attr):
            setattr(deployed, attr, getattr(model, attr))
    deployed.ghostify_deploy = result
    return deployed
