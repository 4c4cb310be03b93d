"""Which original channels become intrinsic maps, which ghost comes from which, and the least-squares fits.

Both initialisers pose the same problem for a layer with ``n`` outputs: every channel ``i`` is a candidate
intrinsic map with ``q = d*d`` shifted copies (the cheap op's taps) spanning what a ghost made from it can be;
every channel ``t`` is a target. ``copy`` states it on filters (the cheap op composed with a primary filter is
a conv with a larger filter), ``calibrate`` on feature maps. A ``Pairing`` holds the inner products; from it
``choose`` picks the intrinsic channels and a capacity-constrained assignment of ghosts to them, and
``solve`` gives the least-squares cheap kernels.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

RIDGE = 1e-6
WIDE = 2048  # channels; a wider layer chooses its ghosts within blocks of about this many (``blocks``)


@dataclass
class Pairing:
    """Inner products of one layer's least-squares ghost problem.

    Attributes:
        cross: ``(n, n, q)``; ``cross[i, t, u]`` = <shift ``u`` of candidate ``i``, target ``t``>.
        gram: ``(n, q, q)``; the Gram matrix of each candidate's ``q`` shifted copies.
        energy: ``(n,)``; squared norm of each target.
        weight: ``(n,)``; how much an error in each channel matters relative to its energy (e.g. the
            following batch norm's gain squared); 1 when nothing is known.
        taps: which of the ``d*d`` cheap taps the ``q`` columns are (None: all, in order).
    """

    cross: torch.Tensor
    gram: torch.Tensor
    energy: torch.Tensor
    weight: torch.Tensor
    taps: Optional[torch.Tensor] = None

    def part(self, span: slice) -> "Pairing":
        """The problem restricted to the channels ``span``, as candidates and as targets."""
        return Pairing(self.cross[span, span], self.gram[span], self.energy[span], self.weight[span], self.taps)

    def kernels(self, coefficients: torch.Tensor, d: int, dim: int = 2) -> torch.Tensor:
        """``(k, d, ..., d)`` cheap kernels (``dim`` spatial sizes) from ``(k, q)`` least-squares coefficients
        (0 on taps left out)."""
        if self.taps is None:
            return coefficients.view(-1, *[d] * dim)
        full = coefficients.new_zeros(len(coefficients), d ** dim)
        full[:, self.taps] = coefficients
        return full.view(-1, *[d] * dim)


@dataclass
class Choice:
    """Original channel of each intrinsic map (module order), and of each kept ghost slot."""

    intrinsic: torch.Tensor
    ghost: torch.Tensor
    s: int

    @property
    def owner(self) -> torch.Tensor:
        """Position of the intrinsic map each kept ghost slot is made from (ghost-major: slot ``k * m + i``
        reads intrinsic map ``i``)."""
        return torch.arange(len(self.ghost)) % len(self.intrinsic)

    @property
    def order(self) -> torch.Tensor:
        """Original channel of each module output: ``cat[intrinsic, ghosts]``."""
        return torch.cat([self.intrinsic, self.ghost])

    def out_index(self) -> torch.Tensor:
        """For each original channel, the module output that approximates it."""
        order = self.order
        index = torch.empty_like(order)
        index[order] = torch.arange(len(order))
        return index


@dataclass(frozen=True)
class Grain:
    """How a grouped conv that reads a layer's output constrains its channel choice.

    The reader takes its input in runs of ``width`` channels, one run per group, so each run of the module's
    outputs must hold one whole original group (in any order within: the reader permutes its filters).
    Whole groups are then intrinsic or ghosts, so the module's intrinsic maps are whole groups
    (``module.intrinsic_count``).
    ``fixed``: the groups must also stay in place (the reader's outputs cannot take a permutation).
    """

    width: int
    fixed: bool = False


def _regularised(gram: torch.Tensor) -> torch.Tensor:
    """``gram`` plus a ridge relative to its scale, so dead filters or flat maps still solve."""
    q = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    return gram + RIDGE * scale[..., None, None] * torch.eye(q, dtype=gram.dtype, device=gram.device)


def solve(cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients ``(..., q)`` from paired ``cross (..., q)`` and ``gram (..., q, q)``, in float64."""
    return torch.linalg.solve(_regularised(gram.double()), cross.double().unsqueeze(-1)).squeeze(-1)


def explained(pairing: Pairing) -> torch.Tensor:
    """``(n, n)``: the fraction of target ``t``'s energy the best ghost from candidate ``i`` reproduces."""
    chol = torch.linalg.cholesky(_regularised(pairing.gram.double()))
    # inverse of the small q x q factors (in float64), then one batched float32 product: a batched triangular
    # solve with n right-hand sides ran up to 250x slower on 2 busy cores (OpenMP contention)
    white = torch.linalg.inv(chol).float() @ pairing.cross.float().transpose(1, 2)
    fit = white.square().sum(1)
    return (fit / pairing.energy.float().clamp_min(torch.finfo(torch.float32).tiny)).clamp(0, 1)


def unexplained(pairing: Pairing, choice: Choice, fraction: Optional[torch.Tensor] = None) -> float:
    """The share of the layer's (weighted) output energy that ``choice``'s ghosts do not reproduce, with each
    ghost's best cheap kernel (0: exact, 1: nothing). ``fraction``: ``explained(pairing)``, when already known."""
    fraction = explained(pairing) if fraction is None else fraction
    value = (pairing.weight * pairing.energy).double()
    kept = fraction[choice.intrinsic[choice.owner], choice.ghost].double()
    lost = value.sum() - value[choice.intrinsic].sum() - (value[choice.ghost] * kept).sum()
    return float(lost.clamp_min(0) / value.sum().clamp_min(torch.finfo(torch.float64).tiny))


def _select(weighted: np.ndarray, value: np.ndarray, m: int, s: int) -> List[int]:
    """Greedy (lazy) choice of ``m`` intrinsic channels by marginal gain, most valuable first.

    ``weighted[i, t]``: the value a ghost of ``i`` keeps of target ``t``. Choosing ``i`` gains its own
    unexplained value plus what it adds for its ``s - 1`` best ghosts over what is already explained; each
    choice then marks those ghosts as explained that well, so redundant copies of one filter are not all
    chosen. Gains only shrink as more is explained, so stale gains are upper bounds (lazy evaluation).
    """
    s = min(s, len(value))  # fewer items than s: every other one can be a partner
    explained_value = np.zeros(len(value))
    others = np.empty(len(value))  # reused by every evaluation

    def marginal(i: int):
        np.subtract(weighted[i], explained_value, out=others)
        others[i] = 0
        own = value[i] - explained_value[i]
        if s == 2:  # the common case: one partner, an argmax
            partner = int(others.argmax())
            return own + max(others[partner], 0.0), [partner]
        partners = np.argpartition(-others, s - 2)[: s - 1]
        return own + np.maximum(others[partners], 0).sum(), partners

    # first bounds: own value plus the s - 1 best partners (a row maximum for s = 2, far cheaper than a partition)
    best = weighted.max(1) if s == 2 else np.partition(weighted, 1 - s, axis=1)[:, 1 - s:].sum(1)
    heap = [(-gain, i) for i, gain in enumerate(value + np.maximum(best, 0))]
    heapq.heapify(heap)
    chosen: List[int] = []
    while len(chosen) < m:
        _, i = heapq.heappop(heap)
        gain, partners = marginal(i)
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, i))
            continue
        chosen.append(i)
        explained_value[partners] = np.maximum(explained_value[partners], weighted[i, partners])
        explained_value[i] = value[i]
    return chosen


def _assign(gain: torch.Tensor, intrinsic: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every other channel assigned to an intrinsic map with the largest total ``gain`` (Hungarian), each map
    taking ``K`` or ``K + 1`` ghosts as the module's layout needs (its last run of ghosts may be partial),
    whichever maps gain most from the extra ones.

    Returns:
        The intrinsic maps in module order (those with ``K + 1`` ghosts first), and per kept ghost slot
        (grouped by map) its channel and the position of its map.
    """
    from scipy.optimize import linear_sum_assignment

    rest = torch.ones(len(gain), dtype=torch.bool)
    rest[intrinsic] = False
    ghosts = rest.nonzero().squeeze(1)
    m = len(intrinsic)
    full, extra = divmod(len(ghosts), m)
    per = full + (extra > 0)  # slots per map: ``full`` that must be filled, then one that may be
    score = gain[intrinsic][:, ghosts].T.double().repeat_interleave(per, 1)
    score.view(len(ghosts), m, per)[:, :, :full] += 1 + 2 * score.abs().sum()  # fill every map's first ``full``
    rows, cols = linear_sum_assignment(-score.numpy())
    map_of = torch.as_tensor(cols) // per
    order = torch.argsort(-torch.bincount(map_of, minlength=m), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(m)
    owner, slots = torch.sort(position[map_of], stable=True)
    return intrinsic[order], ghosts[torch.as_tensor(rows)][slots], owner


def _group_pairs(owner: torch.Tensor, s: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every ``(a, b)`` pair of kept ghost slots in one group (groups are runs of at most ``s - 1`` slots)."""
    a = torch.arange(len(owner)).repeat(2 * s - 3)
    b = a + torch.arange(2 - s, s - 1).repeat_interleave(len(owner))
    inside = (b >= 0) & (b < len(owner))
    a, b = a[inside], b[inside]
    same = owner[a] == owner[b]
    return a[same], b[same]


def _swap(gain: torch.Tensor, value: torch.Tensor, intrinsic: torch.Tensor, slot_ghost: torch.Tensor,
          owner: torch.Tensor, s: int, tol: float) -> bool:
    """Make a ghost the intrinsic map of its group where that gains over ``tol`` (in place); whether any did.

    Swapping intrinsic ``i`` with its ghost ``t`` turns the group's gain from ``value[i] + sum gain[i, ghosts]``
    into ``value[t] + gain[t, i] + sum gain[t, other ghosts]`` (an intrinsic map is exact): it fixes greedy
    choices where a copy was picked before the filter it copies. Each group swaps its best such ghost (the
    first one on ties).
    """
    source = intrinsic[owner]
    a, b = _group_pairs(owner, s)
    old = value[source] + gain.new_zeros(len(owner)).index_add_(0, a, gain[source[a], slot_ghost[b]])
    new = value[slot_ghost] + gain[slot_ghost, source] + gain.new_zeros(len(owner)).index_add_(
        0, a, gain[slot_ghost[a], slot_ghost[b]])
    counts = torch.bincount(owner, minlength=len(intrinsic))
    start = counts.cumsum(0) - counts
    score = torch.full((len(intrinsic), s - 1), -torch.inf, dtype=gain.dtype)
    score[owner, torch.arange(len(owner)) - start[owner]] = torch.where(new - old > tol, new - old, -torch.inf)
    groups = (score.amax(1) > -torch.inf).nonzero().squeeze(1)
    slots = start[groups] + score[groups].argmax(1)
    intrinsic[groups], slot_ghost[slots] = slot_ghost[slots], intrinsic[groups]
    return len(groups) > 0


def blocks(n: int, s: int, m: Optional[int] = None, grain: Optional[Grain] = None) -> List[slice]:
    """The runs of channels a layer of ``n`` outputs chooses its ghosts within: the whole layer up to ``WIDE``
    channels; a wider one splits into nearly equal runs of whole groups of ``s`` (the last takes the rest),
    unless it has more than ``ceil(n / s)`` intrinsic maps (``m``) or chooses in whole groups (``grain``).

    A ghost then comes from an intrinsic map of its own run, so pairing and choosing cost grows linearly past
    ``WIDE`` instead of quadratically (two runs: half the pair products), at the price of partners
    in other runs.
    """
    if n <= WIDE or (m is not None and m != -(-n // s)) or (grain is not None and grain.width > 1):
        return [slice(0, n)]
    per = s * math.ceil(math.ceil(n / s) / math.ceil(n / WIDE))  # whole groups of s, nearly equal runs
    return [slice(start, min(start + per, n)) for start in range(0, n, per)]


def _merge(choices: Sequence[Choice], spans: Sequence[slice], n: int, s: int) -> Choice:
    """One layer's choice from its runs' choices (``blocks``): run ``r``'s intrinsic maps follow those of the
    runs before it, and its ghost ``k`` of local map ``i`` lands in slot ``k * m + (offset_r + i)``."""
    m = -(-n // s)
    slots = torch.full(((s - 1) * m,), -1, dtype=torch.long)
    offset = 0
    for choice, span in zip(choices, spans):
        local = len(choice.intrinsic)
        j = torch.arange(len(choice.ghost))
        slots[j // local * m + offset + j % local] = choice.ghost + span.start
        offset += local
    intrinsic = torch.cat([choice.intrinsic + span.start for choice, span in zip(choices, spans)])
    return Choice(intrinsic, slots[: n - m], s)


def choose(pairings: Sequence[Pairing], s: int, rounds: int = 1, grain: Optional[Grain] = None,
           m: Optional[int] = None) -> Choice:
    """Pick ``m`` (default ``ceil(n / s)``) intrinsic channels and assign every other channel to one, by fit;
    a layer wider than ``WIDE`` does so within each of its ``blocks``; with a ``grain``, whole groups
    (``_choose_groups``).

    An intrinsic channel is reproduced exactly; a ghost ``t`` of ``i`` loses ``weight * energy * (1 -
    explained)``. Several pairings (layers that write into one tensor and so must share a channel order)
    are scored by their summed gains. Intrinsic channels are chosen greedily (``_select``); then an optimal
    assignment of the other channels to them (``_assign``, as many per map as the layout holds) alternates
    with swapping a ghost into its group's intrinsic place (``_swap``) for ``rounds`` rounds. One round gives
    most of what more give (on ResNet-18 trained on digits and a random ResNet-50, up to 10 rounds added under
    0.1% of the layers' energy on average) with about 40% fewer assignments.
    """
    n = len(pairings[0].energy)
    m = -(-n // s) if m is None else m
    if grain is not None and grain.width > 1:
        if grain.fixed:
            return _choose_in_place(pairings, s, grain.width, m)
        return _choose_groups(*_scores(pairings), s, rounds, grain, m)
    spans = blocks(n, s, m)
    if len(spans) > 1:
        return _merge([_choose([p.part(span) for p in pairings], s, rounds) for span in spans], spans, n, s)
    return _pick(*_scores(pairings), s, rounds, m)


def _scores(pairings: Sequence[Pairing]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each channel's weighted energy ``value`` and ``gain[i, t]``, what a ghost of ``i`` keeps of target ``t``."""
    value = sum((p.weight * p.energy).float() for p in pairings)
    gain = sum(explained(p).fill_diagonal_(0) * (p.weight * p.energy).float()[None, :] for p in pairings)
    return value, gain


def _choose(pairings: Sequence[Pairing], s: int, rounds: int) -> Choice:
    """``choose`` on one run of channels."""
    return _pick(*_scores(pairings), s, rounds, -(-len(pairings[0].energy) // s))


def _pick(value: torch.Tensor, gain: torch.Tensor, s: int, rounds: int, m: int) -> Choice:
    """``choose`` from the scores of ``_scores``: ``m`` intrinsic items, and the ghost items in ghost-major
    slots."""
    chosen = _select(gain.double().numpy(), value.double().numpy(), m, s)
    intrinsic, slot_ghost, owner = _assign(gain, torch.tensor(chosen))
    tol = 1e-6 * gain.max().clamp_min(1e-30).item()
    for _ in range(rounds):
        if not _swap(gain, value, intrinsic, slot_ghost, owner, s, tol):
            break
        intrinsic, slot_ghost, owner = _assign(gain, intrinsic)
    # slots run per intrinsic map above; the module orders ghosts ghost-major: slot k of map i is k * m + i
    counts = torch.bincount(owner, minlength=m)
    rank = torch.arange(len(owner)) - (counts.cumsum(0) - counts)[owner]
    ghost = torch.empty_like(slot_ghost)
    ghost[rank * m + owner] = slot_ghost
    return Choice(intrinsic, ghost, s)


def _choose_groups(value: torch.Tensor, gain: torch.Tensor, s: int, rounds: int, grain: Grain, m: int) -> Choice:
    """``choose`` in whole groups of ``grain.width`` channels (a grouped conv reads the layer).

    A ghost group ``b`` of intrinsic group ``a`` pairs their channels one to one, the pairing with the most
    gain (Hungarian); the groups themselves are chosen as ``choose`` chooses channels, scored by what each
    channel of ``b`` would keep from its best channel of ``a`` (an upper bound on the pairing's gain: one
    vectorised pass instead of a Hungarian solve for every pair of groups).
    """
    width = grain.width
    g = len(value) // width
    channels = torch.arange(len(value)).view(g, width)
    per_group = gain.view(g, width, g, width).transpose(1, 2).double()  # [a, b]: channels of a -> channels of b
    m = m // width
    group_gain = per_group.amax(2).sum(2).float().fill_diagonal_(0)
    picked = _pick(value.view(g, width).sum(1), group_gain, s, rounds, m)
    owner = picked.intrinsic[torch.arange(len(picked.ghost)) % m]
    runs = [channels[b][_matching(per_group[a, b])] for a, b in zip(owner.tolist(), picked.ghost.tolist())]
    return Choice(channels[picked.intrinsic].flatten(), torch.cat(runs) if runs else channels[:0].flatten(), s)


def _choose_in_place(pairings: Sequence[Pairing], s: int, width: int, m: int) -> Choice:
    """``choose`` when whole groups of ``width`` channels must stay in place (``Grain.fixed``): the first
    ``m / width`` groups are intrinsic, each ghost group is made from the intrinsic group ``_groups_in_place``
    names, and only the channels within each such pair of groups are matched (Hungarian on their gains)."""
    runs = []
    for rows, cols in _groups_in_place(len(pairings[0].energy), width, m):
        gain = sum(explained(Pairing(p.cross[rows, cols], p.gram[rows], p.energy[cols], p.weight[cols], p.taps))
                   * (p.weight * p.energy).float()[cols] for p in pairings)
        runs.append(torch.arange(cols.start, cols.stop)[_matching(gain)])
    return Choice(torch.arange(m), torch.cat(runs) if runs else torch.arange(0), s)


def _groups_in_place(n: int, width: int, m: int) -> List[Tuple[slice, slice]]:
    """(intrinsic group, ghost group) channel runs when groups stay in place: ghost group ``k`` (channels from
    ``m + k * width``) is made from intrinsic group ``k`` modulo the ``m / width`` intrinsic groups."""
    kept = m // width
    return [(slice(k % kept * width, (k % kept + 1) * width), slice(m + k * width, m + (k + 1) * width))
            for k in range((n - m) // width)]


def _matching(gain: torch.Tensor) -> torch.Tensor:
    """For each row, the column it is matched with for the most total ``gain`` (a square matrix; Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(-gain.double().numpy())  # rows come back in order 0..width-1
    return torch.as_tensor(cols)


def pairs(n: int, s: int, m: Optional[int] = None, grain: Optional[Grain] = None) -> List[Tuple[slice, slice]]:
    """The (candidates, targets) runs of channels whose products ``choose`` reads: each of ``blocks`` with
    itself, or, when whole groups stay in place (``Grain.fixed``), each ghost group with its intrinsic group,
    which makes pairing cost ``n * width`` instead of ``n * n`` (RegNet's widest layers)."""
    if grain is not None and grain.fixed and grain.width > 1:
        return _groups_in_place(n, grain.width, -(-n // s) if m is None else m)
    return [(span, span) for span in blocks(n, s, m, grain)]


Taps = Optional[Tuple[slice, slice]]


def shift_pairs(k: int, pk: int, dilation: int, stride: int, d: int) -> Tuple[List[Taps], Dict[int, Taps]]:
    """Tap bookkeeping along one spatial dimension, in input pixels.

    Original tap ``q`` reads offset ``dilation * q``; primary tap ``p`` reads ``a + dilation * p`` with
    ``a = dilation * (k - pk) / 2`` (the primary conv's padding keeps the output grid); cheap tap ``u``
    moves that by ``stride * (u - d // 2)``. Coinciding taps always form contiguous runs.

    Returns:
        ``to_original[u]``: (primary taps, original taps) that coincide under cheap tap ``u``, or None;
        ``to_self[u - v]``: (primary taps, primary taps) that coincide between cheap taps ``u`` and ``v``.
    """
    a, c = dilation * (k - pk) // 2, d // 2

    def run(shift: int, size: int, first_offset: int) -> Taps:
        found = [(p, (first_offset + dilation * p + shift) // dilation) for p in range(pk)
                 if (first_offset + dilation * p + shift) % dilation == 0
                 and 0 <= (first_offset + dilation * p + shift) // dilation < size]
        if not found:
            return None
        return slice(found[0][0], found[-1][0] + 1), slice(found[0][1], found[-1][1] + 1)

    to_original = [run(a + stride * (u - c), k, 0) for u in range(d)]
    to_self = {delta: run(stride * delta, pk, 0) for delta in range(1 - d, d)}
    return to_original, to_self


def _window(weight: torch.Tensor, taps: Sequence[slice]) -> torch.Tensor:
    """Channels-last filters ``(n, *kernel, c)`` in one window (a slice per spatial dimension), as ``(n, taps * c)``
    (copying runs of whole channels is faster than gathering single taps of channel-major filters)."""
    return weight[(slice(None), *taps)].flatten(1)


def _geometry(weight: torch.Tensor, primary_kernel, dilation, stride, d: int):
    """``shift_pairs`` for each spatial dimension of ``weight``."""
    return [shift_pairs(k, pk, dl, st, d) for k, pk, dl, st in
            zip(weight.shape[2:], primary_kernel, dilation, stride)]


def _overlap(per_dim: Sequence[Taps]) -> Optional[Tuple[Tuple[slice, ...], Tuple[slice, ...]]]:
    """The taps that coincide in every dimension, as (first window, second window), or None."""
    if not all(per_dim):
        return None
    return tuple(pair[0] for pair in per_dim), tuple(pair[1] for pair in per_dim)


def restrict(weight: torch.Tensor, primary_kernel, dilation, stride, d: int) -> torch.Tensor:
    """Each filter restricted to the primary conv's taps: the closest ``primary_kernel`` filter (``weight``
    itself when the kernels are the same size)."""
    if tuple(primary_kernel) == tuple(weight.shape[2:]):
        return weight
    geometry = _geometry(weight, primary_kernel, dilation, stride, d)
    primary = weight.new_zeros(*weight.shape[:2], *primary_kernel)
    centre = _overlap([to_original[d // 2] for to_original, _ in geometry])
    if centre is not None:
        primary[(slice(None), slice(None), *centre[0])] = weight[(slice(None), slice(None), *centre[1])]
    return primary


def filter_pairing(weight: torch.Tensor, primary_kernel, dilation, stride, d: int, gain: torch.Tensor,
                   runs: Optional[Sequence[Tuple[slice, slice]]] = None):
    """The data-free problem on filters (white inputs): candidate ``i``'s primary filter, shifted by each cheap tap.

    Works in any number of spatial dimensions: a cheap tap is one offset per dimension.

    Args:
        weight: the original conv's ``(n, c, *kernel)`` filters.
        gain: ``(n,)`` weight of each channel's error.
        runs: (candidates, targets) runs of channels to pair (``pairs``); the other cross products stay 0.

    Returns:
        The ``Pairing`` and the primary filters ``(n, c, *primary_kernel)`` (``restrict``).
    """
    geometry = _geometry(weight, primary_kernel, dilation, stride, d)
    to_original = [g[0] for g in geometry]
    to_self = [g[1] for g in geometry]
    w = weight.float()
    primary = restrict(w, primary_kernel, dilation, stride, d)
    same = primary is w  # the primary filters are the original ones
    w_last = w.movedim(1, -1).contiguous()
    primary_last = w_last if same else primary.movedim(1, -1).contiguous()
    shifts = _linked(list(itertools.product(range(d), repeat=len(geometry))), to_original, to_self)
    cross = w.new_zeros(len(w), len(w), len(shifts))
    done: Dict[Tuple, int] = {}
    for j, shift in enumerate(shifts):
        windows = _overlap([per_dim[u] for per_dim, u in zip(to_original, shift)])
        if windows is None:
            continue
        key = tuple((a.start, a.stop) for window in windows for a in window)
        mirror = key[len(key) // 2:] + key[: len(key) // 2]
        for rows, cols in runs or [(slice(None), slice(None))]:
            if same and rows == cols and mirror in done:  # <shift of i, t> over swapped windows is <shift of t, i>
                cross[rows, cols, j] = cross[rows, cols, done[mirror]].T
            else:
                cross[rows, cols, j] = _window(primary_last[rows], windows[0]) @ _window(w_last[cols], windows[1]).T
        done.setdefault(key, j)
    auto: Dict[Tuple[int, ...], torch.Tensor] = {}
    for delta in itertools.product(range(1 - d, d), repeat=len(geometry)):
        windows = _overlap([per_dim[u] for per_dim, u in zip(to_self, delta)])
        if tuple(-u for u in delta) in auto:  # the same products: the taps of -delta are those of delta, swapped
            auto[delta] = auto[tuple(-u for u in delta)]
        elif windows is not None:
            auto[delta] = (_window(primary_last, windows[0]) * _window(primary_last, windows[1])).sum(1)
    zero = w.new_zeros(len(w))
    gram = torch.stack([torch.stack([auto.get(tuple(a - b for a, b in zip(u, v)), zero) for v in shifts], 1)
                        for u in shifts], 1)
    energy = torch.linalg.vector_norm(w.flatten(1), dim=1).square()
    taps = torch.tensor([int(np.ravel_multi_index(shift, (d,) * len(shift))) for shift in shifts])
    return Pairing(cross, gram, energy, gain.float(), taps), primary.to(weight.dtype)


def _linked(shifts: List[Tuple[int, ...]], to_original, to_self) -> List[Tuple[int, ...]]:
    """The cheap taps that can matter: those overlapping the original filter, and (transitively) those
    overlapping one of them. The others are orthogonal to everything kept, so their least-squares weight
    is 0; dropping them makes 1x1 convs (only the centre tap matters) ``d*d`` times cheaper to pair."""
    kept = [u for u in shifts if all(per_dim[a] for per_dim, a in zip(to_original, u))]
    grown = True
    while grown:
        more = [u for u in shifts if u not in kept and
                any(all(per_dim[a - b] for per_dim, a, b in zip(to_self, u, v)) for v in kept)]
        kept, grown = kept + more, bool(more)
    return sorted(kept)
