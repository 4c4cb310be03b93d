"""Wall time and peak memory of ``ghostify.convert(..., init="calibrate")`` on a full-size model.

Target on 2 cores: ResNet-50, 224x224, 256 calibration images, s = 2, under 3 minutes. The timing does not
depend on what the images show (the same least-squares problems are solved), so they are random normal
tensors; the weights are torchvision's random initialisation (nothing is downloaded).

    python benchmarks/calibrate_speed.py [--model resnet50] [--images 256] [--size 224] [--threads 2]
"""

import argparse
import resource
import time
import warnings

import torch
import torchvision

import ghostify

TARGET_S = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--s", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)  # the same random weights every run, so the printed errors repeat
    model = torchvision.models.get_model(args.model).eval()
    images = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    ghost = ghostify.convert(model, s=args.s, d=3, example_inputs=images[:1], init="calibrate",
                             calibration_data=images, calibration_samples=args.images)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    errors = [row.error for row in ghost.ghostify_result.replaced]
    verdict = "ok" if seconds < TARGET_S else "SLOWER than target"
    print(f"torch {torch.__version__}, {args.threads} threads; {args.model}, s={args.s}, {args.images} images of "
          f"{args.size}x{args.size}, calibration batches of 64")
    print(f"calibrate: {seconds:.0f} s (target < {TARGET_S:.0f} s: {verdict}), peak memory {peak:.1f} GiB, "
          f"{len(errors)} layers, median layer error {sorted(errors)[len(errors) // 2]:.4f}")


if __name__ == "__main__":
    main()
