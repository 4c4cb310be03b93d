"""ghostify.analyze / ghostify analyze: feature-map redundancy on real photos, the paper's Table 2, figures."""

import builtins
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from skimage import data
from torch import nn

import ghostify
from ghostify.cli import main

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def photos(size: int = 96) -> torch.Tensor:
    """scikit-image's bundled colour photos, resized and normalised as torchvision models expect."""
    images = [torch.tensor(getattr(data, name)(), dtype=torch.float32).permute(2, 0, 1)[:3] / 255 for name in PHOTOS]
    x = torch.stack([F.interpolate(image[None], size=(size, size), mode="bilinear")[0] for image in images])
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def exact_model() -> nn.Sequential:
    """A 1x1 conv whose outputs 8..15 are, by construction, scaled copies of outputs 0..7 (a cheap 3x3 op with
    only its centre tap reproduces them exactly)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1, bias=False))
    with torch.no_grad():
        first = model[2].weight[:8].clone()
        model[2].weight[8:] = first * (torch.rand(8, 1, 1, 1) + 0.5)
    return model.eval()


def test_exact_ghost_channels_score_zero_at_s2_and_pair_up():
    result = ghostify.analyze(exact_model(), photos(32), tables=["2"], tolerance=0.01)
    (layer,) = [layer for layer in result.layers if layer.name == "2"]
    assert layer.errors[2] < 1e-3 and layer.errors[3] > 0.02 and layer.suggested == 2
    (table,) = result.tables
    assert len(table.pairs) == 3 and all(b == a + 8 and corr > 0.999 for a, b, corr in table.pairs)
    assert all(mse < 1e-6 for row in table.mse for mse in row.values())


def test_scrambled_channels_are_not_redundant():
    """The same layer with its copies replaced by other filters: 8 maps of 8 rectified inputs still correlate,
    but far from exactly."""
    model = exact_model()
    with torch.no_grad():
        model[2].weight[8:] = torch.randn(8, 8, 1, 1) * model[2].weight[:8].std()
    (layer,) = [layer for layer in ghostify.analyze(model, photos(32)).layers if layer.name == "2"]
    assert layer.errors[2] > 0.01


def test_table2_on_a_real_photo_through_resnet50s_first_block_does_not_grow_with_d():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    result = ghostify.analyze(model, photos(112)[:2], layers=["layer1.0.conv1"], tables=["layer1.0"])
    (table,) = result.tables
    assert table.layer == "layer1.0" and len(table.pairs) == 3
    for row in table.mse:
        values = [row[d] for d in (1, 3, 5, 7)]
        assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(values, values[1:])), values
        assert values[-1] < values[0]  # the wider filter uses its extra taps
    assert [layer.name for layer in result.layers] == ["layer1.0.conv1"]


def test_unknown_layers_are_clear():
    with pytest.raises(ValueError, match="no module 'nope'"):
        ghostify.analyze(exact_model(), photos(32), tables=["nope"])
    with pytest.raises(ValueError, match="dense convs that run"):
        ghostify.analyze(exact_model(), photos(32), layers=["1"])


def test_plots_are_written_and_open(tmp_path):
    import matplotlib.image

    result = ghostify.analyze(exact_model(), photos(32), tables=["2"], plot=str(tmp_path / "figs"))
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["maps_2.png", "redundancy.png"]
    assert sorted(result.figures) == sorted(str(p) for p in (tmp_path / "figs").iterdir())
    for path in result.figures:
        height, width = matplotlib.image.imread(path).shape[:2]
        assert 300 <= width <= 4000 and 200 <= height <= 4000


@pytest.fixture
def photo_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()[..., :3]).save(folder / f"{name}.png")
    return folder


def test_cli_analyze_json(photo_folder):
    result = CliRunner().invoke(main, ["analyze", "resnet18", "--images", str(photo_folder), "--input-size", "3",
                                       "64", "64", "--layer", "layer1.0", "--d", "1", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == len(PHOTOS) and len(report["layers"]) == 20  # every dense conv, the stem too
    (table,) = report["tables"]
    assert table["layer"] == "layer1.0" and all(set(row) == {"1", "3"} for row in table["mse"])


def test_cli_analyze_reads_a_tensor_file_at_its_own_size(tmp_path):
    photos = torch.stack([torch.tensor(getattr(data, name)()[:48, :48, :3], dtype=torch.float32).permute(2, 0, 1)
                          for name in PHOTOS]) / 255
    torch.save(photos, tmp_path / "photos.pt")
    result = CliRunner().invoke(main, ["analyze", "resnet18", "--images", str(tmp_path / "photos.pt"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"] == len(PHOTOS)  # read at 48x48, not the model's default 224x224
    missing = CliRunner().invoke(main, ["analyze", "resnet18", "--images", str(tmp_path / "none.pt")])
    assert missing.exit_code == 2 and "no such image file or folder" in missing.stderr


def test_cli_analyze_without_matplotlib(photo_folder, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    args = ["analyze", "resnet18", "--images", str(photo_folder), "--input-size", "3", "32", "32"]
    refused = CliRunner().invoke(main, args + ["--plot", str(tmp_path / "figs")])
    assert refused.exit_code == 2 and "pip install 'ghostify[plot]'" in refused.stderr
    assert not (tmp_path / "figs").exists()
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.stderr
    assert "suggested" in plain.stdout and "layer1.0.conv1" in plain.stdout


def test_ghost_figures_show_each_ghost_beside_the_original_map_it_stands_for(tmp_path):
    """Exact ghosts (a 1x1 conv whose channels come in scaled pairs, shuffled): in the paper's Figs. 4-5, every
    intrinsic map equals the original map shown beside it and every ghost is that original map exactly."""
    import matplotlib.image

    from ghostify.figures import ghost_maps

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1, bias=False)).eval()
    with torch.no_grad():
        weight = torch.randn(8, 8, 1, 1)
        model[2].weight.copy_(torch.cat([weight, weight * (torch.rand(8, 1, 1, 1) + 0.5)])[torch.randperm(16)])
    x = photos(32)
    ghost = ghostify.convert(model, s=2, d=1, example_inputs=x[:1]).eval()
    row = ghost.ghostify_result.replaced[0]
    grid = ghost_maps(ghost, model, row, (x,))
    assert len(grid) == 6 and all(len(line) == 4 for line in grid)
    for (_, theirs), (_, intrinsic), (_, made), (_, other) in grid:
        scale = theirs.abs().max()
        assert torch.allclose(intrinsic, theirs, atol=1e-4 * scale) and torch.allclose(made, other, atol=1e-4 * scale)
    assert any(not torch.allclose(line[0][1], line[3][1]) for line in grid)  # the pairs are different maps
    result = ghostify.analyze(ghost, x, tables=["2"], plot=str(tmp_path / "figs"), original=model)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["ghosts_2.png", "maps_2.png", "redundancy.png"]
    height, width = matplotlib.image.imread(str(tmp_path / "figs" / "ghosts_2.png")).shape[:2]
    assert 300 <= width <= 4000 and 200 <= height <= 4000
    assert str(tmp_path / "figs" / "ghosts_2.png") in result.figures


def test_cli_original_is_only_for_a_ghostify_files_figures(photo_folder, tmp_path):
    args = ["analyze", "resnet18", "--images", str(photo_folder), "--input-size", "3", "32", "32"]
    refused = CliRunner().invoke(main, args + ["--original", "resnet18", "--layer", "layer1.0", "--plot",
                                               str(tmp_path / "figs")])
    assert refused.exit_code == 2 and "--original is for a ghostify file" in refused.stderr


def test_an_even_cheap_kernel_is_refused_before_any_work(photo_folder):
    refused = CliRunner().invoke(main, ["analyze", "resnet18", "--images", str(photo_folder), "--cheap-d", "2"])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "Invalid value for '--cheap-d': must be an odd integer >= 1, got 2" in refused.stderr
    with pytest.raises(ValueError, match="d must be an odd integer >= 1, got 4"):  # before the model runs:
        ghostify.analyze(torchvision.models.resnet18(), photos(32)[:2, :1], d=4, progress=False)  # 1 channel
