"""Activation checkpointing (`grad_checkpointing: true`): the same gradients as without it,
a forward that really keeps fewer activations, switched on only while a method trains
(never in CaRot's no-grad EMA teacher), and refused on a tower that cannot checkpoint."""
from __future__ import annotations

import copy
import dataclasses
import json

import open_clip
import open_clip.transformer
import pytest
import torch
from open_clip.model import CLIP
from torch import nn

from trainers.data import ArrayImageDataset
from trainers.methods import FitContext, StartPoint, get_method
from trainers.methods._common import GradCheckpointingError, TrainOptions, set_grad_checkpointing
from trainers.methods.flyp import FLYPOptions, FLYPTask
from trainers.methods.ft import FTOptions, FTTask
from trainers.models import TOY_ARCH, ImageClassifier, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks

CPU = torch.device("cpu")
# A small real open_clip ViT CLIP (conftest's TINY_CONFIG with two blocks per tower, so
# checkpointing has several blocks to recompute).
ARCH = "orch-test-gc-vit"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["circle", "square", "ring", "star"]
TEMPLATES = ["a photo of a {}", "a {}"]
# Checkpointing recomputes the same float32 operations on the same inputs; any difference
# can only come from a kernel ordering its sums differently, a few ulps (float32 eps =
# 1.2e-7) per operation through a few dozen operations: 1e-5 of the largest entry is
# generous for that and far below what a wrong or missing gradient would give.
RTOL = 1e-5


def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(**CONFIG).train()


def checkpoint_calls(monkeypatch) -> list[bool]:
    """Record every call of torch's checkpoint from open_clip's transformer blocks, with
    whether gradients were enabled at the time."""
    calls: list[bool] = []
    real = open_clip.transformer.checkpoint

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip.transformer, "checkpoint", counting)
    return calls


def saved_bytes_and_grads(model: nn.Module, loss_fn) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd saves for the backward pass of `loss_fn()`, and every gradient."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return saved[0], {n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None}


def assert_same_gradients(on: dict, off: dict) -> None:
    assert on.keys() == off.keys() and len(off) > 10
    for name, g in off.items():
        assert g.abs().max() > 0, name          # a real gradient, not an untouched zero
        torch.testing.assert_close(on[name], g, rtol=RTOL, atol=RTOL * float(g.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def test_image_tower_same_gradients_fewer_saved_activations(monkeypatch):
    """FT's task on an image classifier: only the image tower checkpoints."""
    clip = tiny_clip()
    torch.manual_seed(1)
    head = nn.Linear(32, 5)
    plain = ImageClassifier(copy.deepcopy(clip.visual), copy.deepcopy(head)).train()
    ckpt = ImageClassifier(copy.deepcopy(clip.visual), copy.deepcopy(head)).train()
    set_grad_checkpointing(ckpt.image_encoder, True)
    assert ckpt.image_encoder.transformer.grad_checkpointing
    assert not plain.image_encoder.transformer.grad_checkpointing
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])

    calls = checkpoint_calls(monkeypatch)
    off_bytes, off = saved_bytes_and_grads(
        plain, lambda: FTTask(plain, FTOptions()).loss(images, labels))
    assert calls == []
    on_bytes, on = saved_bytes_and_grads(
        ckpt, lambda: FTTask(ckpt, FTOptions()).loss(images, labels))
    assert calls == [True, True]                 # one checkpoint per vision block
    assert on_bytes < off_bytes                  # block activations are not kept
    assert_same_gradients(on, off)


def test_whole_clip_same_gradients_fewer_saved_activations(monkeypatch):
    """FLYP's contrastive task on the whole CLIP: both towers checkpoint, and the
    gradients of both towers and the logit scale are unchanged."""
    plain = tiny_clip()
    ckpt = copy.deepcopy(plain)
    set_grad_checkpointing(ckpt, True)
    assert ckpt.visual.transformer.grad_checkpointing and ckpt.transformer.grad_checkpointing
    texts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    tokens = open_clip.tokenize(texts, context_length=16).view(len(CLASSES), len(TEMPLATES), -1)
    torch.manual_seed(2)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])

    calls = checkpoint_calls(monkeypatch)
    # Same seed: both tasks draw the same template for every sample.
    off_bytes, off = saved_bytes_and_grads(
        plain, lambda: FLYPTask(plain, tokens, FLYPOptions(), seed=0).loss(images, labels))
    assert calls == []
    on_bytes, on = saved_bytes_and_grads(
        ckpt, lambda: FLYPTask(ckpt, tokens, FLYPOptions(), seed=0).loss(images, labels))
    assert calls == [True] * 4                   # two vision blocks, two text blocks
    assert on_bytes < off_bytes
    assert "logit_scale" in off and any(n.startswith("visual.") for n in off)
    assert any(n.startswith("transformer.") for n in off)
    assert_same_gradients(on, off)

    set_grad_checkpointing(ckpt, False)
    assert not (ckpt.visual.transformer.grad_checkpointing or ckpt.transformer.grad_checkpointing)


@pytest.fixture(scope="module")
def vit_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("gc") / f"{ARCH}.json"
    path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(path)
    return load_clip(ARCH, None, augment=False)


def dataset_for(clip, tiny_images):
    images, labels = tiny_images
    return ArrayImageDataset(images, labels, clip.eval_transform)


def options(name: str, **extra):
    """The method's own two-step options (`Method.smoke`), with `extra` on top."""
    method = get_method(name)
    return method.options(**{**method.smoke, **extra})


@pytest.mark.parametrize("name", ["ft", "lp_ft", "flyp", "carot"])
def test_methods_checkpoint_while_training_only(name, vit_clip, tiny_images, monkeypatch):
    """Every method that trains a tower checkpoints in its training steps (all of them
    with gradients on: CaRot's EMA teacher and the evaluation passes never checkpoint),
    and hands back a model with checkpointing off."""
    start = StartPoint(vit_clip, zero_shot_classifier(vit_clip, CLASSES, TEMPLATES),
                       tuple(CLASSES), tuple(TEMPLATES))
    data = dataset_for(vit_clip, tiny_images)
    assert get_method(name).options().grad_checkpointing is False     # off by default
    calls = checkpoint_calls(monkeypatch)
    history = []
    fitted = get_method(name).fit(start, options(name, grad_checkpointing=True), FitContext(
        data, CPU, 0, Hooks(on_epoch_end=lambda e, m, s: history.append(m), progress=False)))
    assert len(history) == (2 if name == "lp_ft" else 1)
    blocks = 2 if name in ("ft", "lp_ft") else 4      # image tower; or both towers
    assert len(calls) == 2 * blocks                   # two training steps, nothing else
    assert all(calls)                                 # never without gradients (teacher)
    assert not fitted.classifier.image_encoder.transformer.grad_checkpointing
    assert not start.clip.model.visual.transformer.grad_checkpointing   # start untouched

    calls.clear()
    get_method(name).fit(start, options(name), FitContext(data, CPU, 0, Hooks(progress=False)))
    assert calls == []                                # the default trains as before


def test_carot_teacher_never_checkpoints(vit_clip):
    from trainers.methods.carot import CaRotOptions, CaRotTask
    student = copy.deepcopy(vit_clip.model)
    set_grad_checkpointing(student, True)             # even a student already switched on
    task = CaRotTask(student, torch.zeros(4, 2, 16, dtype=torch.long), CaRotOptions(), seed=0)
    assert student.visual.transformer.grad_checkpointing
    assert not task.teacher.visual.transformer.grad_checkpointing
    assert not task.teacher.transformer.grad_checkpointing


@pytest.mark.parametrize("name", ["ft", "lp_ft", "flyp", "carot"])
def test_resnet_tower_is_refused_before_training(name, tiny_images):
    """open_clip's ModifiedResNet cannot checkpoint (its switch does nothing): asking for
    it fails with a message naming the option, before any step (LP-FT: before its probe)."""
    torch.manual_seed(0)
    clip = load_clip(TOY_ARCH, None, augment=False)
    start = StartPoint(clip, zero_shot_classifier(clip, CLASSES, TEMPLATES), tuple(CLASSES),
                       tuple(TEMPLATES))
    history = []
    with pytest.raises(GradCheckpointingError, match="grad_checkpointing.*ModifiedResNet"):
        get_method(name).fit(start, options(name, grad_checkpointing=True), FitContext(
            dataset_for(clip, tiny_images), CPU, 0,
            Hooks(on_epoch_end=lambda e, m, s: history.append(m), progress=False)))
    assert history == []
    assert issubclass(GradCheckpointingError, ValueError)


def test_option_is_shared_by_the_tower_training_methods():
    for name in ("ft", "lp_ft", "flyp", "carot"):
        assert issubclass(get_method(name).options, TrainOptions)
        assert options(name, grad_checkpointing=True).grad_checkpointing is True
    assert "grad_checkpointing" not in {f.name for f in dataclasses.fields(get_method("lp").options)}
