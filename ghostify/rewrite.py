"""``convert``: replace a model's Conv1d/2d/3d layers with Ghost modules, keeping its classes and attribute paths.

The pipeline is trace (``ghostify.trace``) -> choose (policy below; for speed or a budget, ``selection``) ->
swap (``apply_plan``) -> initialise (``ghostify.init``). Every conv is either replaced or listed as skipped
with its reason; the input model is never modified.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .init import DATA_METHODS, RECONSTRUCT_STEPS, check_calibration, check_init, grouped_widths, initialise
from .module import (
    CONVS,
    GhostModule,
    _tuple,
    check_cheap_kernel,
    check_ratio,
    conv_dim,
    primary_padding,
)
from .plan import apply_plan
from .result import ConversionResult, Replaced, Skipped
from .selection import budgeted, intrinsic_notes, keep_faster, set_intrinsic
from .trace import Analysis, ConvSite, _shape, analyse, placement, random_inputs

PerLayer = Union[Any, Mapping[str, Any]]
ALIGN = 16  # convert(align=...): channels each part of a module's output is a multiple of, where the width allows


def _is_tensors(value) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)


def _follow(x, dtype: torch.dtype, device: torch.device):
    """A floating-point input (or list of them) in the model's dtype and on its device; others as they are."""
    if isinstance(x, (list, tuple)):
        return type(x)(_follow(item, dtype, device) for item in x)
    return x.to(device, dtype) if x.is_floating_point() else x.to(device)


def _example_inputs(example_inputs, model: nn.Module) -> Tuple[Any, ...]:
    """Positional arguments for the analysis pass: a tensor, or a tuple of tensors (or lists of tensors), with
    floating-point ones cast to the model's dtype and device; by default one 1x3x224x224 image."""
    if example_inputs is None:
        return random_inputs(model, (1, 3, 224, 224))
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and _is_tensors(example_inputs):
        dtype, device = placement(model)
        return tuple(_follow(x, dtype, device) for x in example_inputs)
    raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors (or of lists of tensors), "
                    f"got {type(example_inputs).__name__}")


def _patterns(value: Optional[Union[str, Iterable[str]]], what: str) -> Optional[List[str]]:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be a glob pattern or a list of them, got {value!r}")
    return patterns


def _first_match(patterns: Iterable[str], names: Sequence[str]) -> Optional[str]:
    return next((p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)), None)


def _resolve(value: PerLayer, names: Sequence[str], default: Any) -> Any:
    """A per-layer option: a plain value, or a mapping of glob patterns to values (first match wins)."""
    if not isinstance(value, Mapping):
        return default if value is None else value
    pattern = _first_match(value.keys(), names)
    return default if pattern is None else value[pattern]


def _check_kernel(value: Any, dim: Optional[int] = None) -> Tuple[int, ...]:
    """A primary kernel: an int, or a tuple with one entry per spatial dimension (any length 1-3 when ``dim``
    is not known yet)."""
    length = dim or (len(value) if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3 else 2)
    kernel = _tuple(value, "primary_kernel", length)
    if min(kernel) < 1:
        raise ValueError(f"primary_kernel must be positive, got {value!r}")
    return kernel


def _validate(option: PerLayer, check, what: str) -> None:
    values = option.values() if isinstance(option, Mapping) else [option]
    for value in values:
        if value is not None:
            check(value)
    if isinstance(option, Mapping) and not all(isinstance(k, str) for k in option):
        raise TypeError(f"{what} patterns must be strings, got {list(option)!r}")


def _skip_reason(site: ConvSite, names: List[str], opts: Dict[str, Any]) -> Optional[str]:
    """Why ``site`` stays a plain conv under the default policy, or None when it is replaced."""
    module = site.module
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed conv"
    if conv_dim(module) is None:
        return f"{type(module).__name__} subclasses a conv with its own behaviour"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} conv (groups={module.groups}) is already cheap"
    if any(name.startswith(prefix + ".") for prefix in opts["ghosts"] for name in names):
        return "already part of a Ghost module"
    if site.calls == 0:
        return "never runs on the example inputs"
    if site.read_directly:
        return f"the model's code reads {site.read_directly}, which a Ghost module does not have"
    if site.reads_pooled:
        return ("reads a pooled vector (squeeze-and-excite, a head after global pooling): a linear layer in "
                "effect, where a cheap op could only scale copies of the intrinsic maps")
    excluded = _first_match(opts["exclude"] or [], names)
    if excluded:
        return f"excluded by pattern {excluded!r}"
    if opts["include"] is not None and not _first_match(opts["include"], names):
        return "not matched by include"
    if site.is_stem and not opts["include_stem"]:
        return "stem conv (sees the raw input); include_stem=True (--include-stem) converts it"
    return None


def _choose(site: ConvSite, opts: Dict[str, Any]) -> Union[Replaced, Skipped]:
    names = [site.name] + site.aliases
    reason = _skip_reason(site, names, opts)
    if reason is None:
        conv = site.module
        s = check_ratio(_resolve(opts["s"], names, 2))
        d = check_cheap_kernel(_resolve(opts["d"], names, 3))
        kernel = _resolve(opts["primary_kernel"], names, conv.kernel_size)
        try:
            kernel = _check_kernel(kernel, len(conv.kernel_size))
        except TypeError:
            raise TypeError(f"primary_kernel {kernel!r} does not fit {site.name!r}, a {len(conv.kernel_size)}-D "
                            "conv; give an int, or a per-layer mapping") from None
        if conv.out_channels < s:
            reason = f"{conv.out_channels} output channels, fewer than s={s}"
        else:
            try:
                primary_padding(conv.kernel_size, conv.padding, conv.dilation, kernel)
            except ValueError as error:
                reason = str(error)
    if reason is not None:
        return Skipped(site.name, type(site.module).__name__, reason)
    return Replaced(site.name, s, d, kernel, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                    tuple(conv.stride), site.input_shape, site.output_shape, site.aliases, site.calls,
                    site.norm if opts["absorb_norm"] else None)


def _warn_unmatched(opts: Dict[str, Any], names: List[str]) -> None:
    """Warn about include/exclude patterns and per-layer mapping keys that name no convolution."""
    for what in ("include", "exclude", "s", "d", "primary_kernel"):
        option = opts[what]
        if isinstance(option, Mapping):
            patterns = list(option)
        else:
            patterns = (option or []) if what in ("include", "exclude") else []
        for pattern in patterns:
            if not _first_match([pattern], names):
                warnings.warn(f"{what} pattern {pattern!r} matches no convolution layer", UserWarning, stacklevel=3)


def _check_budget(s: PerLayer, target_flops: Optional[float], target_latency: Optional[float],
                  runtime: Optional[str], runtime_batch: int) -> None:
    """Budget and timing options that cannot work together, refused before any work."""
    if isinstance(runtime_batch, bool) or not isinstance(runtime_batch, int) or runtime_batch < 1:
        raise ValueError(f"runtime_batch is the batch size to time at, a positive integer; got {runtime_batch!r}")
    if runtime is None and runtime_batch != 1:
        raise ValueError("runtime_batch is the batch size runtime= times at; give runtime= too")
    for what, value in (("target_flops", target_flops), ("target_latency", target_latency)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{what} is a fraction of the original's cost, in (0, 1]; got {value!r}")
    if target_flops is not None and target_latency is not None:
        raise ValueError("give target_flops or target_latency, not both")
    if target_latency is not None and runtime is None:
        raise ValueError("target_latency needs runtime= (torch, onnxruntime or inductor) to time the layers in")
    if (target_flops is not None or target_latency is not None) and s != 2:
        raise ValueError(f"with a budget each layer's s is chosen (2..5); leave s at its default, got s={s!r}")


def convert(
    model: nn.Module,
    s: PerLayer = 2,
    d: PerLayer = 3,
    primary_kernel: PerLayer = None,
    *,
    include: Optional[Union[str, Iterable[str]]] = None,
    exclude: Optional[Union[str, Iterable[str]]] = None,
    include_stem: bool = False,
    example_inputs: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    init: str = "copy",
    calibration_data: Any = None,
    calibration_samples: int = 256,
    absorb_norm: bool = True,
    reconstruct_steps: int = RECONSTRUCT_STEPS,
    reconstruct_seconds: Optional[float] = None,
    reconstruct_network: bool = False,
    reconstruct_mix: float = 0.0,
    refit_head: bool = True,
    calibration_mirror: bool = True,
    runtime: Optional[str] = None,
    runtime_batch: int = 1,
    target_flops: Optional[float] = None,
    target_latency: Optional[float] = None,
    align: int = ALIGN,
) -> nn.Module:
    """Return a copy of ``model`` with its dense convolutions (Conv1d, Conv2d, Conv3d) replaced by Ghost modules.

    Args:
        model: any ``nn.Module``; it is deep-copied and never modified.
        s: ghost ratio (int >= 2), or a mapping of glob patterns on qualified layer names to ratios.
        d: cheap-operation kernel (odd int), or a mapping of patterns to kernels.
        primary_kernel: primary conv kernel (default: each conv's own), or a mapping of patterns to kernels.
        include: glob patterns; only matching convs are converted.
        exclude: glob patterns; matching convs are left alone.
        include_stem: also convert the conv that sees the raw input.
        example_inputs: inputs for the analysis pass (default one 1x3x224x224 tensor): a tensor, or a tuple
            of the model's positional arguments (a model that takes a list of images, as torchvision's
            detection models do, gets ``([image],)``).
        init: how the Ghost modules' weights start: ``"copy"`` (from the original filters, no data),
            ``"calibrate"`` (fitted to the original layers' outputs on ``calibration_data``), ``"reconstruct"``
            (calibrate, then each block of layers tuned jointly on its output error) or ``"random"``.
        calibration_data: for ``"calibrate"`` and ``"reconstruct"``: an ``(N, C, H, W)`` tensor, or an iterable
            of batches or of (inputs, targets) pairs; by default ``example_inputs`` is its first input. A model
            with several inputs takes batches as tuples whose first entries are its inputs (as in
            ``example_inputs``).
        calibration_samples: how many calibration inputs to use at most.
        absorb_norm: take the batch norm that alone reads a conv into its Ghost module (the GhostNet form:
            the cheap operation reads normalised maps), so that deploy folds it into the two convs exactly;
            False keeps the norm after a linear Ghost module.
        reconstruct_steps: for ``"reconstruct"``, Adam steps per block.
        reconstruct_seconds: for ``"reconstruct"``, a time budget for tuning all blocks (None: no limit).
        reconstruct_network: for ``"reconstruct"``, after the blocks tune every Ghost module together on the
            model's output against the original's (``reconstruct_steps`` more steps; single-input models).
        reconstruct_mix: for ``"reconstruct"``, the probability that each element of a block's tuning input
            comes from the original model's input to that block instead of the converted model's (QDrop).
        refit_head: for ``"calibrate"`` and ``"reconstruct"``, also refit the ``nn.Linear`` layers that run after
            the last Ghost module (a classifier head) to the original's outputs, so they correct what the Ghost
            modules still miss; False leaves them as they are.
        calibration_mirror: for ``"calibrate"`` and ``"reconstruct"``, where a layer would see fewer output
            positions over the calibration inputs than its filters have weights (deep layers on small inputs),
            also fit the layers on mirror images of the inputs (flipped along the spatial dimensions), as many
            as that needs, up to every combination; the conversion notes say so (``mirror``). Single-input
            models; False: the inputs only.
        runtime: ``"torch"``, ``"onnxruntime"`` or ``"inductor"``: time each layer alone as a conv and as a
            Ghost module in that runtime's deploy form (``latency.layer_times``), then the whole model with
            the layers that pay most alone converted (``latency.model_times``), and convert the fastest choice
            if it beats the original; the others are reported as skipped with their times. None: no timing.
        runtime_batch: the batch size those timings use.
        target_flops: a FLOPs budget, as a fraction of the original's conv + linear multiply-adds: each layer
            stays a conv or takes s = 2..5 (``s`` is then not given), chosen to meet it with the least loss in
            the layers' data-free fit (``ghostify.budget``); layers writing into one tensor share s.
        target_latency: the same with a latency budget, a fraction of the original's latency in ``runtime``
            at ``runtime_batch``, each option's cost timed there layer by layer.
        align: make each module's intrinsic maps and ghost runs multiples of this many channels where the
            layer's width allows it (``module.intrinsic_count``), so runtimes keep the concatenation in their
            SIMD-blocked layout; the conversion notes name the layers it does not fit. 1: ``ceil(n / s)``.

    Returns:
        The converted model, with ``ghostify_result`` (a ``ConversionResult``) listing what was replaced
        and what was skipped, with reasons.

    Example:
        >>> ghost = ghostify.convert(torchvision.models.resnet50(), s=2, d=3)
        >>> type(ghost.layer1[0].conv2).__name__
        'GhostModule'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    init = check_init(init)
    inputs, batches = _inputs_and_batches(model, example_inputs, init, calibration_data, calibration_samples)
    _check_budget(s, target_flops, target_latency, runtime, runtime_batch)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive integer (channels), got {align!r}")
    if not 0 <= reconstruct_mix <= 1:
        raise ValueError(f"reconstruct_mix is a probability in [0, 1], got {reconstruct_mix!r}")
    _validate(s, check_ratio, "s")
    _validate(d, check_cheap_kernel, "d")
    _validate(primary_kernel, _check_kernel, "primary_kernel")
    opts = {"s": s, "d": d, "primary_kernel": primary_kernel, "include_stem": include_stem, "absorb_norm": absorb_norm,
            "include": _patterns(include, "include"), "exclude": _patterns(exclude, "exclude")}
    if not any(isinstance(module, tuple(CONVS.values())) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} has no convolution layer (nn.Conv1d, nn.Conv2d or nn.Conv3d) "
                         "to convert")

    converted = copy.deepcopy(model)
    analysis = _analyse_copy(converted, inputs, isinstance(example_inputs, list))
    opts["ghosts"] = [name for name, module in converted.named_modules() if isinstance(module, GhostModule)]
    _warn_unmatched(opts, [n for site in analysis.sites for n in [site.name] + site.aliases])
    result = _plan(model, converted, analysis, opts, inputs, batches, init, align=align, target_flops=target_flops,
                   target_latency=target_latency, runtime=runtime, runtime_batch=runtime_batch)
    # the fit writes every weight of the new modules, unless it cannot run (random init, weights on the meta device)
    fill = init == "random" or any(p.is_meta for p in converted.parameters())
    swapped = apply_plan(converted, result.plan(), fill=fill)
    replaced = list(result.replaced)
    earlier = getattr(model, "ghostify_result", None)
    if isinstance(earlier, ConversionResult):  # converting a converted model: its plan must replay the earlier one
        result.replaced = copy.deepcopy(earlier.replaced) + result.replaced
    done = initialise(init, swapped, {row.name: row for row in replaced}, converted, model, batches, inputs,
                      reconstruct_steps, reconstruct_seconds, reconstruct_network, reconstruct_mix, refit_head,
                      calibration_mirror, analysis.parts)
    _record_fits(replaced, done.layers)
    result.notes.update(done.notes)
    if "init" in done.notes:  # e.g. weights on the meta device: the modules keep their fresh initialisation
        warnings.warn(done.notes["init"], UserWarning, stacklevel=2)
    converted.ghostify_result = result
    return converted


def _inputs_and_batches(model: nn.Module, example_inputs, init: str, calibration_data, calibration_samples):
    """The analysis inputs and, for the data initialisers, the calibration batches, both in the model's dtype
    and on its device; the example inputs default to the first calibration input, else one 224x224 image."""
    batches = None
    inputs = None if example_inputs is None else _example_inputs(example_inputs, model)
    if init in DATA_METHODS:
        if inputs is not None and not all(isinstance(x, torch.Tensor) for x in inputs):
            raise ValueError(f"init={init!r} needs tensor inputs; this model's example inputs include lists "
                             "(use init='copy')")
        shapes = None if inputs is None else [tuple(x.shape[1:]) for x in inputs]
        dtype, device = placement(model)  # calibration inputs follow the model, as its example inputs do
        batches = [_follow(batch, dtype, device) for batch in
                   check_calibration(calibration_data, calibration_samples, shapes, len(inputs or (None,)))]
        inputs = tuple(x[:1] for x in batches[0]) if inputs is None else inputs
    elif calibration_data is not None:
        raise ValueError(f"calibration_data is only used by init='calibrate' or 'reconstruct', got init={init!r}")
    return (_example_inputs(None, model) if inputs is None else inputs), batches


def _analyse_copy(converted: nn.Module, inputs, given_a_list: bool) -> Analysis:
    """``analyse`` the model's copy; a failure on a list of example inputs says how to pass a list argument."""
    try:
        return analyse(converted, inputs)
    except ValueError as error:
        if not given_a_list:
            raise
        raise ValueError(f"{error}. A list of example inputs is unpacked as positional arguments, "
                         "model(*example_inputs); for a model called with a list, as torchvision's detection "
                         "models are (model([image])), wrap it: example_inputs=([image],)") from None


def _plan(model: nn.Module, converted: nn.Module, analysis: Analysis, opts: Dict[str, Any], inputs, batches,
          init: str, *, align: int, target_flops, target_latency, runtime, runtime_batch) -> ConversionResult:
    """Which convs become which Ghost modules: each conv by the options (``_choose``), then by the budget or
    by layer timings when asked, each module's intrinsic count set; what is left alone, with reasons."""
    decisions = [_choose(site, opts) for site in analysis.sites]
    replaced = [r for r in decisions if isinstance(r, Replaced)]
    skipped = [r for r in decisions if isinstance(r, Skipped)]
    widths = grouped_widths(converted, {row.name: row for row in replaced}, inputs, analysis.parts)
    asked = {row.name: row.s for row in replaced}
    set_intrinsic(replaced, widths, align)  # layer timings build the modules convert builds
    whole = None  # the whole-model times, when layers are converted for speed or a latency budget
    if (target_flops is not None or target_latency is not None) and replaced:
        norms = {site.name: site.norm for site in analysis.sites}
        replaced, kept, whole = budgeted(model, replaced, norms, inputs, batches, target_flops, target_latency,
                                          runtime, runtime_batch, align, widths)
        skipped += kept
        asked = {row.name: row.s for row in replaced}  # the s the budget chose
        set_intrinsic(replaced, widths, align)
    elif runtime is not None and replaced:
        replaced, slower, whole = keep_faster(model, replaced, runtime, runtime_batch, inputs)
        skipped += slower
    skipped += [Skipped(name, "F.conv", "functional convolution call; only conv modules are replaced")
                for name in analysis.functional]
    result = ConversionResult(analysis.method, replaced, skipped, [_shape(x) for x in inputs], init,
                              source=getattr(model, "ghostify_source", None))
    result.notes.update(intrinsic_notes(replaced, asked, align))  # of the layers replaced in the end
    if whole is not None:
        result.notes["whole model"] = whole
    depthwise = sum(getattr(site.module, "groups", 1) == getattr(site.module, "in_channels", 0) > 1
                    for site in analysis.sites)
    if runtime is None and replaced and depthwise >= len(replaced) / 2:
        result.notes["speed"] = (f"a depthwise-separable model ({depthwise} depthwise convs): the 1x1 convs left to "
                                 "convert are memory-bound, and such models (MobileNetV2, EfficientNet-B0) ran "
                                 "slower than the original in every runtime measured with every layer converted; "
                                 "runtime= (--runtime) converts only what makes the whole model faster")
    if not replaced:
        warnings.warn(f"no convolution was converted (the model is unchanged): {_commonest_reasons(skipped)}",
                      UserWarning, stacklevel=3)
    return result


def _commonest_reasons(rows: List[Skipped], most: int = 3) -> str:
    """Why ``rows`` were left alone, the commonest reasons first, as 'N layers: reason'; reasons that differ
    only in their figures (a layer's groups, its timings) count as one."""
    groups: Dict[str, List[str]] = {}
    for row in rows:
        head = row.reason.split(":")[0]
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", head), []).append(head)
    ordered = sorted(groups.values(), key=len, reverse=True)
    parts = [f"{len(heads)} {'layer' if len(heads) == 1 else 'layers'}: {heads[0]}"
             + (", and similar" if len(set(heads)) > 1 else "") for heads in ordered[:most]]
    return ". ".join(parts) + (" ..." if len(ordered) > most else "")


def _record_fits(rows: List[Replaced], fitted: Mapping[str, Any]) -> None:
    """Each row's fit error, gather and channel order from what the initialiser measured."""
    for row in rows:
        fit = fitted.get(row.name)
        if fit is not None:
            row.error, row.gather, row.gather_reason, row.order = fit.error, fit.gather, fit.gather_reason, fit.order
        else:  # not fitted (init="random", or nothing to fit from): outputs stand in order for the original's
            row.order = list(range(row.out_channels))
