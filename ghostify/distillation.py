"""``finetune``: knowledge distillation from the original model (teacher) into the converted one (student).

The student learns the teacher's softened outputs (KL divergence at a temperature, as Hinton et al. and
timm's logit distillation compute it), mixed with cross-entropy on labels when the data has them, so no
labels are needed. The same batch goes to both models. The teacher is frozen, in eval mode and never wrapped
in DDP; the student trains. Under ``torchrun`` (``WORLD_SIZE`` > 1) the student is wrapped in
DistributedDataParallel (gloo on the CPU, nccl on CUDA), each process reads its share of the data
(``DistributedSampler``), and only rank 0 shows progress and writes files.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, TensorDataset

from .files import atomic_write
from .init import DATA_METHODS
from .progress import UNKNOWN, progress
from .serialization import save
from .trace import eval_mode, placement

LR = 0.01  # peak learning rate from a data-free start
CALIBRATED_LR = 0.001  # from a start fitted on data


@dataclass
class Epoch:
    """What one epoch measured (on the validation data, or the training data when none is given); epoch 0 is
    the start, measured before any training (no loss)."""

    epoch: int
    loss: Optional[float]
    agreement: float
    top1: Optional[float] = None
    seconds: float = 0.0


@dataclass
class Finetuned:
    """The history of a ``finetune`` run, attached to the student as ``ghostify_finetune``: each epoch's
    figures, the peak learning rate, and the epoch whose weights were kept (0: the start)."""

    epochs: List[Epoch] = field(default_factory=list)
    lr: Optional[float] = None
    kept: int = 0

    @staticmethod
    def score(row: Epoch) -> float:
        """What ``keep_best`` compares: top-1 when the validation data has labels, else agreement."""
        return row.agreement if row.top1 is None else row.top1

    def better(self) -> bool:
        """Whether the last epoch measured at least as well as the kept one."""
        kept = next(row for row in self.epochs if row.epoch == self.kept)
        return self.score(self.epochs[-1]) >= self.score(kept)


def as_dataset(data: Any) -> Dataset:
    """A dataset of ``inputs`` or ``(inputs, target)`` items from a tensor, an ``(inputs, targets)`` pair or a
    dataset."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"inputs and targets differ in length: {len(data[0])} and {len(data[1])}")
        return TensorDataset(*data)
    raise TypeError(f"data must be a tensor, an (inputs, targets) pair or a Dataset, got {type(data).__name__}")


class ImageFiles(Dataset):
    """Images read on demand, resized and normalised as calibration images are (``init.data``); labelled by
    their subfolder (sorted names, as torchvision's ``ImageFolder``) when the folder has one per class."""

    def __init__(self, folder: str, shape: Tuple[int, ...]):
        from .init.data import IMAGE_SUFFIXES

        self.shape = shape
        self.files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                            if name.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
        parents = [os.path.relpath(os.path.dirname(f), folder).split(os.sep)[0] for f in self.files]
        self.classes = sorted(set(parents)) if "." not in parents else []
        self.labels = [self.classes.index(p) for p in parents] if self.classes else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from .init.data import _read_image

        x = _read_image(self.files[index], self.shape)
        return x if self.labels is None else (x, self.labels[index])


def read_dataset(path: str, shape: Tuple[int, ...]) -> Dataset:
    """Training data from a folder of images (``ImageFiles``) or a ``.pt`` file holding a tensor or an
    ``(inputs, targets)`` pair (read as plain data, no code runs)."""
    from .sources import read_data

    if os.path.isdir(path):
        return ImageFiles(path, shape)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file or folder: {path}")
    data = read_data(path, "training data file")
    dataset = as_dataset(tuple(data) if isinstance(data, list) else data)
    first = _split(dataset[0])[0]
    if tuple(first.shape) != tuple(shape) or not first.is_floating_point():
        raise ValueError(f"{path}: inputs must be floating-point samples of shape {tuple(shape)}, got "
                         f"{first.dtype} {tuple(first.shape)}")
    return dataset


def _split(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, scaled by its square (gradients keep
    their size whatever the temperature)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class Features:
    """Records the outputs of the converted layers in the student and of what they stand for in the teacher,
    for the feature term: the relative MSE between each Ghost module's output and the original layer's (its
    batch norm's, when the Ghost module took the norm in), the teacher's channels put in the student's order.
    Layers that run more than once are left out.

    Raises:
        ValueError: the student is not a ghostify model, or its file does not record its channel orders.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        result = getattr(student, "ghostify_result", None)
        rows = [row for row in getattr(result, "replaced", []) if row.calls == 1]
        if not rows:
            raise ValueError("the feature term needs a converted student (ghostify.convert or ghostify.load) with "
                             "converted layers that run once")
        if any(row.order is None for row in rows):
            raise ValueError("the feature term needs each converted layer's channel order, which files written "
                             "by earlier ghostify versions do not record; convert the model again")
        device = placement(student)[1]
        self.orders = [torch.tensor(row.order, device=device) for row in rows]
        self.maps: Dict[str, List[torch.Tensor]] = {"student": [], "teacher": []}
        self.recording = False
        self._handles = [module.register_forward_hook(self._keep(side))
                         for row in rows for side, module in (("student", student.get_submodule(row.name)),
                                                              ("teacher", teacher.get_submodule(row.norm or row.name)))]

    def _keep(self, side: str):
        def hook(module, args, output):
            if self.recording:  # training steps only: an evaluation pass keeps nothing
                self.maps[side].append(output)
        return hook

    def record(self) -> None:
        """Keep the layers' outputs of the next forward of each model, for ``loss``."""
        self.maps, self.recording = {"student": [], "teacher": []}, True

    def loss(self) -> torch.Tensor:
        """The mean relative MSE over the layers, from the forwards since ``record``."""
        pairs = zip(self.maps["student"], self.maps["teacher"], self.orders)
        terms = [F.mse_loss(ours.float(), theirs.float().index_select(1, order)) /
                 theirs.float().var().clamp_min(1e-12) for ours, theirs, order in pairs]
        self.maps, self.recording = {"student": [], "teacher": []}, False
        return torch.stack(terms).mean()

    def __enter__(self) -> "Features":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.maps, self.recording = {"student": [], "teacher": []}, False


def _distributed(device: torch.device) -> Tuple[int, int]:
    """(rank, world size); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _check_pair(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
    """Refuse, before any training, a teacher whose outputs on ``x`` are not shaped like the student's."""
    with eval_mode(student), eval_mode(teacher), torch.no_grad():
        ours, theirs = student(x), teacher(x)
    if ours.shape != theirs.shape:
        raise ValueError(f"the teacher's outputs ({tuple(theirs.shape)} for one sample) are not shaped like the "
                         f"student's ({tuple(ours.shape)}): the teacher must be the model the student was converted "
                         "from")


def _evaluate(student: nn.Module, teacher: nn.Module, loader: DataLoader, device: torch.device,
              world: int) -> Tuple[float, Optional[float]]:
    """Top-1 agreement with the teacher, and top-1 against the labels when there are labels (all ranks)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    student.eval()
    with torch.no_grad():
        for batch in loader:
            x, y = _split(batch)
            x = x.to(device)
            predicted = student(x).argmax(-1)
            counts[0] += (predicted == teacher(x).argmax(-1)).sum()
            counts[1] += len(x)
            if y is not None:
                counts[2] += (predicted == y.to(device)).sum()
    student.train()
    if world > 1:
        dist.all_reduce(counts)
    has_labels = _split(loader.dataset[0])[1] is not None
    return (counts[0] / counts[1]).item(), ((counts[2] / counts[1]).item() if has_labels else None)


@dataclass
class _Objective:
    """One batch's loss: KL divergence to the teacher's softened logits, mixed with cross-entropy on labels when
    the batch has them, plus ``feature_weight`` times the per-layer feature loss when ``features`` are kept."""

    temperature: float
    label_weight: float
    feature_weight: float
    features: Optional[Features]
    autocast: Any  # a context manager factory: autocast, or nullcontext

    def __call__(self, model: nn.Module, teacher: nn.Module, x: torch.Tensor,
                 y: Optional[torch.Tensor]) -> torch.Tensor:
        if self.features is not None:
            self.features.record()
        with torch.no_grad(), self.autocast():
            target = teacher(x).float()
        with self.autocast():
            logits = model(x).float()
        loss = kd_loss(logits, target, self.temperature)
        if y is not None:
            loss = (1 - self.label_weight) * loss + self.label_weight * F.cross_entropy(logits, y.to(x.device))
        if self.features is not None:
            loss = loss + self.feature_weight * self.features.loss()
        return loss


@dataclass
class _Training:
    """What each step updates and a checkpoint holds: the student, SGD with its cosine schedule, the gradient
    scaler (float16 autocast on CUDA) and the exponential moving average of the weights, if kept."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Optional[torch.optim.swa_utils.AveragedModel]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.student)

    def state_dict(self) -> Dict[str, Any]:
        state = {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    val_data: Any = None,
    epochs: int = 1,
    lr: Optional[float] = None,
    batch_size: int = 64,
    temperature: float = 4.0,
    label_weight: float = 0.5,
    feature_weight: float = 0.0,
    ema_decay: Optional[float] = None,
    amp: bool = False,
    keep_best: bool = True,
    output: Optional[str] = None,
    resume: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Distil ``teacher`` into ``student`` (trained in place, on its own device) and return it.

    Args:
        data: training inputs: a tensor, an ``(inputs, targets)`` pair or a Dataset (of inputs, or of
            ``(input, target)`` items); labels are optional.
        val_data: the same kinds, measured after every epoch (default: the training data).
        lr: peak learning rate of SGD with momentum 0.9 and a cosine schedule over all steps; by default
            ``CALIBRATED_LR`` for a student whose Ghost modules were fitted on data (converted with
            ``init="calibrate"`` or ``"reconstruct"``: it starts close to the teacher, and larger steps take it
            away first), else ``LR``.
        temperature: softening of both models' logits in the KL term.
        label_weight: with labels, the loss is ``(1 - label_weight) * KL + label_weight * cross-entropy``.
        feature_weight: adds ``feature_weight`` times the mean relative MSE between each converted layer's
            output and the original layer's (``Features``); 0: logits only.
        ema_decay: keep an exponential moving average of the student's weights (e.g. 0.999) and return it.
        amp: autocast (bfloat16 on the CPU, float16 with a gradient scaler on CUDA).
        keep_best: give back the weights that measured best on the validation data (top-1 when it has
            labels, else agreement with the teacher), the start's included: a run that takes the student
            away from the teacher returns what it was given. False: the last epoch's weights.
        output: a ghostify file written (atomically) after every epoch, holding what ``finetune`` would return
            if it stopped there, with ``OUTPUT.state.pt`` holding what ``resume`` needs; an interrupted run
            leaves the last complete epoch.
        resume: continue from ``output`` and its state file.

    Returns:
        The student (or its EMA), with ``ghostify_finetune`` (a ``Finetuned``) listing each epoch's figures,
        the start's as epoch 0, and which epoch's weights it holds.
    """
    if lr is None:
        lr = CALIBRATED_LR if getattr(getattr(student, "ghostify_result", None), "init", None) in DATA_METHODS else LR
    if epochs < 1 or batch_size < 1 or lr <= 0 or temperature <= 0 or not 0 <= label_weight <= 1 or feature_weight < 0:
        raise ValueError("epochs and batch_size must be positive, lr and temperature above 0, label_weight "
                         "in [0, 1], feature_weight at least 0")
    if resume and output is None:
        raise ValueError("resume needs output (the file of an earlier run)")
    if resume and not os.path.isfile(f"{output}.state.pt"):
        raise FileNotFoundError(f"nothing to resume: no {output}.state.pt (what a run writes beside its output "
                                "after each epoch); leave out resume to start")
    dataset, val = as_dataset(data), as_dataset(val_data if val_data is not None else data)
    _, device = placement(student)
    rank, world = _distributed(device)
    teacher = teacher.to(device)
    _check_pair(student, teacher, _split(dataset[0])[0][None].to(device))
    student.train()
    loader, val_loader, reseed = _loaders(dataset, val, batch_size, rank, world, seed)
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    ema = (torch.optim.swa_utils.AveragedModel(student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        ema_decay)) if ema_decay is not None else None)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    training = _Training(student, optimizer, schedule,
                         torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda"), ema)
    result = ema.module if ema is not None else student  # what is measured, written and returned
    features = Features(student, teacher) if feature_weight > 0 else None  # after the EMA copy: it copies hooks
    history, start_epoch, best = Finetuned(lr=lr), 0, None
    state_path = None if output is None else f"{output}.state.pt"
    if resume:
        start_epoch, best = _resume(state_path, device, training, history, result, keep_best)
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16 if device.type == "cpu" else torch.float16)) \
        if amp else nullcontext
    objective = _Objective(temperature, label_weight, feature_weight, features, autocast)
    # the teacher runs in eval mode (and without gradients); its flags come back afterwards
    with eval_mode(teacher), features if features is not None else nullcontext():
        if not history.epochs:  # the start, which keep_best may give back
            began = time.monotonic()
            agreement, top1 = _evaluate(result, teacher, val_loader, device, world)
            history.epochs.append(Epoch(0, None, agreement, top1, time.monotonic() - began))
            best = copy.deepcopy(result.state_dict()) if keep_best else None
        with progress("epoch {description}, loss {loss:.4f}, {rate:.0f} images/s", show=rank == 0) as bar:
            for epoch in range(start_epoch, epochs):
                reseed(epoch)
                task = bar.add_task(f"{epoch + 1}/{epochs}", total=len(loader), loss=UNKNOWN, rate=0.0) \
                    if bar else None
                began, seen, running = time.monotonic(), 0, 0.0
                for batch in loader:
                    x, y = _split(batch)
                    loss = objective(model, teacher, x.to(device), y)
                    training.step(loss)
                    seen += len(x) * world
                    running = loss.item() if not running else 0.9 * running + 0.1 * loss.item()
                    if bar:
                        bar.update(task, advance=1, loss=running, rate=seen / max(time.monotonic() - began, 1e-9))
                agreement, top1 = _evaluate(result, teacher, val_loader, device, world)
                history.epochs.append(Epoch(epoch + 1, running, agreement, top1, time.monotonic() - began))
                if not keep_best or history.better():
                    history.kept, best = epoch + 1, copy.deepcopy(result.state_dict()) if keep_best else None
                if rank == 0 and output is not None:
                    _checkpoint(result, training, history, best, output, state_path)
                if world > 1:
                    dist.barrier()
    if history.kept != history.epochs[-1].epoch:  # an earlier epoch, or the start, measured better
        result.load_state_dict(best)
    result.ghostify_finetune = history
    return result


def _loaders(dataset: Dataset, val: Dataset, batch_size: int, rank: int, world: int, seed: int):
    """The shuffled training loader (each process its share under DDP), the validation loader, and a function
    that seeds an epoch's order from the seed and the epoch alone, so that a resumed run repeats it."""
    generator = torch.Generator().manual_seed(seed)
    sampler = (DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if world > 1
               else RandomSampler(dataset, generator=generator))
    loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=len(dataset) >= batch_size * world)
    val_loader = DataLoader(val, batch_size, sampler=DistributedSampler(val, world, rank, shuffle=False)
                            if world > 1 else None)

    def reseed(epoch: int) -> None:
        if world > 1:
            sampler.set_epoch(epoch)
        else:
            generator.manual_seed(seed + epoch)

    return loader, val_loader, reseed


def _resume(state_path: str, device: torch.device, training: _Training, history: Finetuned, result: nn.Module,
            keep_best: bool) -> Tuple[int, Optional[Dict[str, torch.Tensor]]]:
    """Load an earlier run's state into ``training`` and ``history``; returns the epoch to go on from and the
    weights kept so far."""
    state = torch.load(state_path, map_location=device, weights_only=True)
    training.load_state_dict(state)
    start_epoch = state["epoch"]
    history.epochs = [Epoch(**row) for row in state["history"]]
    history.kept, best = state.get("kept", start_epoch), state.get("best")
    if not keep_best:  # the last epoch is what comes back, whatever the earlier run kept
        history.kept, best = start_epoch, None
    elif best is None:  # the earlier run kept its last epoch: the one loaded
        best = copy.deepcopy(result.state_dict())
    return start_epoch, best


def _checkpoint(result: nn.Module, training: _Training, history: Finetuned,
                best: Optional[Dict[str, torch.Tensor]], output: str, state_path: str) -> None:
    """The ghostify file (the kept weights) and the state ``resume`` reads, each written atomically (state
    first)."""
    state: Dict[str, Any] = {**training.state_dict(), "epoch": history.epochs[-1].epoch,
                             "history": [vars(row) for row in history.epochs], "kept": history.kept}
    if best is not None:
        state["best"] = best
    atomic_write(state_path, lambda temp: torch.save(state, temp))
    if history.kept != history.epochs[-1].epoch:
        result = copy.deepcopy(result)
        result.load_state_dict(best)
    save(result, output)
