"""The ``ghostify`` command: a thin click layer over the Python API.

Errors are turned into one line on stderr in one place (``GhostifyGroup.invoke``): exit code 2 for bad
input, 1 for anything else; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator, List, Optional, Sequence, Tuple

import click

BAD_INPUT = (ValueError, TypeError, OSError, ImportError)  # OSError: missing, existing, unwritable files; full disk


def _version() -> str:
    try:
        return version("ghostify")
    except PackageNotFoundError:
        return "unknown"


class ModelParam(click.ParamType):
    """A MODEL string: torchvision or zoo name, timm:NAME, module:factory, file.py:factory, ghostify file."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        from .sources import parse

        try:
            parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        return value


_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class _WarningPrinter:
    """Prints each distinct warning once, on one line, when it is first raised (before the long work it warns
    about, not after); deprecation notices are about libraries' APIs, not the user's model, and are left out."""

    def __init__(self) -> None:
        self.seen = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip().splitlines()[0] if str(message).strip() else ""
        if issubclass(category, _LIBRARY_NOISE) or (category.__name__, text) in self.seen:
            return
        self.seen.add((category.__name__, text))
        kind = "" if category is UserWarning else f" ({category.__name__})"
        click.echo(f"warning{kind}: {text}", err=True)


class GhostifyGroup(click.Group):
    """A command group that reports library errors, and click's own usage errors, as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = _gather_sizes(sys.argv[1:] if args is None else args)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "ghostify"
            click.echo(f"error: {error.format_message()} (see '{command} --help')", err=True)
            sys.exit(2)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = _WarningPrinter()
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # stdout's reader stopped (``ghostify models | head``): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            sys.exit(1)
        except Exception as error:  # noqa: BLE001 - the single place errors become messages
            if ctx.params.get("debug"):
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(2 if isinstance(error, BAD_INPUT) else 1)


@contextmanager
def _status(message: str, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while slow work runs (silent when stderr is not a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def _inputs(input_size: Optional[Tuple[int, ...]], sizes: Sequence[Tuple[int, ...]], model):
    """Random example inputs in ``model``'s dtype and on its device: one of ``input_size`` when given, else one
    per entry of ``sizes`` (``_input_sizes``)."""
    from .trace import random_inputs

    if input_size and len(sizes) > 1:
        raise ValueError(f"the model takes {len(sizes)} inputs and --input-size sets one; leave it out to use the "
                         "sizes it was converted at")
    return random_inputs(model, *[(1, *size) for size in ([input_size] if input_size else sizes)])


def _writable(output: str, force: bool) -> None:
    """``files.check_output`` before any work, its "exists" error in the command line's words."""
    from .files import check_output

    try:
        check_output(output, overwrite=force)
    except FileExistsError:
        raise FileExistsError(f"{output} exists; pass --force to replace it") from None


def _to_device(model, device: Optional[str]):
    """``model`` moved to ``device`` (None: where it is), with a clear error for a device torch cannot use."""
    if device is None:
        return model
    import torch

    try:
        target = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device on this machine")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return model.to(target)


def _input_sizes(text: str, loaded) -> List[Tuple[int, ...]]:
    """The per-sample sizes of the inputs MODEL was converted at (a ghostify file), or its default size."""
    from .sources import default_input_size, parse
    from .trace import input_sizes

    return input_sizes(loaded, default=default_input_size(parse(text)))


def _print_report(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped: wide enough that no column of the layer table is squeezed away
            console = Console(width=220)
        console.print(report)


MODEL = ModelParam()


class Numbers(click.ParamType):
    """Integers given as separate numbers (``--input-size 3 224 224``, joined by ``_gather_sizes``), each passing
    ``rule``, ``low`` to ``high`` of them; ``what`` says what is needed."""

    def __init__(self, name: str, what: str, rule, low: int = 1, high: int = 8) -> None:
        self.name, self.what, self.rule, self.low, self.high = name, what, rule, low, high

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if not self.low <= len(parts) <= self.high or not all(p.isdigit() and self.rule(int(p)) for p in parts):
            self.fail(f"needs {self.what}, got {' '.join(parts)!r}", param, ctx)
        return tuple(int(part) for part in parts)


def _only_with(allowed: bool, needs: str, got: str, *params: str) -> None:
    """Refuse options given on the command line that only mean something with ``needs``."""
    ctx = click.get_current_context()
    given = [f"--{p.replace('_', '-')}" for p in params
             if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
    if given and not allowed:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only used with {needs}, got {got}")


def _odd(value: int) -> int:
    """A cheap kernel size given as an option, checked by the module's own rule (``check_cheap_kernel``)."""
    from .module import check_cheap_kernel

    try:
        return check_cheap_kernel(value)
    except ValueError as error:
        raise click.BadParameter(str(error).removeprefix("d ")) from None


def _gather_sizes(args):
    """``--input-size 3 224 224`` as one token ``3,224,224`` (click options take a fixed number of values; an
    input size takes 2 to 4: C L, C H W or C D H W), and ``analyze``'s ``--d 1 3 5 7`` as ``1,3,5,7``."""
    lists = {"--input-size": 4, **({"--d": 8} if "analyze" in args else {})}
    out, rest = [], list(args)
    while rest:
        token = rest.pop(0)
        out.append(token)
        if token in lists:
            numbers = []
            while rest and len(numbers) < lists[token] and rest[0].lstrip("-").isdigit():  # -64: refused as a size
                numbers.append(rest.pop(0))
            out.append(",".join(numbers) if numbers else (rest.pop(0) if rest else ""))
    return out


INPUT_SIZE = click.option("--input-size", type=Numbers("C [D] H W", "2 to 4 positive integers (C L, C H W or C D H W)",
                                                        lambda v: v > 0, 2, 4), metavar="C [D] H W",
                          help="Example input size: C H W for images, C L for 1-D (audio) and C D H W for 3-D "
                               "(video) models (default: the model's own, usually 3 224 224).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, nothing else.")
TRUST_SOURCE = click.option("--trust-source", is_flag=True,
                            help="Allow rebuilding a ghostify file whose architecture comes from Python code "
                                 "(module:factory or file.py:factory); only for files you trust.")
DEVICE = click.option("--device", metavar="DEVICE",
                      help="Run on this torch device (cpu, cuda, cuda:1); synthetic inputs, fits and counts follow "
                           "the model's device and dtype. Default: where the model is (the CPU).")
ARCH = click.option("--arch", metavar="MODEL", type=MODEL,
                    help="The original architecture of a ghostify file (a MODEL string), for files converted from "
                         "a Python object or from code; used instead of the file's own record.")


@click.group(cls=GhostifyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(_version(), prog_name="ghostify")
def main(debug: bool) -> None:
    """Turn a PyTorch CNN into a cheaper GhostNet-style network.

    MODEL is a torchvision classification model name, a ghostify zoo name, timm:NAME, package.module:factory,
    path/to/file.py:factory, or a file written by ghostify.
    """


@main.command()
@click.argument("model", type=MODEL)
@click.option("--s", "s", type=int, default=2, show_default=True, help="Ghost ratio: 1/s of the maps are intrinsic.")
@click.option("--d", "d", type=int, default=3, show_default=True, help="Kernel of the cheap depthwise operation (odd).")
@click.option("--primary-kernel", type=int, help="Kernel of the primary conv (default: each conv's own).")
@click.option("--include", multiple=True, metavar="PAT", help="Only convert layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, metavar="PAT", help="Leave layers matching this glob alone (repeatable).")
@click.option("--include-stem", is_flag=True, help="Also convert the conv that sees the raw input.")
@INPUT_SIZE
@click.option("--weights", type=click.Path(dir_okay=False), help="A state_dict to load into MODEL first.")
@click.option("--init", type=click.Choice(["copy", "calibrate", "reconstruct", "random"]), default="copy",
              show_default=True, help="How the Ghost modules' weights start: from the original filters, fitted per "
              "layer on --calib-data, fitted per layer then tuned per block on it, or fresh.")
@click.option("--calib-data", type=click.Path(), metavar="PATH",
              help="Calibration inputs for --init calibrate/reconstruct: an image folder or a .pt file of an "
                   "(N, C, H, W) tensor.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="How many calibration inputs to use.")
@click.option("--recon-steps", type=click.IntRange(min=0), metavar="N",
              help="--init reconstruct: Adam steps per block (default 200).")
@click.option("--recon-seconds", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="--init reconstruct: time budget for tuning all blocks (default: none).")
@click.option("--recon-network", is_flag=True,
              help="--init reconstruct: then tune every Ghost module together on the model's output.")
@click.option("--recon-mix", type=click.FloatRange(0, 1), metavar="P",
              help="--init reconstruct: take each element of a block's tuning input from the original model with "
                   "probability P (QDrop; default 0).")
@click.option("--keep-head", is_flag=True,
              help="--init calibrate/reconstruct: leave the linear layers after the last Ghost module (a classifier) "
                   "as they are; by default they are refitted to the original's outputs.")
@click.option("--no-mirror", is_flag=True,
              help="--init calibrate/reconstruct: fit on the calibration inputs only; by default a layer that sees "
                   "fewer output positions than its filters have weights is also fitted on flipped copies.")
@click.option("--form", type=click.Choice(["ghostnet", "linear"]), default="ghostnet", show_default=True,
              help="ghostnet: a conv and the batch norm after it become one Ghost module (folds exactly at deploy); "
                   "linear: the norm stays after a linear Ghost module.")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime", "inductor"]),
              help="Time each layer alone as a conv and as a Ghost module in this runtime's deploy form, and keep "
                   "as convs the layers a Ghost module does not make faster.")
@click.option("--runtime-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="--runtime: the batch size to time at.")
@click.option("--target-flops", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="Choose each layer's s (2..5, or keep the conv) to keep this fraction of the FLOPs, losing "
                   "the least in the layers' fits.")
@click.option("--target-latency", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="The same for this fraction of the latency in --runtime at --runtime-batch, layers timed there.")
@click.option("--align", type=click.IntRange(min=1), metavar="N",
              help="Make intrinsic maps and ghost runs multiples of N channels where a layer's width allows "
                   "(runtimes' SIMD blocks); 1: ceil(n / s) intrinsic maps. Default: ghostify.convert's.")
@JSON
@TRUST_SOURCE
@ARCH
@DEVICE
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
def convert(model, s, d, primary_kernel, include, exclude, include_stem, input_size, weights, init, calib_data,
            calib_samples, recon_steps, recon_seconds, recon_network, recon_mix, keep_head, no_mirror, form,
            runtime, runtime_batch, target_flops, target_latency, align, as_json, trust_source, arch, device, force,
            output) -> None:
    """Convert MODEL's convolutions (Conv1d, Conv2d, Conv3d) to Ghost modules, print the report, write OUT."""
    _writable(output, force)
    from .init import DATA_METHODS

    if init in DATA_METHODS and calib_data is None:
        raise ValueError(f"--init {init} needs --calib-data PATH (an image folder or a .pt tensor file)")
    _only_with(init in DATA_METHODS, "--init calibrate or reconstruct", f"--init {init}", "calib_data", "keep_head",
               "no_mirror")
    _only_with(init == "reconstruct", "--init reconstruct", f"--init {init}", "recon_steps", "recon_seconds",
               "recon_network", "recon_mix")
    _only_with(runtime is not None, "--runtime", "no --runtime", "runtime_batch")
    import ghostify

    from .serialization import load_model

    with _status(f"Building {model}", as_json):
        source = _to_device(load_model(model, weights, trust_source, arch), device)
    inputs = _inputs(input_size, _input_sizes(model, source), source)
    calibration = None
    if calib_data is not None:
        from .init.data import load_calibration

        calibration = load_calibration(calib_data, tuple(inputs[0].shape[1:]), calib_samples)
        found = sum(len(batch[0]) for batch in calibration)
        if found < calib_samples:
            warnings.warn(f"{calib_data} holds {found} calibration inputs, fewer than --calib-samples "
                          f"{calib_samples}; calibrating on {found}", UserWarning, stacklevel=1)
    # calibration and layer timing show their own progress
    busy = init in DATA_METHODS or runtime is not None or target_flops is not None
    with _status("Converting and counting", as_json or busy):
        ghost = ghostify.convert(source, s=s, d=d, primary_kernel=primary_kernel, include=include or None,
                                 exclude=exclude or None, include_stem=include_stem, example_inputs=inputs, init=init,
                                 calibration_data=calibration, calibration_samples=calib_samples,
                                 absorb_norm=form == "ghostnet", reconstruct_seconds=recon_seconds,
                                 reconstruct_network=recon_network, reconstruct_mix=recon_mix or 0.0,
                                 refit_head=not keep_head, calibration_mirror=not no_mirror, runtime=runtime,
                                 runtime_batch=runtime_batch,
                                 target_flops=target_flops, target_latency=target_latency,
                                 **({} if align is None else {"align": align}),
                                 **({} if recon_steps is None else {"reconstruct_steps": recon_steps}))
        report = ghostify.report(source, ghost, inputs, name=model)
    ghostify.save(ghost, output, overwrite=True)
    _print_report(report, as_json)
    if not as_json:
        click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("model", type=MODEL)
@click.option("--images", required=True, type=click.Path(), metavar="PATH",
              help="Real inputs: an image folder or a .pt file of an (N, C, H, W) tensor (64 are used).")
@click.option("--layer", "tables", multiple=True, metavar="NAME",
              help="Give the paper's Table 2 for this module's output maps (repeatable), e.g. layer1.0.")
@click.option("--d", "sizes", type=Numbers("D...", "odd positive integers", lambda v: v % 2 == 1),
              default="1,3,5,7", show_default=True,
              help="Depthwise filter sizes for --layer's table.")
@click.option("--cheap-d", type=int, default=3, show_default=True, callback=lambda _ctx, _param, value: _odd(value),
              help="Cheap kernel the per-layer scores assume (odd).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="The suggested s loses at most this share of a layer's output energy.")
@click.option("--plot", type=click.Path(file_okay=False), metavar="DIR", help="Write PNG figures here (matplotlib).")
@click.option("--original", "original_model", type=MODEL,
              help="With a ghostify file, --layer and --plot: the model it was converted from (any MODEL string); "
                   "the figures then show each Ghost module's intrinsic and ghost maps beside the original's.")
@click.option("--original-weights", type=click.Path(dir_okay=False), help="A state_dict to load into --original.")
@INPUT_SIZE
@JSON
@TRUST_SOURCE
@ARCH
@DEVICE
def analyze(model, images, tables, sizes, cheap_d, tolerance, plot, original_model, original_weights, input_size,
            as_json, trust_source, arch, device) -> None:
    """Measure how redundant MODEL's feature maps are on real images: per layer, the output energy s-1 cheap
    maps of the best 1/s maps cannot reproduce, and the s it suggests; the paper's Table 2 for --layer."""
    from .init.data import load_calibration
    from .redundancy import IMAGES
    from .redundancy import analyze as measure
    from .serialization import load_model

    if plot is not None:
        from .figures import require_matplotlib

        require_matplotlib()
    with _status(f"Building {model}", as_json):
        loaded = _to_device(load_model(model, trust_source=trust_source, arch=arch), device)
    import torch

    from .trace import placement

    shape = tuple(input_size) if input_size else _input_sizes(model, loaded)[0]
    batches = load_calibration(images, tuple(shape), IMAGES)
    dtype, where = placement(loaded)
    inputs = torch.cat([batch[0] for batch in batches]).to(dtype=dtype, device=where)
    if original_model is not None and (plot is None or not tables or getattr(loaded, "ghostify_result", None) is None):
        raise ValueError("--original is for a ghostify file's figures: give it with --layer and --plot")
    original = None if original_model is None else _to_device(
        load_model(original_model, original_weights, trust_source), device)
    result = measure(loaded, inputs, tables=tables, d=cheap_d, sizes=sizes, tolerance=tolerance, plot=plot,
                     name=model, progress=True, original=original)
    _print_report(result, as_json)
    for path in result.figures if not as_json else ():
        click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("model", type=MODEL)
@INPUT_SIZE
@JSON
@TRUST_SOURCE
@ARCH
@DEVICE
def report(model, input_size, as_json, trust_source, arch, device) -> None:
    """Count FLOPs and params of MODEL (before and after, for a ghostify file)."""
    import ghostify

    from .serialization import load_model

    with _status(f"Counting {model}", as_json):
        loaded = _to_device(load_model(model, trust_source=trust_source, arch=arch), device)
        inputs = _inputs(input_size, _input_sizes(model, loaded), loaded)
        result = getattr(loaded, "ghostify_result", None)
        if result is None:
            summary = ghostify.report(loaded, None, inputs, name=model)
        elif result.source is None and arch is None:  # converted from a Python object: no original to rebuild
            summary = ghostify.report(loaded, None, inputs, name=model)
        else:
            original = _to_device(_original_of(model, loaded, arch, trust_source), device)
            summary = ghostify.report(original, loaded, inputs, name=arch or (result.source or {}).get("name", model))
    _print_report(summary, as_json)


def _original_of(text: str, loaded, arch: Optional[str], trust_source: bool):
    """The original model a ghostify file was converted from: ``--arch``, else the file's record."""
    from .serialization import build_source, load_model

    if arch is not None:
        return load_model(arch)
    return build_source(loaded.ghostify_result.source, text, trust_source)


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

    from .distillation import read_dataset
    from .serialization import load_model

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


@main.command()
def models() -> None:
    """List the model names MODEL accepts."""
    from .sources import torchvision_names, zoo_names

    for title, names in (("ghostify zoo", zoo_names()), ("torchvision", torchvision_names())):
        click.echo(f"# {title}")
        for name in names:
            click.echo(name)
    click.echo("# also: timm:NAME (with timm installed), package.module:factory, path/to/file.py:factory")


@main.command()
@click.argument("model", type=MODEL)
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "pt2"]), default="onnx", show_default=True,
              help="onnx (checked with onnxruntime), torchscript (torch.jit.load) or pt2 (torch.export.load).")
@INPUT_SIZE
@click.option("--dynamic-batch", is_flag=True, help="Let the batch size vary in the exported file.")
@TRUST_SOURCE
@ARCH
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the export.")
def export(model, fmt, input_size, dynamic_batch, trust_source, arch, force, output) -> None:
    """Export MODEL (usually a ghostify file) in its deploy form: BNs folded, ready to run without ghostify."""
    from .exporting import export as export_model
    from .serialization import load_model

    _writable(output, force)
    with _status(f"Exporting {model} as {fmt}"):
        loaded = load_model(model, trust_source=trust_source, arch=arch).eval()
        if getattr(loaded, "ghostify_result", None) is None:
            warnings.warn(f"{model} is not a ghostify file: exporting the original model, unconverted "
                          "(convert it first: ghostify convert MODEL -o FILE)", UserWarning, stacklevel=1)
        done = export_model(loaded, output, fmt, input_size=input_size or _input_sizes(model, loaded),
                            dynamic_batch=dynamic_batch, overwrite=force)
    shapes = done.input_shape if isinstance(done.input_shape[0], tuple) else (done.input_shape,)
    click.echo(f"wrote {done.path} ({fmt}, input {', '.join('x'.join(map(str, shape)) for shape in shapes)}"
               f"{', dynamic batch' if dynamic_batch else ''}); max abs diff vs PyTorch: {done.max_abs_diff:.2e} "
               f"({done.max_rel_diff:.2e} of the output's largest magnitude)")


@main.command()
@click.argument("model", type=MODEL)
@click.argument("ghost_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1),
              help="Batch size (repeatable; default 1 and 16).")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime", "inductor"]), default="torch", show_default=True,
              help="torch: eager; inductor: torch.compile with freezing (compiles each model first, minutes); "
                   "onnxruntime: exported to ONNX.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads (default: torch's setting).")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs per model.")
@click.option("--s", "s", type=int, default=2, show_default=True, help="Ghost ratio when MODEL is converted here.")
@click.option("--d", "d", type=int, default=3, show_default=True, help="Cheap kernel when MODEL is converted here.")
@INPUT_SIZE
@JSON
@TRUST_SOURCE
@ARCH
@DEVICE
def bench(model, ghost_file, batches, runtime, threads, repeats, s, d, input_size, as_json, trust_source, arch,
          device) -> None:
    """Latency of MODEL vs its Ghost version (GHOST_FILE, MODEL itself if it is a ghostify file, or converted
    here with --s/--d), both in deploy form, interleaved; median of the repeats."""
    import ghostify

    from .latency import bench as run_bench
    from .serialization import load_model

    with _status(f"Building {model}", as_json):
        original = load_model(model, trust_source=trust_source, arch=arch if ghost_file is None else None)
        converted = load_model(ghost_file, trust_source=trust_source, arch=arch) if ghost_file else None
        if converted is None and getattr(original, "ghostify_result", None) is not None:
            converted, original = original, _original_of(model, original, arch, trust_source)
        elif converted is not None:
            _check_same_source(model, ghost_file, converted)
        sizes = [tuple(input_size)] if input_size else _input_sizes(ghost_file or model, converted if converted
                                                                     is not None else original)
        original = _to_device(original, device)
        converted = _to_device(converted, device) if converted is not None else None
        if converted is None:
            converted = ghostify.convert(original, s=s, d=d, example_inputs=_inputs(None, sizes, original))
    result = run_bench(original.eval(), converted.eval(), batches=batches or (1, 16), runtime=runtime,
                       threads=threads, repeats=repeats, input_size=sizes, name=model, progress=not as_json)
    _print_report(result, as_json)


def _check_same_source(model: str, ghost_file: str, converted) -> None:
    """Refuse to compare a ghostify file with a MODEL it was not converted from."""
    from .sources import describe, parse

    recorded, given = converted.ghostify_result.source, parse(model)
    if recorded is None or given.get("kind") == "ghostify_file":
        return
    keys = ("kind", "name", "module", "factory")
    if any(recorded.get(key) != given.get(key) for key in keys):
        raise ValueError(f"{ghost_file} was converted from {describe(recorded)}, not {model}; bench the model it "
                         "came from")
