"""CaRot: calibrated robust fine-tuning = FLYP + label smoothing + orthogonality
constraint + EMA self-distillation.

Oh et al., "Towards Calibrated Robust Fine-Tuning of Vision-Language Models",
NeurIPS 2024, https://arxiv.org/abs/2311.01723.

    L = L_MCL-LS + lambda_oc * L_OC + lambda_sd * L_SD

- L_MCL-LS: FLYP's contrastive loss, label-smoothed over the B in-batch candidates.
- L_OC = ||W_v^T W_v - I||_F, W_v the image tower's projection to the joint space
  (Frobenius norm, not squared): keeps the visual projection close to orthogonal.
- L_SD: the teacher is an EMA copy of the whole CLIP; with teacher and student
  image->text and text->image similarity matrices (each model's own logit scale),
  sum over the two directions of KL(softmax(teacher) || softmax(student)), rows
  averaged. The teacher runs without gradients. (The authors' code uses the soft-target
  cross-entropy, which differs from the KL by the teacher's entropy, a constant: same
  gradients.)
- EMA: psi <- m*psi + (1-m)*theta over the parameters, after the optimizer step of
  every `ema_every`-th step (step 0 included); m rises linearly from
  `ema_momentum_start` to `ema_momentum_end` over the first `ema_warmup_fraction` of
  all steps, then stays. The paper's 500 steps are for ImageNet (2,500 steps per
  epoch); scale `ema_every` with the dataset.
- `lambda_cross`: the authors' released command adds 0.05*||W_v W_t^T||_F (the visual
  projection times the text projection), a term the paper does not describe.

Two recipes, and which one the defaults follow:
- the authors' RELEASED command (`example_scripts/carot.sh` with `src/args.py` in
  https://github.com/MLAI-Yonsei/CaRot), which produced the paper's ImageNet numbers:
  no `--ls` (label smoothing 0) and `--cross_fnorm 0.05`. These are the defaults.
- the paper's TEXT: the contrastive loss WITH label smoothing (L_MCL-LS), no cross term:
  set `label_smoothing` (e.g. 0.1) and `lambda_cross: 0`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainers.methods import (HEAD, IMAGE_TOWER, TEXT_TOWER, FitContext, Fitted, Method,
                              StartPoint, register)
from trainers.methods._common import TWO_STEPS, check_fraction, set_grad_checkpointing
from trainers.methods.flyp import (FLYPOptions, FLYPTask, contrastive_loss, fit_contrastive,
                                   gather_with_grad)


@dataclass(frozen=True)
class CaRotOptions(FLYPOptions):
    """Defaults: the authors' released ImageNet command (see the module docstring)."""

    label_smoothing: float = 0.0
    lambda_oc: float = 0.2
    lambda_sd: float = 1.5
    ema_every: int = 500
    ema_momentum_start: float = 0.05
    ema_momentum_end: float = 0.9
    ema_warmup_fraction: float = 0.2
    lambda_cross: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        check_fraction("label_smoothing", self.label_smoothing)
        for name in ("lambda_oc", "lambda_sd", "lambda_cross"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.ema_every < 1:
            raise ValueError(f"ema_every must be >= 1, got {self.ema_every}")
        for name in ("ema_momentum_start", "ema_momentum_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_warmup_fraction <= 1.0:
            raise ValueError(f"ema_warmup_fraction must be in [0, 1], got {self.ema_warmup_fraction}")


def visual_projection(clip_model: nn.Module) -> torch.Tensor:
    """W_v: the image tower's last linear map into the joint space, as (width, embed_dim)."""
    visual = clip_model.visual
    if isinstance(getattr(visual, "proj", None), nn.Parameter):          # ViT
        return visual.proj
    attnpool = getattr(visual, "attnpool", None)                        # ModifiedResNet
    if attnpool is not None and isinstance(getattr(attnpool, "c_proj", None), nn.Linear):
        return attnpool.c_proj.weight.T
    head = getattr(visual, "head", None)                                # timm towers
    if head is not None and isinstance(getattr(head, "proj", None), nn.Linear):
        return head.proj.weight.T
    raise ValueError(f"CaRot: no visual projection found in {type(visual).__name__} "
                     "(expected visual.proj, visual.attnpool.c_proj or visual.head.proj)")


def text_projection(clip_model: nn.Module) -> torch.Tensor:
    """W_t as (text width, embed_dim)."""
    proj = getattr(clip_model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.weight.T
    if isinstance(proj, torch.Tensor):
        return proj
    raise ValueError("CaRot: lambda_cross needs a text projection matrix")


def orthogonality_loss(w_v: torch.Tensor) -> torch.Tensor:
    """||W_v^T W_v - I||_F for W_v (width, d): 0 exactly when the columns are orthonormal."""
    gram = w_v.float().T @ w_v.float()                                   # (d, d)
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device))


def self_distillation_loss(student_logits: torch.Tensor,
                           teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), rows averaged, image->text plus
    text->image (the transposed matrices). Inputs: (B, B) image->text logits."""
    total = student_logits.new_zeros(())
    for s, t in ((student_logits, teacher_logits), (student_logits.T, teacher_logits.T)):
        log_p_t = F.log_softmax(t.float(), dim=1)
        total = total + (log_p_t.exp() * (log_p_t - F.log_softmax(s.float(), dim=1))).sum(1).mean()
    return total


def ema_momentum(step: int, total_steps: int, options: CaRotOptions) -> float:
    """Linear from start to end over the first `ema_warmup_fraction` of the steps, then end."""
    ramp = options.ema_warmup_fraction * total_steps
    if step < ramp:
        return options.ema_momentum_start + (options.ema_momentum_end
                                             - options.ema_momentum_start) * step / ramp
    return options.ema_momentum_end


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over the parameters."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1.0 - momentum)


class CaRotTask(FLYPTask):
    def __init__(self, clip_model: nn.Module, tokens: torch.Tensor, options: CaRotOptions,
                 seed: int, head: Callable[[nn.Module], nn.Linear] | None = None):
        super().__init__(clip_model, tokens, options, seed, head)
        self.teacher = copy.deepcopy(clip_model).eval().requires_grad_(False)
        # The teacher runs without gradients: activation checkpointing there would only
        # cost time (fit_contrastive switches it on for the student after this copy).
        set_grad_checkpointing(self.teacher, False)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        o = self.options
        texts = self.captions(labels)
        image_f, text_f = self.encode(self.model, images, texts)
        image_f, text_f = gather_with_grad(image_f), gather_with_grad(text_f)   # (B, d)
        scale = self.model.logit_scale.exp()
        mcl = contrastive_loss(image_f, text_f, scale, o.label_smoothing)
        oc = orthogonality_loss(visual_projection(self.model))
        with torch.no_grad():
            t_image_f, t_text_f = self.encode(self.teacher, images, texts)
            t_image_f, t_text_f = gather_with_grad(t_image_f), gather_with_grad(t_text_f)
            teacher_logits = self.teacher.logit_scale.exp() * t_image_f.float() @ t_text_f.float().T
        sd = self_distillation_loss(scale * image_f.float() @ text_f.float().T, teacher_logits)
        loss = mcl + o.lambda_oc * oc + o.lambda_sd * sd
        if o.lambda_cross:
            loss = loss + o.lambda_cross * torch.linalg.matrix_norm(
                visual_projection(self.model).float() @ text_projection(self.model).float().T)
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        if step % self.options.ema_every == 0:
            ema_update(self.teacher, self.model, ema_momentum(step, total_steps, self.options))

    def extra_state(self) -> dict:
        return {**super().extra_state(), "teacher": self.teacher.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.teacher.load_state_dict(state["teacher"])


def fit(start: StartPoint, options: CaRotOptions, ctx: FitContext) -> Fitted:
    return fit_contrastive(start, options, ctx, CaRotTask)


register(Method(name="carot", options=CaRotOptions, fit=fit,
                trains=frozenset({HEAD, IMAGE_TOWER, TEXT_TOWER}),
                batch_size_options=("batch_size",), smoke={**TWO_STEPS, "ema_every": 1},
                paper="https://arxiv.org/abs/2311.01723"))
