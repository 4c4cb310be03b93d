"""Initialisers: how a new Ghost module's weights start, given the conv it replaces.

``"random"`` keeps the fresh initialisation that ``GhostModule.from_conv`` gives (PyTorch's Conv2d default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple

from torch import nn

from ..module import GhostModule

if TYPE_CHECKING:
    from ..rewrite import ConversionResult

METHODS = ("random",)


def check_init(init: str) -> str:
    """Validate an initialiser name."""
    if init not in METHODS:
        raise ValueError(f"init must be one of {', '.join(METHODS)}, got {init!r}")
    return init


def initialise(init: str, swapped: List[Tuple[str, nn.Conv2d, GhostModule]], result: "ConversionResult") -> None:
    """Set the weights of each ``(name, conv, ghost)`` in ``swapped`` by method ``init``."""
    check_init(init)
