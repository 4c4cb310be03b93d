"""ghostify: turn a PyTorch CNN into a cheaper GhostNet-style network.

The public API is re-exported here and imported on first use, so ``import ghostify`` (and ``ghostify --help``)
stays fast::

    import ghostify, torchvision
    ghost = ghostify.convert(torchvision.models.resnet50(), s=2, d=3)
    print(ghostify.report(torchvision.models.resnet50(), ghost).to_dict()["flops_after"])
"""

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

_EXPORTS = {
    "GhostModule": "module",
    "convert": "rewrite",
    "apply_plan": "rewrite",
    "ConversionResult": "rewrite",
    "Counts": "count",
    "Report": "reporting",
    "report": "reporting",
    "save": "io",
    "load": "io",
    "deploy": "deploy",
    "DeployedGhost": "deploy",
    "export": "export",
    "bench": "bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ghostify' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(ModuleType):
    """Keeps ``ghostify.deploy`` / ``export`` / ``bench`` the functions: importing a submodule of the same
    name would otherwise overwrite the package attribute with the module (``from ghostify.deploy import X``
    still works; it reads ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
