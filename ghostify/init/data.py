"""Calibration inputs: checked before any work starts, from a tensor, batches, (x, y) pairs, a file or a folder."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..sources import read_data

Batch = Tuple[torch.Tensor, ...]  # one calibration batch: the model's positional inputs

BATCH = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _inputs_of(item: Any, arity: int) -> Batch:
    if arity == 1 and isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and len(item) >= arity and all(isinstance(x, torch.Tensor)
                                                                      for x in item[:arity]):
        return tuple(item[:arity])
    if arity == 1:
        bad = item[0] if isinstance(item, (tuple, list)) and item else item
        raise TypeError("calibration_data must be a tensor or an iterable of tensors or (inputs, targets) pairs; "
                        f"got an item of type {type(bad).__name__}")
    raise TypeError(f"the model takes {arity} inputs: each calibration batch must be a tuple whose first {arity} "
                    f"entries are tensors (its inputs; anything after them, such as targets, is ignored), "
                    f"got {type(item).__name__}")


def check_calibration(data: Any, samples: int = 256, shapes: Optional[Sequence[Sequence[int]]] = None,
                      arity: int = 1) -> List[Batch]:
    """The first ``samples`` calibration inputs, validated, in batches of up to 64.

    Args:
        data: an ``(N, ...)`` tensor, or an iterable of such batches or of (inputs, targets) pairs; for a
            model with several inputs, an iterable of tuples whose first ``arity`` entries are its inputs.
        samples: how many inputs to use.
        shapes: the per-sample shape of each input the model was analysed with, e.g. ``[(3, 32, 32)]``.
        arity: how many positional inputs the model takes.

    Returns:
        Batches, each a tuple of the model's ``arity`` inputs.

    Raises:
        TypeError: ``data`` is not a tensor or an iterable of them (or of tuples of them).
        ValueError: no inputs, non-floating-point inputs, or inputs of another shape.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"calibration samples must be a positive integer, got {samples!r}")
    if data is None:
        raise ValueError("init='calibrate' and init='reconstruct' need calibration_data (a tensor of inputs, or "
                         "batches of them)")
    if isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"calibration_data must be a tensor or an iterable of batches, got {type(data).__name__}")
    taken: List[Batch] = []
    count = 0
    for item in data:
        batch = _inputs_of(item, arity)
        for index, x in enumerate(batch):
            _check_input(x, shapes[index] if shapes is not None else
                         (tuple(taken[0][index].shape[1:]) if taken else None), len(batch[0]))
        if len(batch[0]):
            taken.append(tuple(x[: samples - count].detach() for x in batch))
            count += len(taken[-1][0])
        if count >= samples:
            break
    if not count:
        raise ValueError("calibration_data is empty: it holds no inputs")
    return list(zip(*[torch.cat(column).split(BATCH) for column in zip(*taken)]))


def mirrored(batches: Sequence[Batch], layers: Sequence[Any]) -> Tuple[List[Batch], int, Optional[str]]:
    """``batches`` followed by as many mirror images of them as the least-squares fits need: flipped along
    the last spatial dimension, then the one before, then both, ... (every combination at most), until each
    layer in ``layers`` (``result.Replaced`` rows) sees at least as many output positions as its filters have
    weights. A deep layer of a network on small inputs sees few positions (ResNet-18's last on 32x32 inputs:
    one per image, for 4,608 weights), so its fit leans on the ridge prior; mirror images are inputs the
    original model answers too. Only for a single-input model.

    Returns:
        The batches to fit on, how many versions of each input they hold, and which layer needed the most
        (None when none needed more).
    """
    dims = batches[0][0].dim() - 2
    images = sum(len(batch[0]) for batch in batches)
    sizes = {row.name: (images * math.prod(row.output_shape[2:]), row.in_channels * math.prod(row.primary_kernel))
             for row in layers if row.output_shape is not None}
    worst = max(sizes, key=lambda name: sizes[name][1] / sizes[name][0], default=None)
    if worst is None or any(len(batch) != 1 for batch in batches) or dims < 1 or sizes[worst][1] <= sizes[worst][0]:
        return list(batches), 1, None
    flips = [axes for k in range(dims + 1) for axes in itertools.combinations(range(-1, -dims - 1, -1), k)]
    copies = min(2 ** math.ceil(math.log2(sizes[worst][1] / sizes[worst][0])), len(flips))
    return ([(batch[0].flip(axes),) for axes in flips[:copies] for batch in batches], copies,
            f"{worst} sees {sizes[worst][0]} output positions for {sizes[worst][1]} weights per filter")


def _check_input(x: torch.Tensor, expected: Optional[Sequence[int]], batch: int) -> None:
    if not x.is_floating_point():
        raise ValueError("calibration inputs must be floating point (normalised as the model expects), "
                         f"got {x.dtype}")
    expected = None if expected is None else tuple(expected)
    if x.dim() < 2 or (expected is not None and tuple(x.shape[1:]) != expected):
        wanted = ", ".join(map(str, expected or ["..."]))
        raise ValueError(f"calibration inputs must be batches of shape (N, {wanted}), got {tuple(x.shape)}; "
                         "pass example_inputs (CLI: --input-size) of the same size")
    if len(x) != batch:
        raise ValueError(f"the inputs of one calibration batch must have the same batch size, got {len(x)} "
                         f"and {batch}")


def _read_image(path: str, shape: Sequence[int], what: str = "calibration") -> torch.Tensor:
    from PIL import Image

    channels, height, width = shape
    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, -1)
    except (OSError, ValueError) as error:  # PIL: unidentified, truncated or corrupt image
        raise ValueError(f"cannot read {what} image {path}: {error}") from None
    x = x.permute(2, 0, 1).float() / 255
    if channels == 3:
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x


def load_calibration(path: str, shape: Sequence[int], samples: int = 256, what: str = "calibration",
                     any_size: bool = False) -> List[Batch]:
    """Calibration batches from a ``.pt`` file (a tensor, or (inputs, targets)) or a folder of images.

    Images (searched recursively, sorted by path) are resized to ``shape`` = (C, H, W) and, for 3 channels,
    normalised with the ImageNet mean and std, as torchvision's models expect. A tensor file must hold inputs
    of ``shape``, unless ``any_size``. ``what`` names the inputs in errors.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.lower().endswith(IMAGE_SUFFIXES))[:samples]
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        return check_calibration(torch.stack([_read_image(f, shape, what) for f in files]), samples, [shape])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such {what} file or folder: {path}")
    data = read_data(path, f"{what} tensor file")
    if isinstance(data, tuple) and data:
        data = data[0]
    return check_calibration(data, samples, None if any_size else [shape])
