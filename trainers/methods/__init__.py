"""The method registry: one file per method, each registering itself here.

A method is a frozen dataclass of options (exactly the YAML keys a sweep file may
set for it) plus either a `fit` function (methods that train) or nothing more
(post-hoc methods such as WiSE-FT, whose maths lives in pure functions in their
own file). Tests parametrise over `REGISTRY`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from trainers.models import ImageClassifier
from trainers.train_loop import Hooks


@dataclass(frozen=True)
class FitContext:
    """What a training method needs besides its options."""

    train_set: Dataset
    device: torch.device
    seed: int = 0
    hooks: Hooks = dataclasses.field(default_factory=Hooks)


@dataclass(frozen=True)
class Method:
    name: str
    options: type                       # frozen dataclass; its fields are the YAML keys
    paper: str
    # fit(zero-shot classifier, options, context) -> fine-tuned classifier; None = post-hoc
    fit: Callable[[ImageClassifier, Any, FitContext], ImageClassifier] | None = None
    trains: str = "nothing"             # what it updates, in words (docs and --dry-run)

    @property
    def post_hoc(self) -> bool:
        return self.fit is None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


# Importing the method files registers them.
from trainers.methods import ft, wise_ft, zeroshot  # noqa: E402,F401
