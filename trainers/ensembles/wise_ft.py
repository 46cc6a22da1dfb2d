"""WiSE-FT: weight-space ensembles of the zero-shot and fine-tuned models.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022,
https://arxiv.org/abs/2109.01903.  theta(alpha) = (1-alpha)*theta_zs + alpha*theta_ft
over ALL parameters of the classifier, the head included, and over floating-point
buffers too (BatchNorm running statistics); integer buffers (`num_batches_tracked`)
are taken from the zero-shot model.

For methods that fine-tune the text tower (FLYP, CaRot) the fine-tuned classifier's
head is the zero-shot head rebuilt from the fine-tuned text tower, so interpolating
classifiers mixes the two heads linearly, as the CaRot authors' WiSE-FT code does; the
text towers themselves are interpolated with the same alpha (what `orch export` writes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from trainers.ensembles import (FINE_TUNED_MEMBER, ZERO_SHOT_MEMBER, Coefficients,
                                WeightEnsemble, check_grid, register)
from trainers.methods import Fitted

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class WiseFTOptions:
    alpha: tuple[float, ...] = DEFAULT_ALPHAS

    def __post_init__(self):
        check_grid("alpha", self.alpha, 0.0, 1.0)


def interpolate_state_dicts(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """(1-alpha)*zero_shot + alpha*fine_tuned for every floating tensor.

    The endpoints are returned exactly (alpha 0 -> zero-shot values, 1 -> fine-tuned),
    not recomputed through arithmetic that could round.
    """
    if zero_shot.keys() != fine_tuned.keys():
        missing = sorted(zero_shot.keys() ^ fine_tuned.keys())
        raise ValueError(f"state dicts differ in keys: {missing[:5]}")
    mixed = {}
    for key, zs in zero_shot.items():
        ft = fine_tuned[key]
        if zs.shape != ft.shape:
            raise ValueError(f"{key}: shape {tuple(zs.shape)} vs {tuple(ft.shape)}")
        if not zs.is_floating_point():
            mixed[key] = zs.clone()
        elif alpha == 0.0:
            mixed[key] = zs.clone()
        elif alpha == 1.0:
            mixed[key] = ft.clone()
        else:
            mixed[key] = torch.lerp(zs, ft.to(zs.dtype), alpha)  # zs + alpha*(ft-zs)
    return mixed


def wise_ft(zero_shot: nn.Module, fine_tuned: nn.Module, alpha: float) -> nn.Module:
    """A new model with interpolated weights; the inputs are left untouched."""
    model = copy.deepcopy(zero_shot)
    model.load_state_dict(interpolate_state_dicts(zero_shot.state_dict(),
                                                  fine_tuned.state_dict(), alpha))
    return model


def mix(zero_shot: Fitted, fine_tuned: Fitted, options: WiseFTOptions,
        point: Coefficients) -> Fitted:
    alpha = point["alpha"]
    text = None
    if fine_tuned.text_tower is not None:
        text = interpolate_state_dicts(zero_shot.text_tower, fine_tuned.text_tower, alpha)
    return Fitted(wise_ft(zero_shot.classifier, fine_tuned.classifier, alpha), text)


def endpoint(point: Coefficients) -> str | None:
    """alpha 0 and 1 give the members' weights exactly (see interpolate_state_dicts)."""
    return {0.0: ZERO_SHOT_MEMBER, 1.0: FINE_TUNED_MEMBER}.get(point["alpha"])


register(WeightEnsemble(name="wise_ft", options=WiseFTOptions, coefficients=("alpha",),
                        mix=mix, endpoint=endpoint, paper="https://arxiv.org/abs/2109.01903"))
