"""Find which convolutions a model runs, in what order, on what shapes, and which one is the stem.

torch.fx symbolic tracing is the first choice: the traced graph runs on the example inputs (shape propagation)
and its data flow shows the stem (the conv with no conv upstream of it)
and functional ``F.conv2d`` calls. Models that symbolic tracing cannot
handle (data-dependent control flow) fall back to a real forward pass with hooks; there the stem is the first
conv that runs.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .module import NORMS, GhostModule, conv_dim

_CONV_TYPES = (nn.modules.conv._ConvNd,)
# per-channel norms with running statistics a conv's output may pass through: torch's batch norms and
# torchvision's frozen one (the norm of its detection models' pretrained backbones)
RUNNING_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)  # what a norm with its own forward calls on its statistics
_FUNCTIONAL_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
                     F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@dataclass
class ConvSite:
    """One convolution module of the model, as seen by the analysis."""

    name: str
    module: nn.Module
    aliases: List[str] = field(default_factory=list)
    calls: int = 0
    input_shape: Optional[Tuple[int, ...]] = None
    output_shape: Optional[Tuple[int, ...]] = None
    is_stem: bool = False
    norm: Optional[str] = None
    read_directly: Optional[str] = None  # a tensor of it the model's own code reads (``conv.weight.device``)
    reads_pooled: bool = False  # its input is a pooled vector (``_pooled_convs``)


@dataclass
class Analysis:
    """What a forward pass on the example inputs showed: conv modules in run order, functional convs, and the
    graphs of the model (path prefix ``""``) or, when it does not trace, of its largest parts that do and ran
    once (prefix ``"path."``), with convs and Ghost modules as leaves and every node's shape
    (``meta["shape"]``), for the passes that walk the data flow (``init.channels.couple``)."""

    method: str
    sites: List[ConvSite]
    functional: List[str]
    parts: List[Tuple[str, fx.Graph]] = field(default_factory=list)


def placement(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """The dtype and device synthetic inputs for ``model`` should have: those of its first floating-point
    parameter or buffer (float32 on the CPU for a model without any)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float32, torch.device("cpu")


def random_inputs(model: nn.Module, *shapes: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """Standard-normal inputs of ``shapes`` in ``model``'s dtype and on its device (``placement``)."""
    dtype, device = placement(model)
    return tuple(torch.randn(*shape, dtype=dtype, device=device) for shape in shapes)


def input_sizes(model: nn.Module, input_size=None, default: Sequence[int] = (3, 224, 224)) -> List[Tuple[int, ...]]:
    """Per-sample sizes of ``model``'s inputs: ``input_size`` (one size, or one per input), else the sizes it was
    converted at (``ghostify_result``, when every input was a tensor), else ``default``.

    Raises:
        ValueError: a size that is not 2 to 4 positive ints.
    """
    if input_size is None:  # recorded from the inputs the model ran on: any shape it took
        result = getattr(model, "ghostify_result", None)
        shapes = result.input_shapes if result is not None and result.input_shapes else []
        return [tuple(shape[1:]) for shape in shapes] if shapes and all(shapes) else [tuple(default)]
    sizes = [tuple(input_size)] if all(isinstance(v, int) for v in input_size) else [tuple(v) for v in input_size]
    for size in sizes:
        if not 2 <= len(size) <= 4 or not all(isinstance(v, int) and v >= 1 for v in size):
            raise ValueError("input_size must be positive ints C H W (C L for 1-D, C D H W for 3-D models), or one "
                             f"such size per input, got {tuple(input_size or ())!r}")
    return sizes


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; every module's training flag is restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode and without gradients; every module's training flag is restored afterwards."""
    with eval_mode(model), torch.no_grad():
        yield model


class GhostLeafTracer(fx.Tracer):
    """A symbolic tracer that keeps each ``GhostModule``, each conv (also a subclass that only changes how
    it is built, as torchvision's ``Conv3DSimple``) and each frozen batch norm as one call, for passes that act
    on whole modules; also the modules at the paths in ``leaves``."""

    def __init__(self, leaves: Collection[str] = ()):
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return (isinstance(module, (GhostModule, FrozenBatchNorm2d)) or conv_dim(module) is not None
                or qualname in self.leaves or super().is_leaf_module(module, qualname))


class ShapeRecorder(fx.Interpreter):
    """Runs a traced graph and notes each tensor node's shape in ``node.meta["shape"]``: what torch.fx's
    ``ShapeProp`` records, without the traceback it prints and the wrapper it raises when the model fails
    (a failure stays the model's own error)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.extra_traceback = False

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta["shape"] = tuple(result.shape)
        return result

    def fetch_args_kwargs_from_env(self, node: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(node)
        return _mutable(args), _mutable(kwargs)


def _mutable(value):
    """fx's immutable lists and dicts in a node's arguments as plain ones, fresh for each call, as the traced
    graph's own code passes them: a model may change a list it is given (Swin3D's window helper does)."""
    if isinstance(value, list):
        return [_mutable(item) for item in value]
    if isinstance(value, dict):
        return {key: _mutable(item) for key, item in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(item) for item in value)
    return value


def conv_sites(model: nn.Module) -> Dict[int, ConvSite]:
    """Every convolution module of ``model`` keyed by ``id``, with all the attribute paths that reach it."""
    sites: Dict[int, ConvSite] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _CONV_TYPES):
            if id(module) in sites:
                sites[id(module)].aliases.append(name)
            else:
                sites[id(module)] = ConvSite(name, module)
    return sites


def _shape(value) -> Optional[Tuple[int, ...]]:
    """The shape of a tensor; None for anything else."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _run_with_hooks(runner, sites: Dict[int, ConvSite], inputs: Sequence[torch.Tensor]) -> List[ConvSite]:
    """Call ``runner(*inputs)``, recording each conv's calls and first input/output shapes; returns run order."""
    order: List[ConvSite] = []

    def record(site: ConvSite):
        def hook(module, args, output):
            site.calls += 1
            if site.calls == 1:
                site.input_shape, site.output_shape = _shape(args[0]), _shape(output)
                order.append(site)
        return hook

    handles = [site.module.register_forward_hook(record(site)) for site in sites.values()]
    try:
        run_or_explain(runner, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def run_or_explain(model, inputs: Sequence, what: str = "example_inputs"):
    """``model(*inputs)``; a failure, which is the user's forward refusing these inputs (mostly their size),
    becomes a ValueError naming their shapes and how to give others (``what``: the API's argument)."""
    try:
        return model(*inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the user's forward is bad input
        shapes = ", ".join(str(_shape(x) or type(x).__name__) for x in inputs)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"the model fails on inputs of shape {shapes}: {type(error).__name__}: {first}; pass "
                         f"{what} (CLI: --input-size C H W) that the model accepts") from error


def _fx_stems_and_functional(graph_module: fx.GraphModule, conv_names: set) -> Tuple[set, List[str]]:
    """Conv modules with no conv upstream in the data flow (stems), and functional conv calls."""
    downstream_of_conv: Dict[fx.Node, bool] = {}
    stems, not_stems, functional = set(), set(), []
    for node in graph_module.graph.nodes:
        upstream = any(downstream_of_conv.get(arg, False) for arg in node.all_input_nodes)
        is_conv = node.op == "call_module" and node.target in conv_names
        if is_conv:
            (not_stems if upstream else stems).add(node.target)
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
            is_conv = True
            stack = node.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack.values()))[0] if stack else ""
            functional.append(f"{owner}:{node.name}" if owner else node.name)
        downstream_of_conv[node] = upstream or is_conv
    return stems - not_stems, functional


def _positions(shape: Tuple[int, ...]) -> int:
    """Positions of a ``(N, C, *spatial)`` tensor's map (1 with no spatial dimensions)."""
    return math.prod(shape[2:])


def _pooled_convs(graph_module: fx.GraphModule) -> set:
    """Conv modules that read a pooled vector: a single-position tensor that a pooling or reduction made from a
    larger map, perhaps through element-wise ops and other such convs (the two convs of a squeeze-and-excite, a
    head conv after global pooling). Uses the shapes ``ShapeRecorder`` noted."""
    modules = dict(graph_module.named_modules())
    pooled, found = set(), set()
    for node in graph_module.graph.nodes:
        shape = node.meta.get("shape")
        inputs = [arg for arg in node.all_input_nodes if "shape" in arg.meta]
        if shape is None or _positions(shape) != 1 or not inputs:
            continue
        if node.op == "call_module" and conv_dim(modules.get(node.target)) is not None:
            if inputs[0] in pooled:
                pooled.add(node)
                found.add(node.target)
        elif any(arg in pooled or _positions(arg.meta["shape"]) > 1 for arg in inputs):
            pooled.add(node)
    return found


def module_calls(graph: fx.Graph) -> Dict[str, int]:
    """How many times the graph calls each module (by its target path)."""
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def shape_query(node: fx.Node) -> bool:
    """A query of a tensor's size or number of dimensions (``x.ndim``, ``x.size()``), which reads no values."""
    return node.op == "call_method" and node.target in ("size", "dim") or node.target is getattr


def module_of_call(root: nn.Module, graph: fx.Graph, node: fx.Node, functions: Tuple, kind: type) -> Optional[str]:
    """The path of the module (a ``kind``) of ``root`` whose tensors alone a call ``node`` of one of ``functions``
    reads, and which nothing else in ``graph`` reads: a layer with its own forward that calls the function on
    them (timm's ``BatchNormAct2d`` calls ``F.batch_norm``, its ``Linear`` ``F.linear``), or None."""
    if node.op != "call_function" or node.target not in functions:
        return None
    tensors = node.all_input_nodes[1:]
    owners = {arg.target.rpartition(".")[0] for arg in tensors if arg.op == "get_attr"}
    if len(owners) != 1 or any(arg.op != "get_attr" for arg in tensors):
        return None
    (owner,) = owners
    try:
        module = root.get_submodule(owner)
    except AttributeError:
        return None
    readers = {user for other in graph.nodes if other.op == "get_attr" and other.target.rpartition(".")[0] == owner
               for user in other.users}
    return owner if isinstance(module, kind) and readers == {node} else None


def sole_norm(node: fx.Node, modules: Dict[str, nn.Module], calls: Dict[str, int],
              channels: int) -> Optional[str]:
    """The norm over ``channels`` (run once, with running statistics: ``RUNNING_NORMS``) that is the only
    reader of ``node``'s output, or None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    norm = modules.get(user.target) if user.op == "call_module" else None
    if (isinstance(norm, RUNNING_NORMS) and calls[user.target] == 1 and norm.running_mean is not None
            and norm.running_mean.numel() == channels):
        return user.target
    return None


def _sole_norms(graph_module: fx.GraphModule) -> Dict[str, str]:
    """For each conv module run once, the batch norm that alone reads it: the pair a Ghost module can take in."""
    modules, calls = dict(graph_module.named_modules()), module_calls(graph_module.graph)
    found = {}
    for node in graph_module.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if conv_dim(conv) is not None and calls[node.target] == 1:
            norm = sole_norm(node, modules, calls, conv.out_channels)
            if norm is not None and type(modules[norm]) is NORMS[conv_dim(conv)]:
                found[node.target] = norm
    return found


def traceable_parts(module: nn.Module, names: Collection[str],
                    prefix: str = "") -> List[Tuple[str, nn.Module, fx.Graph]]:
    """``(path, submodule, graph)`` of the largest submodules of ``module`` (not single layers) that hold any of
    ``names`` (module paths) and trace with ``GhostLeafTracer``: the parts of a model that does not trace as a
    whole (a detection model's backbone) that the graph-based passes can still see into."""
    found = []
    for child_name, child in module.named_children():
        path = prefix + child_name
        if (conv_dim(child) is not None or isinstance(child, GhostModule)
                or not any(name.startswith(path + ".") for name in names)):
            continue
        try:
            found.append((path, child, GhostLeafTracer().trace(child)))
        except Exception:  # noqa: BLE001 - look inside it
            found += traceable_parts(child, names, path + ".")
    return found


def analyse(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Analysis:
    """Run ``model`` once on ``inputs`` (eval mode, no grad) and describe its convolutions.

    With a symbolic trace, the traced graph itself runs (noting shapes, kept in ``Analysis.graph``) and its
    data flow gives the stems; without one, the model runs as is, the first conv to run is the stem, and the
    norms convs pass their output to are read from its largest parts that trace (``traceable_parts``). Module
    training flags are restored afterwards, so the model is left as it was.

    Raises:
        ValueError: the model fails on ``inputs``.
    """
    with evaluating(model):
        try:
            graph_module = fx.GraphModule(model, GhostLeafTracer().trace(model))
            sites = conv_sites(model)
            order = _run_with_hooks(ShapeRecorder(graph_module).run, sites, inputs)
            parts = [("", graph_module)]
        except Exception:  # noqa: BLE001 - untraceable Python, or a traced graph that fails where the model may not
            graph_module = None
            sites = conv_sites(model)
            order, parts = _run_recording_parts(model, sites, inputs)
    norms = {prefix + conv: prefix + norm for prefix, part in parts for conv, norm in _sole_norms(part).items()}
    pooled = {prefix + conv for prefix, part in parts for conv in _pooled_convs(part)}
    if graph_module is None:
        method, functional = "hooks", []
        for site in order[:1]:
            site.is_stem = True
    else:
        method = "fx"
        stems, functional = _fx_stems_and_functional(graph_module, {site.name for site in sites.values()})
        for site in order:
            site.is_stem = site.name in stems
    read_by_code = {prefix + node.target.rpartition(".")[0]: prefix + node.target for prefix, part in parts
                    for node in part.graph.nodes if node.op == "get_attr"}
    for site in order:  # the norm its Ghost module may take in: seen in the model's graph, or a traced part's
        site.norm = norms.get(site.name) if site.calls == 1 else None
        site.reads_pooled = site.name in pooled
        site.read_directly = next((read_by_code[name] for name in [site.name, *site.aliases] if name in read_by_code),
                                  None)
    unused = [site for site in sites.values() if site.calls == 0]
    return Analysis(method, order + unused, functional, [(prefix, part.graph) for prefix, part in parts])


def _run_recording_parts(model: nn.Module, sites: Dict[int, ConvSite], inputs: Sequence[Any]
                         ) -> Tuple[List[ConvSite], List[Tuple[str, fx.GraphModule]]]:
    """Run ``model`` itself (``_run_with_hooks``), recording the inputs of its largest parts that trace
    (``traceable_parts``); each part called once is then run as its graph on them, noting shapes (a part
    whose graph fails there is left out)."""
    candidates = traceable_parts(model, [site.name for site in sites.values()])
    calls: Dict[str, List[tuple]] = {path: [] for path, _, _ in candidates}
    handles = [module.register_forward_pre_hook(lambda _, args, path=path: calls[path].append(args))
               for path, module, _ in candidates]
    try:
        order = _run_with_hooks(model, sites, inputs)
    finally:
        for handle in handles:
            handle.remove()
    parts = []
    for path, module, graph in candidates:
        if len(calls[path]) == 1:
            part = fx.GraphModule(module, graph)
            try:
                ShapeRecorder(part).run(*calls[path][0])
            except Exception:  # noqa: BLE001 - traced, but its graph does not run: its layers keep their gathers
                continue
            parts.append((path + ".", part))
    return order, parts
