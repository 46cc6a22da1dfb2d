"""Output-space ensemble (OSE): a fixed mix of the two models' predicted probabilities.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (the output-space
baseline of WiSE-FT), https://arxiv.org/abs/2109.01903:
p(alpha) = (1 - alpha) * softmax(z_zs) + alpha * softmax(z_ft), on the raw logits, as the
VRF authors' OSE baseline. `calibrate: true` first divides each model's logits by the
temperature at which its mean confidence equals its accuracy on ID validation (VRF's
calibration), which separates VRF's per-sample weights from its temperatures.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.ensembles import (Coefficients, MemberOutputs, Mixture, OutputEnsemble, check_grid,
                                register)
from trainers.ensembles.mixture import member_temperatures

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class OSEOptions:
    alpha: tuple[float, ...] = DEFAULT_ALPHAS
    calibrate: bool = False

    def __post_init__(self):
        check_grid("alpha", self.alpha, 0.0, 1.0)


def mix(zero_shot: MemberOutputs, fine_tuned: MemberOutputs, options: OSEOptions,
        points: list[Coefficients], device: torch.device | str = "cpu") -> Mixture:
    temperatures = (member_temperatures(zero_shot, fine_tuned) if options.calibrate
                    else (1.0, 1.0))
    alpha = torch.tensor([p["alpha"] for p in points], dtype=torch.float32,
                         device=device)                                              # (P,)
    weights = {s: alpha[:, None].expand(-1, zero_shot.logits[s].shape[0])
               for s in zero_shot.eval_sets()}
    return Mixture(temperatures, weights)


register(OutputEnsemble(name="ose", options=OSEOptions, coefficients=("alpha",), mix=mix,
                        paper="https://arxiv.org/abs/2109.01903"))
