"""Linear probe (LP): train only the linear head, on cached image features.

Radford et al. 2021 (linear-probe evaluation of CLIP), https://arxiv.org/abs/2103.00020;
as in Wortsman et al. 2022 the head starts from the zero-shot head and trains with
AdamW on features computed ONCE with evaluation preprocessing (the image tower never
runs per epoch). orch hands the features over from its Parquet feature cache; in a
notebook the method encodes the training split itself.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from trainers.evaluate import encode
from trainers.methods import HEAD, FitContext, Fitted, Method, StartPoint, register
from trainers.methods._common import TWO_STEPS, OptimOptions, check_fraction, optim_config
from trainers.models import ImageClassifier
from trainers.train_loop import Hooks, train


@dataclass(frozen=True)
class LPOptions(OptimOptions):
    """Defaults of the WiSE-FT reference code's linear classifier: AdamW lr 1e-3, batch
    128, 10 epochs, weight decay 0.1, 500 warmup steps, clipping at 1.0."""

    lr: float = 1e-3
    batch_size: int = 128
    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_fraction("label_smoothing", self.label_smoothing)


class HeadTask:
    """Cross-entropy of a linear head on fixed, L2-normalised features."""

    def __init__(self, head: nn.Linear, label_smoothing: float):
        self.model, self.label_smoothing = head, label_smoothing

    def trainable_parameters(self):
        return self.model.parameters()

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(features).float(), labels,
                               label_smoothing=self.label_smoothing)


def training_features(start: StartPoint, ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot features of the training split (evaluation preprocessing): from the
    cache orch passes, else encoded here once, from `ctx.train_eval_set` (the training
    images under evaluation preprocessing) when the caller gives one, else from the
    training set as given."""
    if ctx.train_features is not None:
        return ctx.train_features()
    dataset = ctx.train_eval_set if ctx.train_eval_set is not None else ctx.train_set
    features, _, labels = encode(start.zero_shot, dataset, ctx.device,
                                 num_workers=ctx.hooks.num_workers)
    return features, labels


def probe(start: StartPoint, options: LPOptions, ctx: FitContext, hooks: Hooks) -> nn.Linear:
    """The trained head (a copy of the zero-shot head, trained on the features)."""
    features, labels = training_features(start, ctx)
    head = copy.deepcopy(start.zero_shot.head)
    torch.manual_seed(ctx.seed)
    train(HeadTask(head, options.label_smoothing), TensorDataset(features, labels),
          optim_config(options, ctx.seed), ctx.device, hooks)
    return head.eval()


def fit(start: StartPoint, options: LPOptions, ctx: FitContext) -> Fitted:
    head = probe(start, options, ctx, ctx.hooks)
    return Fitted(ImageClassifier(copy.deepcopy(start.zero_shot.image_encoder), head))


register(Method(name="lp", options=LPOptions, fit=fit, trains=frozenset({HEAD}),
                needs_train_features=True, batch_size_options=("batch_size",),
                smoke=TWO_STEPS, paper="https://arxiv.org/abs/2103.00020"))
