"""Wall time of ``ghostify.convert`` + ``ghostify.report`` (imports and model building excluded).

Target: under 3 s per model on 2 cores. Prints one row per model and initialiser (``random`` builds the
architecture only; ``copy``, the default, also fits every Ghost module to the original filters), median of
``--repeats`` runs.

    python benchmarks/convert_speed.py [--repeats 3] [--threads 2] [--inits random copy]
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<20} {'init':<7} {'convert s':>10} {'report s':>10} {'total s':>10} {'FLOPs ratio':>12}  "
          f"target < {TARGET_S} s")
    for name, init in ((name, init) for init in args.inits for name in MODELS):
        runs = [time_once(name, init) for _ in range(args.repeats)]
        convert_s = statistics.median(r[0] for r in runs)
        report_s = statistics.median(r[1] for r in runs)
        total = statistics.median(r[0] + r[1] for r in runs)
        verdict = "ok" if total < TARGET_S else "SLOWER than target"
        print(f"{name:<20} {init:<7} {convert_s:>10.2f} {report_s:>10.2f} {total:>10.2f} "
              f"{runs[0][2]:>11.2f}x  {verdict}")


if __name__ == "__main__":
    main()
