"""Wall time of ``ghostify.convert`` + ``ghostify.report`` (imports and model building excluded).

Targets on 2 cores: ResNet-50 under 3 s; every torchvision classification model under 10 s (``--all``).
Prints one row per model and initialiser (``random`` builds the architecture only; ``copy``, the default,
also fits every Ghost module to the original filters), median of ``--repeats`` runs; with ``--all``, one run
of each torchvision classification model with the default init, then the slowest five.

    python benchmarks/convert_speed.py [--repeats 3] [--threads 2] [--inits random copy] [--models resnet50 ...]
    python benchmarks/convert_speed.py --all
"""

import argparse
import statistics
import time
import warnings

import torch
import torchvision

import ghostify

MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "vgg16")
TARGET_S = 3.0
TARGET_ALL_S = 10.0


def time_once(name: str, init: str) -> tuple:
    model = torchvision.models.get_model(name)
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    ghost = ghostify.convert(model, s=2, d=3, example_inputs=x, init=init)
    converted = time.perf_counter()
    summary = ghostify.report(model, ghost, (x,))
    summary.to_dict()
    done = time.perf_counter()
    return converted - start, done - converted, summary.flops_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inits", nargs="+", default=["random", "copy"], choices=["random", "copy"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--all", action="store_true", help="every torchvision classification model, default init")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.all:
        return sweep(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<20} {'init':<7} {'convert s':>10} {'report s':>10} {'total s':>10} {'FLOPs ratio':>12}  "
          f"target (ResNet-50 < {TARGET_S} s, others < {TARGET_ALL_S} s)")
    for name, init in ((name, init) for init in args.inits for name in args.models):
        runs = [time_once(name, init) for _ in range(args.repeats)]
        convert_s = statistics.median(r[0] for r in runs)
        report_s = statistics.median(r[1] for r in runs)
        total = statistics.median(r[0] + r[1] for r in runs)
        verdict = "ok" if total < (TARGET_S if name == "resnet50" else TARGET_ALL_S) else "SLOWER than target"
        print(f"{name:<20} {init:<7} {convert_s:>10.2f} {report_s:>10.2f} {total:>10.2f} "
              f"{runs[0][2]:>11.2f}x  {verdict}")


def sweep(threads: int) -> None:
    """One convert + report of every torchvision classification model (default init); the slowest five."""
    names = torchvision.models.list_models(module=torchvision.models)
    print(f"torch {torch.__version__}, {threads} threads, one run each, default init (copy), target < "
          f"{TARGET_ALL_S} s")
    totals = {}
    for name in names:
        convert_s, report_s, ratio = time_once(name, "copy")
        totals[name] = convert_s + report_s
        verdict = "ok" if totals[name] < TARGET_ALL_S else "SLOWER than target"
        print(f"{name:<28} {convert_s:>8.2f} s convert {report_s:>8.2f} s report  {ratio:>5.2f}x  {verdict}",
              flush=True)
    over = [name for name, total in totals.items() if total >= TARGET_ALL_S]
    print("slowest five: " + ", ".join(f"{name} {totals[name]:.1f} s" for name in
                                         sorted(totals, key=totals.get, reverse=True)[:5]))
    print(f"{len(names) - len(over)} of {len(names)} under {TARGET_ALL_S} s" +
          (f"; over: {', '.join(over)}" if over else ""))


if __name__ == "__main__":
    main()
