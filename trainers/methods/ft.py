"""End-to-end fine-tuning (FT): image encoder + linear head with cross-entropy.

The head starts from the zero-shot head, never from random weights (Wortsman et al.,
"Robust fine-tuning of zero-shot models", CVPR 2022, https://arxiv.org/abs/2109.01903;
Kumar et al., ICLR 2022, on why random heads distort features). Optional label
smoothing `ls`: loss = (1-ls)*NLL + ls*mean_k(-log p_k), which is exactly
`F.cross_entropy(..., label_smoothing=ls)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers.methods import FitContext, Method, register
from trainers.models import ImageClassifier
from trainers.train_loop import OptimConfig, train


@dataclass(frozen=True)
class FTOptions:
    """Defaults are the paper recipe for ViT-B/16 on ImageNet (METHODS.md)."""

    lr: float = 3e-5
    epochs: int = 10
    batch_size: int = 512
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    # Keep BatchNorm running statistics frozen (affine parameters still train). Without
    # it, statistics re-estimated on the ID style alone wreck other styles (TOYWORLD.md
    # section 8.4). No effect on towers without BatchNorm (ViTs).
    freeze_bn_stats: bool = True

    def __post_init__(self):
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, epochs and batch_size >= 1, warmup_steps >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")


class FTTask:
    """Cross-entropy on the whole classifier."""

    def __init__(self, model: ImageClassifier, options: FTOptions):
        self.model, self.options = model, options

    def trainable_parameters(self):
        return self.model.parameters()

    def train_mode(self) -> None:
        self.model.train()
        if self.options.freeze_bn_stats:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)  # (B, C)
        return F.cross_entropy(logits.float(), labels,
                               label_smoothing=self.options.label_smoothing)


def fit(zero_shot: ImageClassifier, options: FTOptions, ctx: FitContext) -> ImageClassifier:
    torch.manual_seed(ctx.seed)
    task = FTTask(zero_shot, options)
    cfg = OptimConfig(lr=options.lr, epochs=options.epochs, batch_size=options.batch_size,
                      weight_decay=options.weight_decay, warmup_steps=options.warmup_steps,
                      grad_clip=options.grad_clip, seed=ctx.seed)
    train(task, ctx.train_set, cfg, ctx.device, ctx.hooks)
    return task.model.eval()


register(Method(name="ft", options=FTOptions, fit=fit, trains="image encoder + head",
                paper="https://arxiv.org/abs/2109.01903"))
