"""Zero-shot CLIP: the classifier built from prompt templates, trained on nothing.

Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021. https://arxiv.org/abs/2103.00020
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.methods import FitContext, Method, register
from trainers.models import ImageClassifier


@dataclass(frozen=True)
class ZeroShotOptions:
    """No options: the head comes from the benchmark's class names and templates."""


def fit(zero_shot: ImageClassifier, options: ZeroShotOptions, ctx: FitContext) -> ImageClassifier:
    return zero_shot


register(Method(name="zeroshot", options=ZeroShotOptions, fit=fit, trains="nothing",
                paper="https://arxiv.org/abs/2103.00020"))
