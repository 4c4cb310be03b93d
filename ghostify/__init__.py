"""ghostify: turn a PyTorch CNN into a cheaper GhostNet-style network.

The public API is re-exported here and imported on first use, so ``import ghostify`` (and ``ghostify --help``)
stays fast. (Modules are named apart from the functions they export, e.g. ``reporting.report``, so that
importing a submodule never shadows a function of the package.)::

    import ghostify, torchvision
    ghost = ghostify.convert(torchvision.models.resnet50(), s=2, d=3)
    print(ghostify.report(torchvision.models.resnet50(), ghost).to_dict()["flops_after"])
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "GhostModule": "module",
    "convert": "rewrite",
    "apply_plan": "plan",
    "ConversionResult": "result",
    "Counts": "count",
    "Report": "reporting",
    "report": "reporting",
    "save": "serialization",
    "load": "serialization",
    "deploy": "deployment",
    "DeployedGhost": "deployment",
    "export": "exporting",
    "bench": "latency",
    "finetune": "distillation",
    "analyze": "redundancy",
    "Redundancy": "redundancy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ghostify' has no attribute {name!r}")


def __dir__():
    return list(__all__)
