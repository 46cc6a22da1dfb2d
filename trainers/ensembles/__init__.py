"""The ensemble registry: one file per way of mixing a zero-shot and a fine-tuned model.

An ensemble is a frozen options dataclass (the YAML keys), the names of the options that
are coefficient grids (WiSE-FT and OSE: `alpha`; VRF: `a`, `b`), and a `mix` function.
Both kinds take their arguments in one order, (zero_shot, fine_tuned, options, point(s)):

- `WeightEnsemble.mix(zero_shot: Fitted, fine_tuned: Fitted, options, point) -> Fitted`:
  a new model (image tower, head, and text tower where the fine-tuned one has its own)
  per coefficient point; each needs its own forward pass over the eval sets, and
  `orch export` writes any of them. `endpoint(point)` names the member a point IS
  exactly (its metrics then come from that member's cached outputs), or None.
- `OutputEnsemble.mix(zero_shot: MemberOutputs, fine_tuned: MemberOutputs, options,
  points, device) -> Mixture`: the per-sample weight of the fine-tuned model at every
  point, from the two members' outputs cached once per model (logits, and image features
  where `needs_features`: of the training split only the rows `train_rows` names); `trainers.ensembles.mixture` turns that into metrics for all
  points at once, vectorised.

Every module here registers itself when the registry is first imported, except
`mixture` (the shared maths of output-space ensembles) and names starting with "_";
adding an ensemble is adding a file (or a plug-in file named in a sweep file).
"""
from __future__ import annotations

import importlib
import itertools
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from trainers.data.benchmark import ID_TRAIN
from trainers.methods import Fitted

WEIGHTS, OUTPUTS = "weights", "outputs"
ZERO_SHOT_MEMBER, FINE_TUNED_MEMBER = "zero_shot", "fine_tuned"
TRAIN_SPLIT = ID_TRAIN      # outputs of the training split (evaluation preprocessing)

Coefficients = dict[str, float]


@dataclass(frozen=True)
class MemberOutputs:
    """One model's cached outputs, per set name (the eval sets, plus `TRAIN_SPLIT`, the
    training split under evaluation preprocessing, aligned by index, when loaded).

    logits: (N, C) over the ID classes (projection to a set's own classes comes later);
    predictions: (N,) top classes of sets whose logits were not kept (the training split:
    1.28 M x 1,000 ImageNet logits are 5 GB a model, its top classes 10 MB);
    features: (N, d) L2-normalised image features, or None when not loaded; of a set in
    `feature_rows`, only the rows its (N,) bool mask marks, in row order (the training
    split holds those an ensemble's `train_rows` asks for: 1.28 M x 512 features are
    2.6 GB a model)."""

    logits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor] | None = None
    predictions: dict[str, torch.Tensor] | None = None
    feature_rows: dict[str, torch.Tensor] | None = None

    def features_of(self, set_name: str, rows: torch.Tensor) -> torch.Tensor:
        """(M, d) features of the rows a (N,) bool mask marks, in row order; a row whose
        features were not loaded is a ValueError (never a silently wrong index)."""
        if self.features is None:
            raise ValueError("this member's image features were not loaded")
        held = (self.feature_rows or {}).get(set_name)
        if held is None:
            return self.features[set_name][rows]
        rows = rows.to(held.device)
        if bool((rows & ~held).any()):
            raise ValueError(f"{set_name}: features of rows that were not loaded were asked for")
        return self.features[set_name][rows[held].to(self.features[set_name].device)]

    def eval_sets(self) -> list[str]:
        """The sets a mixture is evaluated on: all but the training split."""
        return [s for s in self.logits if s != TRAIN_SPLIT]

    def predicted(self, set_name: str) -> torch.Tensor:
        """(N,) top class of every sample of a set (from its logits when it has them)."""
        if self.predictions and set_name in self.predictions:
            return self.predictions[set_name]
        return self.logits[set_name].argmax(1)


@dataclass(frozen=True)
class Mixture:
    """What an output-space ensemble decides: each member's temperature and, per set,
    the fine-tuned member's weight for every (point, sample): (P, N) in [0, 1].
    p = (1 - w) * softmax(z_zs / T_zs) + w * softmax(z_ft / T_ft)."""

    temperatures: tuple[float, float]
    weights: dict[str, torch.Tensor]
    diagnostics: dict[str, Any] | None = None   # e.g. VRF's ZSF size and k


def no_endpoint(point: Coefficients) -> str | None:
    return None


@dataclass(frozen=True)
class Ensemble:
    name: str
    options: type                   # frozen dataclass; its fields are the YAML keys
    coefficients: tuple[str, ...]   # option fields that are grids of coefficient values
    paper: str
    mixes: ClassVar[str] = ""

    def points(self, options: Any) -> list[Coefficients]:
        """Every coefficient combination, in file order (last coefficient fastest)."""
        grids = [getattr(options, name) for name in self.coefficients]
        return [dict(zip(self.coefficients, values)) for values in itertools.product(*grids)]


@dataclass(frozen=True)
class WeightEnsemble(Ensemble):
    mix: Callable[[Fitted, Fitted, Any, Coefficients], Fitted]
    endpoint: Callable[[Coefficients], str | None] = no_endpoint
    mixes: ClassVar[str] = WEIGHTS


@dataclass(frozen=True)
class OutputEnsemble(Ensemble):
    mix: Callable[[MemberOutputs, MemberOutputs, Any, list[Coefficients], torch.device],
                  Mixture]
    needs_features: bool = False    # reads the members' image features
    # Given the zero-shot model's top classes and the labels of the training split, the
    # (N,) bool rows whose fine-tuned features `mix` reads (None: all of them, when it
    # needs features): what an ensemble job loads of a 1.28 M-row split.
    train_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    mixes: ClassVar[str] = OUTPUTS


def check_grid(name: str, values: tuple[float, ...], low: float | None = None,
               high: float | None = None, positive: bool = False) -> None:
    """A coefficient grid: non-empty, finite, no duplicates, inside its range."""
    if not values:
        raise ValueError(f"{name} must list at least one value")
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{name}: {v} is not a finite number")
        if (low is not None and v < low) or (high is not None and v > high):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise ValueError(f"{name}: {v:g} is outside [{lo}, {hi}]")
        if positive and v <= 0:
            raise ValueError(f"{name}: must be > 0, got {v:g}")
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{name}: duplicate value {seen[0]:g}")


REGISTRY: dict[str, Ensemble] = {}


def register(ensemble: Ensemble) -> Ensemble:
    if ensemble.name in REGISTRY:
        raise ValueError(f"ensemble {ensemble.name!r} registered twice")
    if not isinstance(ensemble, (WeightEnsemble, OutputEnsemble)):
        raise ValueError(f"ensemble {ensemble.name!r}: register a WeightEnsemble or an "
                         "OutputEnsemble")
    REGISTRY[ensemble.name] = ensemble
    return ensemble


def get_ensemble(name: str) -> Ensemble:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown ensemble {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "mixture":
        importlib.import_module(f"{__name__}.{_info.name}")
