"""save/load: plain-data files, bit-identical round trips in a fresh process, atomic writes, clear errors."""

import copy
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ghostify
from ghostify.serialization import load_model
from ghostify.sources import build

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """A small CNN handed to convert as a Python object (no MODEL spec)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def converted():
    return ghostify.convert(load_model("resnet18"), s=2, d=3, example_inputs=X).eval()


def test_saved_file_is_plain_data(tmp_path, converted):
    path = tmp_path / "ghost.pt"
    ghostify.save(converted, path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "ghostify"
    assert payload["result"]["source"] == {"kind": "torchvision", "name": "resnet18"}


def test_round_trip_in_fresh_process_is_bit_identical(tmp_path, converted):
    path, expected = tmp_path / "ghost.pt", tmp_path / "expected.pt"
    ghostify.save(converted, path)
    with torch.no_grad():
        torch.save(converted(X), expected)
    script = textwrap.dedent(f"""
        import torch, ghostify
        model = ghostify.load({str(path)!r}).eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(x), torch.load({str(expected)!r})), "outputs differ"
        assert type(model.layer1[0].conv1).__name__ == "GhostModule"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_python_object_needs_model_argument(tmp_path):
    ghost = ghostify.convert(Net(), example_inputs=X).eval()
    path = tmp_path / "net.pt"
    ghostify.save(ghost, path)
    with pytest.raises(ValueError, match=r"ghostify.load\(path, model=<the original architecture>\)"):
        ghostify.load(path)
    original = Net()
    reloaded = ghostify.load(path, model=original).eval()
    assert isinstance(original.features[3], nn.Conv2d)  # the argument is copied, never converted in place
    with torch.no_grad():
        assert torch.equal(reloaded(X), ghost(X))


EVIL = """
open({marker!r}, "w").write("ran")
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
"""
SMALL_X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def small_net():
    """The architecture EVIL's build() returns, made without running EVIL."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())


@pytest.fixture
def code_file(tmp_path):
    """(path, marker, model): a file converted from evil.py:build, whose import writes the marker (removed)."""
    marker, evil = tmp_path / "marker", tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    ghost = ghostify.convert(build({"kind": "file", "path": str(evil), "factory": "build"}), init="random",
                             example_inputs=torch.randn(1, 3, 16, 16)).eval()
    assert type(ghost[2]).__name__ == "GhostModule"
    path = tmp_path / "ghost.pt"
    ghostify.save(ghost, path)
    marker.unlink()
    return path, marker, ghost


def test_load_never_runs_code_the_file_names(code_file):
    path, marker, _ = code_file
    for load in (ghostify.load, load_model):
        with pytest.raises(ValueError, match=r"converted from code \('.*evil\.py:build'\).*trust_source=True") as error:
            load(str(path))
        assert len(str(error.value).splitlines()) == 1 and "model=" in str(error.value)
    assert not marker.exists()


def test_hand_crafted_module_spec_is_never_imported(tmp_path, monkeypatch, code_file):
    path, marker, _ = code_file
    (tmp_path / "ghostify_evil_module.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = torch.load(path, weights_only=True)
    payload["result"]["source"] = {"kind": "module", "module": "ghostify_evil_module", "factory": "build"}
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"\('ghostify_evil_module:build'\).*trust_source=True"):
        ghostify.load(path)
    assert not marker.exists() and "ghostify_evil_module" not in sys.modules


@pytest.mark.parametrize("source", [{"kind": "pickle", "path": "x"}, {"name": "resnet18"}, "resnet18", [1]])
def test_unknown_source_kinds_are_refused_even_when_trusted(tmp_path, converted, source):
    path = tmp_path / "ghost.pt"
    ghostify.save(converted, path)
    payload = torch.load(path, weights_only=True)
    payload["result"]["source"] = source
    torch.save(payload, path)
    with pytest.raises(ValueError, match="names an architecture source ghostify does not build"):
        ghostify.load(path, trust_source=True)


def test_trusted_code_file_loads_identically(code_file):
    path, marker, ghost = code_file
    for reloaded in (ghostify.load(path, trust_source=True), load_model(str(path), trust_source=True)):
        assert marker.exists()  # the file's code ran, as asked
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(SMALL_X), ghost(SMALL_X))


def test_model_argument_loads_code_file_without_running_it(code_file):
    path, marker, ghost = code_file
    reloaded = ghostify.load(path, model=small_net()).eval()
    assert not marker.exists()
    with torch.no_grad():
        assert torch.equal(reloaded(SMALL_X), ghost(SMALL_X))


def test_load_into_wrong_architecture_is_clear(tmp_path):
    path = tmp_path / "net.pt"
    ghostify.save(ghostify.convert(Net(), example_inputs=X), path)
    with pytest.raises(ValueError, match="has no layer 'features.3'"):
        ghostify.load(path, model=nn.Sequential(nn.Conv2d(3, 8, 3)))
    other = Net()
    other.features[3] = nn.Conv1d(8, 16, 3, stride=2, padding=1)  # same path, another conv
    with pytest.raises(ValueError, match=r"'features.3' is a Conv1d 8->16 with kernel \(3,\), but the converted one "
                                         r"was 8->16 with kernel \(3, 3\)"):
        ghostify.load(path, model=other)


@pytest.mark.parametrize("text", ["resnet18", "ghostnet_100", "timm:resnet18", "torchvision.models:resnet18"])
def test_a_source_is_described_as_the_model_string_it_came_from(text):
    from ghostify.sources import describe, parse

    assert describe(parse(text)) == text


def test_save_plain_model_refused():
    with pytest.raises(TypeError, match="made by ghostify.convert"):
        ghostify.save(Net(), "never.pt")
    assert not os.path.exists("never.pt")


def test_saved_file_has_the_usual_permissions(tmp_path, converted):
    path = tmp_path / "ghost.pt"
    ghostify.save(converted, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_leaves_the_process_umask_alone(tmp_path, converted, monkeypatch):
    """Another thread may create files meanwhile: the umask is never flipped to be read."""
    monkeypatch.setattr(os, "umask", lambda *args: (_ for _ in ()).throw(AssertionError("umask changed")))
    ghostify.save(converted, tmp_path / "ghost.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ghost.pt"]


def test_existing_file_kept_without_overwrite(tmp_path, converted):
    path = tmp_path / "ghost.pt"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True to replace it"):
        ghostify.save(converted, path, overwrite=False)
    assert path.read_bytes() == b"keep me"


def test_failed_or_interrupted_write_leaves_nothing(tmp_path, converted, monkeypatch):
    path = tmp_path / "ghost.pt"

    def interrupted(*args, **kwargs):
        with open(args[1], "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ghostify.save(converted, path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    (None, "no such ghostify file"),
    (b"", "not a readable ghostify file"),
    (b"PK\x03\x04 truncated zip", "not a readable ghostify file"),
    ("foreign", "not a ghostify file"),
    ("truncated", "not a readable ghostify file"),
])
def test_corrupt_truncated_or_foreign_files_are_clear(tmp_path, converted, content, message):
    path = tmp_path / "bad.pt"
    if content == "foreign":
        torch.save({"weights": torch.ones(2)}, path)
    elif content == "truncated":
        ghostify.save(converted, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ghostify.load(path)


def _version_1_forward(ghost, x):
    """A Ghost module as version 1 read its weights: the ghosts of intrinsic map i at rows i * (s - 1) + k."""
    intrinsic = ghost.primary(x)
    conv = ghost.cheap_conv
    ghosts = ghost.cheap[1:](F.conv2d(intrinsic, conv.weight, conv.bias, padding=conv.padding,
                                      groups=ghost.intrinsic_channels))
    out = torch.cat([intrinsic, ghosts], 1)
    return out.index_select(1, ghost.out_index) if ghost.out_index is not None else out[:, :ghost.out_channels]


def test_version_1_files_load_with_their_old_outputs(tmp_path):
    """A file written before ghosts were ordered ghost-major (s > 2) still computes what it computed then."""
    model = ghostify.convert(Net(), s=3, d=3, example_inputs=X).eval()  # n = 8, 16: a partial last ghost run
    ghostify.save(model, tmp_path / "new.pt")
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    payload["version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    old = copy.deepcopy(model)
    for ghost in old.modules():
        if isinstance(ghost, ghostify.GhostModule):
            ghost.forward = functools.partial(_version_1_forward, ghost)
    loaded = ghostify.load(tmp_path / "old.pt", model=Net()).eval()
    with torch.no_grad():
        expected, actual = old(X), loaded(X)
        assert not torch.allclose(model(X), expected)  # the two orders really differ on these weights
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict under DataParallel"])
def test_weights_load_from_the_usual_checkpoint_layouts(tmp_path, layout):
    from ghostify.sources import load_weights

    source = Net()
    state = source.state_dict()
    saved = {"plain": state, "model": {"model": state, "epoch": 3, "optimizer": {}},
             "state_dict under DataParallel": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}[layout]
    torch.save(saved, tmp_path / "w.pth")
    model = Net()
    load_weights(model, str(tmp_path / "w.pth"))
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_a_factory_the_file_lacks_is_named(tmp_path):
    (tmp_path / "nets.py").write_text("import torch\n\ndef small():\n    return torch.nn.Conv2d(3, 8, 3)\n")
    with pytest.raises(ValueError, match=r"nets\.py has no 'nope'"):
        build({"kind": "file", "path": str(tmp_path / "nets.py"), "factory": "nope"})
