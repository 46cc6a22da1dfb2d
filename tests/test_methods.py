"""Every registered method: builds from its defaults, takes two steps, gives a finite
loss and trains only what it should. Plus FT's loss maths, the NaN guard, and resume."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainers.data import ArrayImageDataset
from trainers.methods import REGISTRY, FitContext, get_method
from trainers.methods.ft import FTOptions, FTTask
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks, NonFiniteLossError, OptimConfig, train

CLASSES = ["circle", "square", "ring", "star"]
TWO_STEPS = {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TOY_ARCH, None, augment=False)   # random init: fast, no cache needed


@pytest.fixture
def dataset(clip, tiny_images):
    images, labels = tiny_images
    return ArrayImageDataset(images, labels, clip.eval_transform)


def classifier(clip):
    return zero_shot_classifier(clip, CLASSES, ["a photo of a {}"])


def options_for(method, **extra):
    names = {f.name for f in dataclasses.fields(method.options)}
    return method.options(**{k: v for k, v in {**TWO_STEPS, **extra}.items() if k in names})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_builds_trains_two_steps_and_only_what_it_should(name, clip, dataset):
    method = get_method(name)
    assert method.paper.startswith("https://")
    method.options()                                       # defaults are valid
    if method.post_hoc:
        return                                             # post-hoc: tested in their own files
    model = classifier(clip)
    before = copy.deepcopy(model.state_dict())
    history = []
    hooks = Hooks(on_epoch_end=lambda e, m, s: history.append(m), progress=False)
    fitted = method.fit(model, options_for(method), FitContext(dataset, torch.device("cpu"), 0, hooks))
    after = fitted.state_dict()
    if name == "zeroshot":
        assert all(torch.equal(before[k], after[k]) for k in before)
        return
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    params = {k for k, _ in fitted.named_parameters()}
    assert params <= changed, sorted(params - changed)[:5]            # FT trains everything
    bn_stats = {k for k in before if "running_" in k}
    assert bn_stats and not (bn_stats & changed)                      # BN statistics frozen


def test_bn_statistics_update_when_not_frozen(clip, dataset):
    model = classifier(clip)
    before = copy.deepcopy(model.state_dict())
    ft = get_method("ft")
    ft.fit(model, options_for(ft, freeze_bn_stats=False),
           FitContext(dataset, torch.device("cpu"), 0, Hooks(progress=False)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "running_mean" in k)


def test_label_smoothing_loss_matches_the_formula(clip, dataset):
    model = classifier(clip).eval()
    images = torch.stack([dataset[i][0] for i in range(8)])
    labels = torch.tensor([dataset[i][1] for i in range(8)])
    ls = 0.2
    loss = FTTask(model, FTOptions(label_smoothing=ls)).loss(images, labels)
    log_p = F.log_softmax(model(images), dim=-1)
    nll = -log_p.gather(1, labels[:, None]).mean()
    uniform = -log_p.mean(dim=1).mean()
    assert torch.allclose(loss, (1 - ls) * nll + ls * uniform, atol=1e-5)


def test_nan_loss_stops_training_with_a_clear_error(clip, dataset):
    model = classifier(clip)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    ft = get_method("ft")
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 0, step 0"):
        ft.fit(model, options_for(ft), FitContext(dataset, torch.device("cpu"), 0, Hooks(progress=False)))


def test_resume_from_an_epoch_checkpoint_is_exact(clip, dataset):
    cfg = OptimConfig(lr=1e-3, epochs=2, batch_size=8, warmup_steps=1, seed=3)

    def run(model, hooks):
        torch.manual_seed(0)
        return train(FTTask(model, FTOptions()), dataset, cfg, torch.device("cpu"), hooks)

    straight = classifier(clip)
    run(straight, Hooks(progress=False))

    saved = {}

    def stop_after_first_epoch(epoch, metrics, state):
        saved.update(copy.deepcopy(state))
        raise KeyboardInterrupt  # the trial dies after its first checkpoint

    interrupted = classifier(clip)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, Hooks(on_epoch_end=stop_after_first_epoch, progress=False))
    resumed = classifier(clip)
    history = run(resumed, Hooks(resume_state=saved, progress=False))
    assert [h["epoch"] for h in history] == [0, 1]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
