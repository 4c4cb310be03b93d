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
    python benchmarks/latency.py --tables profile --models resnet50 --s 2 --batches 16 --runtimes onnxruntime
    python benchmarks/latency.py --tables align --models mobilenet_v2 --s 2 --runtimes onnxruntime   # align 16 vs 1
    python benchmarks/latency.py --tables detection --s 2 --runtimes torch   # Faster R-CNN's backbone
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile

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
                    kept = sum(" ms as a conv" in row.reason for row in result.skipped)  # left by the timings
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
            changed = sum((ours.s, ours.intrinsic) != (theirs.s, theirs.intrinsic) for ours, theirs in
                          zip(aligned.ghostify_result.replaced, plain.ghostify_result.replaced))
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


def detection_table(args: argparse.Namespace) -> None:
    """torchvision's Faster R-CNN ResNet-50 FPN (random weights, 320-pixel images), converted as a whole (it
    does not trace: ``convert`` and ``deploy`` work on its parts that do), timed on its backbone with the
    feature pyramid: with random weights the heads' work depends on how many random boxes survive, so only
    the backbone's time compares like for like."""
    print("| model | s | part timed | runtime | batch | original ms | ghost ms | speed-up | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                    min_size=320, max_size=320).eval()
    for s in args.s:
        ghost = ghostify.convert(detector, s=s, d=args.d, init=args.init, absorb_norm=args.form == "ghostnet",
                                 example_inputs=([torch.rand(3, 320, 320)],)).eval()
        gathers = sum(row.gather for row in ghost.ghostify_result.replaced)
        for runtime in args.runtimes:
            result = bench(detector.backbone, ghost.backbone, batches=args.batches, runtime=runtime,
                           threads=args.threads, repeats=args.repeats, input_size=(3, 320, 320), name="backbone")
            for row in result.rows:
                print(f"| fasterrcnn_resnet50_fpn | {s} | backbone + FPN ({gathers} gathers in the model) | "
                      f"{runtime} | {row.batch} | {row.original_ms:.1f} | {row.converted_ms:.1f} | "
                      f"{row.speedup:.2f}x | {result.flops_ratio:.2f}x |", flush=True)


def profile_table(args: argparse.Namespace) -> None:
    """Where each deployed model spends its time, per operator: torch.profiler's self CPU time in eager
    PyTorch (runtime ``torch``), onnxruntime's own kernel times (``onnxruntime``)."""
    torch.set_num_threads(args.threads)
    for name in args.models:
        original = torchvision.models.get_model(name).eval()
        converted = ghostify.convert(original, s=args.s[0], d=args.d, init=args.init,
                                     absorb_norm=args.form == "ghostnet").eval()
        x = torch.randn(args.batches[-1], 3, 224, 224)
        models = (("original", original), (f"ghost s={args.s[0]}", converted))
        if "torch" in args.runtimes:
            for label, model in models:
                eager_profile(name, label, model, x)
        if "onnxruntime" in args.runtimes:
            original_ops, ghost_ops = [onnx_profile(model, x, args.threads, args.repeats) for _, model in models]
            print(f"\n{name}, s={args.s[0]}, batch {x.shape[0]}, onnxruntime, {args.threads} threads: kernel ms per "
                  f"run (calls per run), mean of {args.repeats} runs\n")
            print("| operator | original | Ghost |\n|---|---|---|")
            for op in sorted(set(original_ops) | set(ghost_ops), key=lambda op: -ghost_ops.get(op, (0, 0))[0]):
                cells = [f"{ops[op][0]:.1f} ({ops[op][1]:.0f})" if op in ops else "-" for ops in
                         (original_ops, ghost_ops)]
                print(f"| {op} | {' | '.join(cells)} |")
            totals = [sum(ms for ms, _ in ops.values()) for ops in (original_ops, ghost_ops)]
            print(f"| total | {totals[0]:.1f} | {totals[1]:.1f} |")


def eager_profile(name: str, label: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    """torch.profiler's table of one eager forward pass of ``model``'s deploy form."""
    from torch.profiler import ProfilerActivity, profile

    deployed = ghostify.deploy(model)
    with torch.no_grad():
        deployed(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            deployed(x)
    print(f"\n{name} {label}, batch {x.shape[0]}, eager deploy form:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def onnx_profile(model: torch.nn.Module, x: torch.Tensor, threads: int, runs: int) -> dict:
    """onnxruntime's profile of ``model`` in the form ``bench`` times (deployed for onnxruntime, exported, a
    session with ``threads`` threads that do not spin): per operator type of its optimised graph, kernel ms
    per run and calls per run, over ``runs`` runs after a first, unprofiled one; depthwise convs apart."""
    import onnxruntime

    from ghostify.exporting import write_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        with torch.no_grad():
            write_onnx(ghostify.deploy(model, runtime="onnxruntime"), path, x, dynamic_batch=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        options.enable_profiling, options.profile_file_prefix = True, os.path.join(folder, "profile")
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(runs + 1):
            session.run(None, feed)
        with open(session.end_profiling()) as file:
            events = json.load(file)
    first = min((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    totals, calls = collections.Counter(), collections.Counter()
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] >= first["ts"] + first["dur"]):
            op = _operator(event["args"])
            totals[op] += event["dur"] / 1000
            calls[op] += 1
    return {op: (totals[op] / runs, calls[op] / runs) for op in totals}


def _operator(args: dict) -> str:
    """The operator type of a profiled onnxruntime node; a conv with one input channel per group is depthwise."""
    shapes = [next(iter(shape.values())) for shape in args.get("input_type_shape", [])]
    if args["op_name"] == "Conv" and len(shapes) > 1 and shapes[1][1] == 1 and shapes[0][1] > 1:
        return "Conv (depthwise)"
    return args["op_name"]


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
    parser.add_argument("--tables", nargs="+", choices=["converted", "zoo", "profile", "align", "detection"],
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
    if "detection" in args.tables:
        detection_table(args)


if __name__ == "__main__":
    main()
