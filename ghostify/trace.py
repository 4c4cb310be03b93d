"""Find which convolutions a model runs, in what order, on what shapes, and which one is the stem.

torch.fx symbolic tracing plus shape propagation is the first choice: it sees the data flow (so the stem is
the conv with no conv upstream of it) and functional ``F.conv2d`` calls. Models that symbolic tracing cannot
handle (data-dependent control flow) fall back to a real forward pass with hooks; there the stem is the first
conv that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

_CONV_TYPES = (nn.modules.conv._ConvNd,)
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


@dataclass
class Analysis:
    """What a forward pass on the example inputs showed: conv modules in run order, functional convs."""

    method: str
    sites: List[ConvSite]
    functional: List[str]


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
    """The shape of a tensor or of FX's tensor metadata; None for anything else."""
    shape = getattr(value, "shape", None)
    return tuple(int(n) for n in shape) if shape is not None else None


def _run_error(error: Exception, inputs: Sequence[torch.Tensor]) -> ValueError:
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
    return ValueError(f"the model fails on example inputs of shape {shapes}: {type(error).__name__}: {error}; "
                      "pass example_inputs (CLI: --input-size C H W) that the model accepts")


def _analyse_fx(model: nn.Module, graph_module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Analysis:
    sites = conv_sites(model)
    try:
        ShapeProp(graph_module).propagate(*inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the user's forward is bad input
        raise _run_error(error, inputs) from error
    by_name = {site.name: site for site in sites.values()}
    downstream_of_conv: Dict[fx.Node, bool] = {}
    order: List[ConvSite] = []
    functional: List[str] = []
    for node in graph_module.graph.nodes:
        upstream = any(downstream_of_conv.get(arg, False) for arg in node.all_input_nodes)
        is_conv = False
        if node.op == "call_module" and node.target in by_name:
            site, is_conv = by_name[node.target], True
            site.calls += 1
            if site.calls == 1:
                site.input_shape = _shape(node.args[0].meta.get("tensor_meta"))
                site.output_shape = _shape(node.meta.get("tensor_meta"))
                site.is_stem = not upstream
                order.append(site)
            else:
                site.is_stem = site.is_stem and not upstream
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
            is_conv = True
            stack = node.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack.values()), ("", None))[0] if stack else ""
            functional.append(f"{owner}:{node.name}" if owner else node.name)
        downstream_of_conv[node] = upstream or is_conv
    unused = [site for site in sites.values() if site.calls == 0]
    return Analysis("fx", order + unused, functional)


def _analyse_hooks(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Analysis:
    sites = conv_sites(model)
    order: List[ConvSite] = []

    def record(site: ConvSite):
        def hook(module, args, output):
            site.calls += 1
            if site.calls == 1:
                site.input_shape, site.output_shape = _shape(args[0]), _shape(output)
                site.is_stem = not order
                order.append(site)
        return hook

    handles = [site.module.register_forward_hook(record(site)) for site in sites.values()]
    try:
        model(*inputs)
    except Exception as error:  # noqa: BLE001
        raise _run_error(error, inputs) from error
    finally:
        for handle in handles:
            handle.remove()
    unused = [site for site in sites.values() if site.calls == 0]
    return Analysis("hooks", order + unused, [])


def analyse(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Analysis:
    """Run ``model`` once on ``inputs`` (eval mode, no grad) and describe its convolutions.

    Module training flags are restored afterwards, so the model is left as it was.

    Raises:
        ValueError: the model fails on ``inputs``.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            try:
                graph_module = fx.symbolic_trace(model)
            except Exception:  # noqa: BLE001 - untraceable Python: use the hook fallback
                return _analyse_hooks(model, inputs)
            return _analyse_fx(model, graph_module, inputs)
    finally:
        for module, training in flags:
            module.training = training
