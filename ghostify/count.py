"""FLOPs and parameter counts over fvcore, computed lazily on first query.

Unit: one multiply-add is one FLOP, the paper's and fvcore's convention (``torch.utils.flop_counter``
counts two per multiply-add). fvcore also counts batch norm, pooling and upsampling; it ignores
element-wise additions and activations.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Hashable, Tuple

import torch
from torch import nn

from .trace import evaluating, run_or_explain


class Counts:
    """FLOPs and parameters of ``model`` on ``inputs``, by module and in total.

    The model is traced in eval mode and without gradients the first time a FLOP figure is asked for; its
    training flag is restored afterwards, so counting never changes it (no BN statistic updates). Figures
    are cached until the model's structure changes (a module replaced, a layer resized): each query
    compares a cheap fingerprint of the module tree, so a count is never stale.

    Example:
        >>> counts = Counts(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
        >>> counts.flops  # multiply-adds
        1819066368
    """

    def __init__(self, model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
        self.model = model
        self.inputs = inputs
        self._cache: Dict[str, Any] = {}
        self._cached_for: Hashable = None

    def _fingerprint(self) -> Hashable:
        """What the counts depend on, cheaply: which module objects make up the model, and each parameter's
        shape (a replaced module is a new object; a resized layer has new shapes)."""
        return (tuple(map(id, self.model.modules())),
                tuple((id(p), p.shape) for p in self.model.parameters()))

    def _cached(self, key: str, compute: Callable[[], Any]) -> Any:
        fingerprint = self._fingerprint()
        if fingerprint != self._cached_for:
            self._cache, self._cached_for = {}, fingerprint
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _analyse(self):
        """fvcore's analysis; per-module and per-operator totals come from the same trace."""
        with evaluating(self.model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            analysis = FlopCountAnalysis(self.model, self.inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            try:
                analysis.by_module()
            except Exception:
                with torch.no_grad():  # the model refusing the inputs is bad input, said as such; else the trace's
                    run_or_explain(self.model, self.inputs)
                raise
            return analysis

    @property
    def flops_by_module(self) -> Dict[str, int]:
        """Multiply-adds per qualified module name ('' is the whole model), summed over calls."""
        return self._cached("by_module", lambda: dict(self._cached("analysis", self._analyse).by_module()))

    @property
    def flops_by_operator(self) -> Dict[str, int]:
        """Multiply-adds per operator kind ('conv', 'linear', 'batch_norm', ...)."""
        return self._cached("by_operator", lambda: dict(self._cached("analysis", self._analyse).by_operator()))

    @property
    def conv_linear_flops(self) -> int:
        """Multiply-adds of convolutions and matrix products only: the paper's convention, which leaves
        out batch norm (folded into the conv at inference) and pooling."""
        return int(sum(v for k, v in self.flops_by_operator.items()
                       if k in ("conv", "linear", "matmul", "addmm", "bmm", "einsum")))

    @property
    def params_by_module(self) -> Dict[str, int]:
        """Parameter count per qualified module name ('' is the whole model); shared tensors count once."""
        from fvcore.nn import parameter_count

        return self._cached("params", lambda: dict(parameter_count(self.model)))

    @property
    def flops(self) -> int:
        """Total multiply-adds for one forward pass on ``inputs``."""
        return int(self.flops_by_module.get("", 0))

    @property
    def params(self) -> int:
        """Total parameters."""
        return int(self.params_by_module.get("", 0))

    def module_flops(self, name: str) -> int:
        """Multiply-adds of module ``name`` (0 when it never ran)."""
        return int(self.flops_by_module.get(name, 0))

    def module_params(self, name: str) -> int:
        """Parameters of module ``name``."""
        return int(self.params_by_module.get(name, 0))
