"""End-to-end fine-tuning (FT): image encoder + linear head with cross-entropy.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022,
https://arxiv.org/abs/2109.01903. The head starts from the zero-shot head, never from
random weights (Kumar et al., ICLR 2022, on why random heads distort features).
Optional label smoothing `ls`: loss = (1-ls)*NLL + ls*mean_k(-log p_k), which is
exactly `F.cross_entropy(..., label_smoothing=ls)`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.methods import (HEAD, IMAGE_TOWER, FitContext, Fitted, Method, StartPoint,
                              register, train_mode)
from trainers.methods._common import (TWO_STEPS, TrainOptions, check_fraction,
                                      grad_checkpointing, optim_config)
from trainers.models import ImageClassifier
from trainers.train_loop import Hooks, train


@dataclass(frozen=True)
class FTOptions(TrainOptions):
    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_fraction("label_smoothing", self.label_smoothing)


class FTTask:
    """Cross-entropy on the whole classifier."""

    def __init__(self, model: ImageClassifier, options: FTOptions):
        self.model, self.options = model, options

    def trainable_parameters(self):
        return self.model.parameters()

    def train_mode(self) -> None:
        train_mode(self.model, self.options.freeze_bn_stats)

    def classifier(self) -> ImageClassifier:
        return self.model

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)  # (B, C)
        return F.cross_entropy(logits.float(), labels,
                               label_smoothing=self.options.label_smoothing)


def fine_tune(classifier: ImageClassifier, options: FTOptions, ctx: FitContext,
              hooks: Hooks) -> ImageClassifier:
    """Train `classifier` in place (LP-FT calls this with its LP head)."""
    torch.manual_seed(ctx.seed)
    task = FTTask(classifier, options)
    with grad_checkpointing(classifier.image_encoder, options.grad_checkpointing):
        train(task, ctx.train_set, optim_config(options, ctx.seed), ctx.device, hooks)
    return classifier.eval()


def fit(start: StartPoint, options: FTOptions, ctx: FitContext) -> Fitted:
    return Fitted(fine_tune(copy.deepcopy(start.zero_shot), options, ctx, ctx.hooks))


register(Method(name="ft", options=FTOptions, fit=fit, trains=frozenset({HEAD, IMAGE_TOWER}),
                batch_size_options=("batch_size",), smoke=TWO_STEPS,
                paper="https://arxiv.org/abs/2109.01903"))
