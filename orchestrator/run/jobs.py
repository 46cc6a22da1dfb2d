"""The ensemble stage's jobs Ray Tune runs (`plan.Job`): per trained trial one job on its
cached outputs (the model alone, every output-space point, the weight-space endpoints),
and one job per interior weight-space point (its own forward pass). Each ends with its
rows (`records.row.Row`), reported to the driver as JSON."""
from __future__ import annotations

import json

import torch
from ray import tune

from orchestrator.assets.loaded import load_assets, load_fitted
from orchestrator.plan import Job, Plan, Trial
from orchestrator.records.row import ALONE, Row
from orchestrator.run.features import ZERO_SHOT, model_head, read_entry
from orchestrator.run.trials import setup
from orchestrator.spec.types import SweepSpec
from trainers.data.benchmark import ID_TRAIN
from trainers.ensembles import (FINE_TUNED_MEMBER, ZERO_SHOT_MEMBER, MemberOutputs,
                                OutputEnsemble, WeightEnsemble)
from trainers.ensembles.mixture import mixture_metrics
from trainers.evaluate import evaluate, evaluate_logits, reliability_summary, summarize


def _member(feature_paths: dict, model: str, sets: list[str], with_features: bool,
            head: torch.nn.Module, train_rows: torch.Tensor | None = None) -> MemberOutputs:
    """One model's cached outputs, on the job's device (the mixtures and the kNN run
    there): logits are its head on the cached features, computed on the head's device;
    of the training split only its top classes (what VRF's failure set needs), and with
    `train_rows` only those rows' features."""
    device = next(head.parameters()).device
    cached = {s: read_entry(feature_paths[(model, s)], head, with_features=with_features,
                            top1=s == ID_TRAIN,
                            feature_rows=train_rows if s == ID_TRAIN else None) for s in sets}
    return MemberOutputs(
        logits={s: c.logits.to(device) for s, c in cached.items() if s != ID_TRAIN},
        labels={s: c.labels.to(device) for s, c in cached.items()},
        features={s: c.features.to(device) for s, c in cached.items()} if with_features else None,
        predictions={s: c.predictions.to(device) for s, c in cached.items() if s == ID_TRAIN},
        feature_rows={s: c.feature_rows for s, c in cached.items() if c.feature_rows is not None})


def _feature_readers(ensembles: list) -> list[OutputEnsemble]:
    """The output-space ensembles among `ensembles` that read image features."""
    return [e.ensemble for e in ensembles
            if isinstance(e.ensemble, OutputEnsemble) and e.ensemble.needs_features]


def train_feature_rows(ensembles: list, zero_shot: MemberOutputs) -> torch.Tensor | None:
    """The training rows whose fine-tuned features the trial's output-space ensembles
    read: the union of what each asks for (`OutputEnsemble.train_rows`); None: all."""
    readers = _feature_readers(ensembles)
    if not readers or any(r.train_rows is None for r in readers):
        return None
    predicted, labels = zero_shot.predicted(ID_TRAIN).cpu(), zero_shot.labels[ID_TRAIN].cpu()
    rows = torch.zeros_like(labels, dtype=torch.bool)
    for reader in readers:
        rows |= reader.train_rows(predicted, labels).to(torch.bool)
    return rows


class RowMaker:
    """Rows of one trial: its identity and place in the sweep, metrics from per-set results."""

    def __init__(self, plan: Plan, trial: Trial, shift_names):
        self.plan, self.trial, self.shift_names = plan, trial, shift_names

    def __call__(self, ensemble: str, coefficients: dict[str, float], per_set: dict,
                 extra: dict[str, float] | None = None) -> Row:
        return Row(trial=self.trial.name, method=self.trial.label, ensemble=ensemble,
                   coefficients=dict(coefficients),
                   position=self.plan.position(self.trial.name, ensemble, coefficients),
                   metrics={**summarize(per_set, self.shift_names), **(extra or {})},
                   reliability=reliability_summary(per_set, self.shift_names))


def cached_outputs_job(plan: Plan, trial: Trial, feature_paths: dict,
                       checkpoints: dict[str, str], device: torch.device) -> list[Row]:
    """Every point of `trial` computable from cached outputs: the model alone, the
    output-space ensembles (all coefficients at once) and the weight-space ensembles'
    endpoints (alpha 0 is the zero-shot model, 1 the fine-tuned one, exactly)."""
    assets = load_assets(plan.spec, device)
    row = RowMaker(plan, trial, assets.bench.shift_names)
    fine_tuned = (trial.name, model_head(assets, checkpoints[trial.name], device)) \
        if trial.trained else None
    points = cached_points(feature_paths, model_head(assets, None, device), fine_tuned,
                           plan.ensembles_for(trial), assets.bench.eval_sets(), device)
    return [row(*point) for point in points]


def cached_points(feature_paths: dict, zero_shot_head: torch.nn.Module,
                  fine_tuned: tuple[str, torch.nn.Module] | None, ensembles: list,
                  eval_sets: dict, device: torch.device) -> list[tuple]:
    """(ensemble, coefficients, per-set results, extra metrics) of every point of one
    trial from the feature cache (`feature_paths[(model, set)]`): the zero-shot model
    alone when `fine_tuned` (its cache name and head) is None, else the fine-tuned model
    alone, then each ensemble's points. What bounds a job's memory on ImageNet: logits of
    the eval sets only, the training split as top classes, and of its features only the
    rows the ensembles ask for (`bench/ensemble_stage.py` measures it)."""
    needs_features = fine_tuned is not None and bool(_feature_readers(ensembles))
    sets = list(eval_sets) + ([ID_TRAIN] if needs_features else [])
    # the kNN index and queries are the fine-tuned model's features: the zero-shot
    # member's are never read (a 1.28 M x 512 training split is 2.6 GB)
    zero_shot = _member(feature_paths, ZERO_SHOT, sets, False, zero_shot_head)
    if fine_tuned is None:
        return [(ALONE, {}, evaluate_logits(zero_shot.logits, zero_shot.labels, eval_sets), None)]
    name, head = fine_tuned
    fine = _member(feature_paths, name, sets, needs_features, head,
                   train_feature_rows(ensembles, zero_shot) if needs_features else None)
    alone = evaluate_logits(fine.logits, fine.labels, eval_sets)
    points = [(ALONE, {}, alone, None)]
    zs_alone = None
    for entry in ensembles:
        ensemble, coefficients = entry.ensemble, entry.points()
        if isinstance(ensemble, OutputEnsemble):
            mixture = ensemble.mix(zero_shot, fine, entry.options, coefficients, device)
            extra = _diagnostics(entry.name, mixture.diagnostics or {})
            points += [(entry.name, c, per_set, extra) for c, per_set in
                       zip(coefficients, mixture_metrics(zero_shot, fine, mixture, eval_sets))]
            continue
        for c in coefficients:
            member = ensemble.endpoint(c)
            if member == FINE_TUNED_MEMBER:
                points.append((entry.name, c, alone, None))
            elif member == ZERO_SHOT_MEMBER:
                if zs_alone is None:
                    zs_alone = evaluate_logits(zero_shot.logits, zero_shot.labels, eval_sets)
                points.append((entry.name, c, zs_alone, None))
    return points


def _diagnostics(prefix: str, values: dict) -> dict[str, float]:
    """An ensemble's numbers about itself (VRF: ZSF size, k, median distance per set) as
    flat metrics, e.g. `vrf_zsf_size`, `vrf_median_distance_id_test`."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{prefix}_{key}_{k}": float(v) for k, v in value.items()})
        else:
            flat[f"{prefix}_{key}"] = float(value)
    return flat


def weights_job(plan: Plan, trial: Trial, job: Job, checkpoint: str,
                device: torch.device) -> list[Row]:
    """One interior point of a weight-space ensemble: mix, then a forward pass per set."""
    spec = plan.spec
    assets = load_assets(spec, device)
    entry = plan.ensemble(job.ensemble)
    ensemble: WeightEnsemble = entry.ensemble
    fine_tuned = load_fitted(assets, checkpoint, device)
    model = ensemble.mix(assets.start.fitted(), fine_tuned, entry.options, job.coefficients)
    per_set = evaluate(model.classifier, assets.bench.eval_sets(), device,
                       batch_size=spec.eval.batch_size, num_workers=spec.eval.num_workers,
                       precision=spec.eval.precision)
    row = RowMaker(plan, trial, assets.bench.shift_names)
    return [row(job.ensemble, job.coefficients, per_set)]


def ensemble_trial(config: dict, spec: SweepSpec, checkpoints: dict[str, str],
                   feature_paths: dict[tuple[str, str], str]) -> None:
    """One job of the ensemble stage (config["job"]: `Job.config`)."""
    device = setup(spec)
    plan = Plan(spec)
    job = Job.from_config(config["job"])
    trial = plan.trial(job.trial)
    if job.ensemble is None:
        rows = cached_outputs_job(plan, trial, feature_paths, checkpoints, device)
    else:
        rows = weights_job(plan, trial, job, checkpoints[trial.name], device)
    tune.report({"rows": json.dumps([r.to_dict() for r in rows])})
