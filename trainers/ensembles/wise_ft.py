"""WiSE-FT: weight-space ensembles of the zero-shot and fine-tuned models.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022,
https://arxiv.org/abs/2109.01903.  theta(alpha) = (1-alpha)*theta_zs + alpha*theta_ft
over ALL parameters, the head included, and over floating-point buffers too
(BatchNorm running statistics); integer buffers (`num_batches_tracked`) are taken
from the zero-shot model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from trainers.methods import Method, register

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class WiseFTOptions:
    alphas: tuple[float, ...] = DEFAULT_ALPHAS

    def __post_init__(self):
        if not self.alphas:
            raise ValueError("alphas must not be empty")
        bad = [a for a in self.alphas if not 0.0 <= float(a) <= 1.0]
        if bad:
            raise ValueError(f"alphas must lie in [0, 1], got {bad}")


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


register(Method(name="wise_ft", options=WiseFTOptions, fit=None,
                trains="nothing (post-hoc weight interpolation)",
                paper="https://arxiv.org/abs/2109.01903"))
