"""What trials, feature actors and commands share in one process: the pre-trained CLIP,
the benchmark and the methods' start point, loaded once per process; fitted models to and
from files; and the model of any single-model point (a trial alone, or a weight-space
ensemble point), which `orch export` writes and the sweep logs as its chosen model."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.assets.benchmarks import load_benchmark
from orchestrator.assets.models import load_model
from orchestrator.spec.types import SweepSpec
from orchestrator.storage import local_file
from trainers.cache import fingerprint
from trainers.data import Benchmark
from trainers.ensembles import WeightEnsemble
from trainers.methods import Fitted, StartPoint
from trainers.models import LoadedClip, zero_shot_classifier


@dataclass(frozen=True)
class Assets:
    """The pre-trained CLIP, the benchmark (with the model's transforms), and the methods'
    start point (zero-shot classifier, class names, templates)."""

    clip: LoadedClip
    bench: Benchmark
    start: StartPoint


# Trials run in reused Ray actors and feature encoders in an actor pool: keep the last
# loaded assets of this process, so many trials load the model and benchmark once.
_ASSETS: dict[str, Assets] = {}


def load_assets(spec: SweepSpec, device: torch.device) -> Assets:
    """Model, benchmark and zero-shot classifier for this spec, cached per process. The
    returned objects are shared: methods and ensembles copy what they change."""
    key = fingerprint([dataclasses.asdict(spec.model), dataclasses.asdict(spec.benchmark),
                       str(device)])
    if key not in _ASSETS:
        _ASSETS.clear()
        clip = load_model(spec.model, device=device)
        bench = load_benchmark(spec.benchmark, clip)
        # The image tower is shared with `clip.model` (a ViT-B-32 tower is 0.35 GB).
        zero_shot = zero_shot_classifier(clip, bench.classnames, bench.templates, device,
                                         copy_tower=False)
        _ASSETS[key] = Assets(clip, bench, StartPoint(clip, zero_shot, bench.classnames,
                                                      bench.templates))
    return _ASSETS[key]


def save_fitted(fitted: Fitted, path: Path) -> None:
    torch.save(fitted.state(), path)


def load_fitted(assets: Assets, path: str | Path | None, device: torch.device) -> Fitted:
    """A trial's fitted model from its file; None gives the zero-shot model. Files are
    read with weights_only=True: tensors only, no code runs from a checkpoint."""
    if path is None:
        return assets.start.fitted()
    state = torch.load(local_file(str(path)), map_location=device, weights_only=True)
    classifier = copy.deepcopy(assets.start.zero_shot)
    classifier.load_state_dict(state["classifier"])
    return Fitted(classifier.eval(), state.get("text_tower"))


@dataclass
class PointModel:
    classifier: torch.nn.Module            # what the sweep evaluated (image encoder + head)
    clip_state: dict[str, torch.Tensor]    # the whole open_clip model of that point


def point_model(assets: Assets, fitted: Fitted, ensemble: WeightEnsemble | None = None,
                options=None, coefficients: dict[str, float] | None = None) -> PointModel:
    """The model of one point: a fitted trial alone (`ensemble` None), or a weight-space
    ensemble of it with the zero-shot model at `coefficients` (with its `options`)."""
    if ensemble is not None:
        fitted = ensemble.mix(assets.start.fitted(), fitted, options, coefficients)
    state = {k: v.detach().cpu().clone() for k, v in assets.clip.model.state_dict().items()}
    state.update({f"visual.{k}": v.detach().cpu().clone()
                  for k, v in fitted.classifier.image_encoder.state_dict().items()})
    if fitted.text_tower is not None:
        state.update({k: v.detach().cpu().clone() for k, v in fitted.text_tower.items()})
    return PointModel(fitted.classifier.eval(), state)


__all__ = ["Assets", "PointModel", "load_assets", "load_fitted", "point_model",
           "save_fitted"]
