"""Per-epoch validation, what early stopping (the sweep's `search: asha`) reads: after each
epoch of a method's main phase the loop measures the classifier being trained, as
evaluation would see it at that moment."""
from __future__ import annotations

import copy

import pytest
import torch

from trainers.data import ArrayImageDataset
from trainers.evaluate import predict
from trainers.methods import FitContext, StartPoint, get_method, rebuild_head
from trainers.methods.flyp import FLYPOptions, FLYPTask, prompt_tokens
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks

CLASSES = ["circle", "square", "ring", "star"]
TEMPLATES = ["a photo of a {}", "a {}"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TOY_ARCH, None, augment=False)


@pytest.fixture
def start(clip):
    return StartPoint(clip, zero_shot_classifier(clip, CLASSES, TEMPLATES), tuple(CLASSES),
                      tuple(TEMPLATES))


@pytest.fixture
def dataset(clip, tiny_images):
    images, labels = tiny_images
    return ArrayImageDataset(images, labels, clip.eval_transform)


def accuracy(model: torch.nn.Module, dataset) -> float:
    logits, labels = predict(model, dataset, CPU, batch_size=8)
    return float((logits.argmax(1) == labels).float().mean())


def fit_with_validation(name: str, start, dataset, **options):
    """Fit `name` (its two-step smoke options, over two epochs), recording every epoch's
    metrics and, per validation, the logits of the classifier it was handed."""
    method = get_method(name)
    rows, seen = [], []

    def validate(classifier):
        logits, _ = predict(classifier, dataset, CPU, batch_size=8)
        seen.append(logits)
        return {"val_acc": accuracy(classifier, dataset)}

    hooks = Hooks(progress=False, validate=validate,
                  on_epoch_end=lambda epoch, metrics, state: rows.append(dict(metrics)))
    opts = method.options(**{**method.smoke, **options})
    fitted = method.fit(start, opts, FitContext(dataset, CPU, 0, hooks,
                                                train_eval_set=dataset, val_set=dataset))
    return fitted, rows, seen


@pytest.mark.parametrize("name", ["ft", "flyp", "carot"])
def test_every_epoch_is_validated_on_the_model_as_it_then_is(name, start, dataset):
    fitted, rows, seen = fit_with_validation(name, start, dataset, epochs=2)
    assert [r["epochs_done"] for r in rows] == [1, 2]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in rows)
    # the last validation saw the fitted model itself (FLYP/CaRot: its head rebuilt
    # from the fine-tuned text tower, exactly as evaluation rebuilds it)
    final, _ = predict(fitted.classifier, dataset, CPU, batch_size=8)
    torch.testing.assert_close(seen[-1], final, rtol=1e-5, atol=1e-5)
    assert rows[-1]["val_acc"] == accuracy(fitted.classifier, dataset)
    # and the first one a model that training then moved on from
    assert not torch.allclose(seen[0], seen[1])


def test_only_the_main_phase_is_validated(start, dataset):
    """LP-FT's probe is a phase of its own: ASHA's clock counts FT epochs only."""
    _, rows, seen = fit_with_validation("lp_ft", start, dataset, epochs=2, lp_epochs=3)
    assert len(rows) == 5 and len(seen) == 2
    assert [r.get("epochs_done") for r in rows] == [None, None, None, 1, 2]


def test_a_task_without_a_classifier_is_not_validated(start, dataset):
    """LP trains a head on cached features: nothing to measure per epoch, nothing stops it."""
    _, rows, seen = fit_with_validation("lp", start, dataset, epochs=2)
    assert len(rows) == 2 and not seen and all("val_acc" not in r for r in rows)


def test_flyp_classifier_before_training_is_the_zero_shot_model(clip, start, dataset):
    model = copy.deepcopy(clip.model).eval()
    task = FLYPTask(model, prompt_tokens(start, CPU), FLYPOptions(), seed=0,
                    head=lambda m: rebuild_head(clip, m, CLASSES, TEMPLATES, CPU))
    ours, _ = predict(task.classifier(), dataset, CPU, batch_size=8)
    zero_shot, _ = predict(start.zero_shot, dataset, CPU, batch_size=8)
    torch.testing.assert_close(ours, zero_shot, rtol=1e-5, atol=1e-4)
    assert FLYPTask(model, prompt_tokens(start, CPU), FLYPOptions(), seed=0).classifier() is None
