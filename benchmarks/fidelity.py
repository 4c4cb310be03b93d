"""How close does a converted network start to the original? Measured on real data, no training after conversion.

Two tasks on data that packages ship (``--task``): ``digits``, scikit-learn's ``load_digits`` (1,797 real 8x8
handwritten digits, upsampled to 32x32, 3 channels; 10 classes), and ``photos``, a harder one: which of 12
photos and textures scikit-image ships (astronaut, camera, coffee, ..., brick, grass, gravel) a 48x48 grey
patch (shown at 32x32) comes from, trained on patches from the top 70% of each photo and tested on patches
from the bottom 30%. Trains two reference networks per task (weights cached in a temp dir), converts them with
each initialiser at s = 2 and s = 4, and prints top-1 accuracy, top-1 agreement with the original, the
relative error of the logits against the original's on the test images and conversion wall time
(``reconstruct+network``: block reconstruction, then the whole network; ``calibrate, head kept``: without
refitting the linear layers after the last Ghost module; ``calibrate, no mirror``: fitted on the calibration
images alone, not also on their mirror images); then, from every start that read
calibration images, one epoch of label-free distillation from the original (``ghostify.finetune`` on the
training inputs alone, default options) with its wall time, which weights it kept (``start`` when the epoch
agreed less with the original on those inputs) and the top-1 of the epoch's own weights; then fine-tunes
each converted model with labels for the same short budget and prints the accuracy it reaches.

    OMP_NUM_THREADS=2 python benchmarks/fidelity.py [--task digits|photos] [--models resnet18 vgg-small]
                                                     [--distil-epochs 1] [--distil-lr LR] [--finetune-steps 200]
                                                     [--form ghostnet|linear]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ghostify
from ghostify.models.cifar import CifarVGG

CACHE = os.path.join(tempfile.gettempdir(), "ghostify_fidelity")
CALIBRATION = 256
VGG_CFG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)
ARCHITECTURES: Dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda classes: torchvision.models.resnet18(num_classes=classes),
    "vgg-small": lambda classes: CifarVGG(VGG_CFG, num_classes=classes),
}
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "hubble_deep_field",
          "immunohistochemistry", "brick", "grass", "gravel")


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


def photos(train_per: int = 150, test_per: int = 50, crop: int = 48, size: int = 32):
    """12-way "which photo is this patch from": grey patches as 3x32x32 tensors, normalised; 150 training
    patches per photo from its top 70%, 50 test patches from its bottom 30% (no overlap)."""
    from skimage import color, data

    generator = torch.Generator().manual_seed(0)
    xs: Dict[str, List[torch.Tensor]] = {"train": [], "test": []}
    ys: Dict[str, List[int]] = {"train": [], "test": []}
    for label, name in enumerate(PHOTOS):
        image = getattr(data, name)()
        image = torch.tensor(color.rgb2gray(image[..., :3]) if image.ndim == 3 else image, dtype=torch.float32)
        image = image / image.max()
        scale = 256 / min(image.shape)  # every photo at the same scale: 256 pixels on its short side
        image = F.interpolate(image[None, None], scale_factor=scale, mode="area" if scale < 1 else "bilinear")[0, 0]
        height, width = image.shape
        cut = int(height * 0.7)
        for split, (top, bottom, count) in {"train": (0, cut, train_per), "test": (cut, height, test_per)}.items():
            rows = torch.randint(top, bottom - crop + 1, (count,), generator=generator).tolist()
            cols = torch.randint(0, width - crop + 1, (count,), generator=generator).tolist()
            patches = torch.stack([image[r:r + crop, c:c + crop] for r, c in zip(rows, cols)])
            xs[split].append(F.interpolate(patches[:, None], size=size, mode="area"))
            ys[split] += [label] * count
    x_train, x_test = torch.cat(xs["train"]), torch.cat(xs["test"])
    mean, std = x_train.mean(), x_train.std()
    shuffle = torch.randperm(len(x_train), generator=generator)  # calibration takes the first 256: every class
    return (((x_train[shuffle] - mean) / std).repeat(1, 3, 1, 1), torch.tensor(ys["train"])[shuffle],
            ((x_test - mean) / std).repeat(1, 3, 1, 1), torch.tensor(ys["test"]))


TASKS = {"digits": (digits, 10), "photos": (photos, len(PHOTOS))}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int = 0,
          evaluate: Optional[Callable[[nn.Module], float]] = None, every: int = 0) -> List[float]:
    """SGD with momentum and a cosine schedule on random batches of 64 with random 2-pixel shifts.

    Returns:
        ``evaluate(model)`` after every ``every`` steps (empty without ``evaluate``); the model ends in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    scores = []
    for step in range(1, steps + 1):
        model.train()
        index = torch.randint(len(y), (64,), generator=generator)
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        batch = torch.roll(x[index], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(batch), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if evaluate is not None and step % every == 0:
            scores.append(evaluate(model))
    model.eval()
    return scores


def reference(name: str, task: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The trained reference network, from the cache when there."""
    path = os.path.join(CACHE, f"{name}.pt" if task == "digits" else f"{name}-{task}.pt")
    model = ARCHITECTURES[name](TASKS[task][1])
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


DATA_INITS = ("calibrate", "calibrate, no mirror", "calibrate, head kept", "reconstruct",  # read calibration images
              "reconstruct+network")
FORMS = {"ghostnet": True, "linear": False}  # convert's absorb_norm: the GhostNet form (default) or a linear module


def convert(model: nn.Module, data, s: int, init: str, form: str = "ghostnet") -> Tuple[nn.Module, float]:
    """The converted model (``CALIBRATION`` training images for ``calibrate`` and ``reconstruct``) and the wall
    time it took."""
    extra = {"calibration_data": data[0][:CALIBRATION]} if init in DATA_INITS else {}
    if init == "reconstruct+network":  # block reconstruction, then the whole network on its output
        init, extra["reconstruct_network"] = "reconstruct", True
    if init == "calibrate, no mirror":  # fitted on the calibration images alone, not also on their mirror images
        init, extra["calibration_mirror"] = "calibrate", False
    if init == "calibrate, head kept":  # the linear layers after the last Ghost module as they were
        init, extra["refit_head"] = "calibrate", False
    extra["absorb_norm"] = FORMS[form]
    torch.manual_seed(0)
    start = time.perf_counter()
    ghost = ghostify.convert(model, s=s, init=init, example_inputs=data[0][:1], **extra)
    return ghost, time.perf_counter() - start


def fidelity(name: str, model: nn.Module, data, s: int, init: str, form: str, distil_epochs: int,
             distil_lr: Optional[float]) -> Dict:
    """Accuracy and agreement with the original right after conversion, no training; for ``calibrate`` and
    ``reconstruct``, also the accuracy after ``distil_epochs`` of label-free distillation (peak learning rate
    ``distil_lr``) and its wall time."""
    xte, yte = data[2], data[3]
    ghost, seconds = convert(model, data, s, init, form)
    predictions, reference_predictions = predict(ghost, xte), predict(model, xte)
    with torch.no_grad():
        logits, reference_logits = ghost(xte), model(xte)
    row = {"model": name, "s": s, "init": init, "seconds": seconds,
           "logit_error": ((logits - reference_logits).norm() / reference_logits.norm()).item(),
           "accuracy": (predictions == yte).float().mean().item(),
           "agreement": (predictions == reference_predictions).float().mean().item(),
           "gathers": sum(r.gather for r in ghost.ghostify_result.replaced),
           "layers": len(ghost.ghostify_result.replaced)}
    if distil_epochs and init in DATA_INITS:
        last = ghostify.finetune(copy.deepcopy(ghost), model, data[0], epochs=distil_epochs, lr=distil_lr,
                                 keep_best=False)  # the same run (same seed), its last epoch's weights
        start = time.perf_counter()
        student = ghostify.finetune(ghost, model, data[0], epochs=distil_epochs, lr=distil_lr)  # inputs, no labels
        row["distil_seconds"] = time.perf_counter() - start
        row["distilled"] = (predict(student, xte) == yte).float().mean().item()
        row["kept"] = student.ghostify_finetune.kept
        row["last_epoch"] = (predict(last, xte) == yte).float().mean().item()
    return row


def finetune(model: nn.Module, data, s: int, init: str, steps: int, every: int, form: str) -> List[float]:
    """Test accuracy every ``every`` SGD steps of fine-tuning the converted model (same budget for every init)."""
    ghost, _ = convert(model, data, s, init, form)
    accuracy = lambda m: (predict(m, data[2]) == data[3]).float().mean().item()  # noqa: E731
    return train(ghost, data[0], data[1], steps=steps, lr=0.01, seed=1, evaluate=accuracy, every=every)


def table(rows: List[Dict], originals: Dict[str, float], tuned: Dict, every: int) -> str:
    """The results as a Markdown table."""
    budgets = sorted({every * (i + 1) for scores in tuned.values() for i in range(len(scores))})
    head = "".join(f" top-1 after {b} steps |" for b in budgets)
    lines = [f"| model | s | init | top-1 | agreement | logit error | convert (s) | gathers | top-1 after "
             f"distillation | kept | last epoch's top-1 | distil (s) |{head}",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(budgets)]
    for name, accuracy in originals.items():
        lines.append(f"| {name} | - | original | {accuracy:.1%} | 100% | 0 | - | - | - | - | - | - |"
                     + " - |" * len(budgets))
        for r in (r for r in rows if r["model"] == name):
            scores = tuned.get((name, r["s"], r["init"]), [])
            cells = "".join(f" {scores[i]:.1%} |" if i < len(scores) else " - |" for i in range(len(budgets)))
            distilled = (f"{r['distilled']:.1%} | {'start' if r['kept'] == 0 else 'epoch ' + str(r['kept'])} | "
                         f"{r['last_epoch']:.1%} | {r['distil_seconds']:.1f}") if "distilled" in r else "- | - | - | -"
            lines.append(f"| {name} | {r['s']} | {r['init']} | {r['accuracy']:.1%} | {r['agreement']:.1%} | "
                         f"{r['logit_error']:.3f} | {r['seconds']:.1f} | {r['gathers']}/{r['layers']} | {distilled} |"
                         f"{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits")
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--distil-epochs", type=int, default=1,
                        help="label-free distillation epochs from the calibrate and reconstruct starts (0: none)")
    parser.add_argument("--distil-lr", type=float, help="the distillation's peak learning rate (default: "
                        "ghostify.finetune's, 0.001 from calibrate and reconstruct, 0.01 otherwise)")
    parser.add_argument("--finetune-steps", type=int, default=200, help="SGD steps after conversion (0: none)")
    parser.add_argument("--finetune-every", type=int, default=50, help="report test accuracy every this many steps")
    parser.add_argument("--finetune-s", type=int, nargs="*", default=[2, 4], help="ratios to fine-tune")
    parser.add_argument("--form", choices=list(FORMS), default="ghostnet",
                        help="Ghost module form: norm taken in (convert's default) or a linear module before it")
    args = parser.parse_args()
    lr = args.distil_lr or "by start (ghostify.finetune's default)"
    print(f"task: {args.task}, Ghost module form: {args.form}, distillation lr {lr}", flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = TASKS[args.task][0]()
    models = {name: reference(name, args.task, data[0], data[1]) for name in args.models}
    originals = {name: (predict(model, data[2]) == data[3]).float().mean().item() for name, model in models.items()}
    rows, tuned = [], {}
    for name, model in models.items():
        for s in (2, 4):
            for init in ("random", "copy", *DATA_INITS):
                rows.append(fidelity(name, model, data, s, init, args.form, args.distil_epochs, args.distil_lr))
                print(rows[-1], flush=True)
    print(table(rows, originals, tuned, args.finetune_every), flush=True)
    for name, model in models.items():
        for s in args.finetune_s if args.finetune_steps else ():
            for init in ("random", "copy", "calibrate"):
                tuned[name, s, init] = finetune(model, data, s, init, args.finetune_steps, args.finetune_every,
                                                args.form)
                print(name, s, init, tuned[name, s, init], flush=True)
    print(table(rows, originals, tuned, args.finetune_every))


if __name__ == "__main__":
    main()
