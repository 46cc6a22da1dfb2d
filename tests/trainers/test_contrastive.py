"""What makes FLYP and CaRot what they are: FLYP's loss is CLIP's contrastive loss on
(image, one random filled template) pairs; CaRot adds label smoothing, an orthogonality
constraint on the visual projection and self-distillation from an EMA teacher whose
momentum follows the schedule and which moves only on its steps."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image

from trainers.data import ArrayImageDataset
from trainers.methods import StartPoint
from trainers.methods.carot import (CaRotOptions, CaRotTask, ema_momentum, orthogonality_loss,
                                    self_distillation_loss, visual_projection)
from trainers.methods.flyp import FLYPOptions, FLYPTask, contrastive_loss, prompt_tokens
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks, OptimConfig, train

CLASSES = ("circle", "square", "ring", "star")
TEMPLATES = ("a photo of a {}", "a {}", "a sketch of a {}")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TOY_ARCH, None, augment=False)


@pytest.fixture(scope="module")
def start(clip):
    return StartPoint(clip, zero_shot_classifier(clip, CLASSES, TEMPLATES), CLASSES, TEMPLATES)


@pytest.fixture
def batch(clip):
    rng = np.random.default_rng(0)
    images = torch.stack([clip.eval_transform(Image.fromarray(
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for _ in range(6)])
    return images, torch.tensor([0, 1, 2, 3, 0, 1])


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_contrastive_loss_equals_open_clip_clip_loss():
    torch.manual_seed(1)
    image, text = unit(torch.randn(8, 16)), unit(torch.randn(8, 16))
    scale = torch.tensor(14.3)
    assert torch.allclose(contrastive_loss(image, text, scale), ClipLoss()(image, text, scale),
                          atol=1e-6)


def test_label_smoothing_is_over_the_in_batch_candidates():
    torch.manual_seed(2)
    image, text = unit(torch.randn(5, 8)), unit(torch.randn(5, 8))
    ls, scale = 0.1, torch.tensor(10.0)
    logits = scale * image @ text.T
    expected = 0.0
    for z in (logits, logits.T):
        log_p = F.log_softmax(z, dim=1)
        nll = -log_p.diagonal().mean()
        expected += ((1 - ls) * nll + ls * (-log_p.mean(dim=1)).mean()) / 2
    assert torch.allclose(contrastive_loss(image, text, scale, ls), expected, atol=1e-6)


def test_flyp_loss_is_clip_loss_on_the_filled_templates_it_drew(start, clip, batch):
    images, labels = batch
    model = copy.deepcopy(clip.model).eval()
    task = FLYPTask(model, prompt_tokens(start, CPU), FLYPOptions(), seed=5)
    state = task.generator.get_state()
    with torch.no_grad():
        loss = task.loss(images, labels)
    # the same draw, by hand: one template per sample, filled with that sample's class
    task.generator.set_state(state)
    drawn = torch.randint(len(TEMPLATES), (len(labels),), generator=task.generator)
    texts = [TEMPLATES[t].format(CLASSES[y]) for t, y in zip(drawn.tolist(), labels.tolist())]
    assert len(set(drawn.tolist())) > 1                  # per sample, not per batch
    with torch.no_grad():
        image_f = model.encode_image(images, normalize=True)
        text_f = model.encode_text(clip.tokenizer(texts), normalize=True)
        reference = ClipLoss()(image_f, text_f, model.logit_scale.exp())
    assert torch.allclose(loss, reference, atol=1e-5)


def test_orthogonality_loss_is_zero_for_orthonormal_columns_and_unsquared_otherwise():
    q, _ = torch.linalg.qr(torch.randn(32, 8))        # (width 32, d 8), orthonormal columns
    assert orthogonality_loss(q).item() == pytest.approx(0.0, abs=1e-5)
    # W^T W - I = 3 I for W = 2 * orthonormal: Frobenius norm 3 * sqrt(8), not its square
    assert orthogonality_loss(2 * q).item() == pytest.approx(3 * math.sqrt(8), rel=1e-5)


def test_visual_projection_of_resnet_and_vit_towers(clip):
    w = visual_projection(clip.model)                  # toy CLIP: ModifiedResNet tower
    assert w.shape == (clip.model.visual.attnpool.c_proj.in_features, 64)
    vit = load_clip("ViT-B-32", None, augment=False).model
    assert visual_projection(vit) is vit.visual.proj and vit.visual.proj.shape[1] == 512


def test_self_distillation_is_summed_kl_in_both_directions():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 4), torch.randn(4, 4)
    expected = 0.0
    for s, t in ((student, teacher), (student.T, teacher.T)):
        p_t = F.softmax(t, dim=1)
        expected += (p_t * (p_t.log() - F.log_softmax(s, dim=1))).sum(1).mean()
    assert torch.allclose(self_distillation_loss(student, teacher), expected, atol=1e-6)
    assert self_distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_ema_momentum_ramps_linearly_over_the_first_fifth_then_stays():
    o = CaRotOptions()                                 # 0.05 -> 0.9 over 20 % of the steps
    assert ema_momentum(0, 100, o) == pytest.approx(0.05)
    assert ema_momentum(10, 100, o) == pytest.approx(0.05 + 0.85 * 10 / 20)
    assert ema_momentum(20, 100, o) == pytest.approx(0.9)
    assert ema_momentum(99, 100, o) == pytest.approx(0.9)


def test_teacher_moves_only_on_its_steps_by_the_scheduled_momentum(start, clip):
    rng = np.random.default_rng(0)
    data = ArrayImageDataset(rng.integers(0, 256, (28, 32, 32, 3), dtype=np.uint8),
                             np.arange(28) % 4, clip.eval_transform)
    options = CaRotOptions(ema_every=3, lr=1e-3)
    model = copy.deepcopy(clip.model)
    task = CaRotTask(model, prompt_tokens(start, CPU), options, seed=0)
    snapshots, students = [], []
    update = task.after_step

    def record(step, total):
        before = [p.detach().clone() for p in task.teacher.parameters()]
        update(step, total)
        snapshots.append((step, total, before, [p.detach().clone() for p in task.teacher.parameters()]))
        students.append([p.detach().clone() for p in model.parameters()])

    task.after_step = record
    assert all(not p.requires_grad for p in task.teacher.parameters())
    train(task, data, OptimConfig(lr=1e-3, epochs=1, batch_size=4, warmup_steps=1), CPU,
          Hooks(progress=False))
    assert [s for s, *_ in snapshots] == list(range(7))
    for (step, total, before, after), student in zip(snapshots, students):
        moved = any(not torch.equal(b, a) for b, a in zip(before, after))
        assert moved == (step % 3 == 0), step
        if step % 3 == 0:                             # psi <- m psi + (1 - m) theta
            m = ema_momentum(step, total, options)
            for b, a, s in zip(before, after, student):
                assert torch.allclose(a, m * b + (1 - m) * s, atol=1e-6)


def test_teacher_gets_no_gradient(start, clip, batch):
    images, labels = batch
    task = CaRotTask(copy.deepcopy(clip.model), prompt_tokens(start, CPU), CaRotOptions(), seed=0)
    task.loss(images, labels).backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in task.model.visual.parameters())


def test_carot_loss_is_smoothed_clip_loss_plus_weighted_oc_and_teacher_to_student_kl(
        start, clip, batch):
    """The whole objective by hand: label-smoothed contrastive loss on the drawn captions
    + lambda_oc ||W_v^T W_v - I||_F + lambda_sd (KL(teacher || student) both ways), the
    teacher's logits at the teacher's own scale, + lambda_cross ||W_v W_t^T||_F. A
    teacher that differs from the student makes swapping the KL's arguments or the
    scales visible."""
    images, labels = batch
    options = CaRotOptions(label_smoothing=0.1, lambda_oc=0.3, lambda_sd=2.0, lambda_cross=0.07)
    task = CaRotTask(copy.deepcopy(clip.model).eval(), prompt_tokens(start, CPU), options,
                     seed=3)
    with torch.no_grad():
        for p in task.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        task.teacher.logit_scale.fill_(math.log(20.0))
    state = task.generator.get_state()
    with torch.no_grad():
        loss = task.loss(images, labels)
    task.generator.set_state(state)
    drawn = torch.randint(len(TEMPLATES), (len(labels),), generator=task.generator)
    tokens = clip.tokenizer([TEMPLATES[t].format(CLASSES[y])
                             for t, y in zip(drawn.tolist(), labels.tolist())])
    student, teacher = task.model, task.teacher
    with torch.no_grad():
        s_img, s_txt = student.encode_image(images, True), student.encode_text(tokens, True)
        t_img, t_txt = teacher.encode_image(images, True), teacher.encode_text(tokens, True)
        s_logits = student.logit_scale.exp() * s_img @ s_txt.T
        t_logits = teacher.logit_scale.exp() * t_img @ t_txt.T
        mcl = contrastive_loss(s_img, s_txt, student.logit_scale.exp(), 0.1)
        w_v = visual_projection(student)
        oc = torch.linalg.matrix_norm(w_v.T @ w_v - torch.eye(w_v.shape[1]))
        cross = torch.linalg.matrix_norm(w_v @ student.text_projection.T)   # (width_v, width_t)
        kl = sum(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True,
                          reduction="batchmean")
                 for s, t in ((s_logits, t_logits), (s_logits.T, t_logits.T)))
    assert kl > 1e-3                                    # the teacher really differs
    assert torch.allclose(loss, mcl + 0.3 * oc + 2.0 * kl + 0.07 * cross, rtol=1e-4, atol=1e-5)


def test_carot_defaults_are_the_authors_released_command():
    """example_scripts/carot.sh + src/args.py of MLAI-Yonsei/CaRot: lr 1e-5, batch 512,
    10 epochs, wd 0.1, warmup 500, --distil_coef 1.5, --l_orth_wv 0.2, EMA every 500 steps
    from 0.05 to 0.9 over 20 %, --cross_fnorm 0.05, no --ls (label smoothing 0)."""
    o = CaRotOptions()
    assert (o.lr, o.batch_size, o.epochs, o.weight_decay, o.warmup_steps, o.grad_clip) == \
        (1e-5, 512, 10, 0.1, 500, None)
    assert (o.lambda_sd, o.lambda_oc, o.lambda_cross, o.label_smoothing) == (1.5, 0.2, 0.05, 0.0)
    assert (o.ema_every, o.ema_momentum_start, o.ema_momentum_end, o.ema_warmup_fraction) == \
        (500, 0.05, 0.9, 0.2)
