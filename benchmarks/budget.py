"""Does a per-layer budget pay? Uniform s against per-layer s at the same FLOPs, and latency budgets.

1. On the fidelity benchmark's trained networks (``fidelity.py``: digits, cached weights), convert with a
   uniform s = 2 and s = 4, then with ``target_flops`` set to the FLOPs fraction each uniform model has,
   all with ``init="calibrate"`` on 256 training images and no training; prints top-1, agreement with the
   original and logit error on the 500 test images.
2. With ``target_latency`` in one runtime (eager torch by default, 2 threads), converts random-init
   torchvision models and times the result against the original in that runtime (``ghostify.bench``,
   interleaved) at the batch the budget was timed at.

    python benchmarks/budget.py [--models resnet18 vgg-small] [--latency-models mobilenet_v2 efficientnet_b0]
                                [--target-latency 0.9] [--batches 1 16] [--runtime torch|onnxruntime|inductor]
"""

from __future__ import annotations

import argparse
import os

import torch
import torchvision
from fidelity import CALIBRATION, TASKS, predict, reference

import ghostify
from ghostify.count import Counts
from ghostify.latency import bench


def flops_fraction(original: torch.nn.Module, ghost: torch.nn.Module, x: torch.Tensor) -> float:
    return Counts(ghost, (x,)).conv_linear_flops / Counts(original, (x,)).conv_linear_flops


def fidelity_row(name: str, plan: str, model, ghost, data) -> str:
    xte, yte = data[2], data[3]
    predictions, reference_predictions = predict(ghost, xte), predict(model, xte)
    with torch.no_grad():
        logits, reference_logits = ghost(xte), model(xte)
    error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    ratios = sorted({row.s for row in ghost.ghostify_result.replaced})
    kept = sum("budget" in row.reason for row in ghost.ghostify_result.skipped)
    return (f"| {name} | {plan} | {flops_fraction(model, ghost, xte[:1]):.3f} | {ratios} / {kept} kept | "
            f"{(predictions == yte).float().mean().item():.1%} | "
            f"{(predictions == reference_predictions).float().mean().item():.1%} | {error:.3f} |")


def flops_table(args: argparse.Namespace) -> None:
    data = TASKS[args.task][0]()
    calibration = {"init": "calibrate", "calibration_data": data[0][:CALIBRATION], "example_inputs": data[0][:1]}
    print("| model | plan | FLOPs fraction | s used / convs kept | top-1 | agreement | logit error |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = reference(name, args.task, data[0], data[1])
        for s in (2, 4):
            torch.manual_seed(0)
            uniform = ghostify.convert(model, s=s, **calibration)
            print(fidelity_row(name, f"uniform s={s}", model, uniform, data), flush=True)
            target = flops_fraction(model, uniform, data[0][:1])
            torch.manual_seed(0)
            budgeted = ghostify.convert(model, target_flops=target, **calibration)
            print(fidelity_row(name, f"target_flops={target:.3f}", model, budgeted, data), flush=True)


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
