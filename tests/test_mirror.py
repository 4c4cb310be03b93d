"""Calibration also fits on mirror images of its inputs where a layer sees fewer output positions than its filters
have weights: how many versions the rule takes (constructed layers), that they are the flips, that a real model at
its usual size needs none, and that on a trained model the mirror images bring held-out outputs closer."""

from types import SimpleNamespace

import pytest
import torch
import torchvision

import ghostify
from ghostify.init.data import mirrored


def _layer(positions, weights, name="layer"):
    """A converted layer whose output has ``positions`` pixels per input and whose filters have ``weights``."""
    return SimpleNamespace(name=name, in_channels=weights, primary_kernel=(1, 1), output_shape=(1, 8, positions, 1))


@pytest.mark.parametrize("weights, copies", [(40, 1), (64, 1), (65, 2), (128, 2), (129, 4), (100000, 4)])
def test_as_many_flips_as_the_neediest_layer_takes(weights, copies):
    x = torch.randn(4, 3, 4, 4)  # 4 inputs: 16 output positions per layer below, 64 in all
    batches, found, why = mirrored([(x,)], [_layer(16, 8, "easy"), _layer(16, weights, "hard")])
    assert found == copies and len(batches) == copies
    versions = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]  # the last dimension first, then both
    for batch, expected in zip(batches, versions):
        assert torch.equal(batch[0], expected)
    assert (why is None) == (copies == 1)
    if why:
        assert why == f"hard sees 64 output positions for {weights} weights per filter"


def test_flips_stop_at_every_combination_and_skip_multi_input_models():
    x = torch.randn(2, 1, 16)  # one spatial dimension: the input and its mirror image
    batches, copies, _ = mirrored([(x,)], [_layer(16, 10000)])
    assert copies == 2 and torch.equal(batches[1][0], x.flip(-1))
    assert mirrored([(x, x)], [_layer(16, 10000)])[1] == 1


def test_resnet50_on_256_images_at_224_needs_no_mirror_image():
    model = torchvision.models.resnet50()
    ghost = ghostify.convert(model, init="random", example_inputs=torch.randn(1, 3, 224, 224))
    images = torch.zeros(1, 3, 224, 224).expand(256, -1, -1, -1)
    layers = ghost.ghostify_result.replaced
    assert mirrored([(images,)], layers)[1] == 1  # calibration time stays what it was
    assert mirrored([(images[:64],)], layers)[1] == 2  # 64 images: layer4 sees 3,136 positions for 4,608 weights


def test_mirror_images_bring_held_out_outputs_closer(digits_model, calibrated_error):
    calibration = digits_model[1][:3]  # 3 images: the 8x8 layers see 192 positions for 288 weights
    errors = {}
    for mirror in (True, False):
        ghost, errors[mirror] = calibrated_error(calibration, calibration_mirror=mirror)
        notes = ghost.ghostify_result.notes
        assert ("mirror" in notes) == mirror
        assert "2 versions" in notes.get("mirror", "2 versions")
    assert errors[True] < 0.8 * errors[False], errors


def test_cli_fits_on_the_inputs_alone_with_no_mirror(calibrated_notes):
    assert "4 versions" in calibrated_notes()["mirror"] and "mirror" not in calibrated_notes("--no-mirror")
