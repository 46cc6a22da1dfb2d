"""DaWin: training-free, per-sample weights from the two models' entropies.

Oh et al., "DaWin: Training-free Dynamic Weight Interpolation for Robust Adaptation",
ICLR 2025, https://arxiv.org/abs/2410.03782.  The model that is less uncertain about a
sample is trusted more on it: with H the entropy of a model's softmax prediction,

    lambda(x) = e^-H_ft(x) / (e^-H_zs(x) + e^-H_ft(x)) = sigmoid(H_zs(x) - H_ft(x)),
    p(x) = (1 - w) softmax(z_zs / T_zs) + w softmax(z_ft / T_ft),   w = scale * lambda(x).

This is the output-space form (the paper's "dynamic output ensemble"); the weight-space
variant, which interpolates weights per sample and clusters the coefficients with a
Beta mixture to save forward passes, is not implemented.

Temperatures. The authors compute the entropies, and mix the outputs, at each model's
calibrated temperature (fixed per backbone in their code, `temperature_scales`). orch uses
the members' own temperatures where their mean confidence equals their accuracy on ID
validation (`calibrate: true`, the default, as VRF; no test set is looked at), or the raw
logits (`calibrate: false`); the same temperature enters the entropy and the mixture.
Entropies are over the ID classes (what the cached logits hold; the authors' code first
projects logits to each evaluation set's own classes).

Coefficient. DaWin is training-free, but the registry sweeps coefficient grids. `scale`
multiplies the per-sample weight (the authors' `--wise-alpha` option, which scales the
dynamic coefficients; off, i.e. 1, in their main results), so the default grid (1.0,) is
exactly the paper's method, one point. Limited to [0, 1] so that w stays in [0, 1].
Each point records `dawin_mean_lambda_<set>`, the mean of lambda(x) per set (before `scale`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.ensembles import (Coefficients, MemberOutputs, Mixture, OutputEnsemble, check_grid,
                                register)
from trainers.ensembles.mixture import member_temperatures


@dataclass(frozen=True)
class DaWinOptions:
    scale: tuple[float, ...] = (1.0,)
    calibrate: bool = True

    def __post_init__(self):
        check_grid("scale", self.scale, 0.0, 1.0)


def prediction_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, C) -> (N,): entropy of softmax(logits / T), in float64. xlogy counts a class
    with probability 0 as 0 (0 * log 0 -> 0), where p * log p would give NaN."""
    p = torch.softmax(logits.double() / temperature, dim=1)
    return -torch.special.xlogy(p, p).sum(dim=1)


def entropy_weight(h_zero_shot: torch.Tensor, h_fine_tuned: torch.Tensor) -> torch.Tensor:
    """e^-H_ft / (e^-H_zs + e^-H_ft), as the sigmoid of the difference: no overflow for
    any entropies, and exactly 0.5 where they are equal."""
    return torch.sigmoid(h_zero_shot - h_fine_tuned)


def mix(zero_shot: MemberOutputs, fine_tuned: MemberOutputs, options: DaWinOptions,
        points: list[Coefficients], device: torch.device | str = "cpu") -> Mixture:
    t_zs, t_ft = (member_temperatures(zero_shot, fine_tuned) if options.calibrate
                  else (1.0, 1.0))
    scale = torch.tensor([p["scale"] for p in points], dtype=torch.float64)        # (P,)
    weights, mean_lambda = {}, {}
    for s in zero_shot.eval_sets():
        z_zs = zero_shot.logits[s]                           # entropies where the logits are
        z_ft = fine_tuned.logits[s].to(z_zs.device)
        lam = entropy_weight(prediction_entropy(z_zs, t_zs), prediction_entropy(z_ft, t_ft))
        weights[s] = (scale.to(lam.device)[:, None] * lam[None, :]).float().to(device)  # (P, N)
        mean_lambda[s] = float(lam.mean()) if lam.numel() else float("nan")
    return Mixture((t_zs, t_ft), weights, diagnostics={"mean_lambda": mean_lambda})


register(OutputEnsemble(name="dawin", options=DaWinOptions, coefficients=("scale",), mix=mix,
                        paper="https://arxiv.org/abs/2410.03782"))
