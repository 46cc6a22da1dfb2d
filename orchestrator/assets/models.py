"""The CLIP model a spec names: orch's toy CLIP, an open_clip architecture with a
pretrained tag, a checkpoint file or random weights, or an hf-hub: model."""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from orchestrator.spec.types import ModelSpec
from trainers.models import (HF_HUB, RANDOM_INIT, TOY, TOY_ARCH, LoadedClip, ModelError,
                             load_clip, offline_problem)
from trainers.toyworld.pretrain import toy_clip_checkpoint


def load_model(model: ModelSpec, device: str | torch.device = "cpu") -> LoadedClip:
    if model.arch == TOY:
        # Eval-only preprocessing for the toy world: augmentation hurt there (docs/toyworld.md).
        return load_clip(TOY_ARCH, str(toy_clip_checkpoint(progress=False)), augment=False,
                         device=device)
    if model.config:  # a user's own architecture: register it in this process too
        open_clip.add_model_config(Path(model.config))
    if model.pretrained is None and not model.arch.startswith(HF_HUB):
        # random weights only when asked for (`pretrained: none`); the spec checks say so first
        raise ModelError(f"model.pretrained: required for {model.arch} (a pretrained tag, a "
                         "checkpoint file, or `none` for random weights)")
    return load_clip(model.arch, model.pretrained, augment=model.augment, device=device)


def download_problem(model: ModelSpec) -> tuple[str, str] | None:
    """(field, one-line message) when the model's weights must be downloaded (a tag, an
    hf-hub: model, not in open_clip's or the Hugging Face cache) and this machine is
    offline (HF_HUB_OFFLINE); None otherwise. Looks at the caches only, no network."""
    if model.arch == TOY or model.pretrained == RANDOM_INIT:
        return None
    return offline_problem(model.arch, model.pretrained)
