"""Zero-shot CLIP: the classifier built from prompt templates, trained on nothing.

Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021. https://arxiv.org/abs/2103.00020
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from trainers.methods import FitContext, Fitted, Method, StartPoint, register


@dataclass(frozen=True)
class ZeroShotOptions:
    """No options: the head comes from the benchmark's class names and templates."""


def fit(start: StartPoint, options: ZeroShotOptions, ctx: FitContext) -> Fitted:
    return Fitted(copy.deepcopy(start.zero_shot))


register(Method(name="zeroshot", options=ZeroShotOptions, fit=fit, trains=frozenset(),
                paper="https://arxiv.org/abs/2103.00020"))
