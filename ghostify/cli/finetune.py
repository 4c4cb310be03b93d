"""``ghostify finetune``: label-free distillation of a ghostify file from its original."""

from __future__ import annotations

import os

import click

from .app import ARCH, DEVICE, INPUT_SIZE, MODEL, TRUST_SOURCE, _input_sizes, _to_device, _writable, main


@main.command()
@click.argument("ghost_file", type=click.Path(dir_okay=False))
@click.option("--teacher", required=True, type=MODEL, help="The original model (any MODEL string).")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help="A state_dict to load into the teacher.")
@click.option("--data", "data_path", required=True, type=click.Path(), metavar="PATH",
              help="Training inputs: an image folder (labels from class subfolders when present) or a .pt file of "
                   "a tensor or an (inputs, targets) pair. Labels are optional.")
@click.option("--val-data", type=click.Path(), metavar="PATH", help="Measured after every epoch (default: --data).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate (SGD, momentum 0.9, cosine schedule); default 0.001 for a GHOST_FILE converted "
                   "with --init calibrate or reconstruct, else 0.01.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Per process.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Softening of both models' logits in the distillation loss.")
@click.option("--label-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With labels: weight of the cross-entropy against the distillation loss.")
@click.option("--feature-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of a feature term: relative MSE of each converted layer's output against the "
                   "original layer's (0: logits only).")
@click.option("--ema", "ema_decay", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="DECAY",
              help="Keep and write an exponential moving average of the weights (e.g. 0.999).")
@click.option("--amp", is_flag=True, help="Mixed precision (bfloat16 on the CPU, float16 on CUDA).")
@click.option("--keep-last", is_flag=True,
              help="Write the last epoch's weights, not those that measured best on the validation data (top-1 "
                   "with labels, else agreement with the teacher; the start counts as epoch 0).")
@click.option("--resume", is_flag=True, help="Continue the run that wrote OUT (and OUT.state.pt).")
@INPUT_SIZE
@TRUST_SOURCE
@ARCH
@DEVICE
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The fine-tuned ghostify file, written after every epoch.")
def finetune(ghost_file, teacher, teacher_weights, data_path, val_data, epochs, lr, batch_size, temperature,
             label_weight, feature_weight, ema_decay, amp, keep_last, resume, input_size, trust_source, arch, device,
             force, output) -> None:
    """Distil the original model (--teacher) into a converted GHOST_FILE; runs unchanged under torchrun."""
    import ghostify

    from ..distillation import read_dataset
    from ..serialization import load_model

    if not resume:
        _writable(output, force)
    if device is not None and device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process under torchrun
    student = _to_device(load_model(ghost_file, trust_source=trust_source, arch=arch), device)
    if getattr(student, "ghostify_result", None) is None:
        raise ValueError(f"{ghost_file} is not a ghostify file (convert a model first)")
    source = _to_device(load_model(teacher, teacher_weights, trust_source), device)
    shape = tuple(input_size) if input_size else _input_sizes(ghost_file, student)[0]
    data = read_dataset(data_path, shape)
    val = read_dataset(val_data, shape) if val_data else None
    tuned = ghostify.finetune(student, source, data, val_data=val, epochs=epochs, lr=lr, batch_size=batch_size,
                              temperature=temperature, label_weight=label_weight, feature_weight=feature_weight,
                              ema_decay=ema_decay, amp=amp, keep_best=not keep_last, output=output, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        history = tuned.ghostify_finetune
        for row in history.epochs:
            what = "start" if row.epoch == 0 else f"epoch {row.epoch}: loss {row.loss:.4f},"
            top1 = "" if row.top1 is None else f", top-1 {row.top1:.1%}"
            click.echo(f"{what} agreement with the teacher {row.agreement:.1%}{top1}", err=True)
        kept = "the start: no epoch measured better" if history.kept == 0 else f"epoch {history.kept}"
        click.echo(f"wrote {output} ({kept}; peak lr {history.lr:g})", err=True)
