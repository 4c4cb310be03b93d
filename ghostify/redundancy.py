"""``analyze``: how redundant a model's feature maps are, on real inputs (the paper's section 3.1 and Table 2).

Two measurements, both on the original layers' output maps:

* per layer and ratio ``s``: the share of the output energy that ``s - 1`` cheap ``d x d`` maps of the best
  ``m = ceil(n / s)`` maps cannot reproduce (``calibrate``'s pairing and channel choice), and the largest ``s``
  within a tolerance: how hard the layer can be converted;
* for chosen layers, Table 2: the most similar pairs of maps and the mean squared error of a depthwise
  ``d x d`` filter fitted from one map of a pair to the other, for each ``d``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import figures
from .init.calibrate import ROWS, _design, map_pairing
from .init.datafree import bn_gain
from .init.fit import choose, explained, solve, unexplained
from .init.measure import record
from .module import GhostModule, check_cheap_kernel, conv_dim
from .progress import progress as progress_display
from .trace import analyse

RATIOS = (2, 3, 4, 5)
IMAGES = 64  # inputs whose output maps are paired
TOLERANCE = 0.1  # the suggested s loses at most this share of a layer's output energy


@dataclass
class LayerRedundancy:
    """One layer: its lost output energy at each ``s`` and the largest ``s`` within the tolerance (None: none)."""

    name: str
    channels: int
    errors: Dict[int, float]
    suggested: Optional[int]


@dataclass
class PairTable:
    """Table 2 for one layer: its most similar map pairs (input map, output map, |correlation|) and, per pair and
    ``d``, the mean squared error of the best depthwise ``d x d`` filter from the first map to the second."""

    layer: str
    pairs: List[Tuple[int, int, float]]
    mse: List[Dict[int, float]]


@dataclass
class Redundancy:
    """What ``analyze`` found: per-layer scores and Table 2 for the chosen layers."""

    model: str
    images: int
    tolerance: float
    layers: List[LayerRedundancy] = field(default_factory=list)
    tables: List[PairTable] = field(default_factory=list)
    figures: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        ratios = sorted({s for layer in self.layers for s in layer.errors})
        scores = Table(title=f"{self.model}: output energy lost by s-1 cheap maps of the best 1/s "
                             f"({self.images} inputs); suggested s loses <= {self.tolerance:.0%}")
        for column in ["layer", "maps", *[f"s={s}" for s in ratios], "suggested s"]:
            scores.add_column(column, justify="left" if column == "layer" else "right")
        for layer in self.layers:
            scores.add_row(layer.name, str(layer.channels),
                           *[f"{layer.errors[s]:.3f}" if s in layer.errors else "-" for s in ratios],
                           str(layer.suggested) if layer.suggested else "keep")
        parts = [scores]
        for table in self.tables:
            sizes = sorted({d for row in table.mse for d in row})
            pairs = Table(title=f"{table.layer}: most similar map pairs, MSE of a d x d depthwise fit (paper Table 2)")
            for column in ["pair", "|corr|", *[f"d={d}" for d in sizes]]:
                pairs.add_column(column, justify="right")
            for (a, b, corr), row in zip(table.pairs, table.mse):
                pairs.add_row(f"{a} -> {b}", f"{corr:.3f}", *[f"{row[d]:.3g}" for d in sizes])
            parts.append(pairs)
        return Group(*parts)


def _pairing(y: torch.Tensor, d: int, gain: torch.Tensor, seed: int):
    """``calibrate``'s ghost problem on maps ``y`` (float32, CPU) and its explained fractions."""
    probe = GhostModule(2, 2, 1, d=d, dim=y.dim() - 2)  # only the cheap conv's geometry is used
    pairing = map_pairing(probe, y, gain, torch.Generator().manual_seed(seed))
    return pairing, explained(pairing)


def layer_errors(y: torch.Tensor, d: int, gain: torch.Tensor, ratios: Iterable[int] = RATIOS,
                 seed: int = 0) -> Dict[int, float]:
    """Per ratio, the output energy of maps ``y`` (weighted by ``gain``) that ``s - 1`` cheap ``d x d`` maps of the
    best ``ceil(n / s)`` maps cannot reproduce (``fit.choose`` on ``calibrate``'s pairing)."""
    pairing, fraction = _pairing(y.float().cpu(), d, gain, seed)
    return {s: unexplained(pairing, choose([pairing], s), fraction) for s in ratios if s <= y.shape[1]}


def ghost_maps(y: torch.Tensor, d: int, gain: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    """``y`` with every map the channel choice at ratio ``s`` makes a ghost replaced by the best cheap ``d x d``
    filtering of its intrinsic map (least squares on sampled pixels): what a Ghost module fitted to these maps
    would output."""
    maps = y.float().cpu()
    dim = maps.dim() - 2
    pairing, _ = _pairing(maps, d, gain, seed)
    choice = choose([pairing], s)
    source = choice.intrinsic[choice.owner]
    kernels = pairing.kernels(solve(pairing.cross[source, choice.ghost], pairing.gram[source]).float(), d, dim)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    ghosts = conv(maps[:, source], kernels[:, None], padding=d // 2, groups=len(source))
    axes = [0, *range(2, maps.dim())]  # the pairing is centred: each ghost takes its target's mean
    out = maps.clone()
    out[:, choice.ghost] = ghosts - ghosts.mean(axes, keepdim=True) + maps[:, choice.ghost].mean(axes, keepdim=True)
    return out.to(dtype=y.dtype, device=y.device)


def similar_pairs(y: torch.Tensor, count: int = 3) -> List[Tuple[int, int, float]]:
    """The ``count`` most correlated pairs of maps (no map in two pairs), lower index first."""
    flat = y.float().transpose(0, 1).flatten(1)
    flat = F.normalize(flat - flat.mean(1, keepdim=True), dim=1)
    corr = (flat @ flat.T).abs().fill_diagonal_(-1)
    pairs, used = [], set()
    for index in corr.flatten().argsort(descending=True).tolist():
        a, b = divmod(index, len(corr))
        if a < b and a not in used and b not in used:
            pairs.append((a, b, corr[a, b].item()))
            used.update((a, b))
        if len(pairs) == count:
            break
    return pairs


def pair_mse(source: torch.Tensor, target: torch.Tensor, d: int, seed: int = 0) -> float:
    """Mean squared error of the least-squares depthwise ``d``-sized filter (with bias, zero padding) mapping the
    maps ``source`` ``(N, *spatial)`` to ``target``, on the same randomly sampled pixels for every ``d`` (so a
    larger ``d``, whose taps include a smaller one's, never fits worse)."""
    probe = GhostModule(2, 2, 1, d=d, dim=source.dim() - 1).cheap_conv
    patches, targets = _design(probe, source.float()[:, None], target.float()[:, None], ROWS,
                               torch.Generator().manual_seed(seed))
    design = torch.cat([patches, torch.ones(len(patches), 1)], 1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution
    return (design @ solution - targets.double()).square().mean().item()


def analyze(model: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor, *, layers: Optional[Sequence[str]] = None,
            tables: Sequence[str] = (), d: int = 3, sizes: Sequence[int] = (1, 3, 5, 7), pairs: int = 3,
            tolerance: float = TOLERANCE, plot: Optional[str] = None, name: str = "model",
            progress: bool = False, original: Optional[nn.Module] = None) -> Redundancy:
    """Measure the redundancy of ``model``'s conv outputs on real ``inputs`` (at most ``IMAGES`` are used).

    Args:
        model: any model; not modified.
        inputs: a batch of inputs (or a tuple of the model's positional inputs).
        layers: the convs to score (default: every dense conv that runs, the stem included).
        tables: modules (any, e.g. ``"layer1.0"``) to give Table 2 for: their ``pairs`` most similar map
            pairs and the MSE of a depthwise fit for each ``d`` in ``sizes``.
        d: the cheap kernel the scores assume.
        tolerance: the suggested ``s`` is the largest that loses at most this share of a layer's energy.
        plot: a folder to write PNG figures into (``figures``; needs matplotlib).
        original: for a converted ``model``, the model it was converted from: the figures then also show, for
            each Table 2 layer that is a Ghost module, its intrinsic and ghost maps beside the original's.

    Raises:
        ValueError: a named layer is not in the model (or, for ``layers``, is not a dense conv that runs).
        ImportError: ``plot`` without matplotlib (before any work).
    """
    check_cheap_kernel(d)
    if plot is not None:
        figures.require_matplotlib()
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    inputs = tuple(x[:IMAGES] for x in inputs)
    sites = [site for site in analyse(model, tuple(x[:1] for x in inputs)).sites
             if site.calls and conv_dim(site.module) is not None and site.module.groups == 1]
    if layers is not None:
        wanted = set(check_layers(model, layers))
        sites = [site for site in sites if wanted & {site.name, *site.aliases}]
        if len(sites) != len(wanted):
            raise ValueError(f"--layer names dense convs that run; not all of {sorted(wanted)} are")
    entries = [{"name": site.name, "norm": site.norm} for site in sites]
    check_layers(model, tables)
    result = Redundancy(name, len(inputs[0]), tolerance)
    found: Dict[str, torch.Tensor] = {}
    with progress_display("measuring {description}", show=progress) as bar:
        task = bar.add_task("layers", total=len(entries) + len(tables)) if bar else None

        def visit(module_name: str, output: torch.Tensor) -> None:
            if module_name in tables:
                found[module_name] = output.detach().float().cpu().clone()
            entry = next((e for e in entries if e["name"] == module_name), None)
            if entry is not None and module_name not in {layer.name for layer in result.layers}:
                norm = model.get_submodule(entry["norm"]) if entry.get("norm") else None
                errors = layer_errors(output, d, bn_gain(norm, output.shape[1]))
                within = [s for s, error in errors.items() if error <= tolerance]
                result.layers.append(LayerRedundancy(module_name, output.shape[1], errors, max(within, default=None)))
            if bar:
                bar.advance(task)

        record(model, list(dict.fromkeys([e["name"] for e in entries] + list(tables))), visit, [inputs])
    run_order = {site.name: index for index, site in enumerate(sites)}
    result.layers.sort(key=lambda layer: run_order[layer.name])
    for module_name in tables:
        y = found[module_name]
        chosen = similar_pairs(y, pairs)
        result.tables.append(PairTable(module_name, chosen, [
            {size: pair_mse(y[:, a], y[:, b], size) for size in sizes} for a, b, _ in chosen]))
    if plot is not None:
        converted = {row.name: row for row in getattr(getattr(model, "ghostify_result", None), "replaced", [])}
        ghosts = {layer: figures.ghost_maps(model, original, converted[layer], inputs) for layer in tables
                  if original is not None and layer in converted and converted[layer].order is not None}
        result.figures = figures.write(result, found, plot, ghosts)
    return result


def check_layers(model: nn.Module, names: Iterable[str]) -> List[str]:
    """``names`` if each is a module of ``model``; else a ValueError naming the first that is not."""
    names = list(names)
    modules = dict(model.named_modules())
    for module_name in names:
        if module_name not in modules:
            raise ValueError(f"the model has no module {module_name!r} (see `ghostify report` for layer names)")
    return names

