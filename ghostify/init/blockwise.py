"""Block-wise reconstruction (``init="reconstruct"``): after ``calibrate``, tune each block on its output error.

Per-layer least squares makes each layer as close to the original as a linear fit allows; the layers of a
block (a residual block, an Inception module) can do better tuned together against the original block's
output, from the converted model's own input to the block, so earlier blocks' errors are corrected too (the
block-wise reconstruction of BRECQ). No labels. A block is, for each converted layer, the outermost module
above it that runs once, maps one tensor to one tensor and holds at most ``MAX_LAYERS`` converted layers; a
layer with no such module is its own block. Each block's weights are tuned with Adam on the relative MSE of
its output over most of the calibration inputs, and kept only where that error went down on the rest
(``HELD_OUT``), which guards against fitting a few hundred images better than the model generalises; the
whole result is kept only if the model's output error on those inputs went down too (``output_error``).
With ``mix``, the tuning inputs are partly the original model's (QDrop's input mixing).
Optionally (``network``) the converted layers of the whole network are then tuned together on the model's
output against the original's (the network-level stage of MiR), with the same rule.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..module import GhostModule
from ..progress import UNKNOWN, loss_progress
from ..trace import evaluating
from .activations import activations
from .data import Batch

MAX_LAYERS = 8
HELD_OUT = 0.2  # share of the calibration inputs that decides whether a block keeps its tuned weights
STEPS = 200
BATCH = 32
NETWORK = "(whole network)"  # the key of the network-level stage in ``reconstruct``'s result
LR = 1e-3


def find_blocks(model: nn.Module, layers: Sequence[str], inputs: Sequence[torch.Tensor]) -> List[str]:
    """Module paths of the blocks that hold ``layers`` (converted layers run once), in run order."""
    calls: Dict[str, int] = {}
    plain: Dict[str, bool] = {}

    def record(path: str):
        def hook(module, args, kwargs, output):
            calls[path] = calls.get(path, 0) + 1
            plain[path] = (len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                           and isinstance(output, torch.Tensor))
        return hook

    handles = [module.register_forward_hook(record(path), with_kwargs=True)
               for path, module in model.named_modules() if path]
    try:
        with evaluating(model):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    order = list(calls)  # hooks fire as modules finish; a block finishes after the layers inside it
    inside = {path: sum(layer.startswith(path + ".") for layer in layers) for path in calls}
    blocks: List[str] = []
    for layer in layers:
        parts = layer.split(".")
        outer = [".".join(parts[:i]) for i in range(1, len(parts))]
        block = next((path for path in outer if calls.get(path) == 1 and plain[path]
                      and inside[path] <= MAX_LAYERS), layer)
        if block not in blocks:
            blocks.append(block)
    return sorted(blocks, key=order.index)


def _relative(block: nn.Module, x: torch.Tensor, y: torch.Tensor, energy: float) -> float:
    """``||block(x) - y||^2 / energy`` over all of ``x``, in chunks."""
    error = 0.0
    with torch.no_grad():
        for xs, ys in zip(x.split(BATCH), y.split(BATCH)):
            error += (block(xs) - ys).double().square().sum().item()
    return error / max(energy, 1e-30)


def _tune(block: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, deadline: Optional[float],
          generator: torch.Generator, params: Optional[List[torch.Tensor]] = None,
          original: Optional[torch.Tensor] = None, mix: float = 0.0) -> Tuple[float, float]:
    """Adam on ``block``'s weights (or ``params``) to bring ``block(x)`` to ``y`` on all but the last
    ``HELD_OUT`` of ``x``; the weights stay only if the error on those fell (on all of ``x`` when there are
    fewer than 10). Returns the error on them before and after.

    ``original``: the original model's input to the block (same shape as ``x``); each tuning step then takes
    each input element from it with probability ``mix`` (QDrop), so the block learns from both the converted
    model's inputs and clean ones. The keep decision always uses ``x``, what the block will see.
    """
    params = params if params is not None else [p for p in block.parameters() if p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    held = int(len(x) * HELD_OUT) if len(x) >= 10 else 0
    fit = slice(0, len(x) - held)
    check = slice(len(x) - held, len(x)) if held else fit
    x, y, x_check, y_check = x[fit], y[fit], x[check], y[check]
    original = original[fit] if original is not None else None
    energy = (y_check - y_check.mean(0, keepdim=True)).square().sum(dtype=torch.float64).item()  # ||y - mean||^2
    before = _relative(block, x_check, y_check, energy)
    scale = (y - y.mean(0, keepdim=True)).square().mean().item() or 1.0
    optimizer = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    with torch.enable_grad():
        for _ in range(steps):
            if deadline is not None and time.monotonic() > deadline:
                break
            pick = torch.randint(len(x), (min(BATCH, len(x)),), generator=generator).to(x.device)
            batch = x[pick]
            if original is not None and mix > 0:
                clean = torch.rand(batch.shape, generator=generator).to(batch.device) < mix
                batch = torch.where(clean, original[pick], batch)
            loss = (block(batch) - y[pick]).square().mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    block.zero_grad(set_to_none=True)
    after = _relative(block, x_check, y_check, energy)
    if not after < before:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        after = before
    return before, after


def reconstruct(model: nn.Module, original: nn.Module, blocks: Sequence[str], batches: Sequence[Batch],
                steps: int = STEPS, seconds: Optional[float] = None,
                targets: Optional[Mapping[str, str]] = None, network: bool = False,
                mix: float = 0.0) -> Dict[str, Tuple[float, float]]:
    """Tune each block of ``model`` (paths in run order, ``find_blocks``) towards ``original``'s same block.

    Args:
        targets: for a block whose output stands for another module's in ``original`` (a Ghost module that
            took in the batch norm after its conv stands for that norm), that module's path.
        steps: Adam steps per block.
        seconds: a time budget for all blocks together (each block gets its share); None for no limit.
        network: then tune the weights of every Ghost module together on the model's output (``steps`` more
            steps; a model with several inputs or a non-tensor output is left out), recorded as ``NETWORK``.
        mix: the probability with which each element of a block's tuning inputs comes from the original
            model's input to that block instead of the converted model's (QDrop); 0: the converted model's only.

    Returns:
        Each block's relative output error before and after, on the held-out calibration inputs.
    """
    start, generator = time.monotonic(), torch.Generator().manual_seed(0)
    theirs = {path: (targets or {}).get(path, path) for path in blocks}
    done: Dict[str, Tuple[float, float]] = {}
    with evaluating(model), evaluating(original), loss_progress("reconstructing", "error") as bar:
        task = bar.add_task("blocks", total=len(blocks) + network, loss=UNKNOWN)
        inputs = activations(model, batches, blocks)
        outputs = activations(original, batches, {*theirs.values(), *blocks})
        for index, path in enumerate(blocks):
            bar.update(task, description=f"block {index + 1}/{len(blocks)} {path}")
            ours = model.get_submodule(path)
            x = torch.cat(inputs.input_of(ours))
            clean = torch.cat(outputs.input_of(original.get_submodule(path))) if mix > 0 else None
            y = torch.cat(outputs.output_of(original.get_submodule(theirs[path])))
            deadline = None if seconds is None else start + seconds * (index + 1) / (len(blocks) + network)
            done[path] = _tune(ours, x, y, steps, deadline, generator, original=clean, mix=mix)
            bar.update(task, advance=1, loss=done[path][1])
        if network and all(len(batch) == 1 for batch in batches):
            bar.update(task, description="the whole network")
            x = torch.cat([batch[0] for batch in batches])
            y = _outputs(original, x)
            if y is not None:
                params = [p for module in model.modules() if isinstance(module, GhostModule)
                          for p in module.parameters() if p.is_floating_point()]
                deadline = None if seconds is None else start + seconds
                done[NETWORK] = _tune(model, x, y, steps, deadline, generator, params)
            bar.update(task, advance=1, loss=done[NETWORK][1] if NETWORK in done else UNKNOWN)
    return done


def held_out(batches: Sequence[Batch]) -> Optional[torch.Tensor]:
    """The calibration inputs ``_tune`` holds out (its last ``HELD_OUT``), for a single-input model; None when
    there are too few or several inputs."""
    if any(len(batch) != 1 for batch in batches):
        return None
    x = torch.cat([batch[0] for batch in batches])
    return x[len(x) - int(len(x) * HELD_OUT):] if len(x) >= 10 else None


def _outputs(model: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``model``'s output on ``x``, run in chunks without gradients (None: the output is not a tensor)."""
    with torch.no_grad():
        outputs = [model(chunk) for chunk in x.split(BATCH)]
    return torch.cat(outputs) if all(isinstance(out, torch.Tensor) for out in outputs) else None


def output_error(model: nn.Module, original: nn.Module, x: torch.Tensor) -> Optional[float]:
    """Relative squared error of ``model``'s output against ``original``'s on ``x`` (None: not a tensor)."""
    with evaluating(model), evaluating(original):
        y = _outputs(original, x)
        return None if y is None else _relative(model, x, y, y.double().square().sum().item())


def summary(done: Dict[str, Tuple[float, float]]) -> str:
    """One line for the conversion notes: how much the blocks' errors fell."""
    done = dict(done)
    whole = done.pop(NETWORK, None)
    if not done:
        return "no block to reconstruct"
    ratio = [after / before for before, after in done.values() if before > 0]
    mean = math.exp(sum(math.log(max(r, 1e-12)) for r in ratio) / len(ratio)) if ratio else 1.0
    line = (f"{len(done)} blocks tuned on their output error; held-out error after / before: geometric mean "
            f"{mean:.2f}, {sum(after < before for before, after in done.values())} of {len(done)} improved")
    if whole is not None:
        line += f"; then the whole network on its output: {whole[0]:.4f} -> {whole[1]:.4f}"
    return line
