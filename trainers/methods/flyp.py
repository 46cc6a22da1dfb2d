"""FLYP: "Finetune Like You Pretrain" - contrastive fine-tuning of both towers.

Goyal et al., CVPR 2023, https://arxiv.org/abs/2212.00638. Each training image is
paired with ONE prompt template, drawn at random per sample, filled with its class
name; the loss is CLIP's symmetric contrastive loss over the batch,
`(CE(s F G^T, arange(B)) + CE(s G F^T, arange(B))) / 2`, with the logit scale `s`
trained too. Same-class pairs in a batch are negatives of each other, as in the
authors' code. Evaluation rebuilds the zero-shot head from the fine-tuned text tower.
Paper recipe: lr 1e-5, batch 512, 10 epochs, no gradient clipping.

Under data-parallel training every sample of the global batch must be a negative
(gradient accumulation does not reproduce a larger batch): features are gathered
across workers with gradients, as open_clip's `ClipLoss(gather_with_grad=True)` does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn  # autograd-aware collectives (all_gather with gradients)
import torch.nn.functional as F
from torch import nn

from trainers.methods import (HEAD, IMAGE_TOWER, TEXT_TOWER, FitContext, Fitted, Method,
                              StartPoint, rebuild_head, register, text_tower_state, train_mode)
from trainers.methods._common import TWO_STEPS, TrainOptions, grad_checkpointing, optim_config
from trainers.models import ImageClassifier
from trainers.train_loop import train, world


@dataclass(frozen=True)
class FLYPOptions(TrainOptions):
    """FLYP's ImageNet recipe: lr 1e-5, no gradient clipping; the rest as FT."""

    lr: float = 1e-5
    grad_clip: float | None = None


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` (B, d) from every data-parallel worker along the batch,
    keeping the gradient path to each worker's own rows; identity on one worker."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return torch.cat(torch.distributed.nn.all_gather(features), dim=0)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric CLIP loss over the batch; row i of each input is a positive pair.

    image_features, text_features: (B, d), L2-normalised. With label_smoothing > 0 each
    direction's cross-entropy is smoothed over the B in-batch candidates (CaRot)."""
    logits = logit_scale * image_features.float() @ text_features.float().T   # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing)) / 2


def prompt_tokens(start: StartPoint, device: torch.device) -> torch.Tensor:
    """Tokens of every (class, template) prompt: (C, T, context_length)."""
    texts = [t.format(c) for c in start.classnames for t in start.templates]
    tokens = start.clip.tokenizer(texts)                                    # (C*T, L)
    return tokens.view(len(start.classnames), len(start.templates), -1).to(device)


class FLYPTask:
    """The whole CLIP, trained on (image, one random filled template) pairs."""

    def __init__(self, clip_model: nn.Module, tokens: torch.Tensor, options: FLYPOptions,
                 seed: int, head: Callable[[nn.Module], nn.Linear] | None = None):
        self.model, self.tokens, self.options = clip_model, tokens, options
        self.head = head      # the zero-shot head of a CLIP, for `classifier()`
        # Template draws depend only on the seed and the step, so a resumed run repeats them.
        self.generator = torch.Generator().manual_seed(seed)

    def trainable_parameters(self):
        return self.model.parameters()

    def train_mode(self) -> None:
        train_mode(self.model, self.options.freeze_bn_stats)

    def captions(self, labels: torch.Tensor) -> torch.Tensor:
        """One random template per sample, filled with its class: tokens (B, L).

        Drawn for the whole global batch and cut to this worker's share (positions rank,
        rank + world, ... as the loop shards batches), so N data-parallel workers pair
        each sample with the template one worker would."""
        rank, world_size = world()
        draws = torch.randint(self.tokens.shape[1], (labels.shape[0] * world_size,),
                              generator=self.generator)
        template = draws[rank::world_size]
        return self.tokens[labels, template.to(labels.device)]

    def encode(self, model: nn.Module, images: torch.Tensor, texts: torch.Tensor):
        images = images.contiguous(memory_format=torch.channels_last)
        return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image_f, text_f = self.encode(self.model, images, self.captions(labels))  # (B, d) each
        return contrastive_loss(gather_with_grad(image_f), gather_with_grad(text_f),
                                self.model.logit_scale.exp())

    def classifier(self) -> ImageClassifier | None:
        """The model as evaluation sees it now: the image tower and the head rebuilt from
        the text tower (None without a head builder)."""
        if self.head is None:
            return None
        return ImageClassifier(self.model.visual, self.head(self.model))

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def classifier_from_clip(start: StartPoint, clip_model: nn.Module,
                         device: torch.device) -> Fitted:
    """Evaluation model of a contrastively fine-tuned CLIP: its image tower and the
    zero-shot head rebuilt from its text tower and logit scale."""
    clip_model.eval()
    head = rebuild_head(start.clip, clip_model, start.classnames, start.templates, device)
    return Fitted(ImageClassifier(clip_model.visual, head), text_tower_state(clip_model))


def fit_contrastive(start: StartPoint, options: FLYPOptions, ctx: FitContext,
                    task_class: type = None) -> Fitted:
    """Train a copy of the whole CLIP with `task_class` (FLYP's task, or CaRot's)."""
    torch.manual_seed(ctx.seed)
    model = copy.deepcopy(start.clip.model).to(ctx.device)
    model.visual.to(memory_format=torch.channels_last)
    task = (task_class or FLYPTask)(
        model, prompt_tokens(start, ctx.device), options, ctx.seed,
        head=lambda m: rebuild_head(start.clip, m, start.classnames, start.templates, ctx.device))
    # Switched on after the task is built: CaRot's EMA teacher, a copy made there, runs
    # without gradients and must not checkpoint (nothing to save memory for).
    with grad_checkpointing(model, options.grad_checkpointing):
        train(task, ctx.train_set, optim_config(options, ctx.seed), ctx.device, ctx.hooks)
    return classifier_from_clip(start, model, ctx.device)


def fit(start: StartPoint, options: FLYPOptions, ctx: FitContext) -> Fitted:
    return fit_contrastive(start, options, ctx)


register(Method(name="flyp", options=FLYPOptions, fit=fit,
                trains=frozenset({HEAD, IMAGE_TOWER, TEXT_TOWER}),
                batch_size_options=("batch_size",), smoke=TWO_STEPS,
                paper="https://arxiv.org/abs/2212.00638"))
