"""``calibrate``: refit every converted layer, in run order, to the original model's outputs on real inputs.

Layer by layer, the converted model's input to the layer (so earlier layers' errors are seen and corrected)
and the original layer's output are collected, each with a forward pass stopped at that layer. Then, all
least squares: the intrinsic/ghost choice is redone on the original output maps; the primary filters are
fitted to the intrinsic channels (ridge towards the original filters, which keeps them sensible when there
are fewer output pixels than filter weights); the cheap kernels to the ghost channels, on the intrinsic
maps the new primary conv makes.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..module import GhostModule
from ..progress import progress
from ..trace import evaluating
from .data import Batch
from .datafree import bn_gain, bn_scale, write
from .fit import Choice, Pairing, choose, restrict, solve

ROWS = 16384
PAIR_ROWS = 2048
PRIOR = 1e-2

class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been reached."""


def _capture(model: nn.Module, module: nn.Module, batches: Sequence[Batch], output: bool) -> torch.Tensor:
    """``module``'s input (or output) over all ``batches``, running ``model`` only as far as ``module``; in
    float32 on the CPU, where the fits run whatever the model's dtype and device."""
    grabbed: List[torch.Tensor] = []

    def hook(mod, args, out=None):
        grabbed.append((out if output else args[0]).float().cpu())
        raise _Stop

    handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
    try:
        with evaluating(model):
            for inputs in batches:
                try:
                    model(*inputs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(grabbed)


def _unfold(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, C * prod(kernel), positions)``: the input patches ``conv`` reads at each output position,
    channel-major like ``conv.weight.flatten(1)``. ``F.unfold`` in 2-D; in 1-D and 3-D (which it does not
    support) a depthwise conv whose one-hot filters each pick one tap."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if x.dim() == 4:
        return F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    taps = math.prod(conv.kernel_size)
    one_hot = torch.eye(taps, dtype=x.dtype, device=x.device).view(taps, 1, *conv.kernel_size)
    pick = one_hot.repeat(x.shape[1], *[1] * (one_hot.dim() - 1))
    convolve = F.conv1d if x.dim() == 3 else F.conv3d
    return convolve(padded, pick, stride=conv.stride, dilation=conv.dilation, groups=x.shape[1]).flatten(2)


def _design(conv: nn.Module, x: torch.Tensor, y: torch.Tensor, limit: int, generator: torch.Generator):
    """Rows of the least-squares problem ``conv``'s taps over ``x`` -> ``y``, for at most ``limit`` output pixels.

    Returns:
        ``(rows, in_channels * prod(kernel))`` patches of ``x`` as ``conv`` sees them, and ``(rows, y channels)``.
    """
    pixels = math.prod(y.shape[2:])
    keep = min(1.0, limit / (len(y) * pixels))
    patches, targets = [], []
    for xs, ys in zip(x.split(16), y.split(16)):
        cols = _unfold(conv, xs).transpose(1, 2).flatten(0, 1)
        rows = torch.rand(len(cols), generator=generator) < keep
        patches.append(cols[rows])
        targets.append(ys.flatten(2).transpose(1, 2).flatten(0, 1)[rows])
    return torch.cat(patches).float(), torch.cat(targets).float()


def _ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)


def _ridge(a: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``argmin ||a @ delta - residual||^2 + lam ||delta||^2``, lam relative to ``a``'s scale; primal or dual form."""
    rows, cols = a.shape
    a, residual = a.double(), residual.double()
    lam = PRIOR * a.square().sum() / cols
    if rows >= cols:
        return torch.linalg.solve(a.T @ a + lam * torch.eye(cols, dtype=a.dtype, device=a.device), a.T @ residual)
    return a.T @ torch.linalg.solve(a @ a.T + lam * torch.eye(rows, dtype=a.dtype, device=a.device), residual)


def map_pairing(ghost: GhostModule, y: torch.Tensor, gain: torch.Tensor, generator: torch.Generator) -> Pairing:
    """The ghost problem on the original output maps ``y`` (centred), for ``fit.choose``."""
    n, q = y.shape[1], ghost.d ** ghost.dim
    patches, targets = _design(ghost.cheap_conv, y, y, PAIR_ROWS, generator)
    shifted = patches.view(len(patches), n, q)
    shifted, targets = shifted - shifted.mean(0), targets - targets.mean(0)
    return Pairing(torch.einsum("riu,rt->itu", shifted, targets), torch.einsum("riu,riv->iuv", shifted, shifted),
                   targets.square().sum(0), gain)


def _fit_primary(conv: nn.Module, ghost: GhostModule, choice: Choice, x, y, offset: bool, generator):
    """Primary filters ``(m, c, *kernel)`` and intrinsic offsets ``(m,)``, ridge-fitted towards the original filters."""
    prior = restrict(conv.weight.detach().float(), ghost.primary_conv.kernel_size, conv.dilation, conv.stride,
                     ghost.d)[choice.intrinsic].flatten(1).T
    bias = conv.bias.detach().float()[choice.intrinsic] if conv.bias is not None else prior.new_zeros(prior.shape[1])
    a, targets = _design(ghost.primary_conv, x, y[:, choice.intrinsic], ROWS, generator)
    if offset:
        a, prior = _ones(a), torch.cat([prior, bias[None]])
    fitted = prior.double() + _ridge(a, targets - a @ prior)
    weights = fitted[: prior.shape[0] - offset].T.reshape(ghost.primary_conv.weight.shape)
    return weights, (fitted[-1] if offset else bias.double())


def _fit_cheap(ghost: GhostModule, choice: Choice, z: torch.Tensor, y: torch.Tensor, offset: bool, generator):
    """Cheap kernels ``(kept, d, ..., d)`` and ghost offsets ``(kept,)`` fitted on the new intrinsic maps ``z``."""
    q = ghost.d ** ghost.dim
    patches, targets = _design(ghost.cheap_conv, z, y, ROWS, generator)
    shifted = patches.view(len(patches), z.shape[1], q)
    if offset:
        shifted = _ones(shifted)
    source = shifted[:, choice.owner]
    cross = torch.einsum("rou,ro->ou", source, targets[:, choice.ghost])
    gram = torch.einsum("riu,riv->iuv", shifted, shifted)[choice.owner]
    h = solve(cross, gram)
    return h[:, :q].view(-1, *[ghost.d] * ghost.dim), (h[:, q] if offset else torch.zeros(len(h), dtype=h.dtype))


def fit_layer(conv: nn.Module, ghost: GhostModule, bn: Optional[nn.Module], mean: Optional[torch.Tensor],
              x: torch.Tensor, y: torch.Tensor, seed: int = 0, choice: Optional[Choice] = None) -> Tuple[Choice, float]:
    """Refit ``ghost`` so that, on input ``x``, it outputs ``conv``'s original outputs ``y``.

    ``bn`` is the batch norm reading the layer, if any: the original one when ``ghost`` has taken it in (its
    inner norms get its statistics; ``y`` stays the conv's output), else the converted model's, which gets back
    its original running ``mean`` before it absorbs the new offsets. ``choice`` fixes the channel choice (a
    group's shared one); by default it is chosen from ``y``.

    Returns:
        The channel choice and the relative MSE of the fitted layer on ``x``.
    """
    generator = torch.Generator().manual_seed(seed)
    offset = conv.bias is not None or bn is not None
    if choice is None:
        choice = choose([map_pairing(ghost, y, bn_gain(bn, conv.out_channels), generator)], ghost.s)
    primary, intrinsic_offset = _fit_primary(conv, ghost, choice, x, y, offset, generator)
    inner = ghost.inner_norms is not None
    per_channel = (1, -1, *[1] * ghost.dim)
    with torch.no_grad():
        z = ghost.primary_conv._conv_forward(x, primary.to(x.dtype), None)
        if inner:  # the cheap op reads the normalised intrinsic maps
            a, beta = (t[choice.intrinsic].to(z).view(per_channel) for t in bn_scale(bn))
            mean = bn.running_mean[choice.intrinsic.to(z.device)].to(z).view(per_channel)
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


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return progress("calibrating {description}, fit error {loss:.4f}", TextColumn("calibrating {task.description}"),
                    BarColumn(), MofNCompleteColumn(), TextColumn("fit error {task.fields[loss]:.4f}"),
                    TimeElapsedColumn())


def shared_choice(original: nn.Module, layers: Sequence[Tuple[str, GhostModule, Optional[nn.Module]]],
                  batches: Sequence[Batch], seed: int = 0) -> Choice:
    """One channel choice for layers that write into the same tensor, from all their original outputs."""
    generator = torch.Generator().manual_seed(seed)
    pairings = []
    for name, ghost, bn in layers:
        y = _capture(original, original.get_submodule(name), batches, output=True)
        pairings.append(map_pairing(ghost, y, bn_gain(bn, ghost.out_channels), generator))
    return choose(pairings, layers[0][1].s)


def calibrate(model: nn.Module, original: nn.Module, swapped: List[Tuple[str, nn.Module, GhostModule]],
              bns: Dict[str, Optional[nn.Module]], means: Dict[str, torch.Tensor],
              batches: Sequence[Batch], groups: Dict[str, List[str]]) -> Dict[str, Choice]:
    """Refit each swapped layer of ``model`` in turn (``fit_layer``); returns each layer's channel choice.

    Args:
        bns: each layer's following batch norm; ``means``: its running mean before ``copy`` changed it.
        batches: calibration inputs (``check_calibration``).
        groups: for layers that must share a channel choice, the names of all the layers sharing it.
    """
    choices: Dict[str, Choice] = {}
    ghosts = {name: ghost for name, _, ghost in swapped}
    with _progress() as bar:
        task = bar.add_task("", total=len(swapped), loss=float("nan"))
        for step, (name, conv, ghost) in enumerate(swapped):
            bar.update(task, description=f"layer {step + 1}/{len(swapped)} {name}")
            if name in groups and name not in choices:
                members = [(member, ghosts[member], bns[member]) for member in groups[name]]
                choices.update(dict.fromkeys(groups[name], shared_choice(original, members, batches, seed=step)))
            x = _capture(model, ghost, batches, output=False)
            y = _capture(original, original.get_submodule(name), batches, output=True)
            choice, loss = fit_layer(conv, ghost, bns[name], means.get(name), x, y, seed=step,
                                     choice=choices.get(name))
            choices[name] = choice
            bar.update(task, advance=1, loss=loss)
    return choices
