"""``calibrate``: refit every converted layer, in run order, to the original model's outputs on real inputs.

Layer by layer, the converted model's input to the layer (so earlier layers' errors are seen and corrected)
and the original layer's output are collected (``activations``: all batches carried through both models
together, one forward pass each, for a traceable model). Then, all
least squares: the intrinsic/ghost choice is redone on the original output maps; the primary filters are
fitted to the intrinsic channels (ridge towards the original filters, which keeps them sensible when there
are fewer output pixels than filter weights); the cheap kernels to the ghost channels, on the intrinsic
maps the new primary conv makes. Then the linear layers after the last Ghost module (a classifier head,
``heads``) are refitted the same way: each layer corrects what the layers before it got wrong, and nothing
came after the last Ghost module to correct its error.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..module import GhostModule, channels_last
from ..progress import UNKNOWN, loss_progress
from ..trace import evaluating
from .activations import activations
from .data import Batch
from .datafree import bn_gain, bn_scale, write
from .fit import Choice, Grain, Pairing, choose, restrict, solve
from .measure import record

ROWS = 16384
PAIR_ROWS = 2048
PRIOR = 1e-2
SPREAD = 4


def _channels_last(batch: Batch) -> Batch:
    """A batch's images channels-last, a layout the layers keep: oneDNN's fastest on the CPU, and the fits then
    gather whole runs of channels."""
    return tuple(channels_last(x) if isinstance(x, torch.Tensor) else x for x in batch)


def _pick(count: int, pixels: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``count`` images a layer's fits read: all of them, or a random subset with ``SPREAD`` times more
    output ``pixels`` than the ``limit`` rows drawn from them (early, large layers need a few images only)."""
    keep = min(count, -(-SPREAD * limit // pixels))
    return torch.randperm(count, generator=generator)[:keep].sort().values


def _take(values: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Images ``index`` (counted over all batches) of per-batch values, as one float32 CPU tensor: the fits
    run there whatever the model's dtype and device."""
    parts, start = [], 0
    for value in values:
        inside = index[(index >= start) & (index < start + len(value))] - start
        parts.append(value[inside.to(value.device)].float().cpu())
        start += len(value)
    return torch.cat(parts)


def _source(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """The input pixel a (possibly padded) position ``index`` along a dimension of ``size`` reads, for each
    padding mode (``zeros``: clamped, the caller zeroes what lies outside)."""
    if mode == "circular":
        return index.remainder(size)
    if mode == "reflect":
        return (size - 1) - ((size - 1) - index.abs()).abs()
    return index.clamp(0, size - 1)


def _patches(conv: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(R, prod(kernel) * C)``: the input patches ``conv`` reads at ``rows`` (``(R, 1 + dims)``: image index,
    then output position), tap-major like ``taps_last(conv.weight)``. Only the sampled pixels are read, as
    whole runs of channels (no padded copy of ``x``), in any number of spatial dimensions."""
    size = torch.tensor(x.shape[2:])
    before = torch.tensor(conv._reversed_padding_repeated_twice[::2][::-1])  # padding before, per dimension
    taps = torch.cartesian_prod(*[torch.arange(k) * step for k, step in zip(conv.kernel_size, conv.dilation)])
    coords = rows[:, None, 1:] * torch.tensor(conv.stride) + taps.view(1, -1, len(conv.kernel_size)) - before
    source = [_source(c, n, conv.padding_mode) for c, n in zip(coords.unbind(-1), size.tolist())]
    picked = x.movedim(1, -1)[(rows[:, :1].expand(-1, coords.shape[1]), *source)]  # (R, taps, C)
    if conv.padding_mode == "zeros":
        picked[((coords < 0) | (coords >= size)).any(-1)] = 0  # taps on the zero padding
    return picked.flatten(1)


def taps_last(weight: torch.Tensor) -> torch.Tensor:
    """``(n, prod(kernel) * c)``: filters in the tap-major order of ``_patches``' columns."""
    return weight.movedim(1, -1).flatten(1)


def _design(conv: nn.Module, x: torch.Tensor, y: torch.Tensor, limit: int, generator: torch.Generator):
    """Rows of the least-squares problem ``conv``'s taps over ``x`` -> ``y``, for at most ``limit`` output pixels
    drawn at random.

    Returns:
        ``(rows, in_channels * prod(kernel))`` patches of ``x`` as ``conv`` sees them, and ``(rows, y channels)``.
    """
    total = len(y) * math.prod(y.shape[2:])
    chosen = torch.randperm(total, generator=generator)[:limit].sort().values
    rows = torch.stack(torch.unravel_index(chosen, (len(y), *y.shape[2:])), 1)
    return _patches(conv, x, rows).float(), y.movedim(1, -1)[tuple(rows.T)].float()


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric positive definite ``matrix`` (Cholesky: half the work of LU), LU where
    rounding made it indefinite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_solve(rhs, factor) if info.item() == 0 else torch.linalg.solve(matrix, rhs)


def _ridge(a: torch.Tensor, residual: torch.Tensor, offset: bool) -> torch.Tensor:
    """``argmin ||[a, 1] @ delta - residual||^2 + lam ||delta||^2``, lam relative to ``[a, 1]``'s scale; the column
    of ones (a last row of ``delta``) only with ``offset``; primal or dual form.

    The ones column is never built: its products are ``a``'s column sums and the row count (a copy of ``a``
    costs as much as a product on the wide layers). Products in float32 (4x faster than float64 there), the
    solve in float64.
    """
    rows, cols = a.shape
    a, residual = a.float(), residual.float()
    if rows >= cols + offset:
        gram, cross = (a.T @ a).double(), (a.T @ residual).double()
        if offset:
            sums = a.sum(0, dtype=torch.float64)
            gram = torch.cat([torch.cat([gram, sums[:, None]], 1), torch.cat([sums, sums.new_tensor([rows])])[None]])
            cross = torch.cat([cross, residual.sum(0, dtype=torch.float64)[None]])
        lam = PRIOR * gram.trace() / (cols + offset)
        return _spd_solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), cross)
    kernel = (a @ a.T).double() + offset
    lam = PRIOR * kernel.trace() / (cols + offset)
    dual = _spd_solve(kernel + lam * torch.eye(rows, dtype=kernel.dtype, device=kernel.device), residual.double())
    delta = a.T.double() @ dual
    return torch.cat([delta, dual.sum(0, keepdim=True)]) if offset else delta


def _ridge_towards(prior: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, targets: torch.Tensor,
                   offset: bool) -> torch.Tensor:
    """``(cols [+ 1], outputs)``: weights ``prior`` (``(cols, outputs)``, and ``bias`` as a last row with
    ``offset``) moved by the ridge fit (``_ridge``) of what they leave of ``a -> targets``."""
    fitted = torch.cat([prior, bias[None]]).double() if offset else prior.double()
    return fitted + _ridge(a, targets - a @ prior - (bias if offset else 0), offset)


def _per_channel(patches: torch.Tensor, q: int) -> torch.Tensor:
    """``(R, C, q)``: tap-major patches of a depthwise op regrouped channel by channel, the layout whose
    per-channel products run as batched matrix products without further copies."""
    return patches.view(len(patches), q, -1).transpose(1, 2).contiguous()


def map_pairing(ghost: GhostModule, y: torch.Tensor, gain: torch.Tensor, generator: torch.Generator) -> Pairing:
    """The ghost problem on the original output maps ``y`` (centred), for ``fit.choose``."""
    n, q = y.shape[1], ghost.d ** ghost.dim
    patches, targets = _design(ghost.cheap_conv, y, y, PAIR_ROWS, generator)
    patches, targets = patches - patches.mean(0), targets - targets.mean(0)
    cross = (patches.T @ targets).view(q, n, n).permute(1, 2, 0)  # one product: [i, t, u]
    shifted = _per_channel(patches, q)
    return Pairing(cross, torch.einsum("riu,riv->iuv", shifted, shifted),
                   targets.square().sum(0), gain)


def _fit_primary(conv: nn.Module, ghost: GhostModule, choice: Choice, x, y, offset: bool, generator):
    """Primary filters ``(m, c, *kernel)`` and intrinsic offsets ``(m,)``, ridge-fitted towards the original filters."""
    prior = taps_last(restrict(conv.weight.detach().float().cpu(), ghost.primary_conv.kernel_size, conv.dilation,
                               conv.stride, ghost.d)[choice.intrinsic]).T
    bias = (conv.bias.detach().float().cpu()[choice.intrinsic] if conv.bias is not None
            else prior.new_zeros(prior.shape[1]))
    a, targets = _design(ghost.primary_conv, x, y[:, choice.intrinsic], ROWS, generator)
    fitted = _ridge_towards(prior, bias, a, targets, offset)
    shape = ghost.primary_conv.weight.shape
    weights = fitted[: prior.shape[0]].T.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return weights, (fitted[-1] if offset else bias.double())


def _fit_cheap(ghost: GhostModule, choice: Choice, z: torch.Tensor, y: torch.Tensor, offset: bool, generator):
    """Cheap kernels ``(kept, d, ..., d)`` and ghost offsets ``(kept,)`` fitted on the new intrinsic maps ``z``."""
    q, m, kept = ghost.d ** ghost.dim, z.shape[1], len(choice.ghost)
    patches, targets = _design(ghost.cheap_conv, z, y, ROWS, generator)
    shifted = _per_channel(patches, q)
    # slot k * m + i reads intrinsic map i: the targets in runs of m, each run against all maps at once
    runs = targets.new_zeros(len(targets), -(-kept // m) * m)
    runs[:, :kept] = targets[:, choice.ghost]
    cross = torch.einsum("riu,rki->kiu", shifted, runs.view(len(runs), -1, m)).flatten(0, 1)[:kept]
    gram = torch.einsum("riu,riv->iuv", shifted, shifted)
    if offset:  # a column of ones beside each map's taps
        sums = shifted.sum(0)
        gram = torch.cat([torch.cat([gram, sums[:, :, None]], 2),
                          torch.cat([sums, sums.new_full((m, 1), len(shifted))], 1)[:, None]], 1)
        cross = torch.cat([cross, runs.sum(0).view(-1, 1)[:kept]], 1)
    h = solve(cross, gram[choice.owner])
    return h[:, :q].view(-1, *[ghost.d] * ghost.dim), (h[:, q] if offset else torch.zeros(len(h), dtype=h.dtype))


def fit_layer(conv: nn.Module, ghost: GhostModule, bn: Optional[nn.Module], mean: Optional[torch.Tensor],
              x: torch.Tensor, y: torch.Tensor, seed: int = 0, choice: Optional[Choice] = None,
              grain: Optional[Grain] = None) -> Tuple[Choice, float]:
    """Refit ``ghost`` so that, on input ``x``, it outputs ``conv``'s original outputs ``y``.

    ``bn`` is the batch norm reading the layer, if any: the original one when ``ghost`` has taken it in (its
    inner norms get its statistics; ``y`` stays the conv's output), else the converted model's, which gets back
    its original running ``mean`` before it absorbs the new offsets. ``choice`` fixes the channel choice (a
    group's shared one); by default it is chosen from ``y``, in whole groups with a ``grain``.

    Returns:
        The channel choice and the relative MSE of the fitted layer on ``x``.
    """
    generator = torch.Generator().manual_seed(seed)
    offset = conv.bias is not None or bn is not None
    if choice is None:
        choice = choose([map_pairing(ghost, y, bn_gain(bn, conv.out_channels), generator)], ghost.s, grain=grain,
                        m=ghost.intrinsic_channels)
    primary, intrinsic_offset = _fit_primary(conv, ghost, choice, x, y, offset, generator)
    inner = ghost.inner_norms is not None
    per_channel = (1, -1, *[1] * ghost.dim)
    with torch.no_grad():
        z = ghost.primary_conv._conv_forward(x, primary.to(x.dtype), None)
        if inner:  # the cheap op reads the normalised intrinsic maps
            a, beta = (t[choice.intrinsic].to(z).view(per_channel) for t in bn_scale(bn))
            mean = bn.running_mean.to(z)[choice.intrinsic].view(per_channel)
            z = a * (z + intrinsic_offset.to(z).view(per_channel) - mean) + beta
        elif ghost.primary_conv.bias is not None:  # else the offset goes to the batch norm, after the cheap op
            z = z + intrinsic_offset.to(z.dtype).view(per_channel)
    cheap, ghost_offset = _fit_cheap(ghost, choice, z, y, offset, generator)
    offsets = torch.zeros(conv.out_channels, dtype=torch.float64)
    offsets[choice.intrinsic], offsets[choice.ghost] = intrinsic_offset, ghost_offset
    if bn is not None and not inner:
        bn.running_mean.copy_(mean)
    primary_bias = torch.zeros(len(choice.intrinsic)) if conv.bias is not None and not inner else None
    write(ghost, choice, primary.to(ghost.primary_conv.weight.dtype), cheap, offsets, bn, primary_bias)
    with torch.no_grad():
        weight = ghost.primary_conv.weight
        out = ghost(x.to(weight)).float().cpu()
        if inner:
            stats = [None if t is None else t.detach().float().cpu()
                     for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
            y = F.batch_norm(y, *stats, False, 0.0, bn.eps)
    return choice, ((out - y).square().sum() / y.square().sum().clamp_min(1e-30)).item()


def heads(model: nn.Module, converted: Sequence[str], inputs: Batch) -> List[str]:
    """The ``nn.Linear`` layers of ``model`` that run once each after the last call of any ``converted`` layer
    (a classifier head): no refitted layer comes after them to correct the converted layers' remaining error,
    so ``calibrate`` refits them too. Layers whose weights another module shares are left alone."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears or not converted:
        return []
    calls: List[str] = []
    record(model, [*converted, *linears], lambda name, out: calls.append(name), [inputs])
    last = max((i for i, name in enumerate(calls) if name in set(converted)), default=len(calls))
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [name for name in dict.fromkeys(calls[last + 1:]) if calls.count(name) == 1
            and all(counts[id(p)] == 1 for p in model.get_submodule(name).parameters())]


def fit_linear(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
    """Refit ``linear`` (ridge towards its own weights) so that, on inputs ``x``, it outputs ``y``; returns the
    relative MSE of the refitted layer on ``x``."""
    a, targets = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    rows = torch.randperm(len(a), generator=generator)[:ROWS].sort().values
    offset = linear.bias is not None
    prior = linear.weight.detach().float().cpu()
    bias = linear.bias.detach().float().cpu() if offset else prior.new_zeros(len(prior))
    fitted = _ridge_towards(prior.T, bias, a[rows], targets[rows], offset)
    weight, bias = fitted[: a.shape[1]].T, fitted[-1] if offset else None
    with torch.no_grad():
        linear.weight.copy_(weight)
        if offset:
            linear.bias.copy_(bias)
        out = F.linear(a, weight.float(), bias.float() if offset else None)
    return ((out - targets).square().sum() / targets.square().sum().clamp_min(1e-30)).item()


class _Targets:
    """The original's outputs at the layers to fit, each a random image subset (``_pick``) with its index.

    Read in run order as the original model's activations pass the layers; asking for a layer further on
    (a group's shared choice needs all its members) keeps the samples of the layers passed on the way.
    """

    def __init__(self, original: nn.Module, names: Sequence[str], batches: Sequence[Batch]):
        self.outputs = activations(original, batches, leaves=names)
        modules = {original.get_submodule(name): name for name in names}
        self.pending = [modules[module] for module in self.outputs.in_run_order(list(modules))]
        self.modules = {name: module for module, name in modules.items()}
        self.kept: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.generator = torch.Generator().manual_seed(0)

    def get(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The image index and the sampled original outputs of layer ``name``."""
        while name not in self.kept:
            passed = self.pending.pop(0)
            y = self.outputs.output_of(self.modules[passed])
            index = _pick(sum(map(len, y)), math.prod(y[0].shape[2:]), ROWS, self.generator)
            self.kept[passed] = index, _take(y, index)
        return self.kept[name]

    def drop(self, names: Sequence[str]) -> None:
        for name in names:
            self.kept.pop(name, None)


def shared_choice(targets: _Targets, layers: Sequence[Tuple[str, GhostModule, Optional[nn.Module]]],
                  seed: int, grain: Optional[Grain] = None) -> Choice:
    """One channel choice for layers that write into the same tensor, from all their original outputs."""
    generator = torch.Generator().manual_seed(seed)
    pairings = [map_pairing(ghost, targets.get(name)[1], bn_gain(bn, ghost.out_channels), generator)
                for name, ghost, bn in layers]
    return choose(pairings, layers[0][1].s, grain=grain, m=layers[0][1].intrinsic_channels)


def calibrate(model: nn.Module, original: nn.Module, swapped: List[Tuple[str, nn.Module, GhostModule]],
              bns: Dict[str, Optional[nn.Module]], means: Dict[str, torch.Tensor],
              batches: Sequence[Batch], groups: Dict[str, List[str]],
              ghosts: Dict[str, GhostModule], grains: Optional[Dict[str, Grain]] = None,
              head: bool = True) -> Tuple[Dict[str, Choice], List[str]]:
    """Refit each swapped layer of ``model`` in run order (``fit_layer``), then, with ``head``, the linear head
    after them (``heads``, ``fit_linear``); returns each layer's channel choice and the heads refitted.

    The converted model's inputs to each layer and the original's outputs come from ``activations``: one
    forward pass over each model when torch.fx can trace it.

    Args:
        bns: each layer's following batch norm; ``means``: its running mean before ``copy`` changed it.
        batches: calibration inputs (``check_calibration``).
        groups: for layers that must share a channel choice, the names of all the layers sharing it.
        ghosts: every converted layer's Ghost module by name (group members may not be in ``swapped``).
        grains: the layers a grouped conv reads, with how it constrains their choice (``fit.Grain``).
        head: also refit the heads.
    """
    choices: Dict[str, Choice] = {}
    grains = grains or {}
    fitted = [name for name, _, _ in swapped]
    last = heads(model, list(ghosts), tuple(x[:1] for x in batches[0])) if fitted and head else []
    with evaluating(model), evaluating(original), loss_progress("calibrating", "fit error") as bar:
        task = bar.add_task("layers", total=len(swapped) + len(last), loss=UNKNOWN)
        batches = [_channels_last(batch) for batch in batches]
        inputs = activations(model, batches, leaves=last)
        targets = _Targets(original, fitted + list(groups) + last, batches)
        for step, (name, conv, ghost) in enumerate(swapped):
            bar.update(task, description=f"layer {step + 1}/{len(swapped)} {name}")
            if name in groups and name not in choices:
                members = [(member, ghosts[member], bns[member]) for member in groups[name]]
                choice = shared_choice(targets, members, seed=step, grain=grains.get(name))
                choices.update(dict.fromkeys(groups[name], choice))
                targets.drop([member for member in groups[name] if member not in fitted])
            index, y = targets.get(name)
            x = _take(inputs.input_of(ghost), index)
            targets.drop([name])
            choice, loss = fit_layer(conv, ghost, bns[name], means.get(name), x, y, seed=step,
                                     choice=choices.get(name), grain=grains.get(name))
            choices[name] = choice
            bar.update(task, advance=1, loss=loss)
        _fit_heads(model, last, inputs, targets, bar, task)
    return choices, last


def _fit_heads(model: nn.Module, names: Sequence[str], inputs, targets: _Targets, bar, task) -> None:
    """``fit_linear`` each head in ``names`` (in run order) on the converted model's ``inputs`` to it and the
    original's ``targets``."""
    for step, name in enumerate(names):
        bar.update(task, description=f"head {name}")
        linear = model.get_submodule(name)
        index, y = targets.get(name)
        x = _take(inputs.input_of(linear), index)
        targets.drop([name])
        bar.update(task, advance=1, loss=fit_linear(linear, x, y, torch.Generator().manual_seed(step)))


def refit_heads(model: nn.Module, original: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> None:
    """Refit the heads ``names`` of ``model`` (``fit_linear``) on their inputs as ``model`` now makes them."""
    with evaluating(model), evaluating(original), loss_progress("refitting", "fit error") as bar:
        task = bar.add_task("heads", total=len(names), loss=UNKNOWN)
        batches = [_channels_last(batch) for batch in batches]
        _fit_heads(model, names, activations(model, batches, leaves=names), _Targets(original, names, batches), bar,
                   task)
