"""CLIP models from open_clip, and the classifier every method fine-tunes.

One code path for real and toy models: the toy CLIP is an open_clip model config
(`orch-toy-rn`, registered from a JSON file in this package) plus a checkpoint file
that orch pre-trains itself; real models are any open_clip architecture with a
pretrained tag (downloads where a user has internet) or a local checkpoint file, or
random weights when asked for (`pretrained: none`, for tests and smoke runs).

Random weights are drawn from a fixed seed: every process of a sweep (the driver, each
Ray actor, `orch export`) builds the model itself, and torch seeds each new process
differently, so an unseeded random init gives each process another zero-shot model.

The classifier is `head(normalize(image_encoder(x)))` with the head initialised from
the zero-shot head (weights `s * W_zs`, bias 0; docs/methods.md, "Shared pieces").
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.pretrained import get_pretrained_cfg
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn

from trainers.data import ArrayNormalize

TOY_ARCH = "orch-toy-rn"
TOY = "toy"          # what a sweep file calls the toy CLIP (model.arch)
HF_HUB = "hf-hub:"   # open_clip's prefix for a model (config and weights) on the Hugging Face hub
TOY_CONFIG = Path(__file__).parent / "toyworld" / f"{TOY_ARCH}.json"
open_clip.add_model_config(TOY_CONFIG)
RANDOM_INIT = "none"          # `pretrained: none`: random weights, drawn from RANDOM_INIT_SEED
RANDOM_INIT_SEED = 0


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


def is_random_init(pretrained: str | None) -> bool:
    """None (a library caller's default) or "none" (a sweep file's spelling, any case)."""
    return pretrained is None or pretrained.strip().lower() == RANDOM_INIT


def random_init_identity() -> str:
    """What random weights are: the seed and the code that draws them (a feature-cache key)."""
    return (f"random-init seed={RANDOM_INIT_SEED} open_clip={open_clip.__version__} "
            f"torch={torch.__version__}")


def _offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(hub_constants.HF_HUB_OFFLINE)


def _hub_cached(repo: str, filename: str) -> bool:
    """A file of a hub repository (or its safetensors twin, which open_clip prefers) is in
    the local Hugging Face cache. No network."""
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def weights_download(arch: str, pretrained: str | None) -> str | None:
    """Where this model's weights would be downloaded from when they are not on this
    machine yet; None when nothing needs a download (a file, random weights, an unknown
    tag, or weights already in open_clip's or the Hugging Face cache). No network."""
    if arch.startswith(HF_HUB):
        repo = arch[len(HF_HUB):]
        cached = _hub_cached(repo, "open_clip_config.json") and _hub_cached(repo, HF_WEIGHTS_NAME)
        return None if cached else f"the Hugging Face hub ({repo})"
    if is_random_init(pretrained) or names_a_file(pretrained):
        return None
    cfg = get_pretrained_cfg(arch, pretrained)
    if not cfg or cfg.get("file"):
        return None
    if cfg.get("hf_hub"):                        # open_clip prefers the hub when it has one
        repo, filename = os.path.split(cfg["hf_hub"])
        return None if _hub_cached(repo, filename or HF_WEIGHTS_NAME) else \
            f"the Hugging Face hub ({repo})"
    if cfg.get("url"):
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        return None if cached.is_file() else cfg["url"]
    return None


def download_advice(arch: str, pretrained: str | None, source: str, why: str) -> tuple[str, str]:
    """(field, message): which model needs a download, why it cannot have it, what to do."""
    if arch.startswith(HF_HUB):
        return "model.arch", (f"{arch} needs a download from {source}, and {why}: name an "
                              "open_clip architecture with a local checkpoint file in "
                              "model.pretrained, or run once with internet to fill the cache")
    return "model.pretrained", (f"{arch} {pretrained!r} needs a download from {source}, and "
                                f"{why}: give model.pretrained a local checkpoint file, or run "
                                "once with internet to fill the cache")


def offline_problem(arch: str, pretrained: str | None) -> tuple[str, str] | None:
    """(field, message) when the weights need a download and the machine is offline."""
    source = weights_download(arch, pretrained)
    if source is None or not _offline():
        return None
    return download_advice(arch, pretrained, source, "this machine is offline (HF_HUB_OFFLINE)")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def names_a_file(pretrained: str) -> bool:
    """The one rule for what `pretrained` means: a checkpoint FILE when it is one, or looks
    like a path (a separator, a checkpoint suffix); else an open_clip tag ("openai")."""
    return (Path(pretrained).expanduser().is_file() or "/" in pretrained
            or pretrained.endswith(CHECKPOINT_SUFFIXES))


def _close_names(word: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def model_problem(arch: str, pretrained: str | None,
                  required: bool = False) -> tuple[str, str] | None:
    """(field, message) when `arch` and `pretrained` name no model, else None; no network
    and no file is read (a missing checkpoint file fails when it is loaded).

    An `hf-hub:<org>/<name>` model brings its weights; an open_clip architecture takes a
    tag it knows, a checkpoint file, or "none" (random weights). With `required` (a sweep
    file) a real architecture must say which; a library caller's None means random."""
    if arch.startswith(HF_HUB):
        if not _HF_REPO.fullmatch(arch[len(HF_HUB):]):
            return "model.arch", f"expected hf-hub:<org>/<name>, got {arch!r}"
        if pretrained is not None:
            return "model.pretrained", (f"{arch} brings its own weights; leave pretrained "
                                        f"unset (got {pretrained!r})")
        return None
    archs = open_clip.list_models()
    if arch not in archs:
        hint = _close_names(arch, archs) or \
            "see open_clip.list_models(), or use hf-hub:<org>/<name>"
        return "model.arch", f"unknown open_clip architecture {arch!r}; {hint}"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is None and required:
        which = (f"one of its pretrained tags ({', '.join(tags)}), a checkpoint file"
                 if tags else "a checkpoint file (open_clip has no pretrained tags for it)")
        return "model.pretrained", f"required for {arch}: {which}, or `none` for random weights"
    if is_random_init(pretrained) or names_a_file(pretrained):
        return None
    tag = pretrained.lower().replace("-", "_")              # how open_clip reads a tag
    if tag not in tags:
        hint = _close_names(tag, tags) or (
            f"its tags: {', '.join(tags[:6])}" + (f", ... ({len(tags)} in all)"
                                                  if len(tags) > 6 else "")
            if tags else "open_clip has none for it: give a checkpoint file")
        return "model.pretrained", (f"{pretrained!r} is neither a file nor a pretrained tag "
                                    f"of {arch}; {hint}")
    return None


def load_clip(arch: str, pretrained: str | None = None, *, augment: bool = True,
              device: str | torch.device = "cpu") -> LoadedClip:
    """Build an open_clip model by architecture name.

    `pretrained` is an open_clip tag (e.g. "openai"; downloads on first use), a path to
    a local checkpoint file, or None / "none": random weights (tests and smoke runs),
    the same in every process (drawn from RANDOM_INIT_SEED, the caller's random state
    left as it was). A model that needs a download fails in one line when the machine is
    offline (HF_HUB_OFFLINE) or the download fails.
    `augment=False` makes the train transform the eval transform (no random crop).
    """
    random_init = is_random_init(pretrained) and not arch.startswith(HF_HUB)
    problem = model_problem(arch, pretrained)
    if problem:
        raise ModelError(": ".join(problem))
    problem = offline_problem(arch, pretrained)
    if problem:
        raise ModelError(": ".join(problem))
    download = weights_download(arch, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            if random_init:
                torch.manual_seed(RANDOM_INIT_SEED)
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                arch, pretrained=None if random_init else pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as err:  # bad pickles, mismatched state dicts, unreadable files, no hub
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if download is not None:        # hub errors quote their whole story: keep its start
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            raise ModelError(": ".join(download_advice(
                arch, pretrained, download, f"the download failed ({reason})"))) from err
        what = (f"model.arch: cannot load {arch}" if arch.startswith(HF_HUB) else
                f"model.pretrained: cannot load {pretrained!r} into {arch}")
        raise ModelError(f"{what}: {reason}") from err
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
                         device: str | torch.device = "cpu", *,
                         copy_tower: bool = True) -> ImageClassifier:
    """The zero-shot model as a classifier: a deep copy of the image tower, so training
    the classifier never touches `clip`; `copy_tower=False` shares `clip.model.visual`
    (one tower in memory, for a caller that never trains the classifier in place)."""
    head = zero_shot_head(clip, classnames, templates, device)
    tower = copy.deepcopy(clip.model.visual) if copy_tower else clip.model.visual
    return ImageClassifier(tower, head).to(device)
