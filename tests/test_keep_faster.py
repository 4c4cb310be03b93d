"""convert(runtime=...): each layer timed alone as a conv and as a Ghost module; the slower ones stay convs."""

import json
import warnings

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import ghostify
from ghostify import result, selection
from ghostify.cli import main
from ghostify.deployment import DeployedGhost
from ghostify.epilogue import follows
from ghostify.latency import _Unit, _units, layer_times
from ghostify.trace import GhostLeafTracer

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.ReLU()).eval()


TABLE = {"3": (1.0, 1.5), "6": (2.0, 0.5), "0": (1.0, 0.95)}  # alone: "3" slower, "0" faster but not by 10%


def alone(name: str):
    """(conv ms, Ghost ms) of a layer alone: from the table, else twice as fast as a Ghost module."""
    return TABLE.get(name, (1.0, 0.5))


def fake_whole(per_layer: float):
    """Whole-model times from the table: 10 ms outside the layers, each layer's time alone as converted or
    not, plus ``per_layer`` ms for each Ghost module (what its neighbours pay, or gain, in the whole model)."""

    def model_times(model, plans, sizes, **kwargs):
        original = 10.0 + sum(dense for dense, _ in TABLE.values())
        return [original] + [original + sum(alone(row["name"])[1] - alone(row["name"])[0] + per_layer
                                            for row in plan) for plan in plans]

    return model_times


@pytest.fixture
def fake_times(monkeypatch):
    """A fixed timing table in place of the clock, alone and in the whole model (each Ghost module 0.1 ms
    dearer there): the whole model is fastest with layer "6" alone converted."""
    seen = []

    def fake(model, plan, **kwargs):
        seen.append(([entry["name"] for entry in plan], kwargs))
        return [alone(entry["name"]) for entry in plan]

    monkeypatch.setattr(selection, "layer_times", fake)
    monkeypatch.setattr(selection, "model_times", fake_whole(0.1))
    return seen


def test_layers_no_faster_as_ghost_modules_stay_convs(fake_times, tmp_path):
    model = small()
    ghost = ghostify.convert(model, example_inputs=X, runtime="onnxruntime", runtime_batch=8,
                             include_stem=True).eval()
    assert fake_times == [(["0", "3", "6"], {"runtime": "onnxruntime", "batch": 8, "progress": True})]
    assert type(ghost[0]) is type(ghost[3]) is nn.Conv2d and isinstance(ghost[6], ghostify.GhostModule)
    result = ghost.ghostify_result
    reasons = {row.name: row.reason for row in result.skipped}
    assert ("the whole model ran fastest in onnxruntime (batch 8) with only layers at least 20% faster alone: "
            "alone, 1.50 ms as a Ghost module vs 1.00 ms as a conv") in reasons["3"]
    assert "0.950 ms as a Ghost module vs 1.00 ms" in reasons["0"]
    # candidates: 20% (and 10%) faster alone, no slower, every layer; 14 ms, 12.6, 12.65 and 13.25 ms
    assert str(result.notes["whole model"]) == ("in onnxruntime (batch 8): the original 14.0 ms; 1 layer (at least "
                                                "20% faster alone) 12.6 ms; 2 layers (no slower alone) 12.7 ms; 3 "
                                                "layers (every layer) 13.2 ms; converted: 1 layer, 1.11x faster")
    whole = json.loads(json.dumps(ghostify.report(model, ghost, X).to_dict()))["notes"]["whole model"]
    assert whole["original_ms"] == 14.0 and whole["chosen"] == 0 and whole["runtime"] == "onnxruntime"
    assert [(t["count"], t["ms"]) for t in whole["tried"]] == [(1, pytest.approx(12.6)), (2, pytest.approx(12.65)),
                                                              (3, pytest.approx(13.25))]
    ghostify.save(ghost, tmp_path / "g.pt")
    reloaded = ghostify.load(tmp_path / "g.pt", model=model).ghostify_result.notes["whole model"]
    assert reloaded == result.notes["whole model"] and str(reloaded) == str(result.notes["whole model"])
    (row,) = result.replaced
    assert (row.name, row.dense_ms, row.ghost_ms) == ("6", 2.0, 0.5)
    with torch.no_grad():  # the kept conv and its norm are the original's
        torch.testing.assert_close(ghost[:6](X), model[:6](X))


@pytest.mark.parametrize("per_layer, converted", [(-0.6, ["0", "3", "6"]), (1.6, [])])
def test_the_whole_model_decides(fake_times, monkeypatch, per_layer, converted):
    """Ghost modules that gain in the whole model (a runtime that keeps one layout throughout) are all
    converted, even those slower alone; when each costs its neighbours more than it saves, none is."""
    monkeypatch.setattr(selection, "model_times", fake_whole(per_layer))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no convolution was converted")
        ghost = ghostify.convert(small(), example_inputs=X, runtime="torch", include_stem=True)
    result = ghost.ghostify_result
    assert [row.name for row in result.replaced] == converted
    if not converted:
        assert all("the whole model was not 3% faster in torch (batch 1) with Ghost modules" in row.reason
                   for row in result.skipped)


def test_without_tensor_inputs_layers_clearly_faster_alone_are_converted(fake_times):
    """A model called with a list (no sizes to time the whole model at): layers 10% faster alone."""
    rows = [result.Replaced(name, 2, 3, (3, 3), 16, 16, (3, 3), (1, 1)) for name in TABLE]
    faster, slower, note = selection.keep_faster(small(), rows, "torch", 1, ([X],))
    assert [row.name for row in faster] == ["6"] and note is None
    assert {row.name for row in slower} == {"0", "3"}
    assert "not 10% faster as a Ghost module in torch (batch 1): alone, 0.950 ms as" in {row.name: row.reason
                                                                                         for row in slower}["0"]


def test_timings_reach_the_report_and_survive_save_and_load(fake_times, tmp_path):
    ghost = ghostify.convert(small(), example_inputs=X, runtime="torch")
    report = ghostify.report(small(), ghost, X)
    (layer,) = report.layers
    assert (layer.dense_ms, layer.ghost_ms) == (2.0, 0.5)
    assert report.to_dict()["layers"][0]["ghost_ms"] == 0.5
    ghostify.save(ghost, tmp_path / "g.pt")
    (row,) = ghostify.load(tmp_path / "g.pt", model=small()).ghostify_result.replaced
    assert (row.dense_ms, row.ghost_ms) == (2.0, 0.5)


@pytest.mark.filterwarnings("ignore:no convolution was converted")
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_layer_times_time_each_planned_layer_in_its_runtime(runtime):
    """Real timings (no value asserted: the machine is shared): one positive pair per planned layer, and the
    decision in convert agrees with them."""
    model = small()
    plan = [{"name": "3", "s": 2, "d": 3, "primary_kernel": [3, 3], "norm": "4", "input_shape": (1, 16, 32, 32)},
            {"name": "6", "s": 4, "d": 5, "primary_kernel": [1, 1], "norm": None, "input_shape": (1, 32, 32, 32)}]
    times = layer_times(model, plan, runtime=runtime, batch=2, repeats=2)
    assert len(times) == 2 and all(t > 0 for pair in times for t in pair)
    ghost = ghostify.convert(model, example_inputs=X, runtime=runtime)
    result = ghost.ghostify_result
    slower = [row for row in result.skipped if "the whole model" in row.reason]
    assert len(result.replaced) + len(slower) == 2
    assert str(result.notes["whole model"]).startswith(f"in {runtime} (batch 1): the original ")


def test_bad_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime must be one of"):
        ghostify.convert(small(), example_inputs=X, runtime="tensorrt")


def test_cli_convert_runtime_reports_layer_times(fake_times, tmp_path):
    out = tmp_path / "g.pt"
    result = CliRunner().invoke(main, ["convert", "resnet18", "--input-size", "3", "32", "32",
                                       "--runtime", "torch", "--runtime-batch", "4", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert fake_times[0][1]["batch"] == 4
    data = json.loads(result.stdout)
    assert data["layers"] and all(layer["ghost_ms"] is not None for layer in data["layers"])


def test_timed_units_carry_the_residual_add_and_relu_that_follow_the_layer():
    """A bottleneck's last conv is timed with the shortcut addition and ReLU after it (the epilogue its Ghost
    module writes); its first conv with the ReLU only. Deployed, the Ghost unit computes what it did before."""
    model = torchvision.models.resnet18().eval()
    graph = torch.fx.GraphModule(model, GhostLeafTracer().trace(model))
    assert follows(graph, "layer1.0.conv2", "layer1.0.bn2") == (True, "relu")
    assert follows(graph, "layer1.0.conv1", "layer1.0.bn1") == (False, "relu")
    assert follows(graph, "layer1.0.conv1") == (False, None)  # its output goes to the norm, not a ReLU
    mobile = torchvision.models.mobilenet_v2().eval()
    mobile_graph = torch.fx.GraphModule(mobile, GhostLeafTracer().trace(mobile))
    assert follows(mobile_graph, "features.1.conv.0.0", "features.1.conv.0.1") == (False, "relu6")
    entry = {"name": "layer1.0.conv2", "s": 2, "d": 3, "primary_kernel": [3, 3], "norm": "layer1.0.bn2",
             "input_shape": (1, 64, 16, 16), "output_shape": (1, 64, 16, 16)}
    (dense, ghost), x = _units(model, entry, 2, follows(graph, entry["name"], entry["norm"]))
    assert dense.shortcut.shape == (2, 64, 16, 16) and dense.activation == "relu"
    deployed = ghostify.deploy(ghost)
    (module,) = [m for m in deployed.modules() if isinstance(m, DeployedGhost)]
    assert module.activation == "relu" and deployed.ghostify_deploy.epilogues == 1
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), ghost(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ghostify.deploy(dense)(x), dense(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("add, activation", [(True, "silu"), (False, "relu6"), (True, None)])
def test_timed_conv_units_add_and_activate_in_place(add, activation):
    """The conv unit's shortcut addition and activation work in the conv's output, as a CNN's own in-place
    ReLU / SiLU and ``+=`` do: an out-of-place pass charges the conv a whole extra tensor (on EfficientNet-B0's
    112x112 expansion at batch 16 it made the conv look much slower alone than it runs in the model)."""
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    unit = _Unit(conv, torch.randn(2, 8, 16, 16) if add else None, activation)
    outputs = []
    handle = conv.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        y = unit(torch.randn(2, 8, 16, 16))
    handle.remove()
    assert y.data_ptr() == outputs[0].data_ptr()


def test_notes_and_warning_speak_of_the_layers_timing_left_alone(monkeypatch):
    """When timing leaves every layer a conv, no note names layers as converted ones, and the warning gives
    the commonest reason first: the timing, not the depthwise convs that were never candidates."""
    monkeypatch.setattr(selection, "layer_times", lambda model, plan, **kwargs: [(1.0, 1.0)] * len(plan))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1, groups=24),
                          nn.Conv2d(24, 40, 1), nn.Conv2d(40, 40, 3, padding=1, groups=40),
                          nn.Conv2d(40, 24, 1), nn.Conv2d(24, 8, 1)).eval()
    monkeypatch.setattr(selection, "model_times", lambda model, plans, sizes, **kwargs: [1.0] * (len(plans) + 1))
    with pytest.warns(UserWarning, match=r"no convolution was converted .*: 3 layers: the whole model was not 3% "
                                         r"faster in torch \(batch 1\) with Ghost modules\. 2 layers: depthwise "
                                         r"conv \(groups=24\) is already cheap, and similar\. 1 layer: stem conv"):
        ghost = ghostify.convert(model, example_inputs=X, runtime="torch")
    assert not ghost.ghostify_result.replaced and "unaligned" not in ghost.ghostify_result.notes
    assert "unaligned" in ghostify.convert(model, example_inputs=X).ghostify_result.notes  # 24, 40: off the block


def test_layers_alike_are_timed_once_and_share_their_figures(monkeypatch):
    """ResNet-18's layer1 has four alike 3x3 convs (same conv, norm, plan, input and ReLU after; two with a
    shortcut before it): two timings for the four, then one for a conv with another input, each pair given
    back to every layer alike."""
    from ghostify import latency

    calls = []

    def fake_interleaved(runners, repeats, warmup=1, step=None):
        calls.append(len(runners))
        return [float(len(calls)), float(len(calls)) / 2]

    monkeypatch.setattr(latency, "interleaved", fake_interleaved)
    model = torchvision.models.resnet18().eval()
    names = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "layer2.1.conv1"]
    plan = [{"name": name, "s": 2, "d": 3, "primary_kernel": [3, 3], "norm": name.replace("conv", "bn"),
             "input_shape": (1, 64, 16, 16) if name.startswith("layer1") else (1, 128, 8, 8),
             "output_shape": (1, 64, 16, 16) if name.startswith("layer1") else (1, 128, 8, 8)} for name in names]
    times = layer_times(model, plan, runtime="torch", batch=1, repeats=1)
    assert len(calls) == 3  # conv1s (ReLU after), conv2s (shortcut and ReLU after), layer2.1.conv1
    assert times == [(1.0, 0.5), (2.0, 1.0), (1.0, 0.5), (2.0, 1.0), (3.0, 1.5)]


def test_timing_keeps_the_notes_of_the_layers_it_keeps(fake_times):
    """A 32-wide layer asked for s=4 with 16-channel alignment becomes an s=2 module (16 intrinsic maps leave
    one run of ghosts); timing keeps it, and the report still says its s was lowered."""
    ghost = ghostify.convert(small(), example_inputs=X, runtime="torch", s=4)
    (row,) = ghost.ghostify_result.replaced
    assert (row.name, row.s) == ("6", 2)
    assert "6 (s=4 -> 2, m=16)" in ghost.ghostify_result.notes["lowered s"]


def test_a_depthwise_separable_model_is_pointed_to_runtime(fake_times):
    """Converted whole, a MobileNet-like model (as many depthwise convs as layers converted) gets a note that
    says it may run slower and how to convert for speed; a plain CNN, or a conversion timed already, does not."""
    torch.manual_seed(0)
    mobile = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                           nn.Conv2d(32, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 32, 1))
    note = ghostify.convert(mobile.eval(), example_inputs=X).ghostify_result.notes.get("speed", "")
    assert note.startswith("a depthwise-separable model (2 depthwise convs)") and "runtime= (--runtime)" in note
    assert "speed" not in ghostify.convert(small(), example_inputs=X).ghostify_result.notes
    assert "speed" not in ghostify.convert(mobile.eval(), example_inputs=X, runtime="torch").ghostify_result.notes
