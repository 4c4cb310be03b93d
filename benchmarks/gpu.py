"""The whole pipeline on a CUDA device: convert, calibrate, deploy and time torchvision models on the GPU.

Per model (random weights, batch norms settled on the photos; nothing is downloaded): ``ghostify.convert`` with
the default init (``copy``) and with ``calibrate`` on photo crops, each timed and compared with the original on
other crops (relative error of the logits, top-1 agreement); ``ghostify.deploy``'s outputs against the
converted model's; then latency of the original against the default conversion (``ghostify.bench``, both
deployed, interleaved, median) in eager torch and ``torch.compile`` (inductor, freezing), float32 and float16.
The photos are the colour ones scikit-image ships, cut into random crops.

    python benchmarks/gpu.py [--models resnet50] [--s 2] [--batches 1 16 64] [--runtimes torch inductor]
    python benchmarks/gpu.py --runtimes torch --dtypes float32 --batches 64 --profile 64   # where the time goes
    python benchmarks/gpu.py --runtimes torch --dtypes float32 --batches 1 64 --timed   # only layers timed faster
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torchvision
from torchvision.transforms import v2

import ghostify

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def photo_crops(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random crops of scikit-image's colour photos, ImageNet-normalised, ``(count, 3, size, size)``."""
    from skimage import data

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the crop transform draws from torch's global generator
    crop = v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    photos = [torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1) for name in PHOTOS]
    picks = torch.randint(len(photos), (count,), generator=generator)
    return torch.stack([crop(photos[i]) for i in picks.tolist()])


def agreement(original: torch.nn.Module, converted: torch.nn.Module, x: torch.Tensor) -> tuple:
    """Relative error of ``converted``'s logits against ``original``'s on ``x``, and top-1 agreement."""
    with torch.no_grad():
        a, b = original(x).double(), converted(x).double()
    return ((b - a).norm() / a.norm()).item(), (a.argmax(1) == b.argmax(1)).double().mean().item()


def timed(make, device: torch.device):
    """``make()`` and its wall time in seconds, the device's queued work included."""
    wait = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    wait(device)
    start = time.perf_counter()
    out = make()
    wait(device)
    return out, time.perf_counter() - start


def pipeline(name: str, args: argparse.Namespace, calibration: torch.Tensor, test: torch.Tensor):
    """Convert (copy, calibrate) and deploy ``name`` on the GPU; prints one row per init; returns the original
    and its default conversion."""
    torch.manual_seed(0)
    original = torchvision.models.get_model(name).to(test.device)
    with torch.no_grad():  # settle the batch norms on the photos, as trained weights would have them
        for batch in calibration.split(16):
            original.train()(batch)
    original.eval()
    converted = {}
    for init in ("copy", "calibrate"):
        data = {"calibration_data": calibration} if init == "calibrate" else {}
        options = dict(s=args.s, d=args.d, init=init, example_inputs=test[:1], **data)
        ghost, seconds = timed(partial(ghostify.convert, original, **options), test.device)
        converted[init] = ghost.eval()
        error, top1 = agreement(original, ghost, test)
        deploy_error, _ = agreement(ghost, ghostify.deploy(ghost), test)
        print(f"| {name} | {args.s} | {init} | {seconds:.2f} | {error:.4f} | {top1:.3f} | {deploy_error:.1e} |",
              flush=True)
    return original, converted["copy"]


def timed_rows(name: str, original: torch.nn.Module, args: argparse.Namespace, example: torch.Tensor) -> None:
    """Per runtime and batch: the conversion that keeps as convs the layers a Ghost module does not make faster
    there (``convert(runtime=..., runtime_batch=...)``, each layer timed alone on the device), timed against
    the original."""
    for runtime in args.runtimes:
        for batch in args.batches:
            ghost = ghostify.convert(original, s=args.s, d=args.d, example_inputs=example, runtime=runtime,
                                     runtime_batch=batch).eval()
            result = ghost.ghostify_result
            kept = sum(" ms as a conv" in row.reason for row in result.skipped)  # left by the timings
            row = ghostify.bench(original, ghost, batches=[batch], runtime=runtime, repeats=args.repeats,
                                 name=name).rows[0]
            print(f"| {name} | {args.s} | {runtime}, timed: {len(result.replaced)} of {len(result.replaced) + kept} "
                  f"layers | float32 | {batch} | {row.original_ms:.2f} | {row.converted_ms:.2f} | "
                  f"{row.speedup:.2f}x |", flush=True)


def profile(name: str, label: str, model: torch.nn.Module, x: torch.Tensor, top: int = 10) -> None:
    """The ``top`` kernels by device time of the deployed eager ``model`` on ``x``, per run."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profile

    deployed = ghostify.deploy(model).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    cuda = x.is_cuda
    runs = 5
    with torch.inference_mode():
        deployed(x)
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with run_profile(activities=activities) as prof:
            for _ in range(runs):
                deployed(x)
            torch.cuda.synchronize(x.device) if cuda else None
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    spent = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(spent(e) for e in events)
    print(f"\n{name} {label}, batch {len(x)}: {total / runs / 1000:.2f} ms of kernels per run")
    for event in sorted(events, key=spent, reverse=True)[:top]:
        print(f"  {spent(event) / runs / 1000:7.3f} ms  {100 * spent(event) / total:4.1f}%  {event.key[:220]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--s", type=int, default=2)
    parser.add_argument("--d", type=int, default=3)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "inductor"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float16"], default=["float32", "float16"])
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--timed", action="store_true",
                        help="also convert only the layers timed faster as Ghost modules on the device, per row")
    parser.add_argument("--profile", type=int, metavar="BATCH", help="also profile both models' kernels (eager)")
    parser.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device on this machine")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, TF32 for convs {torch.backends.cudnn.allow_tf32}, "
          f"for matmuls {torch.backends.cuda.matmul.allow_tf32}; photo crops 224x224\n")
    calibration = photo_crops(args.calibration, 224, seed=0).to(device)
    test = photo_crops(64, 224, seed=1).to(device)
    print("| model | s | init | convert s | logits rel. error | top-1 agreement | deploy rel. diff |")
    print("|---|---|---|---|---|---|---|")
    pairs = {name: pipeline(name, args, calibration, test) for name in args.models}

    print("\n| model | s | runtime | dtype | batch | original ms | ghost ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (original, ghost) in pairs.items():
        for runtime in args.runtimes:
            for dtype in args.dtypes:
                cast = getattr(torch, dtype)
                result = ghostify.bench(original.to(cast), ghost.to(cast), batches=args.batches, runtime=runtime,
                                        repeats=args.repeats, name=name)
                for row in result.rows:
                    print(f"| {name} | {args.s} | {runtime} | {dtype} | {row.batch} | {row.original_ms:.2f} | "
                          f"{row.converted_ms:.2f} | {row.speedup:.2f}x |", flush=True)
        original.float(), ghost.float()
        if args.timed:
            timed_rows(name, original, args, test[:1])
        if args.profile:
            x = photo_crops(args.profile, 224, seed=2).to(device)
            profile(name, "original", original, x)
            profile(name, f"Ghost s={args.s}", ghost, x)


if __name__ == "__main__":
    main()
