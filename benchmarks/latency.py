"""Latency of torchvision models vs their Ghost conversions, both in deploy form (``ghostify.bench``).

Prints a markdown table: per model, s, runtime and batch size, the median latency of the original and the
converted model (interleaved runs), the speed-up and the FLOPs ratio (conv + linear multiply-adds). A second
table puts the zoo's GhostNet 1.0x beside torchvision's mobilenet_v3_large and resnet18 (paper Table 7's
comparison, on this CPU), measured the same way: speed-up = baseline ms / GhostNet ms.

    OMP_NUM_THREADS=1 python benchmarks/latency.py --threads 1 --repeats 10
    python benchmarks/latency.py --models resnet50 --s 2 --runtimes torch --batches 1 16
    python benchmarks/latency.py --tables zoo
    python benchmarks/latency.py --timed --models mobilenet_v2 --s 2   # only layers timed faster, per runtime/batch
    python benchmarks/latency.py --tables profile --models resnet50 --s 2 --batches 16   # where the time goes
    python benchmarks/latency.py --tables align --models mobilenet_v2 --s 2 --runtimes onnxruntime   # align 16 vs 1
"""

from __future__ import annotations

import argparse
import platform

import torch
import torchvision

import ghostify
from ghostify.latency import bench
from ghostify.models import get_model

MODELS = ("resnet50", "resnet18", "vgg16", "efficientnet_b0")
BASELINES = ("mobilenet_v3_large", "resnet18")


def print_rows(args: argparse.Namespace, first: torch.nn.Module, second: torch.nn.Module, runtime: str,
               cells: list, batches=None) -> None:
    """Time ``first`` against ``second`` in one interleaved run; one markdown row per batch size."""
    result = bench(first, second, batches=batches or args.batches, runtime=runtime, threads=args.threads,
                   repeats=args.repeats, name=str(cells[0]))
    for row in result.rows:
        values = cells + [row.batch, f"{row.original_ms:.1f}", f"{row.converted_ms:.1f}", f"{row.speedup:.2f}x",
                          f"{result.flops_ratio:.2f}x"]
        print("| " + " | ".join(map(str, values)) + " |", flush=True)


def converted_table(args: argparse.Namespace) -> None:
    """Each torchvision model against its Ghost conversion: every dense conv converted (``convert``'s default),
    or, with ``--timed``, only the layers timed faster as Ghost modules in the runtime and batch of the row
    (``convert(runtime=..., runtime_batch=...)``)."""
    print("| model | s | layers | runtime | batch | original ms | ghost ms | speed-up | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    options = {"d": args.d, "init": args.init, "absorb_norm": args.form == "ghostnet"}
    for name in args.models:
        original = torchvision.models.get_model(name).eval()
        for s in args.s:
            if not args.timed:
                converted = ghostify.convert(original, s=s, **options).eval()
                for runtime in args.runtimes:
                    print_rows(args, original, converted, runtime, [name, s, "all", runtime])
                continue
            for runtime in args.runtimes:
                for batch in args.batches:
                    converted = ghostify.convert(original, s=s, runtime=runtime, runtime_batch=batch, **options).eval()
                    result = converted.ghostify_result
                    kept = sum("faster as a Ghost module" in row.reason for row in result.skipped)
                    layers = f"timed: {len(result.replaced)} of {len(result.replaced) + kept}"
                    print_rows(args, original, converted, runtime, [name, s, layers, runtime], [batch])


def align_table(args: argparse.Namespace) -> None:
    """Each model converted with ``align=1`` (``ceil(n / s)`` intrinsic maps) against ``align=--align``
    (parts on SIMD-block boundaries where the width allows), interleaved: speed-up = align 1 ms / aligned ms."""
    print(f"| model | s | layers changed | runtime | batch | align 1 ms | align {args.align} ms | speed-up | "
          "FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    options = {"d": args.d, "init": args.init, "absorb_norm": args.form == "ghostnet"}
    for name in args.models:
        original = torchvision.models.get_model(name).eval()
        for s in args.s:
            plain = ghostify.convert(original, s=s, align=1, **options).eval()
            aligned = ghostify.convert(original, s=s, align=args.align, **options).eval()
            changed = sum(row.intrinsic is not None for row in aligned.ghostify_result.replaced)
            for runtime in args.runtimes:
                print_rows(args, plain, aligned, runtime, [name, s, changed, runtime])


def zoo_table(args: argparse.Namespace) -> None:
    """GhostNet 1.0x (built with Ghost modules) against torchvision baselines of similar or larger cost."""
    ghostnet = get_model("ghostnet_100").eval()
    print("| baseline | runtime | batch | baseline ms | GhostNet 1.0x ms | speed-up | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in BASELINES:
        baseline = torchvision.models.get_model(name).eval()
        for runtime in args.runtimes:
            print_rows(args, baseline, ghostnet, runtime, [name, runtime])


def profile_table(args: argparse.Namespace) -> None:
    """Eager CPU time per operator of each deployed model (torch.profiler), to show where a speed-up is lost."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    for name in args.models:
        original = torchvision.models.get_model(name).eval()
        converted = ghostify.convert(original, s=args.s[0], d=args.d, init=args.init,
                                     absorb_norm=args.form == "ghostnet").eval()
        x = torch.randn(args.batches[-1], 3, 224, 224)
        for label, model in (("original", original), (f"ghost s={args.s[0]}", converted)):
            deployed = ghostify.deploy(model)
            with torch.no_grad():
                deployed(x)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    deployed(x)
            print(f"\n{name} {label}, batch {x.shape[0]}, eager deploy form:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--s", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--d", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--init", default="copy",
                        help="ghostify init (default: convert's default, so the timed model is what users get)")
    parser.add_argument("--form", choices=["ghostnet", "linear"], default="ghostnet",
                        help="Ghost module form: norm taken in (convert's default) or a linear module before it")
    parser.add_argument("--timed", action="store_true",
                        help="convert only the layers timed faster as Ghost modules (convert --runtime), per row")
    parser.add_argument("--align", type=int, default=16, help="--tables align: the alignment to compare with 1")
    parser.add_argument("--tables", nargs="+", choices=["converted", "zoo", "profile", "align"],
                        default=["converted", "zoo"])
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved runs; d={args.d}, init={args.init}, form={args.form}; "
          "depthwise/grouped convs left alone\n")
    if "converted" in args.tables:
        converted_table(args)
    if "zoo" in args.tables:
        print()
        zoo_table(args)
    if "profile" in args.tables:
        profile_table(args)
    if "align" in args.tables:
        align_table(args)


if __name__ == "__main__":
    main()
