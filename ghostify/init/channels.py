"""Coupled channels: which tensors share a channel order, so that a fitted layer's channel order costs nothing.

A fitted Ghost module makes the original channels in another order (``Choice.order``). The order is free
when everything the output flows into can store its channels permuted: per-channel layers (batch norm,
activations, pooling, depthwise convs) permute their parameters, dense convs and linear layers that read the
tensor permute their input weights, and plain convs that write into the same tensor permute their filters.
Tensors tied by element-wise arithmetic (a residual addition, a squeeze-and-excite product) must share one
order, so the Ghost modules writing into them form a ``Group`` that gets one shared intrinsic/ghost choice,
as Torch-Pruning's dependency groups tie the layers that must be pruned together; a concatenation places its
inputs' orders side by side. Where a tensor reaches something that needs the original order (the model's
output, an op this analysis cannot see through), the group keeps an ``out_index`` gather on every member,
and the reason is recorded.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..module import GhostModule, conv_dim
from ..trace import NORM_FUNCTIONS, RUNNING_NORMS, analyse, module_calls, module_of_call, shape_query, sole_norm
from .fit import Grain

_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                nn.Tanh, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_PER_CHANNEL_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.silu, F.gelu, F.elu, F.hardswish,
                          F.hardsigmoid, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.dropout, F.max_pool1d,
                          F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                          F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                          F.adaptive_max_pool3d, F.interpolate}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPES = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}


def _per_channel_extras() -> set:
    """Channel-agnostic functions from torchvision that torch.fx keeps as calls (stochastic depth)."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return set()
    return {stochastic_depth}


class Space:
    """The channels of a family of tensors that must share one order (a union-find node)."""

    def __init__(self, size: int, blocked: Optional[str] = None) -> None:
        self.size = size
        self.parent: "Space" = self
        self.members: List[str] = []
        self.writers: List[nn.Module] = []  # plain convs writing into this space
        self.blocked = blocked

    def root(self) -> "Space":
        node = self
        while node.parent is not node:
            node = node.parent
        self.parent = node
        return node

    def block(self, reason: str) -> None:
        root = self.root()
        root.blocked = root.blocked or reason


def _union(a: Space, b: Space) -> None:
    a, b = a.root(), b.root()
    if a is b:
        return
    b.parent = a
    a.members += b.members
    a.writers += b.writers
    a.blocked = a.blocked or b.blocked


@dataclass
class Layout:
    """A tensor's channels as spaces side by side (a concatenation), each channel repeated ``repeat`` times in
    a row (a flattened ``(N, C, H, W)`` tensor has ``repeat = H * W``)."""

    spaces: Tuple[Space, ...]
    repeat: int = 1

    def block(self, reason: str) -> None:
        for space in self.spaces:
            space.block(reason)

    def permutation(self, orders: Dict[int, torch.Tensor]) -> Optional[torch.Tensor]:
        """Index of the original feature stored at each position, or None when nothing moves."""
        parts, offset, moved = [], 0, False
        for space in self.spaces:
            order = orders.get(id(space.root()))
            moved |= order is not None
            parts.append(offset + (torch.arange(space.size) if order is None else order))
            offset += space.size
        if not moved:
            return None
        channels = torch.cat(parts)
        return (channels[:, None] * self.repeat + torch.arange(self.repeat)).flatten()


@dataclass
class Group:
    """Converted layers whose outputs share one channel order; ``blocked`` says why they keep a gather;
    ``grain``: how grouped convs reading their output constrain that order (``fit.Grain``)."""

    members: List[str]
    blocked: Optional[str] = None
    grain: Optional[Grain] = None


@dataclass
class Coupling:
    """The channel groups of a converted model and what absorbs each group's order.

    Attributes:
        groups: one per family of tied tensors that converted layers write into.
        bn: per converted layer, the batch norm that alone reads its output (run once), or None.
        uses: ``(role, module, layout)`` for every module whose weights follow the order of a tensor it reads:
            ``"reader"`` (dense conv / Ghost module input), ``"linear"`` (linear input), ``"per_channel"``
            (batch norm, depthwise conv).
    """

    groups: List[Group]
    bn: Dict[str, Optional[nn.Module]]
    uses: List[Tuple[str, nn.Module, Layout]] = field(default_factory=list)
    roots: Dict[str, Space] = field(default_factory=dict)
    grouped: List[Tuple[nn.Module, Space, Space]] = field(default_factory=list)

    @classmethod
    def isolated(cls, names: Sequence[str], reason: str) -> "Coupling":
        """Every layer on its own and gathered: nothing is known about the readers."""
        return cls([Group([name], reason) for name in names], {name: None for name in names})

    @classmethod
    def joined(cls, parts: Sequence["Coupling"]) -> "Coupling":
        """One coupling from those of separate parts of a model (no tensor ties two parts)."""
        return cls([group for part in parts for group in part.groups],
                   {name: bn for part in parts for name, bn in part.bn.items()},
                   [use for part in parts for use in part.uses],
                   {name: root for part in parts for name, root in part.roots.items()},
                   [item for part in parts for item in part.grouped])

    def group_of(self, name: str) -> Group:
        return next(group for group in self.groups if name in group.members)

    def apply(self, orders: Dict[str, torch.Tensor], ghosts: Dict[str, GhostModule]) -> None:
        """Store each unblocked group in its members' shared order: drop their gathers, permute what reads or
        writes the group's tensors. ``orders`` holds each layer's output order (original channel per output)."""
        by_space = {id(self.roots[group.members[0]]): orders[group.members[0]].cpu()
                    for group in self.groups if group.blocked is None and group.members[0] in self.roots}
        with torch.no_grad():
            for conv, source, target in self.grouped:  # before the uses: a grouped conv may order its outputs
                order, out = by_space.get(id(source.root())), by_space.get(id(target.root()))
                if order is not None or out is not None:
                    derived = _permute_grouped(conv, order, out)
                    if derived is not None:
                        by_space[id(target.root())] = derived
                        for writer in target.root().writers:
                            _permute_output(writer, derived)
            for role, module, layout in self.uses:
                index = layout.permutation(by_space)
                if index is not None:
                    _permute_input(role, module, index)
            for group in self.groups:
                if group.blocked is not None:
                    continue
                root = self.roots[group.members[0]]
                for conv in root.writers:
                    _permute_output(conv, by_space[id(root)])
                for name in group.members:
                    ghosts[name].set_out_index(None)


def _permute_input(role: str, module: nn.Module, index: torch.Tensor) -> None:
    if role == "per_channel":
        for tensor in (module.weight, module.bias, getattr(module, "running_mean", None),
                       getattr(module, "running_var", None)):
            if tensor is not None:
                tensor.copy_(tensor[index.to(tensor.device)])
        return
    conv = module.primary_conv if isinstance(module, GhostModule) else module
    conv.weight.copy_(conv.weight[:, index.to(conv.weight.device)])


def _permute_grouped(conv: nn.Module, order: Optional[torch.Tensor],
                     out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Make grouped ``conv`` read its input in ``order`` and write its output in ``out`` (None: the original
    order). Both keep whole groups (``fit.Grain``); a group moved on the input moves its outputs alike, which
    is the output order returned when ``out`` is None (None: nothing moved).

    Raises:
        ValueError: the orders split a group, or move a group on one side only.
    """
    width, out_width = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    order = torch.arange(conv.in_channels) if order is None else order
    blocks = order.view(conv.groups, width)
    source = blocks[:, 0] // width  # the original group each run of inputs holds
    derived = (source[:, None] * out_width + torch.arange(out_width)).flatten()
    target = derived if out is None else out
    if not torch.equal(blocks // width, source[:, None].expand_as(blocks)) or not torch.equal(
            target // out_width, derived // out_width):
        raise ValueError(f"channel orders that split or move the groups of {conv} reached it")
    within = (blocks - source[:, None] * width).repeat_interleave(out_width, 0)  # per output: its inputs' order
    device = conv.weight.device
    index = within.to(device).view(*within.shape, *[1] * (conv.weight.dim() - 2))
    conv.weight.copy_(conv.weight[target.to(device)].gather(1, index.expand(-1, -1, *conv.weight.shape[2:])))
    if conv.bias is not None:
        conv.bias.copy_(conv.bias[target.to(device)])
    return None if out is not None or torch.equal(derived, torch.arange(len(derived))) else derived


def _permute_output(conv: nn.Module, order: torch.Tensor) -> None:
    for tensor in (conv.weight, conv.bias):
        if tensor is not None:
            tensor.copy_(tensor[order.to(tensor.device)])


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}" if node.op != "call_module" else f"module {target}"


class _Walker:
    """One pass over the traced graph, giving each tensor-valued node a ``Layout``."""

    def __init__(self, root: nn.Module, gm: fx.GraphModule, names: Sequence[str], prefix: str = "") -> None:
        self.root, self.graph = root, gm.graph  # the traced module itself, and its graph
        self.modules = dict(gm.named_modules())
        self.names = set(names)
        self.prefix = prefix  # of the graph's module paths in the model (a traced part of it)
        self.calls = module_calls(gm.graph)
        self.nodes: Dict[str, fx.Node] = {}  # the call of each converted layer
        self.layouts: Dict[fx.Node, Layout] = {}
        self.roots: Dict[str, Space] = {}
        self.uses: List[Tuple[str, nn.Module, Layout]] = []
        self.grouped: List[Tuple[nn.Module, Space, Space]] = []  # (grouped conv, the space it reads, its output's)
        self.per_channel_functions = _PER_CHANNEL_FUNCTIONS | _per_channel_extras()

    def fresh(self, node: fx.Node, blocked: Optional[str]) -> Layout:
        return Layout((Space(_shape(node)[1], blocked),))

    def inputs(self, node: fx.Node) -> List[fx.Node]:
        return [arg for arg in node.all_input_nodes if arg in self.layouts]

    def block_inputs(self, node: fx.Node, reason: Optional[str] = None) -> None:
        for arg in self.inputs(node):
            self.layouts[arg].block(reason or f"read by {_describe(node)}")

    def visit(self, node: fx.Node) -> None:
        shape = _shape(node)
        if node.op == "output":
            self.block_inputs(node, f"reaches the output of {self.prefix[:-1]}" if self.prefix
                              else "reaches the model's output")
            return
        if shape is None or len(shape) < 2:
            if not shape_query(node):
                self.block_inputs(node)
            return
        if node.op in ("placeholder", "get_attr"):
            self.layouts[node] = self.fresh(node, "the model's input" if node.op == "placeholder" else "a constant")
            return
        layout = self.module_rule(node) if node.op == "call_module" else self.function_rule(node)
        if layout is None:
            self.block_inputs(node)
            layout = self.fresh(node, f"made by {_describe(node)}")
        self.layouts[node] = layout

    def first(self, node: fx.Node) -> Optional[Layout]:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node) or arg not in self.layouts:
            return None
        others = [a for a in node.all_input_nodes if a is not arg and a in self.layouts]
        return None if others else self.layouts[arg]

    def module_rule(self, node: fx.Node) -> Optional[Layout]:
        module = self.modules[node.target]
        layout, once = self.first(node), self.calls[node.target] == 1
        if layout is None:
            return None
        dim = conv_dim(module)
        if isinstance(module, GhostModule) or (dim is not None and module.groups == 1):
            if not once:
                return None
            self.uses.append(("reader", module, layout))
            out = self.fresh(node, None)
            space = out.spaces[0]
            name = self.prefix + node.target
            if name in self.names:  # a Ghost module, or the conv that becomes one
                space.members.append(name)
                self.roots[name], self.nodes[name] = space, node
            elif isinstance(module, GhostModule):
                space.blocked = f"made by {_describe(node)}"
            else:
                space.writers.append(module)
            return out
        depthwise = dim is not None and module.groups == module.in_channels == module.out_channels
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not depthwise:
            if dim is None or not once or layout.repeat != 1 or len(layout.spaces) != 1:
                layout.block(f"read by grouped conv {node.target} (groups={module.groups}), which mixes "
                             "channels within fixed groups")
                return None
            out = self.fresh(node, None)
            self.grouped.append((module, layout.spaces[0], out.spaces[0]))
            return out
        if depthwise or isinstance(module, RUNNING_NORMS):
            if not once or layout.repeat != 1:
                return None
            self.uses.append(("per_channel", module, layout))
            return layout
        if isinstance(module, _PER_CHANNEL):
            return layout
        if isinstance(module, nn.Flatten):
            return self.reshaped(node, layout)
        if isinstance(module, nn.Linear) and len(_shape(node.args[0])) == 2 and once:
            self.uses.append(("linear", module, layout))
            return self.fresh(node, f"made by {_describe(node)}")
        return None

    def function_rule(self, node: fx.Node) -> Optional[Layout]:
        target, method = node.target, node.op == "call_method"
        if (method and target in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE):
            return self.elementwise(node)
        if not method and target is torch.cat:
            return self.concatenated(node)
        if not method and target is F.linear:  # its weight is a 2-D tensor with a layout of its own: not ``first``
            return self.linear_call(node)
        layout = self.first(node)
        if layout is None:
            return None
        if (method and target in _PER_CHANNEL_METHODS) or (not method and target in self.per_channel_functions):
            return layout
        if not method and target in NORM_FUNCTIONS:
            return self.norm_call(node, layout)
        if (method and target in _RESHAPE_METHODS) or (not method and target in _RESHAPES):
            return self.reshaped(node, layout)
        if (method and target in _REDUCTION_METHODS) or (not method and target in _REDUCTIONS):
            return self.reduced(node, layout)
        return None

    def called_module(self, node: fx.Node, functions: Tuple, kind: type) -> Optional[nn.Module]:
        """The module whose tensors alone the call ``node`` reads (``trace.module_of_call``), or None."""
        path = module_of_call(self.root, self.graph, node, functions, kind)
        return None if path is None else self.root.get_submodule(path)

    def called_norm(self, node: fx.Node) -> Optional[nn.Module]:
        return self.called_module(node, NORM_FUNCTIONS, RUNNING_NORMS)

    def norm_call(self, node: fx.Node, layout: Layout) -> Optional[Layout]:
        """A batch norm function call of one norm module (``called_norm``): per channel, as a call of it."""
        module = self.called_norm(node)
        if module is None or layout.repeat != 1:
            return None
        self.uses.append(("per_channel", module, layout))
        return layout

    def linear_call(self, node: fx.Node) -> Optional[Layout]:
        """``F.linear`` on one linear module's weight and bias (``called_module``), reading a flat input: the
        module's input weights take the order, as for a call of it."""
        module = self.called_module(node, (F.linear,), nn.Linear)
        layout = self.layouts.get(node.args[0])
        if module is None or layout is None or len(_shape(node.args[0])) != 2:
            return None
        self.uses.append(("linear", module, layout))
        return self.fresh(node, f"made by {_describe(node)}")

    def reduced(self, node: fx.Node, layout: Layout) -> Optional[Layout]:
        """A mean / sum / max over spatial dimensions only (``x.mean((2, 3))``, ``x.mean(-1)``) keeps each
        channel in place; a reduction over the batch or the channels, or of everything, does not."""
        before, after = _shape(node.all_input_nodes[0]), _shape(node)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None or layout.repeat != 1 or len(after) < 2 or tuple(after[:2]) != tuple(before[:2]):
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims or not all(isinstance(d, int) for d in dims):
            return None
        return layout if all(d % len(before) >= 2 for d in dims) else None

    def reshaped(self, node: fx.Node, layout: Layout) -> Optional[Layout]:
        """A flatten of ``(N, C, *spatial)`` to ``(N, C*prod(spatial))`` keeps channels in runs of
        ``prod(spatial)``; a no-op reshape keeps the layout; anything else mixes channels."""
        before, after = _shape(node.all_input_nodes[0]), _shape(node)
        if tuple(before) == tuple(after):
            return layout
        if len(before) >= 3 and len(after) == 2 and after[1] == math.prod(before[1:]):
            return Layout(layout.spaces, layout.repeat * math.prod(before[2:]))
        return None

    def elementwise(self, node: fx.Node) -> Optional[Layout]:
        """Operands with the full channel count share their order; broadcast operands (one channel) do not."""
        shape = _shape(node)
        full = []
        for arg in self.inputs(node):
            other = _shape(arg)
            channel = len(other) - len(shape) + 1  # operands broadcast from the right
            if len(other) == len(shape) and other[1] == shape[1] and shape[1] > 1:
                full.append(self.layouts[arg])
            elif channel >= 0 and other[channel] != 1:
                return None
        if not full:
            return self.fresh(node, f"made by {_describe(node)}")
        for other in full[1:]:
            if other.repeat != full[0].repeat or [s.size for s in other.spaces] != [s.size for s in full[0].spaces]:
                return None
            for a, b in zip(full[0].spaces, other.spaces):
                _union(a, b)
        return full[0]

    def concatenated(self, node: fx.Node) -> Optional[Layout]:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(t in self.layouts for t in tensors):
            return None
        if dim not in (1, 1 - len(_shape(node))):
            return None
        parts = [self.layouts[t] for t in tensors]
        if any(part.repeat != 1 for part in parts):
            return None
        return Layout(tuple(space for part in parts for space in part.spaces))


def _shape(node) -> Optional[Tuple[int, ...]]:
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


def couple(model: nn.Module, names: Sequence[str], example_inputs: Sequence[torch.Tensor],
           parts: Optional[Sequence[Tuple[str, fx.Graph]]] = None) -> Coupling:
    """Group the converted layers ``names`` of ``model`` by the tensors they write into (see module docstring).

    The data flow comes from ``trace.analyse``'s graphs with shapes noted (``parts``, of ``model`` or of the
    model it was converted from, whose Ghost modules sit at the converted convs' paths), or from analysing
    ``model`` on ``example_inputs`` when they are not given. A model that does not trace is grouped within its
    largest parts that do (a detection model's backbone), whose outputs then need the original order; a layer
    outside every graph keeps its gather.
    """
    if parts is None:
        try:
            parts = analyse(model, example_inputs).parts
        except ValueError:  # the model fails on these inputs: nothing is known about its readers
            parts = []
    couplings = [_couple_part(model.get_submodule(prefix[:-1]), graph,
                              [name for name in names if name.startswith(prefix)], prefix) for prefix, graph in parts]
    covered = {name for coupling in couplings for name in coupling.bn}
    traced = "not in a part of the model that traces" if parts else "the model does not trace"
    couplings.append(Coupling.isolated([name for name in names if name not in covered], traced + " with torch.fx"))
    return Coupling.joined(couplings)


def _couple_part(root: nn.Module, graph: fx.Graph, names: Sequence[str], prefix: str) -> Coupling:
    """``couple`` on the traced graph (with shapes noted) of ``root``, the part of the model at ``prefix``."""
    gm = fx.GraphModule(root, graph)
    walker = _Walker(root, gm, names, prefix)
    for node in gm.graph.nodes:
        walker.visit(node)
    grains = _grains(walker.grouped)
    groups: Dict[int, Group] = {}
    for name in names:
        root = walker.roots[name].root() if name in walker.roots else None
        if root is None:
            groups[id(name)] = Group([name], "runs more than once")
            continue
        groups.setdefault(id(root), Group(list(root.members), root.blocked, grains.get(id(root))))
        walker.roots[name] = root
    bn = {name: None for name in names}
    for name, node in walker.nodes.items():  # the norm that alone reads the layer: a module, or a norm's call
        channels = walker.modules[node.target].out_channels
        norm = sole_norm(node, walker.modules, walker.calls, channels)
        readers = [user for user in node.users if not shape_query(user)]  # a norm's forward may check x.ndim
        called = walker.called_norm(readers[0]) if norm is None and len(readers) == 1 else None
        if called is not None and called.running_mean is not None and called.running_mean.numel() == channels:
            bn[name] = called
        else:
            bn[name] = walker.modules[norm] if norm is not None else None
    return Coupling(list(groups.values()), bn, walker.uses, walker.roots, walker.grouped)


def layer_grains(groups: Sequence[Group]) -> Dict[str, Grain]:
    """The ``Grain`` of each layer whose group keeps no gather and is read by a grouped conv."""
    return {name: group.grain for group in groups if group.blocked is None and group.grain for name in group.members}


def _grains(grouped: Sequence[Tuple[nn.Module, Space, Space]]) -> Dict[int, Grain]:
    """Per space a grouped conv reads or a converted layer writes beside one, the ``Grain`` its order must keep
    (blocking the space when none can).

    A grouped conv's filters can take any order within each group, of its inputs and of its outputs alike;
    whole groups may move only together on both sides. So its input's groups move freely when its output's
    order is its alone (no converted layer or other grouped conv writes it, and nothing needs the original
    order there); otherwise the groups stay in place on both sides.
    """
    sources = {id(source.root()) for _, source, _ in grouped}
    targets: Dict[int, int] = {}
    for _, _, target in grouped:
        targets[id(target.root())] = targets.get(id(target.root()), 0) + 1
    grains: Dict[int, Grain] = {}

    def need(space: Space, width: int, fixed: bool) -> None:
        known = grains.get(id(space))
        if known is not None and known.width != width:
            space.block(f"its channels are read or written by grouped convs in groups of {known.width} and {width}")
        grains[id(space)] = Grain(width, fixed or (known is not None and known.fixed))

    for conv, source, target in grouped:
        root, out = source.root(), target.root()
        fixed = bool(out.members) or out.blocked is not None or id(out) in sources or targets[id(out)] > 1
        need(root, conv.in_channels // conv.groups, fixed)
        if out.members:
            need(out, conv.out_channels // conv.groups, True)
    return grains
