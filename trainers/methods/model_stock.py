"""Model Stock: a few fine-tuned models and the pre-trained one, merged per layer.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
https://arxiv.org/abs/2403.19522. With k >= 2 models fine-tuned from the same
pre-trained weights theta_0 (other seeds), per layer l (every tensor of the state dict):

    cos(phi) = the mean cosine between the fine-tuning deltas theta_i - theta_0, over
               every pair i < j (the paper's angle between fine-tuned models);
    t        = k cos(phi) / ((k - 1) cos(phi) + 1);
    theta    = t * mean_i(theta_i) + (1 - t) * theta_0.

Deltas that agree (cos 1) keep their average (t = 1); orthogonal ones (cos 0) fall back
to the pre-trained layer (t = 0): the average of noisy deltas lies closer to the centre
of the weight distribution the further apart they point. theta_0 of the image tower and
head is the zero-shot classifier (the head's pre-trained weights are the zero-shot
head); of the text tower, the pre-trained one. A layer no member moved stays as it is,
and k identical members give that member, tensor for tensor. A delta of zero norm beside
others counts as orthogonal (cos 0). Negative mean cosines are used as the formula gives
them (the authors' code does not clip t either).

The members are the trials of one method entry (`of`: its label); a WiSE-FT grid
between the zero-shot model and the result is an ensemble like any other.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from trainers.methods import (HEAD, IMAGE_TOWER, TEXT_TOWER, FitContext, Fitted, Method,
                              StartPoint, register)
from trainers.methods._merge import members_of, merge_fitted
from trainers.train_loop import MAIN_PHASE


@dataclass(frozen=True)
class ModelStockOptions:
    of: str                          # the method entry (its label) whose trials are the members


def mean_cosine(deltas: list[torch.Tensor]) -> float:
    """Mean cosine over pairs of flattened deltas (float64); a zero delta counts as 0."""
    flat = [d.reshape(-1).double() for d in deltas]
    norms = [f.norm() for f in flat]
    cosines = [float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
               for (a, na), (b, nb) in itertools.combinations(zip(flat, norms), 2)]
    return sum(cosines) / len(cosines)


def interpolation_ratio(k: int, cos: float) -> float:
    """t = k cos / ((k - 1) cos + 1)."""
    return k * cos / ((k - 1) * cos + 1)


def stock_layer(tensors: list[torch.Tensor], pre: torch.Tensor) -> torch.Tensor:
    if all(torch.equal(t, tensors[0]) for t in tensors[1:]):
        return tensors[0].clone()            # identical members (and a layer none moved)
    t = interpolation_ratio(len(tensors), mean_cosine([x - pre for x in tensors]))
    return torch.lerp(pre, torch.stack(tensors).mean(0), t)   # t * mean + (1 - t) * pre


def fit(start: StartPoint, options: ModelStockOptions, ctx: FitContext) -> Fitted:
    members = members_of(ctx)
    if len(members) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned trials of {options.of!r}, "
                         f"got {len(members)} (give it a grid, e.g. over seed)")
    merged = merge_fitted(start, members, stock_layer)
    if ctx.hooks.on_epoch_end is not None:
        ctx.hooks.on_epoch_end(0, {"stock_members": float(len(members))}, {"phase": MAIN_PHASE})
    return merged


register(Method(name="model_stock", options=ModelStockOptions, fit=fit, merges=True,
                trains=frozenset({HEAD, IMAGE_TOWER, TEXT_TOWER}),
                paper="https://arxiv.org/abs/2403.19522"))
