"""Does a per-layer budget pay? Uniform s against per-layer s at the same FLOPs, and latency budgets.

1. On the fidelity benchmark's trained networks (``fidelity.py``: digits or photos, cached weights), convert
   with a uniform s = 2 and s = 4, then with ``target_flops`` set to the FLOPs fraction each uniform model
   has, all with ``init="calibrate"`` on 256 training images and no training, once per calibration subset
   (``--subsets``: disjoint sets of 256 training images, the same for both plans); prints top-1, agreement
   with the original and logit error on the test images: the mean and the range over subsets, so a plan's
   difference can be read beside what the calibration images alone change.
2. With ``target_latency`` in one runtime (eager torch by default, 2 threads), converts random-init
   torchvision models and times the result against the original in that runtime (``ghostify.bench``,
   interleaved) at the batch the budget was timed at.

    python benchmarks/budget.py [--task digits|photos] [--subsets 3] [--models resnet18 vgg-small]
                                [--latency-models mobilenet_v2 efficientnet_b0]
                                [--target-latency 0.9] [--batches 1 16] [--runtime torch|onnxruntime|inductor]
"""

from __future__ import annotations

import argparse
import os
from typing import List, Tuple

import torch
import torchvision
from fidelity import CALIBRATION, TASKS, reference

import ghostify
from ghostify.count import Counts
from ghostify.latency import bench


def flops_fraction(original: torch.nn.Module, ghost: torch.nn.Module, x: torch.Tensor) -> float:
    return Counts(ghost, (x,)).conv_linear_flops / Counts(original, (x,)).conv_linear_flops


def scores(model, ghost, data) -> Tuple[float, float, float]:
    """Top-1, top-1 agreement with the original and the relative logit error, on the test images."""
    xte, yte = data[2], data[3]
    with torch.no_grad():
        logits, reference_logits = ghost(xte), model(xte)
    error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    return ((logits.argmax(1) == yte).float().mean().item(),
            (logits.argmax(1) == reference_logits.argmax(1)).float().mean().item(), error)


def spread(values: List[float], percent: bool) -> str:
    """Mean, and the range over calibration subsets when there are several."""
    show = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.3f}")
    mean = sum(values) / len(values)
    return show(mean) + (f" ({show(min(values))}-{show(max(values))})" if len(values) > 1 else "")


def flops_table(args: argparse.Namespace) -> None:
    """Uniform s = 2 and 4 against ``target_flops`` at their FLOPs, each calibrated on ``--subsets`` disjoint
    sets of training images (the same sets for both plans): how much the plan changes top-1 beside how much the
    calibration images alone do."""
    data = TASKS[args.task][0]()
    subsets = [data[0][k * CALIBRATION:(k + 1) * CALIBRATION] for k in range(args.subsets)]
    print(f"{len(subsets)} calibration subsets of {CALIBRATION} images; mean (range over subsets)\n")
    print("| model | plan | FLOPs fraction | s used / convs kept | top-1 | agreement | logit error |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = reference(name, args.task, data[0], data[1])
        for s in (2, 4):
            target = None
            for plan in ("uniform", "budget"):
                rows, fractions, ratios, kept = [], [], set(), set()
                for images in subsets:
                    torch.manual_seed(0)
                    options = {"s": s} if plan == "uniform" else {"target_flops": target}
                    ghost = ghostify.convert(model, init="calibrate", calibration_data=images,
                                             example_inputs=images[:1], **options)
                    rows.append(scores(model, ghost, data))
                    fractions.append(flops_fraction(model, ghost, images[:1]))
                    ratios.update(row.s for row in ghost.ghostify_result.replaced)
                    kept.add(sum("budget" in row.reason for row in ghost.ghostify_result.skipped))
                target = target or max(fractions)  # uniform s's own fraction, not rounded: it must be reachable
                label = f"uniform s={s}" if plan == "uniform" else f"target_flops={target:.3f}"
                columns = [spread([r[i] for r in rows], percent=i < 2) for i in range(3)]
                print(f"| {name} | {label} | {'/'.join(sorted({f'{f:.3f}' for f in fractions}))} | {sorted(ratios)} / "
                      f"{'/'.join(map(str, sorted(kept)))} kept | " + " | ".join(columns) + " |", flush=True)


def latency_table(args: argparse.Namespace) -> None:
    print(f"\nlatency budgets in {args.runtime}:\n")
    print("| model | target_latency | batch | layers converted | original ms | ghost ms | speed-up | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.latency_models:
        original = torchvision.models.get_model(name).eval()
        for batch in args.batches:
            try:
                ghost = ghostify.convert(original, target_latency=args.target_latency, runtime=args.runtime,
                                         runtime_batch=batch).eval()
            except ValueError as error:
                print(f"| {name} | {args.target_latency} | {batch} | {error} | | | | |", flush=True)
                continue
            result = ghost.ghostify_result
            kept = sum("budget" in row.reason for row in result.skipped)
            layers = f"{len(result.replaced)} of {len(result.replaced) + kept}"
            timed = bench(original, ghost, batches=[batch], runtime=args.runtime, threads=args.threads,
                          repeats=args.repeats, name=name)
            row = timed.rows[0]
            print(f"| {name} | {args.target_latency} | {batch} | {layers} | {row.original_ms:.1f} | "
                  f"{row.converted_ms:.1f} | {row.speedup:.2f}x | {timed.flops_ratio:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits", help="the fidelity benchmark's task")
    parser.add_argument("--models", nargs="*", default=["resnet18", "vgg-small"])
    parser.add_argument("--latency-models", nargs="*", default=["mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--target-latency", type=float, default=0.9)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--runtime", choices=["torch", "onnxruntime", "inductor"], default="torch",
                        help="the runtime the latency budget is timed and the result benchmarked in")
    parser.add_argument("--subsets", type=int, default=3,
                        help="disjoint sets of calibration images each FLOPs plan is calibrated on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
    print(f"torch {torch.__version__}, {args.threads} threads; calibrate on {CALIBRATION} {args.task} images\n")
    if args.models:
        flops_table(args)
    if args.latency_models:
        latency_table(args)


if __name__ == "__main__":
    main()
