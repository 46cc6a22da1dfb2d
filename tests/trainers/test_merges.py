"""Merging methods, each by the property that makes it what it is: a soup of one trial is
that trial's model and a uniform soup is the members' mean; a greedy soup is never below
its best member on ID validation (and says when it kept that one alone); Model Stock of
identical models is that model, and elsewhere follows t = k cos / ((k - 1) cos + 1) per
layer; a sweep file's `of` must name a trained entry."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import image_task_spec
from trainers.data.benchmark import ArrayImageDataset
from trainers.evaluate import predict
from trainers.methods import FitContext, Fitted, StartPoint, get_method, text_tower_state
from trainers.methods.model_stock import interpolation_ratio, mean_cosine, stock_layer
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks

CLASSES = ["circle", "square", "ring", "star"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def start():
    torch.manual_seed(0)
    clip = load_clip(TOY_ARCH, None, augment=False)
    return StartPoint(clip, zero_shot_classifier(clip, CLASSES, ["a {}"]), tuple(CLASSES),
                      ("a {}",))


@pytest.fixture
def val_set(start, tiny_images):
    images, labels = tiny_images
    return ArrayImageDataset(images, labels, start.clip.eval_transform)


def member(start: StartPoint, seed: int, scale: float = 0.02, text: bool = False) -> Fitted:
    """The zero-shot model with every floating tensor moved by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    classifier = copy.deepcopy(start.zero_shot)
    with torch.no_grad():
        for tensor in classifier.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    tower = None
    if text:
        tower = {k: v + scale * torch.randn(v.shape, generator=generator)
                 if v.is_floating_point() else v.clone()
                 for k, v in text_tower_state(start.clip.model).items()}
    return Fitted(classifier.eval(), tower)


def merge(name: str, start: StartPoint, members: list[Fitted], val_set=None, **options):
    rows = []
    hooks = Hooks(on_epoch_end=lambda epoch, metrics, state: rows.append(metrics), progress=False)
    method = get_method(name)
    fitted = method.fit(start, method.options(of="ft", **options),
                        FitContext(None, CPU, hooks=hooks, members=lambda: members,
                                   val_set=val_set))
    return fitted, rows


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def accuracy(fitted: Fitted, val_set) -> float:
    logits, labels = predict(fitted.classifier, val_set, CPU)
    return float((logits.argmax(1) == labels).float().mean())


@pytest.mark.parametrize("kind", ["uniform", "greedy"])
def test_a_soup_of_one_trial_is_that_trials_model(start, val_set, kind):
    one = member(start, 1, text=True)
    soup, rows = merge("soup", start, [one], val_set, kind=kind)
    assert same(soup.classifier.state_dict(), one.classifier.state_dict())
    assert same(soup.text_tower, one.text_tower)
    assert rows[0]["soup_size"] == 1.0


def test_a_uniform_soup_is_the_members_mean_towers_included(start):
    members = [member(start, s, text=True) for s in (1, 2, 3)]
    soup, rows = merge("soup", start, members, kind="uniform")
    for key, value in soup.classifier.state_dict().items():
        tensors = [m.classifier.state_dict()[key] for m in members]
        if value.is_floating_point():
            assert torch.allclose(value, torch.stack(tensors).mean(0), atol=1e-7), key
        else:
            assert torch.equal(value, tensors[0]), key
    key = next(k for k in soup.text_tower if soup.text_tower[k].is_floating_point())
    assert torch.allclose(soup.text_tower[key],
                          torch.stack([m.text_tower[key] for m in members]).mean(0), atol=1e-7)
    assert rows[0]["soup_size"] == 3.0 and rows[0]["soup_candidates"] == 3.0


def test_a_greedy_soup_is_never_below_its_best_member(start, val_set):
    # near members, and one moved so far that averaging it in can only hurt
    members = [member(start, 1), member(start, 2), member(start, 3, scale=5.0), member(start, 4)]
    best = max(accuracy(m, val_set) for m in members)
    soup, rows = merge("soup", start, members, val_set, kind="greedy")
    assert accuracy(soup, val_set) >= best
    assert rows[0]["soup_val_acc"] == pytest.approx(accuracy(soup, val_set))
    assert 1.0 <= rows[0]["soup_size"] <= 4.0 and rows[0]["soup_candidates"] == 4.0


def test_a_greedy_soup_that_keeps_one_member_says_so(start, val_set, monkeypatch):
    """Every average scoring below the best member: the soup is that member, size 1."""
    from trainers.methods import soup as soup_module
    members = [member(start, 1), member(start, 2), member(start, 3)]
    scores = iter([0.5, 0.9, 0.7, 0.8, 0.6])     # members, then the two candidate soups
    monkeypatch.setattr(soup_module, "val_accuracy", lambda *a: next(scores))
    soup, rows = merge("soup", start, members, val_set, kind="greedy")
    assert same(soup.classifier.state_dict(), members[1].classifier.state_dict())
    assert rows[0]["soup_size"] == 1.0 and rows[0]["soup_val_acc"] == 0.9
    # and the sweep says so (printed, and in `orch report`)
    (note,) = get_method("soup").notes(rows)
    assert "kept 1 of 3 members" in note and "best member alone" in note
    assert get_method("soup").notes([{**rows[0], "soup_size": 2.0}]) == []


def test_model_stock_of_identical_models_is_that_model(start):
    one = member(start, 1, text=True)
    stock, _ = merge("model_stock", start, [one, copy.deepcopy(one), copy.deepcopy(one)])
    assert same(stock.classifier.state_dict(), one.classifier.state_dict())
    assert same(stock.text_tower, one.text_tower)


def test_model_stock_follows_the_papers_ratio_per_layer():
    pre = torch.tensor([1.0, -1.0])
    angle = math.radians(60)                       # cos = 0.5, k = 2: t = 1 / 1.5 = 2/3
    tensors = [pre + torch.tensor([2.0, 0.0]),
               pre + 3 * torch.tensor([math.cos(angle), math.sin(angle)])]
    assert mean_cosine([t - pre for t in tensors]) == pytest.approx(0.5)
    assert interpolation_ratio(2, 0.5) == pytest.approx(2 / 3)
    expected = 2 / 3 * torch.stack(tensors).mean(0) + 1 / 3 * pre
    assert torch.allclose(stock_layer(tensors, pre), expected, atol=1e-6)
    # orthogonal deltas fall back to the pre-trained layer; aligned ones keep the mean
    assert torch.allclose(stock_layer([pre + torch.tensor([1.0, 0.0]),
                                       pre + torch.tensor([0.0, 1.0])], pre), pre)
    aligned = [pre + torch.tensor([1.0, 1.0]), pre + torch.tensor([2.0, 2.0])]
    assert torch.allclose(stock_layer(aligned, pre), torch.stack(aligned).mean(0))
    # three members: the mean of the three pairwise cosines
    three = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    assert mean_cosine(three) == pytest.approx((0 + 2 * math.sqrt(0.5)) / 3)


def test_model_stock_needs_two_members(start):
    with pytest.raises(ValueError, match="at least 2 fine-tuned trials of 'ft'"):
        merge("model_stock", start, [member(start, 1)])


def test_of_must_name_a_trained_entry_of_the_sweep(tmp_path):
    from orchestrator.spec import parse_spec
    from orchestrator.spec.schema import SpecError
    base = image_task_spec(tmp_path, method=None, grid=None, ensemble=None)
    ft = {"name": "ft", "lr": 1e-3, "epochs": 1, "batch_size": 8, "grid": {"seed": [0, 1]}}
    for of, message in (("lp", "'lp' is not a trained method entry"),
                        ("zeroshot", "'zeroshot' is not a trained method entry")):
        with pytest.raises(SpecError, match=message) as err:
            parse_spec({**base, "methods": [{"name": "zeroshot"}, ft,
                                            {"name": "model_stock", "of": of}]})
        assert err.value.path == "methods[2].of"
