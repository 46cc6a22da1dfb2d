"""What the training methods share: the optimisation options every one of them takes,
and the AdamW + warmup + cosine configuration built from them (docs/methods.md, "Shared pieces")."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from trainers.train_loop import OptimConfig


@dataclass(frozen=True)
class OptimOptions:
    """Defaults are the paper recipe for end-to-end fine-tuning of ViT-B/16 on ImageNet
    (Wortsman et al. 2022): AdamW lr 3e-5, batch 512, 10 epochs, weight decay 0.1 on all
    parameters, 500 warmup steps then cosine, gradient clipping at norm 1.0."""

    lr: float = 3e-5
    epochs: int = 10
    batch_size: int = 512
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainOptions(OptimOptions):
    """Options of methods that train an image tower."""

    # Keep BatchNorm running statistics frozen (affine parameters still train). Without
    # it, statistics re-estimated on the ID style alone wreck other styles. No effect on
    # towers without BatchNorm (ViTs).
    freeze_bn_stats: bool = True
    # Activation (gradient) checkpointing in the transformer towers that train: each
    # residual block keeps only its input and recomputes its activations in the backward
    # pass (open_clip's `set_grad_checkpointing`). Same gradients, far less activation
    # memory, about one more forward pass of compute. ViT and text transformers only: a
    # ModifiedResNet image tower cannot (open_clip's switch does nothing there) and is
    # refused.
    grad_checkpointing: bool = False


# Two optimizer steps on 16 samples (one epoch of batch 8): what a method's `smoke`
# options start from.
TWO_STEPS = {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "lr": 1e-3}


def optim_config(options: OptimOptions, seed: int) -> OptimConfig:
    return OptimConfig(lr=options.lr, epochs=options.epochs, batch_size=options.batch_size,
                       weight_decay=options.weight_decay, warmup_steps=options.warmup_steps,
                       grad_clip=options.grad_clip, seed=seed)


def check_fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")


class GradCheckpointingError(ValueError):
    """Activation checkpointing was asked for on a tower that cannot do it."""


def _check_image_tower(tower: nn.Module) -> None:
    """Raise when open_clip's switch would leave `tower` without checkpointing."""
    if isinstance(tower, ModifiedResNet):   # its set_grad_checkpointing does nothing
        raise GradCheckpointingError(
            "grad_checkpointing: open_clip cannot checkpoint a ModifiedResNet image tower "
            "(ResNet CLIPs such as RN50, and the toy CLIP); it applies to transformer "
            "towers (ViT-*): set grad_checkpointing: false")
    if type(tower).__name__ == "TimmModel":
        # open_clip's TimmModel logs a warning and carries on when timm cannot: refuse
        try:
            tower.trunk.set_grad_checkpointing(True)
        except Exception as err:  # timm asserts, or the trunk lacks the method
            raise GradCheckpointingError(
                f"grad_checkpointing: the timm image tower {type(tower.trunk).__name__} "
                f"cannot checkpoint ({err or type(err).__name__}): set "
                "grad_checkpointing: false") from err
    elif not hasattr(tower, "set_grad_checkpointing"):
        raise GradCheckpointingError(f"grad_checkpointing: the image tower "
                                     f"{type(tower).__name__} cannot checkpoint")


def check_grad_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Raise GradCheckpointingError when `enabled` and the image tower of `model` (a CLIP,
    an image classifier or a tower) cannot checkpoint; for a method to fail before it
    trains anything."""
    if enabled:
        model = getattr(model, "image_encoder", model)     # an ImageClassifier
        _check_image_tower(getattr(model, "visual", model))


def set_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """open_clip's activation checkpointing on or off in `model`: a whole CLIP (both
    towers, `CLIP.set_grad_checkpointing`) or an image tower alone. Raises
    GradCheckpointingError, before changing anything, when asked to enable it with an
    image tower that cannot checkpoint."""
    if enable:
        _check_image_tower(getattr(model, "visual", model))
    model.set_grad_checkpointing(enable)
    text = getattr(getattr(model, "text", None), "transformer", None)
    if not enable and hasattr(text, "gradient_checkpointing_disable"):
        text.gradient_checkpointing_disable()   # open_clip's HF text tower only ever enables


@contextmanager
def grad_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Activation checkpointing in `model` while the block runs (training), off again
    after it, so the fitted model evaluates and exports as a plain one. Does nothing
    unless `enabled`."""
    if not enabled:
        yield
        return
    set_grad_checkpointing(model, True)
    try:
        yield
    finally:
        set_grad_checkpointing(model, False)
