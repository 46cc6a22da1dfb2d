"""What the training methods share: the optimisation options every one of them takes,
and the AdamW + warmup + cosine configuration built from them (docs/methods.md, "Shared pieces")."""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def optim_config(options: OptimOptions, seed: int) -> OptimConfig:
    return OptimConfig(lr=options.lr, epochs=options.epochs, batch_size=options.batch_size,
                       weight_decay=options.weight_decay, warmup_steps=options.warmup_steps,
                       grad_clip=options.grad_clip, seed=seed)


def check_fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
