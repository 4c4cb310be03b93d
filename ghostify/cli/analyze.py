"""``ghostify analyze``: how redundant MODEL's feature maps are on real images (the paper's Table 2)."""

from __future__ import annotations

import click

from .app import (
    ARCH,
    DEVICE,
    INPUT_SIZE,
    JSON,
    MODEL,
    TRUST_SOURCE,
    Numbers,
    _input_sizes,
    _odd,
    _print_report,
    _status,
    _to_device,
    main,
)


@main.command()
@click.argument("model", type=MODEL)
@click.option("--images", required=True, type=click.Path(), metavar="PATH",
              help="Real inputs: an image folder or a .pt file of an (N, C, H, W) tensor (64 are used).")
@click.option("--layer", "tables", multiple=True, metavar="NAME",
              help="Give the paper's Table 2 for this module's output maps (repeatable), e.g. layer1.0.")
@click.option("--d", "sizes", type=Numbers("D...", "odd positive integers", lambda v: v % 2 == 1),
              default="1,3,5,7", show_default=True,
              help="Depthwise filter sizes for --layer's table.")
@click.option("--cheap-d", type=int, default=3, show_default=True, callback=_odd,
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
    from ..init.data import load_calibration
    from ..redundancy import IMAGES
    from ..redundancy import analyze as measure
    from ..serialization import load_model

    if plot is not None:
        from ..figures import require_matplotlib

        require_matplotlib()
    with _status(f"Building {model}", as_json):
        loaded = _to_device(load_model(model, trust_source=trust_source, arch=arch), device)
    import torch

    from ..trace import placement

    shape = tuple(input_size) if input_size else _input_sizes(model, loaded)[0]
    batches = load_calibration(images, tuple(shape), IMAGES, what="image", any_size=not input_size)
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
