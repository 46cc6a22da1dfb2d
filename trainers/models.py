"""CLIP models from open_clip, and the classifier every method fine-tunes.

One code path for real and toy models: the toy CLIP is an open_clip model config
(`orch-toy-rn`, registered from a JSON file in this package) plus a checkpoint file
that orch pre-trains itself; real models are any open_clip architecture with a
pretrained tag (downloads where a user has internet) or a local checkpoint file.

The classifier is `head(normalize(image_encoder(x)))` with the head initialised from
the zero-shot head (weights `s * W_zs`, bias 0; docs/methods.md, "Shared pieces").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn

from trainers.data import ArrayNormalize

TOY_ARCH = "orch-toy-rn"
HF_HUB = "hf-hub:"   # open_clip's prefix for a model (config and weights) on the Hugging Face hub
_TOY_CONFIG = Path(__file__).parent / "toyworld" / f"{TOY_ARCH}.json"
open_clip.add_model_config(_TOY_CONFIG)


class ModelError(ValueError):
    """A model that cannot be built: unknown architecture, missing or mismatched checkpoint."""


@dataclass
class LoadedClip:
    """An open_clip CLIP model with its transforms and tokenizer."""

    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    arch: str


def load_clip(arch: str, pretrained: str | None = None, *, augment: bool = True,
              device: str | torch.device = "cpu") -> LoadedClip:
    """Build an open_clip model by architecture name.

    `pretrained` is an open_clip tag (e.g. "openai"; downloads on first use), a path to
    a local checkpoint file, or None (random init: only useful in tests).
    `augment=False` makes the train transform the eval transform (no random crop).
    """
    if arch.startswith(HF_HUB):
        # "hf-hub:<org>/<name>": open_clip reads the config and the weights from the hub
        if len(arch) == len(HF_HUB) or arch.count("/") != 1:
            raise ModelError(f"model.arch: expected hf-hub:<org>/<name>, got {arch!r}")
        if pretrained is not None:
            raise ModelError(f"model.pretrained: {arch} brings its own weights; "
                             f"leave pretrained unset (got {pretrained!r})")
    elif arch not in open_clip.list_models():
        raise ModelError(f"model.arch: unknown open_clip architecture {arch!r} "
                         f"(see open_clip.list_models(), or use hf-hub:<org>/<name>)")
    elif pretrained is not None and not Path(pretrained).is_file() and (
            pretrained.lower().replace("-", "_")       # open_clip's reading of a tag
            not in open_clip.list_pretrained_tags_by_model(arch)):
        raise ModelError(f"model.pretrained: {pretrained!r} is neither a file nor a known "
                         f"pretrained tag of {arch} "
                         f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as err:  # bad pickles, mismatched state dicts, unreadable files, no hub
        what = (f"model.arch: cannot load {arch}" if arch.startswith(HF_HUB) else
                f"model.pretrained: cannot load {pretrained!r} into {arch}")
        raise ModelError(f"{what}: "
                         f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}") from err
    return LoadedClip(model=model, train_transform=train_tf if augment else eval_tf,
                      eval_transform=eval_tf, tokenizer=tokenizer, arch=arch)


def native_size_transform(clip: LoadedClip, height: int, width: int) -> ArrayNormalize | None:
    """For images that already have the model's input size, its eval transform is only
    "to tensor + normalise": return that as a fast array transform (None otherwise)."""
    cfg = getattr(clip.model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size")
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if size != (height, width) or cfg.get("mode", "RGB") != "RGB":
        return None
    return ArrayNormalize(cfg["mean"], cfg["std"])


class ImageClassifier(nn.Module):
    """Image encoder + linear head on the L2-normalised embedding.

    Convolutions run channels-last (measured 1.6x faster for the toy ResNet on CPU; a
    no-op cost for ViTs, whose only convolution is the patch embedding)."""

    def __init__(self, image_encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.image_encoder = image_encoder.to(memory_format=torch.channels_last)
        self.head = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        return F.normalize(self.image_encoder(images), dim=-1)  # (B, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, C)


def zero_shot_head(clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str],
                   device: str | torch.device = "cpu") -> nn.Linear:
    """The zero-shot head: weights `s * W_zs` (C, d), bias 0, from open_clip's builder."""
    model = clip.model
    was_training = model.training
    model.eval()
    # (d, C): per class, the renormalised mean of the normalised template embeddings.
    weights = build_zero_shot_classifier(model, clip.tokenizer, list(classnames), list(templates),
                                         num_classes_per_batch=None, device=device)
    model.train(was_training)
    scale = model.logit_scale.detach().exp()
    head = nn.Linear(weights.shape[0], weights.shape[1], bias=True)
    with torch.no_grad():
        head.weight.copy_(scale * weights.T)
        head.bias.zero_()
    return head.to(device)


def zero_shot_classifier(clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str],
                         device: str | torch.device = "cpu") -> ImageClassifier:
    """The zero-shot model as a classifier (a deep copy: fine-tuning never touches `clip`)."""
    head = zero_shot_head(clip, classnames, templates, device)
    return ImageClassifier(copy.deepcopy(clip.model.visual), head).to(device)
