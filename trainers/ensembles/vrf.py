"""VRF: variance reduction fine-tuning, a sample-wise output-space ensemble.

Zhu et al., "Robust Fine-tuning of Zero-shot Models via Variance Reduction",
NeurIPS 2024, https://arxiv.org/abs/2411.06966.

1. Zero-shot-failure (ZSF) set: training samples (evaluation preprocessing, aligned by
   index) the fine-tuned model gets right and the zero-shot model gets wrong; the index
   holds their FINE-TUNED, L2-normalised image features.
2. d(x): distance from x's fine-tuned feature to its k-th nearest neighbour in the ZSF
   set (exact, `trainers.knn`).
3. w(x) = sigmoid(-(d(x) - a) / b): near the ZSF set, trust the fine-tuned model.
4. p(x) = (1 - w) softmax(z_zs / T_zs) + w softmax(z_ft / T_ft), each T chosen so the
   model's mean confidence equals its accuracy on ID VALIDATION. (The authors fit T on
   the ID test set; orch never looks at a test set to choose anything.)

`variant: code` (default) follows the authors' code: squared L2 distance (0..4) and
k = round(1000 |ZSF| / N_train); their a = 1.5, b = 0.6 were tuned on that scale.
`variant: paper` follows the paper's text: L2 distance and k = floor(0.001 |ZSF|)
(at least 1). `k:` overrides either rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers.ensembles import (TRAIN_SPLIT, Coefficients, MemberOutputs, Mixture,
                                OutputEnsemble, check_grid, register)
from trainers.ensembles.mixture import member_temperatures
from trainers.knn import kth_neighbour_sq_distance

@dataclass(frozen=True)
class VRFOptions:
    a: tuple[float, ...] = (1.5,)
    b: tuple[float, ...] = (0.6,)
    variant: str = "code"
    k: int | None = None

    def __post_init__(self):
        check_grid("a", self.a)
        check_grid("b", self.b, positive=True)
        if self.variant not in ("code", "paper"):
            raise ValueError(f"variant must be code or paper, got {self.variant!r}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def zero_shot_failures(zs_predicted: torch.Tensor, ft_predicted: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the fine-tuned model is right and the zero-shot model is wrong, from
    each model's top classes (N,)."""
    return (ft_predicted == labels) & (zs_predicted != labels)


def neighbour_rank(zsf_size: int, train_size: int, options: VRFOptions) -> int:
    """k for a ZSF set of `zsf_size` out of `train_size` training samples (>= 1)."""
    if options.k is not None:
        return min(options.k, zsf_size)
    if options.variant == "code":
        k = round(1000 * zsf_size / train_size)
    else:
        k = math.floor(0.001 * zsf_size)
    return min(max(k, 1), zsf_size)


def zero_shot_wrong(zs_predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the training rows whose fine-tuned features VRF may read, those the
    zero-shot model gets wrong (the ZSF set is among them; ~30 % of ImageNet's)."""
    return zs_predicted != labels


def sample_weights(distance: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w = sigmoid(-(d - a) / b) for every (a, b) pair and sample: a, b (P,), d (N,) -> (P, N)."""
    return torch.sigmoid(-(distance[None, :] - a[:, None]) / b[:, None])


def mix(zero_shot: MemberOutputs, fine_tuned: MemberOutputs, options: VRFOptions,
        points: list[Coefficients], device: torch.device | str = "cpu") -> Mixture:
    if fine_tuned.features is None:
        raise ValueError("VRF needs the fine-tuned model's image features")
    failures = zero_shot_failures(zero_shot.predicted(TRAIN_SPLIT),
                                  fine_tuned.predicted(TRAIN_SPLIT), fine_tuned.labels[TRAIN_SPLIT])
    zsf = fine_tuned.features_of(TRAIN_SPLIT, failures)                    # (M, d)
    # No failure fixed by fine-tuning: every sample is infinitely far from the (empty)
    # set, so w = 0 and VRF is the calibrated zero-shot model.
    k = neighbour_rank(zsf.shape[0], failures.shape[0], options) if zsf.shape[0] else 0
    a = torch.tensor([p["a"] for p in points], dtype=torch.float32)
    b = torch.tensor([p["b"] for p in points], dtype=torch.float32)
    weights, median = {}, {}
    for s in zero_shot.eval_sets():
        n = fine_tuned.features[s].shape[0]
        d = (kth_neighbour_sq_distance(fine_tuned.features[s], zsf, k, device) if k
             else torch.full((n,), float("inf")))                      # (N,)
        if options.variant == "paper":
            d = d.sqrt()
        weights[s] = sample_weights(d, a, b)
        median[s] = float(d.median()) if n else float("nan")
    return Mixture(member_temperatures(zero_shot, fine_tuned), weights,
                   diagnostics={"zsf_size": int(zsf.shape[0]), "k": k,
                                "median_distance": median})


register(OutputEnsemble(name="vrf", options=VRFOptions, coefficients=("a", "b"), mix=mix,
                        needs_features=True, train_rows=zero_shot_wrong, paper="https://arxiv.org/abs/2411.06966"))
