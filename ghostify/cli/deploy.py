"""``ghostify export`` and ``ghostify bench``: the deploy form written for other runtimes, and timed."""

from __future__ import annotations

import warnings

import click

from .app import (
    ARCH,
    DEVICE,
    INPUT_SIZE,
    JSON,
    MODEL,
    TRUST_SOURCE,
    _input_sizes,
    _inputs,
    _odd,
    _only_with,
    _original_of,
    _print_report,
    _status,
    _to_device,
    _writable,
    main,
)


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
    from ..exporting import export as export_model
    from ..serialization import load_model

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
@click.option("--s", "s", type=click.IntRange(min=2), default=2, show_default=True,
              help="Ghost ratio when MODEL is converted here.")
@click.option("--d", "d", type=int, default=3, show_default=True, callback=_odd,
              help="Cheap kernel when MODEL is converted here.")
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

    from ..latency import bench as run_bench
    from ..serialization import load_model

    with _status(f"Building {model}", as_json):
        original = load_model(model, trust_source=trust_source, arch=arch if ghost_file is None else None)
        converted = load_model(ghost_file, trust_source=trust_source, arch=arch) if ghost_file else None
        if converted is None and getattr(original, "ghostify_result", None) is not None:
            converted, original = original, _original_of(model, original, arch, trust_source)
        elif converted is not None:
            _check_same_source(model, ghost_file, converted)
        _only_with(converted is None, "a MODEL that bench converts itself", f"the ghostify file {ghost_file or model}",
                   "s", "d")
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
    from ..sources import describe, parse

    recorded, given = converted.ghostify_result.source, parse(model)
    if recorded is None or given.get("kind") == "ghostify_file":
        return
    keys = ("kind", "name", "module", "factory")
    if any(recorded.get(key) != given.get(key) for key in keys):
        raise ValueError(f"{ghost_file} was converted from {describe(recorded)}, not {model}; bench the model it "
                         "came from")
