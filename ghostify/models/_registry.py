"""A name -> builder registry for the model zoo, with each model's default input size."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    input_size: Tuple[int, int, int]


_MODELS: Dict[str, _Entry] = {}


def _check_input_size(input_size: Tuple[int, int, int]) -> Tuple[int, int, int]:
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise ValueError(f"input_size must be three positive ints (C, H, W), got {input_size!r}")
    return (input_size[0], input_size[1], input_size[2])


def register_model(
    name: Optional[str] = None, *, input_size: Tuple[int, int, int] = (3, 224, 224)
) -> Callable[[Callable[..., M]], Callable[..., M]]:
    """Decorator that adds a model builder to the zoo.

    Args:
        name: the name to register under; the builder's ``__name__`` by default.
        input_size: the model's default input as (C, H, W), without the batch dimension.

    Raises:
        ValueError: the name is already taken, or ``input_size`` is not three positive ints.

    Example:
        >>> @register_model("tiny_net", input_size=(3, 32, 32))
        ... def tiny_net(*, num_classes: int = 10) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
    """
    size = _check_input_size(input_size)

    def wrapper(builder: Callable[..., M]) -> Callable[..., M]:
        key = builder.__name__ if name is None else name
        if key in _MODELS:
            raise ValueError(f"a model is already registered as {key!r}; pick another name")
        _MODELS[key] = _Entry(builder, size)
        return builder

    return wrapper


def list_models() -> List[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def _entry(name: str) -> _Entry:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "see list_models()"
        raise ValueError(f"unknown model {name!r}; {hint}") from None


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder function registered as ``name``.

    Raises:
        ValueError: no model has that name; the message lists the closest names.
    """
    return _entry(name).builder


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its builder (e.g. ``num_classes``).

    Raises:
        ValueError: no model has that name; the message lists the closest names.
    """
    return _entry(name).builder(**kwargs)


def model_input_size(name: str) -> Tuple[int, int, int]:
    """The default input (C, H, W) of the model registered as ``name``.

    Raises:
        ValueError: no model has that name.
    """
    return _entry(name).input_size
