"""What a module receives or gives on every calibration batch, read layer after layer in run order.

Calibration refits layers in run order, each on the converted model's input to it (earlier refits included)
and the original's output at it. ``Frontier`` moves all batches through a traced graph together, node by
node, keeping only the values still to be read: one forward pass in all, whatever the depth. A model that
torch.fx cannot trace gets ``Replay``, which reruns the model from its inputs for each request (its cost
grows with depth squared). ``activations`` picks one; both are used inside ``trace.evaluating``.
"""

from __future__ import annotations

from typing import Collection, Dict, List, Sequence, Union

import torch
from torch import fx, nn

from ..trace import GhostLeafTracer
from .data import Batch


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the module of interest has been reached."""


class Replay:
    """Values at a module by running the model from its inputs each time, stopped at that module."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch]):
        self.model, self.batches = model, batches

    def _capture(self, module: nn.Module, output: bool) -> List[torch.Tensor]:
        grabbed: List[torch.Tensor] = []

        def hook(mod, args, out=None):
            grabbed.append(out if output else args[0])
            raise _Stop

        handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
        try:
            for inputs in self.batches:
                try:
                    self.model(*inputs)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return grabbed

    def input_of(self, module: nn.Module) -> List[torch.Tensor]:
        """``module``'s first input on each batch, as the model is now."""
        return self._capture(module, output=False)

    def output_of(self, module: nn.Module) -> List[torch.Tensor]:
        """``module``'s output on each batch, as the model is now."""
        return self._capture(module, output=True)

    def in_run_order(self, modules: Sequence[nn.Module]) -> List[nn.Module]:
        """Any order will do: every request starts from the inputs."""
        return list(modules)


class Frontier:
    """All batches at one point of a traced model, moved forward node by node on request.

    Requests must come in run order: ``input_of(m)`` runs every batch up to the call of ``m``, ``output_of(m)``
    up to and including it; a module requested must be a leaf of the trace (convs, Ghost modules and the
    paths in ``leaves`` are). Values are dropped once their last reader has run. Changing a module's weights
    between requests is seen by the nodes that run afterwards, which is what calibration needs.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], leaves: Collection[str] = ()):
        graph_module = fx.GraphModule(model, GhostLeafTracer(leaves).trace(model))  # shares model's modules
        self.nodes = list(graph_module.graph.nodes)
        self.modules = dict(graph_module.named_modules())
        self.runners = [fx.Interpreter(graph_module, garbage_collect_values=False) for _ in batches]
        for runner, inputs in zip(self.runners, batches):
            runner.args_iter = iter(inputs)
        self.position = 0
        last_reader: Dict[fx.Node, int] = {}
        for index, node in enumerate(self.nodes):
            for read in node.all_input_nodes:
                last_reader[read] = index
        self.release: List[List[fx.Node]] = [[] for _ in self.nodes]
        for node, index in last_reader.items():
            self.release[index].append(node)

    def _index(self, module: nn.Module) -> int:
        """The first call of ``module`` at or after the current position."""
        for index in range(self.position, len(self.nodes)):
            node = self.nodes[index]
            if node.op == "call_module" and self.modules[node.target] is module:
                return index
        raise RuntimeError(f"{type(module).__name__} is not called after the current point of the traced model "
                           "(requests must come in run order)")

    def _run_to(self, stop: int) -> None:
        for index in range(self.position, stop):
            node = self.nodes[index]
            for runner in self.runners:
                runner.env[node] = runner.run_node(node)
                for done in self.release[index]:
                    del runner.env[done]
        self.position = max(self.position, stop)

    def input_of(self, module: nn.Module) -> List[torch.Tensor]:
        """``module``'s first input on each batch."""
        index = self._index(module)
        self._run_to(index)
        node = self.nodes[index].args[0]
        return [runner.env[node] if isinstance(node, fx.Node) else node for runner in self.runners]

    def output_of(self, module: nn.Module) -> List[torch.Tensor]:
        """``module``'s output on each batch."""
        index = self._index(module)
        self._run_to(index + 1)
        return [runner.env[self.nodes[index]] for runner in self.runners]

    def in_run_order(self, modules: Sequence[nn.Module]) -> List[nn.Module]:
        """``modules`` sorted by their first call after the current position."""
        return sorted(modules, key=self._index)


def activations(model: nn.Module, batches: Sequence[Batch], leaves: Collection[str] = ()) -> Union[Frontier, Replay]:
    """A ``Frontier`` over ``model`` (with the modules at ``leaves`` kept whole) when torch.fx can trace it, else
    a ``Replay``."""
    try:
        return Frontier(model, batches, leaves)
    except Exception:  # noqa: BLE001 - untraceable Python: rerun the model itself
        return Replay(model, batches)
