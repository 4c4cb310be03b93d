"""How close does a converted network start to the original? Measured on real data, no training after conversion.

Trains two reference networks on scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits,
upsampled to 32x32, 3 channels; weights cached in a temp dir), converts them with each initialiser at
s = 2 and s = 4, and prints top-1 accuracy, top-1 agreement with the original and conversion wall time;
then fine-tunes each converted model for the same short budget and prints the accuracy it reaches.

    OMP_NUM_THREADS=2 python benchmarks/fidelity.py [--finetune-steps 200] [--models resnet18 vgg-small]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ghostify
from ghostify.models.cifar import CifarVGG

CACHE = os.path.join(tempfile.gettempdir(), "ghostify_fidelity")
CALIBRATION = 256
VGG_CFG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)
ARCHITECTURES: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "vgg-small": lambda: CifarVGG(VGG_CFG, num_classes=10),
}


def digits() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """load_digits as 3x32x32 tensors, normalised; a fixed split of 1,297 training and 500 test images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1297], order[1297:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int = 0) -> nn.Module:
    """SGD with momentum and a cosine schedule on random batches of 64 with random 2-pixel shifts."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(y), (64,), generator=generator)
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        batch = torch.roll(x[index], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(batch), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


def reference(name: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The trained reference network, from the cache when there."""
    path = os.path.join(CACHE, f"{name}.pt")
    model = ARCHITECTURES[name]()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    train(model, x, y, steps=600, lr=0.05)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(batch).argmax(1) for batch in x.split(250)])


def measure(name: str, model: nn.Module, data, s: int, init: str, finetune_steps: int) -> Dict[str, float]:
    """Convert ``model`` with ``init``; accuracy and agreement before and after a short fine-tuning."""
    xtr, ytr, xte, yte = data
    reference_predictions = predict(model, xte)
    extra = {"calibration_data": xtr[:CALIBRATION]} if init == "calibrate" else {}
    torch.manual_seed(0)
    start = time.perf_counter()
    ghost = ghostify.convert(model, s=s, init=init, example_inputs=xtr[:1], **extra)
    seconds = time.perf_counter() - start
    predictions = predict(ghost, xte)
    row = {"model": name, "s": s, "init": init, "seconds": seconds,
           "accuracy": (predictions == yte).float().mean().item(),
           "agreement": (predictions == reference_predictions).float().mean().item(),
           "gathers": sum(r.gather for r in ghost.ghostify_result.replaced),
           "layers": len(ghost.ghostify_result.replaced)}
    if finetune_steps:
        train(ghost, xtr, ytr, steps=finetune_steps, lr=0.01, seed=1)
        row["finetuned"] = (predict(ghost, xte) == yte).float().mean().item()
    return row


def table(rows: List[Dict[str, float]], originals: Dict[str, float]) -> str:
    """The results as a Markdown table."""
    lines = ["| model | s | init | top-1 | agreement | convert (s) | top-1 after fine-tune |",
             "|---|---|---|---|---|---|---|"]
    for name, accuracy in originals.items():
        lines.append(f"| {name} | - | original | {accuracy:.1%} | 100% | - | - |")
        for r in (r for r in rows if r["model"] == name):
            tuned = f"{r['finetuned']:.1%}" if "finetuned" in r else "-"
            lines.append(f"| {name} | {r['s']} | {r['init']} | {r['accuracy']:.1%} | {r['agreement']:.1%} | "
                         f"{r['seconds']:.1f} | {tuned} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune-steps", type=int, default=200, help="SGD steps after conversion (0: none)")
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = digits()
    rows, originals = [], {}
    for name in args.models:
        model = reference(name, data[0], data[1])
        originals[name] = (predict(model, data[2]) == data[3]).float().mean().item()
        for s in (2, 4):
            for init in ("random", "copy", "calibrate"):
                rows.append(measure(name, model, data, s, init, args.finetune_steps))
                print(rows[-1], flush=True)
    print(table(rows, originals))


if __name__ == "__main__":
    main()
