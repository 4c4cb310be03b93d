"""The feature term of ``finetune``: each converted layer's output against the original layer's, in the channel
order the conversion recorded (and saved); exact layers give 0, a wrong order does not; tuning lowers it."""

import copy

import pytest
import torch
import torchvision
from test_exact_real_models import _exact_ghost_filters, _settle

import ghostify
from ghostify.distillation import Features


def _feature_loss(student, teacher, x) -> float:
    with Features(student, teacher) as features, torch.no_grad():
        features.record()
        student(x), teacher(x)
        return features.loss().item()


@pytest.fixture(scope="module")
def exact_resnet():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    _exact_ghost_filters(model, generator)
    x = torch.randn(8, 3, 32, 32, generator=generator)
    return _settle(model, x), x


def test_exact_layers_match_the_original_in_the_recorded_order(exact_resnet, tmp_path):
    model, x = exact_resnet
    ghost = ghostify.convert(model, s=2, d=1, example_inputs=x[:1]).eval()
    rows = ghost.ghostify_result.replaced
    assert any(row.order != sorted(row.order) for row in rows)  # readers absorbed a permutation somewhere
    assert _feature_loss(ghost, model, x) < 1e-8
    ghostify.save(ghost, tmp_path / "ghost.pt")
    loaded = ghostify.load(tmp_path / "ghost.pt", model=model).eval()
    assert _feature_loss(loaded, model, x) < 1e-8
    row = next(row for row in rows if row.order != sorted(row.order))
    row.order = sorted(row.order)  # the order a converter that forgot the permutation would assume
    assert _feature_loss(ghost, model, x) > 1e-3


def test_feature_term_is_tuned_down(digits_model):
    """Against the same run on logits only: the layers' outputs end closer to the original's, and the
    predictions agree with it as well."""
    model, x = digits_model
    ghost = ghostify.convert(model, s=4, example_inputs=x[:1])
    runs = {weight: ghostify.finetune(copy.deepcopy(ghost), model, x[:1200], epochs=2, feature_weight=weight)
            for weight in (0.0, 1.0)}
    loss = {weight: _feature_loss(student.eval(), model, x[-300:]) for weight, student in runs.items()}
    assert loss[1.0] < 0.85 * loss[0.0], loss
    agreement = {weight: student.ghostify_finetune.epochs[-1].agreement for weight, student in runs.items()}
    assert agreement[1.0] > agreement[0.0] - 0.05, agreement
    student = runs[1.0]
    assert all(not m._forward_hooks for m in student.modules()) and all(not m._forward_hooks for m in model.modules())


def test_feature_term_needs_a_converted_student(digits_model):
    model, x = digits_model
    with pytest.raises(ValueError, match="converted student"):
        ghostify.finetune(copy.deepcopy(model), model, x[:64], feature_weight=1.0)
