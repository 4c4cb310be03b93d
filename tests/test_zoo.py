"""The model zoo: registry behaviour, and every registered model against the paper's figures."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

from ghostify.count import Counts
from ghostify.models import (
    GhostNet,
    _registry,
    get_model,
    get_model_builder,
    list_models,
    model_input_size,
    register_model,
)

# (parameters, multiply-adds) from the paper: Table 7 (ImageNet, 224x224) and Table 5 (CIFAR-10, 32x32).
PAPER_COUNTS = {
    "ghostnet_050": (2.6e6, 42e6),
    "ghostnet_100": (5.2e6, 141e6),
    "ghostnet_130": (7.3e6, 226e6),
    "cifar_vgg16": (15.0e6, 313e6),
    "cifar_resnet56": (0.85e6, 125e6),
}

# The paper counts the multiply-adds of convolutions and linear layers; fvcore also counts batch norm
# (foldable into the convs) and pooling, which the comparison takes out.
_NOT_IN_PAPER_FLOPS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
)


@functools.lru_cache(maxsize=None)
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name).eval()


def _input(name: str) -> torch.Tensor:
    return torch.randn(1, *model_input_size(name))


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_forward_shape(name: str) -> None:
    model = _built(name)
    with torch.no_grad():
        out = model(_input(name))
    num_classes = inspect.signature(get_model_builder(name)).parameters["num_classes"].default
    assert out.shape == (1, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_num_classes(name: str) -> None:
    model = get_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *model_input_size(name))).shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_matches_paper_counts(name: str) -> None:
    if name not in PAPER_COUNTS:
        pytest.skip(f"no paper figures recorded for {name}")
    params, flops = PAPER_COUNTS[name]
    model = _built(name)
    counts = Counts(model, (_input(name),))
    left_out = sum(counts.module_flops(n) for n, m in model.named_modules() if isinstance(m, _NOT_IN_PAPER_FLOPS))
    assert counts.params == pytest.approx(params, rel=0.05)
    assert counts.flops - left_out == pytest.approx(flops, rel=0.05)


@pytest.mark.parametrize("name", list_models())
def test_zoo_builder_is_keyword_only(name: str) -> None:
    with pytest.raises(TypeError):
        get_model_builder(name)(10)


def test_list_models_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"ghostnet_050", "ghostnet_100", "ghostnet_130", "cifar_vgg16", "cifar_resnet56"} <= set(names)


def test_model_input_size() -> None:
    assert model_input_size("ghostnet_100") == (3, 224, 224)
    assert model_input_size("cifar_resnet56") == (3, 32, 32)


def test_register_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="already registered as 'ghostnet_100'"):
        register_model("ghostnet_100")(lambda: nn.Identity())


def test_register_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))

    @register_model(input_size=(1, 28, 28))
    def tiny_net(*, num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))

    assert "tiny_net" in list_models()
    assert model_input_size("tiny_net") == (1, 28, 28)
    assert get_model("tiny_net", num_classes=3)(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("size", [(3, 32), (3, 0, 32), (3.0, 32, 32)])
def test_register_bad_input_size_raises(size) -> None:
    with pytest.raises(ValueError, match="input_size"):
        register_model("never_registered", input_size=size)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="did you mean .*'ghostnet_100'"):
        get_model("ghostnet_10")
    with pytest.raises(ValueError, match="unknown model 'resnet_56_cifar'"):
        model_input_size("resnet_56_cifar")


def test_ghostnet_any_width() -> None:
    model = GhostNet(width=0.75, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="width must be positive"):
        GhostNet(width=0)


@pytest.mark.parametrize("width, channels", [(1.0, [24, 40, 112, 160]), (0.5, [12, 20, 56, 80])])
def test_ghostnet_features_only(width: float, channels: list) -> None:
    model = GhostNet(width=width, features_only=True).eval()
    assert model.feature_strides == [4, 8, 16, 32]
    assert model.feature_channels == channels
    assert not hasattr(model, "classifier")
    with torch.no_grad():
        features = model(torch.randn(1, 3, 128, 96))
    assert [f.shape for f in features] == [(1, c, 128 // s, 96 // s) for c, s in zip(channels, [4, 8, 16, 32])]
