"""``ghostify convert``: MODEL's convolutions to Ghost modules, the report, the written file."""

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
    _print_report,
    _status,
    _to_device,
    _writable,
    main,
)


@main.command()
@click.argument("model", type=MODEL)
@click.option("--s", "s", type=click.IntRange(min=2), default=2, show_default=True,
              help="Ghost ratio: 1/s of the maps are intrinsic.")
@click.option("--d", "d", type=int, default=3, show_default=True, callback=_odd,
              help="Kernel of the cheap depthwise operation (odd).")
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
              help="Time each layer alone as a conv and as a Ghost module in this runtime's deploy form, then the "
                   "whole model with the layers that pay; convert only what made the whole model faster.")
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
    from ..init import DATA_METHODS

    if init in DATA_METHODS and calib_data is None:
        raise ValueError(f"--init {init} needs --calib-data PATH (an image folder or a .pt tensor file)")
    _only_with(init in DATA_METHODS, "--init calibrate or reconstruct", f"--init {init}", "calib_data", "keep_head",
               "no_mirror")
    _only_with(init == "reconstruct", "--init reconstruct", f"--init {init}", "recon_steps", "recon_seconds",
               "recon_network", "recon_mix")
    if target_flops is not None and target_latency is not None:
        raise ValueError("give --target-flops or --target-latency, not both")
    _only_with(runtime is not None, "--runtime", "no --runtime", "runtime_batch", "target_latency")
    import ghostify

    from ..serialization import load_model

    with _status(f"Building {model}", as_json):
        source = _to_device(load_model(model, weights, trust_source, arch), device)
    inputs = _inputs(input_size, _input_sizes(model, source), source)
    calibration = None
    if calib_data is not None:
        from ..init.data import load_calibration

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
