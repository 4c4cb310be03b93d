"""``analyze --plot``: PNG figures of a model's feature-map redundancy (matplotlib, an optional extra).

* ``redundancy.png``: per layer, the output energy lost at each ratio ``s`` (a bar per ``s``), the way to
  see which layers can be converted hard;
* ``maps_<layer>.png``: a Table 2 layer's feature maps on the first input, its most similar pairs first and
  outlined in one colour per pair, as in the paper's Fig. 1;
* ``ghosts_<layer>.png``: for a Table 2 layer that a conversion made a Ghost module, its intrinsic maps
  beside the ghost maps made from them, each beside the original layer's map it stands for, as in the paper's
  Figs. 4-5 (``ghost_maps`` gives the maps).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .init.measure import record

COLOURS = ("red", "lime", "deepskyblue", "orange", "magenta", "yellow")
MAPS = 32  # feature maps shown per layer


def require_matplotlib():
    """``matplotlib.pyplot`` on a file-only backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'ghostify[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write(result: Any, maps: Dict[str, torch.Tensor], folder: str,
          ghosts: Optional[Dict[str, List[Tuple[str, torch.Tensor]]]] = None) -> List[str]:
    """Write the figures for ``result`` (a ``redundancy.Redundancy``; ``maps``: the output of each of its Table 2
    layers; ``ghosts``: ``ghost_maps`` of those that are Ghost modules) into ``folder``; their paths."""
    plt = require_matplotlib()
    os.makedirs(folder, exist_ok=True)
    paths = [_scores(plt, result, os.path.join(folder, "redundancy.png"))]
    for table in result.tables:
        safe = table.layer.replace(".", "_").replace("/", "_")
        paths.append(_maps(plt, table, maps[table.layer], os.path.join(folder, f"maps_{safe}.png")))
        if ghosts and table.layer in ghosts:
            paths.append(_ghosts(plt, table.layer, ghosts[table.layer], os.path.join(folder, f"ghosts_{safe}.png")))
    return paths


def ghost_maps(ghost: nn.Module, original: nn.Module, row: Any, inputs: Sequence[torch.Tensor],
               rows: int = 6) -> List[List[Tuple[str, torch.Tensor]]]:
    """For the first ``rows`` intrinsic maps of the converted layer ``row`` (a ``result.Replaced`` of model
    ``ghost``) on the first input: the original layer's map it stands for, the intrinsic map, then each ghost
    made from it beside the original map that ghost stands for, as (title, 2-D map) pairs.

    The Ghost module's maps are read after its inner norms when it took in the original's batch norm, and
    compared with that norm's output; else with the conv's.
    """
    module = ghost.get_submodule(row.name)
    inputs = tuple(x[:1] for x in inputs)
    seen: Dict[str, torch.Tensor] = {}

    def keep(name: str, output: torch.Tensor) -> None:
        seen[name] = output.detach().float().cpu().clone()[0]

    record(ghost, [f"{row.name}.primary", f"{row.name}.cheap"], keep, [inputs])
    record(original, [row.norm or row.name], keep, [inputs])
    intrinsic, made, theirs = seen[f"{row.name}.primary"], seen[f"{row.name}.cheap"], seen[row.norm or row.name]
    m, n = module.intrinsic_channels, module.out_channels
    if module.out_index is not None:  # gathered: position p of [intrinsic, ghosts] is channel out_index^-1[p]
        order = torch.argsort(module.out_index.cpu()).tolist()
    else:
        order = list(row.order)
    grid = []
    for i in range(min(rows, m)):
        line = [(f"original {order[i]}", _plane(theirs[order[i]])), (f"intrinsic {i}", _plane(intrinsic[i]))]
        for k in range(module.s - 1):
            if m + k * m + i < n:
                line += [(f"ghost {k + 1} of {i}", _plane(made[k * m + i])),
                         (f"original {order[m + k * m + i]}", _plane(theirs[order[m + k * m + i]]))]
        grid.append(line)
    return grid


def _plane(y: torch.Tensor) -> torch.Tensor:
    """A map as a 2-D image (a 1-D map as one row, a 3-D one with its depths stacked)."""
    return y.reshape(-1, y.shape[-1]) if y.dim() > 1 else y[None]


def _ghosts(plt, layer: str, grid: List[List[Tuple[str, torch.Tensor]]], path: str) -> str:
    columns = max(len(line) for line in grid)
    figure, axes = plt.subplots(len(grid), columns, figsize=(2 * columns, 2.1 * len(grid) + 0.8), squeeze=False)
    low = min(image.min().item() for line in grid for _, image in line)
    high = max(image.max().item() for line in grid for _, image in line)
    for axes_row, line in zip(axes, grid):
        for position, axis in enumerate(axes_row):
            axis.set_xticks([])
            axis.set_yticks([])
            if position >= len(line):
                axis.axis("off")
                continue
            title, image = line[position]
            shown = axis.imshow(image.numpy(), cmap="gray", vmin=low, vmax=high)
            axis.set_title(title, fontsize=8, color="black" if title.startswith("original") else "tab:blue")
    figure.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="activation")
    figure.suptitle(f"{layer}: intrinsic maps (blue), the ghosts made from them, each beside the original map it "
                    "stands for (input 0)")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _scores(plt, result: Any, path: str) -> str:
    ratios = sorted({s for layer in result.layers for s in layer.errors})
    width = 0.8 / max(len(ratios), 1)
    figure, axes = plt.subplots(figsize=(max(8, 0.35 * len(result.layers)), 5))
    for index, s in enumerate(ratios):
        axes.bar([i + index * width for i in range(len(result.layers))],
                 [layer.errors.get(s, float("nan")) for layer in result.layers], width, label=f"s={s}")
    axes.axhline(result.tolerance, color="black", linestyle="--", linewidth=1, label="tolerance")
    axes.set_xticks([i + width * (len(ratios) - 1) / 2 for i in range(len(result.layers))])
    axes.set_xticklabels([layer.name for layer in result.layers], rotation=90, fontsize=7)
    axes.set_ylabel("output energy lost by the ghosts")
    axes.set_title(f"{result.model}: feature-map redundancy per layer ({result.images} inputs)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _maps(plt, table: Any, y: torch.Tensor, path: str) -> str:
    image = y[0].reshape(y.shape[1], -1, y.shape[-1]) if y.dim() > 3 else y[0][:, None]  # 3-D: depths stacked
    paired = [index for a, b, _ in table.pairs for index in (a, b)]
    order = (paired + [index for index in range(len(image)) if index not in paired])[:MAPS]
    shown = len(order)
    columns = 8
    rows = -(-shown // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.1 * rows + 0.6), squeeze=False)
    outlined = {}
    for colour, (a, b, corr) in zip(COLOURS, table.pairs):
        outlined[a] = outlined[b] = (colour, corr)
    low, high = image[order].min().item(), image[order].max().item()
    for position, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if position >= shown:
            axis.axis("off")
            continue
        index = order[position]
        shown_image = axis.imshow(image[index].numpy(), cmap="gray", vmin=low, vmax=high)
        axis.set_title(f"map {index}", fontsize=8)
        if index in outlined:
            colour, corr = outlined[index]
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            axis.set_title(f"map {index} (|r|={corr:.2f})", fontsize=8, color=colour)
    figure.colorbar(shown_image, ax=axes.ravel().tolist(), shrink=0.6, label="activation")
    pairs = ", ".join(f"{a}-{b}" for a, b, _ in table.pairs)
    figure.suptitle(f"{table.layer}: {shown} feature maps of input 0, the most similar pairs first and outlined "
                    f"({pairs})")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
