"""Every registered method: builds from its defaults, takes two steps with a finite loss,
updates exactly the parts it declares and leaves its start point untouched. Plus FT's
loss maths, the NaN guard, resume (FT, and LP-FT in either phase), and the per-epoch
validation early stopping reads."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainers.data import ArrayImageDataset
from trainers.evaluate import predict
from trainers.methods import (HEAD, IMAGE_TOWER, PARTS, REGISTRY, TEXT_TOWER, FitContext,
                              Fitted, StartPoint, get_method, rebuild_head)
from trainers.methods.flyp import FLYPOptions, FLYPTask, prompt_tokens
from trainers.methods.ft import FTOptions, FTTask
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import MAIN_PHASE, Hooks, NonFiniteLossError, OptimConfig, train

CLASSES = ["circle", "square", "ring", "star"]
TEMPLATES = ["a photo of a {}", "a {}"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TOY_ARCH, None, augment=False)   # random init: fast, no cache needed


@pytest.fixture
def dataset(clip, tiny_images):
    images, labels = tiny_images
    return ArrayImageDataset(images, labels, clip.eval_transform)


def start_point(clip) -> StartPoint:
    return StartPoint(clip, zero_shot_classifier(clip, CLASSES, TEMPLATES), tuple(CLASSES),
                      tuple(TEMPLATES))


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A plain open_clip state dict of the toy architecture from another random init:
    what `checkpoint` loads in the registry test (it replaces every part)."""
    import open_clip
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "other.pt"
    state = open_clip.create_model(TOY_ARCH).state_dict()
    # every tensor moved (a fresh init leaves BatchNorm weights at 1 and biases at 0)
    torch.save({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in state.items()}, path)
    return str(path)


def options_for(method, **extra):
    """The method's own two-step options (`Method.smoke`: 16 images, batch 8, one epoch;
    LP-FT one in each phase), with `extra` on top."""
    return method.options(**{**method.smoke, **extra})


def epoch_options(method, epochs: int) -> dict:
    """Every epoch count among the method's smoke options (LP-FT has one per phase)."""
    names = [k for k in method.smoke if k == "epochs" or k.endswith("_epochs")]
    assert names, f"{method.name}: no epoch count among its smoke options"
    return dict.fromkeys(names, epochs)


def required(method, other_weights) -> dict:
    """Options a method has no default for (the one table the registry test needs)."""
    return {"path": other_weights} if method.name == "checkpoint" else {}


def parts_of(start: StartPoint, fitted) -> dict[str, dict[str, torch.Tensor]]:
    """The model split into the parts methods declare: head, image tower, text tower (the
    CLIP's tensors outside `visual.`, logit scale included)."""
    text = fitted.text_tower if fitted.text_tower is not None else {
        k: v for k, v in start.clip.model.state_dict().items() if not k.startswith("visual.")}
    state = fitted.classifier.state_dict()
    return {HEAD: {k: v for k, v in state.items() if k.startswith("head.")},
            IMAGE_TOWER: {k: v for k, v in state.items() if k.startswith("image_encoder.")},
            TEXT_TOWER: dict(text)}


def trainable_keys(start: StartPoint) -> dict[str, set[str]]:
    """Per part, the names of its parameters (buffers such as BatchNorm statistics are
    not trained: frozen by default)."""
    clip_params = {k for k, _ in start.clip.model.named_parameters()}
    return {HEAD: {f"head.{k}" for k, _ in start.zero_shot.head.named_parameters()},
            IMAGE_TOWER: {f"image_encoder.{k}" for k, _ in
                          start.zero_shot.image_encoder.named_parameters()},
            TEXT_TOWER: {k for k in clip_params if not k.startswith("visual.")}}


# Merging methods (soups, Model Stock) change what their members changed: their own
# properties are tested in test_merges.py.
@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items() if not m.merges))
def test_method_trains_exactly_what_it_declares_and_leaves_its_start_alone(
        name, clip, dataset, other_weights):
    method = get_method(name)
    assert method.paper.startswith("https://") and method.trains <= set(PARTS)
    method.options(**required(method, other_weights))      # defaults are valid
    if "epochs" in {f.name for f in dataclasses.fields(method.options)}:
        assert method.smoke, "a method that takes steps declares its two-step options (smoke)"
    start = start_point(clip)
    clip_before = copy.deepcopy(start.clip.model.state_dict())
    zs_before = copy.deepcopy(start.zero_shot.state_dict())
    before = copy.deepcopy(parts_of(start, Fitted(start.zero_shot)))
    history = []
    hooks = Hooks(on_epoch_end=lambda e, m, s: history.append(m), progress=False)
    fitted = method.fit(start, options_for(method, **required(method, other_weights)),
                        FitContext(dataset, CPU, 0, hooks))

    # fit never modifies what it was given
    for key, value in start.clip.model.state_dict().items():
        assert torch.equal(value, clip_before[key]), key
    for key, value in start.zero_shot.state_dict().items():
        assert torch.equal(value, zs_before[key]), key

    phases = 2 if name == "lp_ft" else (0 if name in ("zeroshot", "checkpoint") else 1)
    assert len(history) == phases
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    after = parts_of(start, fitted)
    params = trainable_keys(start)
    if TEXT_TOWER in method.trains:
        # the head is rebuilt from the text tower: new weights, bias 0 as in every
        # zero-shot head
        params[HEAD].discard("head.bias")
        assert not after[HEAD]["head.bias"].any()
    for part in PARTS:
        changed = {k for k in params[part] if not torch.equal(before[part][k], after[part][k])}
        if part in method.trains:
            # every parameter of a trained part moved (AdamW's weight decay moves even the
            # ones a batch gives no gradient)
            assert changed == params[part], (part, sorted(params[part] - changed)[:5])
        else:
            assert not changed, (part, sorted(changed)[:5])
    bn_stats = {k for k in before[IMAGE_TOWER] if "running_" in k}
    if name != "checkpoint":                   # a loaded model brings its own statistics
        assert bn_stats and all(torch.equal(before[IMAGE_TOWER][k], after[IMAGE_TOWER][k])
                                for k in bn_stats)              # BN statistics frozen


def test_bn_statistics_update_when_not_frozen(clip, dataset):
    start = start_point(clip)
    ft = get_method("ft")
    fitted = ft.fit(start, options_for(ft, freeze_bn_stats=False),
                    FitContext(dataset, CPU, 0, Hooks(progress=False)))
    before, after = start.zero_shot.state_dict(), fitted.classifier.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)


def test_label_smoothing_loss_matches_the_formula(clip, dataset):
    model = start_point(clip).zero_shot.eval()
    images = torch.stack([dataset[i][0] for i in range(8)])
    labels = torch.tensor([dataset[i][1] for i in range(8)])
    ls = 0.2
    loss = FTTask(model, FTOptions(label_smoothing=ls)).loss(images, labels)
    log_p = F.log_softmax(model(images), dim=-1)
    nll = -log_p.gather(1, labels[:, None]).mean()
    uniform = -log_p.mean(dim=1).mean()
    assert torch.allclose(loss, (1 - ls) * nll + ls * uniform, atol=1e-5)


def test_lp_trains_on_the_features_it_is_given(clip, dataset):
    """LP never runs the image tower when orch hands it cached features: features that
    are not the tower's output give a different head."""
    start = start_point(clip)
    lp = get_method("lp")
    real = lp.fit(start, options_for(lp), FitContext(dataset, CPU, 0, Hooks(progress=False)))
    calls = []
    fake = torch.nn.functional.normalize(torch.randn(len(dataset), 64), dim=1)
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])

    def cached():
        calls.append(1)
        return fake, labels

    given = lp.fit(start, options_for(lp), FitContext(dataset, CPU, 0, Hooks(progress=False),
                                                      train_features=cached))
    assert calls == [1]
    assert not torch.equal(real.classifier.head.weight, given.classifier.head.weight)


def test_nan_loss_stops_training_with_a_clear_error(clip, dataset):
    start = start_point(clip)
    with torch.no_grad():
        start.zero_shot.head.weight.fill_(float("nan"))
    ft = get_method("ft")
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 0, step 0"):
        ft.fit(start, options_for(ft), FitContext(dataset, CPU, 0, Hooks(progress=False)))


def test_resume_from_an_epoch_checkpoint_is_exact(clip, dataset):
    cfg = OptimConfig(lr=1e-3, epochs=2, batch_size=8, warmup_steps=1, seed=3)

    def run(model, hooks):
        torch.manual_seed(0)
        return train(FTTask(model, FTOptions()), dataset, cfg, CPU, hooks)

    straight = start_point(clip).zero_shot
    run(straight, Hooks(progress=False))

    saved = {}

    def stop_after_first_epoch(epoch, metrics, state):
        saved.update(copy.deepcopy(state))
        raise KeyboardInterrupt  # the trial dies after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
        run(start_point(clip).zero_shot, Hooks(on_epoch_end=stop_after_first_epoch, progress=False))
    assert saved["epoch"] == 0
    resumed = start_point(clip).zero_shot
    epochs = []
    assert run(resumed, Hooks(resume_state=saved, progress=False,
                              on_epoch_end=lambda e, m, s: epochs.append(m["epoch"]))) is None
    assert epochs == [1]                   # the resumed run trains only what was left
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("name, stop_in", [("lp_ft", "lp"), ("lp_ft", MAIN_PHASE),
                                           ("flyp", MAIN_PHASE), ("carot", MAIN_PHASE)])
def test_resume_in_any_phase_gives_the_uninterrupted_result(name, stop_in, clip, dataset):
    """A run killed after its first checkpoint of `stop_in` and restarted from it ends
    exactly where an uninterrupted run ends (LP-FT: the probe ("lp") is not redone after a
    stop in its FT phase, MAIN_PHASE; FLYP/CaRot: template draws and the EMA teacher ride in the checkpoint)."""
    method = get_method(name)
    options = options_for(method, **epoch_options(method, 2))

    def fit(hooks):
        return method.fit(start_point(clip), options, FitContext(dataset, CPU, 0, hooks))

    straight = fit(Hooks(progress=False)).classifier.state_dict()
    saved = {}

    def stop(epoch, metrics, state):
        if state["phase"] == stop_in:
            saved.update(copy.deepcopy(state))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(Hooks(on_epoch_end=stop, progress=False))
    phases = []
    resumed = fit(Hooks(resume_state=saved, progress=False,
                        on_epoch_end=lambda e, m, s: phases.append(s["phase"])))
    if name == "lp_ft" and stop_in == MAIN_PHASE:
        assert phases == [MAIN_PHASE]      # only the rest of FT ran: no probe again
    for key, value in straight.items():
        assert torch.equal(value, resumed.classifier.state_dict()[key]), key

# -- per-epoch validation, what early stopping (the sweep's `search: asha`) reads: after
# each epoch of a method's main phase the loop measures the classifier being trained, as
# evaluation would see it at that moment.

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
def test_every_epoch_is_validated_on_the_model_as_it_then_is(name, clip, dataset):
    fitted, rows, seen = fit_with_validation(name, start_point(clip), dataset, epochs=2)
    assert [r["epochs_done"] for r in rows] == [1, 2]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in rows)
    # the last validation saw the fitted model itself (FLYP/CaRot: its head rebuilt
    # from the fine-tuned text tower, exactly as evaluation rebuilds it)
    final, _ = predict(fitted.classifier, dataset, CPU, batch_size=8)
    torch.testing.assert_close(seen[-1], final, rtol=1e-5, atol=1e-5)
    assert rows[-1]["val_acc"] == accuracy(fitted.classifier, dataset)
    # and the first one a model that training then moved on from
    assert not torch.allclose(seen[0], seen[1])


def test_only_the_main_phase_is_validated(clip, dataset):
    """LP-FT's probe is a phase of its own: ASHA's clock counts FT epochs only."""
    _, rows, seen = fit_with_validation("lp_ft", start_point(clip), dataset, epochs=2, lp_epochs=3)
    assert len(rows) == 5 and len(seen) == 2
    assert [r.get("epochs_done") for r in rows] == [None, None, None, 1, 2]


def test_a_task_without_a_classifier_is_not_validated(clip, dataset):
    """LP trains a head on cached features: nothing to measure per epoch, nothing stops it."""
    _, rows, seen = fit_with_validation("lp", start_point(clip), dataset, epochs=2)
    assert len(rows) == 2 and not seen and all("val_acc" not in r for r in rows)


def test_flyp_classifier_before_training_is_the_zero_shot_model(clip, dataset):
    start = start_point(clip)
    model = copy.deepcopy(clip.model).eval()
    task = FLYPTask(model, prompt_tokens(start, CPU), FLYPOptions(), seed=0,
                    head=lambda m: rebuild_head(clip, m, CLASSES, TEMPLATES, CPU))
    ours, _ = predict(task.classifier(), dataset, CPU, batch_size=8)
    zero_shot, _ = predict(start.zero_shot, dataset, CPU, batch_size=8)
    torch.testing.assert_close(ours, zero_shot, rtol=1e-5, atol=1e-4)
    assert FLYPTask(model, prompt_tokens(start, CPU), FLYPOptions(), seed=0).classifier() is None
