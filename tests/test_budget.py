"""Per-layer s from a budget: the search meets it, spends it where the fit loses least, and the plan replays."""

import itertools
import json
import warnings

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import ghostify
from ghostify import budget, selection
from ghostify.budget import Option, fit_errors, search
from ghostify.cli import main
from ghostify.count import Counts

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _cost(chosen):
    return sum(o.cost for o in chosen.values())


def _error(chosen):
    return sum(o.error for o in chosen.values())


def test_search_puts_the_savings_where_they_lose_least():
    """A redundant layer takes s=4; a layer whose ghosts would lose half its output stays a conv."""
    options = {"redundant": [Option(None, 10, 0), Option(2, 6, 0.001), Option(4, 3, 0.01)],
               "dense": [Option(None, 10, 0), Option(2, 6, 0.5), Option(4, 3, 0.9)]}
    chosen = search(options, budget=13)
    assert (chosen["redundant"].s, chosen["dense"].s) == (4, None)


@pytest.mark.parametrize("seed", range(20))
def test_search_meets_the_budget_and_beats_every_uniform_plan_that_does(seed):
    """Random tables: never over budget, never more error than the best uniform ratio within it, and within
    the budget's rounding of the exhaustive optimum."""
    generator = torch.Generator().manual_seed(seed)
    options = {}
    for layer in range(5):
        dense = 1 + 9 * torch.rand(1, generator=generator).item()
        errors = torch.rand(4, generator=generator).sort().values.tolist()
        options[layer] = [Option(None, dense, 0.0)] + [Option(s, dense * (1 / s + 0.05), e)
                                                       for s, e in zip(range(2, 6), errors)]
    total = sum(opts[0].cost for opts in options.values())
    target = total * (0.35 + 0.6 * torch.rand(1, generator=generator).item())
    chosen = search(options, target)
    assert _cost(chosen) <= target + 1e-9
    uniform = [{k: opts[i] for k, opts in options.items()} for i in range(5)]
    assert all(_error(chosen) <= _error(plan) + 1e-12 for plan in uniform if _cost(plan) <= target)
    best = min(_error(dict(zip(options, combo))) for combo in itertools.product(*options.values())
               if sum(o.cost for o in combo) <= target)
    assert _error(chosen) <= best * 1.01 + 1e-9


def test_unreachable_budget_is_refused():
    with pytest.raises(ValueError, match="unreachable"):
        search({"a": [Option(None, 10, 0), Option(2, 6, 0.1)]}, budget=5)


def test_fit_errors_find_exact_ghosts():
    """A 1x1 conv whose second half of filters are scaled copies of the first half: at s=2 the ghosts are exact
    (a cheap kernel's centre tap is the scale), at s=3 a third of the channels must be guessed."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 32, 1, bias=False)
    first = torch.randn(16, 16, 1, 1, generator=generator)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([first, first * (torch.rand(16, 1, 1, 1, generator=generator) + 0.5)]))
    entry = {"primary_kernel": (1, 1), "d": 3}
    errors = fit_errors(conv, None, entry)
    assert errors[2] < 1e-5 and errors[3] > 0.1 and errors[4] >= errors[3] - 1e-6
    with torch.no_grad():
        conv.weight[16:] = torch.randn(16, 16, 1, 1, generator=generator)  # scrambled: no longer exact
    assert fit_errors(conv, None, entry)[2] > 0.1


def test_map_errors_find_exact_ghost_maps():
    """A layer whose second half of output maps are, by construction, exact depthwise 3x3 filterings of the
    first half (a Ghost module standing in for a conv): near-zero error at s=2; a plain conv's maps are not."""
    torch.manual_seed(0)
    ghost = ghostify.GhostModule(8, 16, 3, padding=1, s=2, d=3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ghost).eval()
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    entry = {"name": "2", "d": 3}
    errors = budget.map_errors(model, [entry], {"2": None}, [(x,)])["2"]
    assert errors[2] < 1e-3 and errors[3] > 0.05
    model[2] = nn.Conv2d(8, 16, 3, padding=1)
    assert budget.map_errors(model, [entry], {"2": None}, [(x,)])["2"][2] > 0.05


def test_output_errors_count_what_the_model_makes_of_a_layers_ghosts():
    """Exact ghost maps (a Ghost module standing in for a conv) leave the output where it was; a conv whose
    maps are not ghosts of one another moves it, more at s=4 than at s=2."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    entry = {"name": "2", "d": 3}
    exact = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ghostify.GhostModule(8, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    assert budget.output_errors(exact, [entry], {"2": None}, [(x,)])["2"][2] < 1e-6
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    moved = budget.output_errors(plain, [entry], {"2": None}, [(x,)])["2"]
    assert moved[2] > 1e-3 and moved[4] > moved[2]


def test_output_errors_keep_the_maps_an_in_place_relu_would_change():
    """A layer read by ``ReLU(inplace=True)``: its maps are kept as they were output (exact ghosts move nothing)."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ghostify.GhostModule(8, 16, 3, padding=1),
                          nn.ReLU(inplace=True), nn.Conv2d(16, 4, 1)).eval()
    assert budget.output_errors(model, [{"name": "2", "d": 3}], {"2": None}, [(x,)])["2"][2] < 1e-6


def test_target_flops_with_calibration_data_uses_the_output_maps():
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ghost = ghostify.convert(torchvision.models.resnet18(), target_flops=0.5, init="calibrate",
                             calibration_data=x, example_inputs=x[:1])
    assert all("model output moved, on calibration inputs" in row.why for row in ghost.ghostify_result.replaced)


@pytest.mark.parametrize("name, target", [("resnet18", 0.5), ("vgg11_bn", 0.4), ("mobilenet_v2", 0.85),
                                          ("regnet_x_400mf", 0.7)])
def test_target_flops_is_met_within_two_percent(name, target):
    """fvcore's count of the converted model (independent of the plan's own arithmetic) meets the budget."""
    original = torchvision.models.get_model(name).eval()
    converted = ghostify.convert(original, target_flops=target, example_inputs=X, init="random")
    ratio = Counts(converted, (X,)).conv_linear_flops / Counts(original, (X,)).conv_linear_flops
    assert target - 0.02 <= ratio <= target + 1e-6, ratio
    result = converted.ghostify_result
    assert len({row.s for row in result.replaced}) > 1 or any("budget" in row.reason for row in result.skipped)
    assert all(row.why and "FLOPs budget" in row.why for row in result.replaced)
    assert not any(row.gather for row in result.replaced)  # layers writing into one tensor share s


def test_unreachable_target_fails_before_any_fit(monkeypatch):
    def no_fits(*args, **kwargs):
        raise AssertionError("fitted before refusing")

    monkeypatch.setattr(budget, "_errors", no_fits)
    with pytest.raises(ValueError, match="target_flops=0.05 is unreachable: .* keeps 0.[0-9]+ of its FLOPs"):
        ghostify.convert(torchvision.models.resnet18(), target_flops=0.05, example_inputs=X)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_flops": 1.5}, "in \\(0, 1\\]"), ({"target_flops": 0.5, "target_latency": 0.5}, "not both"),
    ({"target_latency": 0.5}, "needs runtime"), ({"target_flops": 0.5, "s": 4}, "leave s at its default")])
def test_bad_budget_options_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ghostify.convert(torchvision.models.resnet18(), example_inputs=X, **kwargs)


def test_budgeted_plan_is_saved_and_replayed(tmp_path):
    ghost = ghostify.convert(torchvision.models.resnet18(), target_flops=0.4, example_inputs=X).eval()
    ghostify.save(ghost, tmp_path / "g.pt")
    loaded = ghostify.load(tmp_path / "g.pt", model=torchvision.models.resnet18()).eval()
    ratios = {row.name: row.s for row in ghost.ghostify_result.replaced}
    assert {row.name: row.s for row in loaded.ghostify_result.replaced} == ratios
    assert all(loaded.get_submodule(name).s == s for name, s in ratios.items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), ghost(X))


def test_target_latency_uses_layer_times(monkeypatch):
    """Latency costs come from the layer timings (a fixed table here) and the original's measured time."""
    monkeypatch.setattr(budget, "layer_times", lambda model, plan, **kw: [(1.0, 1.0 / row["s"]) for row in plan])
    monkeypatch.setattr(budget, "model_times", lambda model, plans, sizes, **kw: [20.0])
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    # 20 ms, of which the two convertible layers take 1 ms each: 0.925 leaves them 0.5 ms in all
    monkeypatch.setattr(selection, "model_times", lambda model, plans, sizes, **kw: [20.0, 18.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole model meets the budget: no warning
        ghost = ghostify.convert(model, target_latency=0.925, runtime="torch", example_inputs=X)
    rows = ghost.ghostify_result.replaced
    assert len(rows) == 2 and sum(1 / row.s for row in rows) <= 0.5 + 1e-9
    assert str(ghost.ghostify_result.notes["whole model"]) == ("in torch (batch 1): the original 20.0 ms; 2 layers "
                                                               "(the budget's plan) 18.0 ms, 0.90 of it; converted: "
                                                               "that (target 0.925)")
    with pytest.raises(ValueError, match="target_latency=0.9 is unreachable"):
        ghostify.convert(model, target_latency=0.9, runtime="torch", example_inputs=X)


def test_timing_options_are_checked_before_any_work():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    with pytest.raises(ValueError, match="runtime_batch is the batch size runtime= times at; give runtime="):
        ghostify.convert(model, runtime_batch=4, example_inputs=X)
    with pytest.raises(ValueError, match="runtime_batch is the batch size to time at, a positive integer; got 0"):
        ghostify.convert(model, runtime="torch", runtime_batch=0, example_inputs=X)


def whole_model_times(*fractions):
    """Whole-model times that read each fraction of 20 ms in turn, one per plan measured, recording the plans."""
    plans = []

    def model_times(model, plans_asked, sizes, **kw):
        plans.append(plans_asked[0])
        return [20.0, 20.0 * fractions[min(len(plans), len(fractions)) - 1]]

    return model_times, plans


def test_a_latency_plan_the_whole_model_misses_is_searched_again(monkeypatch):
    """The first plan meets 0.95 layer by layer (its two layers 1 ms of 20 ms in all) but the whole model
    measures 0.97: the plan is searched again with 0.4 ms less, and the whole model then meets the target."""
    monkeypatch.setattr(budget, "layer_times", lambda model, plan, **kw: [(1.0, 1.0 / row["s"]) for row in plan])
    monkeypatch.setattr(budget, "model_times", lambda model, plans, sizes, **kw: [20.0])
    times, plans = whole_model_times(0.97, 0.94)
    monkeypatch.setattr(selection, "model_times", times)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # met in the end: no warning
        ghost = ghostify.convert(model, target_latency=0.95, runtime="torch", example_inputs=X)
    first, second = [sum(1 / row["s"] for row in plan) for plan in plans]
    assert first <= 1.0 + 1e-9 and second <= 0.6 + 1e-9 < first
    rows = ghost.ghostify_result.replaced
    assert [(row.name, row.s) for row in rows] == [(row["name"], row["s"]) for row in plans[1]]
    assert str(ghost.ghostify_result.notes["whole model"]) == (
        "in torch (batch 1): the original 20.0 ms; 2 layers (the budget's plan) 19.4 ms, 0.97 of it; 2 layers "
        "(searched again as the whole model missed) 18.8 ms, 0.94 of it; converted: the last (target 0.95)")


def test_a_latency_budget_the_whole_model_misses_is_said(monkeypatch):
    """Layers timed alone meet the budget, the whole model never does and no tighter plan is left: the user
    is told."""
    monkeypatch.setattr(budget, "layer_times", lambda model, plan, **kw: [(1.0, 1.0 / row["s"]) for row in plan])
    monkeypatch.setattr(budget, "model_times", lambda model, plans, sizes, **kw: [20.0])
    times, plans = whole_model_times(0.99)
    monkeypatch.setattr(selection, "model_times", times)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    with pytest.warns(UserWarning, match=r"measured 0.99 of the original's time in torch \(batch 1\), above "
                                         r"target_latency=0.97, after 1 plan:"):
        ghostify.convert(model, target_latency=0.97, runtime="torch", example_inputs=X)
    assert len(plans) == 1  # 0.4 ms less than the first plan's budget leaves none


def test_cli_target_flops_reports_the_plan(tmp_path):
    out = tmp_path / "g.pt"
    result = CliRunner().invoke(main, ["convert", "resnet18", "--input-size", "3", "64", "64", "--target-flops",
                                       "0.45", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["flops_ratio"] > 1.8
    assert all(layer["why"] for layer in data["layers"])
    refused = CliRunner().invoke(main, ["convert", "resnet18", "--target-flops", "0.01", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "unreachable" in refused.stderr and not (tmp_path / "x").exists()
