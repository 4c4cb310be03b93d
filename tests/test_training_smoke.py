"""Zoo models train: a few SGD steps on real digits (scikit-learn's ``load_digits``) lower the loss.

The 8x8 digits are upsampled to 32x32 and repeated over 3 channels. Each model fits one fixed batch, which
checks that gradients reach every layer and point downhill without the noise of changing batches.
"""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

from ghostify.models import get_model

STEPS = 15
BATCH = 32


def _digits_batch(seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    images = (images - images.mean()) / images.std()
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:BATCH]
    return images[pick].contiguous(), torch.tensor(digits.target)[pick]


def _losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["ghostnet_050", "cifar_resnet56"])
def test_training_smoke_loss_goes_down(name: str) -> None:
    torch.manual_seed(0)
    images, labels = _digits_batch(seed=0)
    losses = _losses(get_model(name, num_classes=10).train(), images, labels)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, f"loss did not go down: {losses}"


def test_training_smoke_ghost_resnet56_loss_goes_down() -> None:
    """Ghost-ResNet-56 (Table 5: every conv, the stem included, a Ghost module with s=2, d=3) trains from scratch."""
    import ghostify

    torch.manual_seed(0)
    images, labels = _digits_batch(seed=0)
    model = ghostify.convert(get_model("cifar_resnet56", num_classes=10), s=2, d=3, include_stem=True,
                             example_inputs=images[:1], init="random")
    assert len(model.ghostify_result.replaced) == 55 and not model.ghostify_result.skipped
    losses = _losses(model.train(), images, labels)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, f"loss did not go down: {losses}"
