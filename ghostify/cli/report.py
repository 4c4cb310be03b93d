"""``ghostify report`` and ``ghostify models``: counts for one model (or a ghostify file), the names MODEL takes."""

from __future__ import annotations

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
    _original_of,
    _print_report,
    _status,
    _to_device,
    main,
)


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

    from ..serialization import load_model

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


@main.command()
def models() -> None:
    """List the model names MODEL accepts."""
    from ..sources import torchvision_names, zoo_names

    for title, names in (("ghostify zoo", zoo_names()), ("torchvision", torchvision_names())):
        click.echo(f"# {title}")
        for name in names:
            click.echo(name)
    click.echo("# also: timm:NAME (with timm installed), package.module:factory, path/to/file.py:factory")
