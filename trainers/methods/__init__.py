"""The method registry: one file per method in this folder, found without an import list.

A method file holds a docstring citing its paper, a frozen dataclass of options (exactly
the YAML keys a sweep file may set for it), pure functions for its maths, a `fit`
function, and one `register(Method(...))` call. Every module of this package whose
name does not start with "_" is imported on first use of the registry, so adding a
method is adding a file.

`fit(start, options, ctx) -> Fitted` never modifies `start`: it copies what it trains.
`Method.trains` says which parts of the model it updates; the registry test checks
that exactly those change.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from trainers.models import ImageClassifier, LoadedClip, zero_shot_head
from trainers.train_loop import Hooks

# The parts of a CLIP classifier a method may update (`Method.trains`).
HEAD = "head"                    # the linear head on the normalised image embedding
IMAGE_TOWER = "image_tower"      # the image encoder
TEXT_TOWER = "text_tower"        # the text encoder (and the logit scale)
PARTS = (HEAD, IMAGE_TOWER, TEXT_TOWER)


@dataclass(frozen=True)
class StartPoint:
    """What every method starts from. Shared, never modified: a method copies what it trains.

    `clip` is the whole pre-trained open_clip model (with tokenizer and transforms), for
    methods that train the text tower; `zero_shot` is the image classifier whose head was
    built from `classnames` x `templates`.
    """

    clip: LoadedClip
    zero_shot: ImageClassifier
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def fitted(self) -> "Fitted":
        """The zero-shot model as a method's result, with the pre-trained text tower (not
        copied): what a weight-space ensemble mixes with a fitted model."""
        return Fitted(self.zero_shot, text_tower_state(self.clip.model, copy=False))


@dataclass(frozen=True)
class FitContext:
    """What a training method needs besides its options and start point."""

    train_set: Dataset               # training split, training preprocessing
    device: torch.device
    seed: int = 0
    hooks: Hooks = dataclasses.field(default_factory=Hooks)
    # Zero-shot image features of the training split under EVALUATION preprocessing,
    # (features (N, d) L2-normalised, labels (N,)). orch passes its Parquet feature cache;
    # None means a method that needs them encodes the split itself, once.
    train_features: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    train_eval_set: Dataset | None = None   # training split, evaluation preprocessing
    # A merging method's members (`Method.merges`): the fitted models of the trials of
    # the method entry its `of` option names, in sweep order; and the ID validation set
    # (evaluation preprocessing) that a greedy soup chooses on.
    members: Callable[[], list["Fitted"]] | None = None
    val_set: Dataset | None = None


@dataclass
class Fitted:
    """A method's result. `classifier` is what evaluation runs (image encoder + head).

    `text_tower` holds the fine-tuned CLIP's state outside the image tower (text encoder,
    logit scale) for methods that train it; None means it is the pre-trained one.
    """

    classifier: ImageClassifier
    text_tower: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint file stores (tensors only: loadable with weights_only=True)."""
        return {"classifier": self.classifier.state_dict(), "text_tower": self.text_tower}


@dataclass(frozen=True)
class Method:
    name: str
    options: type                       # frozen dataclass; its fields are the YAML keys
    paper: str
    fit: Callable[[StartPoint, Any, FitContext], Fitted]
    trains: frozenset[str]              # subset of PARTS
    # Trains on the zero-shot image features of the training split (FitContext.train_features)
    needs_train_features: bool = False
    # The options that are batch sizes: data-parallel workers split each of them evenly.
    batch_size_options: tuple[str, ...] = ()
    # Options that make a fit of two tiny steps (registry tests, smoke runs): every
    # method knows its own option names, nothing else does.
    smoke: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Merges the fitted models of another method entry's trials (its option `of` names
    # the entry's label) instead of training: its trials run after those (soups, Model
    # Stock); it changes whatever its members changed.
    merges: bool = False
    # What a user should know about a finished trial, from its loss curve's rows (a
    # greedy soup that kept one member): sentences the sweep prints and records.
    notes: Callable[[list[dict]], list[str]] | None = None

    def __post_init__(self):
        unknown = set(self.trains) - set(PARTS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown parts {sorted(unknown)}")
        fields = {f.name for f in dataclasses.fields(self.options)}
        if self.merges and "of" not in fields:
            raise ValueError(f"method {self.name!r}: a merging method names its members "
                             "with an option `of`")
        for name in (*self.batch_size_options, *self.smoke):
            if name not in fields:
                raise ValueError(f"method {self.name!r}: {name!r} is not one of its options")

    @property
    def trained(self) -> bool:
        return bool(self.trains)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def text_tower_state(clip_model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of an open_clip model outside its image tower (text encoder, logit
    scale): detached copies, or (`copy=False`) the model's own tensors, read-only use."""
    return {k: v.detach().clone() if copy else v.detach()
            for k, v in clip_model.state_dict().items() if not k.startswith("visual.")}


def train_mode(model: nn.Module, freeze_bn_stats: bool) -> None:
    """model.train(), keeping BatchNorm layers in eval mode when `freeze_bn_stats`: their
    running statistics stay as pre-trained while the affine parameters still train.
    Re-estimating them on the ID style alone wrecks the other styles (measured on the toy
    world: sketch 85 -> 43 %). No effect on ViTs."""
    model.train()
    if freeze_bn_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def rebuild_head(clip: LoadedClip, clip_model: nn.Module, classnames: Sequence[str],
                 templates: Sequence[str], device: torch.device) -> nn.Linear:
    """The zero-shot head built from `clip_model`'s (fine-tuned) text tower and logit scale."""
    return zero_shot_head(dataclasses.replace(clip, model=clip_model), classnames, templates,
                          device)


_discover()
