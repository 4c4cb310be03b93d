"""The ``ghostify`` command group and what its commands share: parameter types, options, helpers.

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
        from ..sources import parse

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
    from ..trace import random_inputs

    if input_size and len(sizes) > 1:
        raise ValueError(f"the model takes {len(sizes)} inputs and --input-size sets one; leave it out to use the "
                         "sizes it was converted at")
    return random_inputs(model, *[(1, *size) for size in ([input_size] if input_size else sizes)])


def _writable(output: str, force: bool) -> None:
    """``files.check_output`` before any work, its "exists" error in the command line's words."""
    from ..files import check_output

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
    from ..sources import default_input_size, parse
    from ..trace import input_sizes

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


def _odd(_ctx, _param, value: int) -> int:
    """A cheap kernel size given as an option (a click callback), checked by the module's own rule
    (``check_cheap_kernel``)."""
    from ..module import check_cheap_kernel

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


def _original_of(text: str, loaded, arch: Optional[str], trust_source: bool):
    """The original model a ghostify file was converted from: ``--arch``, else the file's record."""
    from ..serialization import build_source, load_model

    if arch is not None:
        return load_model(arch)
    return build_source(loaded.ghostify_result.source, text, trust_source)
