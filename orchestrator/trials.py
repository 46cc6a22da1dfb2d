"""The functions Ray Tune runs: one training trial per grid point, and the ensemble
stage's jobs (the outputs job of a trained trial, one job per weight-space point).

A single-worker trial uses only `ray.tune.*` (Ray 2.60: `ray.train.*` reporting there
fails the trial); a data-parallel trial starts a Ray Train TorchTrainer inside it.
Everything a trial reads comes from absolute paths resolved on the driver.
Checkpoints are read with `weights_only=True`: tensors and plain containers only.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
from ray import tune

from orchestrator.build import TRAIN_EVAL, load_assets, load_fitted, save_fitted
from orchestrator.features import ZERO_SHOT, read_entry
from orchestrator.spec import SweepSpec, TrialPoint
from trainers.ensembles import FINE_TUNED_MEMBER, OUTPUTS, ZERO_SHOT_MEMBER, MemberOutputs
from trainers.ensembles.mixture import mixture_metrics
from trainers.evaluate import evaluate, evaluate_logits, reliability_summary, summarize
from trainers.methods import FitContext, get_method
from trainers.train_loop import Hooks

STATE_FILE = "train_state.pt"        # per-epoch resumable state (model, optimizer, ...)
HISTORY_FILE = "history.json"        # the trial's loss curve so far
MODEL_FILE = "model.pt"              # the fitted model (classifier, fine-tuned text tower)
OUTPUTS_JOB = "outputs"              # the ensemble-stage job that works on cached outputs


def _setup(spec: SweepSpec) -> torch.device:
    # Tune gives a trial `cpus_per_trial` cores; more threads than that oversubscribe them.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _history_row(history: list[dict], phase: str, metrics: dict) -> dict:
    """One row of the trial's loss curve; a multi-phase method's earlier phases get
    their name as prefix (LP-FT: `lp_train_loss`, then `train_loss`)."""
    prefix = "" if phase in ("train", "ft") else f"{phase}_"
    return {"epoch": len(history), **{f"{prefix}{k}": v for k, v in metrics.items()
                                      if k != "epoch"}}


def _fit(spec: SweepSpec, point: TrialPoint, feature_paths: dict, device: torch.device,
         checkpoint, report: Callable[[dict, Path | None], None], is_first: bool = True) -> None:
    """Fit one grid point, continuing from `checkpoint` (a Tune or Train checkpoint, or
    None); `report(metrics, folder)` hands each epoch's state (and at the end the fitted
    model) to whoever runs the fit. Only the first data-parallel worker writes files."""
    method = get_method(point.method)
    assets = load_assets(spec, device)
    resume_state, history = None, []
    if checkpoint is not None:  # continue from the last epoch
        with checkpoint.as_directory() as folder:
            if (Path(folder) / STATE_FILE).is_file():
                resume_state = torch.load(Path(folder) / STATE_FILE, map_location=device,
                                          weights_only=True)
                history = json.loads((Path(folder) / HISTORY_FILE).read_text())

    def on_epoch_end(epoch: int, metrics: dict, state: dict) -> None:
        history.append(_history_row(history, state["phase"], metrics))
        with tempfile.TemporaryDirectory() as folder:
            if is_first:
                torch.save(state, Path(folder) / STATE_FILE)
                (Path(folder) / HISTORY_FILE).write_text(json.dumps(history))
            report(metrics, Path(folder) if is_first else None)

    train_features = None
    if (ZERO_SHOT, TRAIN_EVAL) in feature_paths:
        def train_features():
            cached = read_entry(feature_paths[(ZERO_SHOT, TRAIN_EVAL)])
            return cached.features, cached.labels

    hooks = Hooks(on_epoch_end=on_epoch_end, resume_state=resume_state, progress=False,
                  num_workers=spec.eval.num_workers)
    ctx = FitContext(assets.bench.train, device, point.seed, hooks, train_features=train_features,
                     train_eval_set=assets.bench.train_eval)
    fitted = method.fit(assets.start, point.options, ctx)
    with tempfile.TemporaryDirectory() as folder:
        if is_first:
            save_fitted(fitted, Path(folder) / MODEL_FILE)
        # The whole loss curve rides on the last report, so the driver can log it to
        # MLflow from the final result alone.
        report({"fitted": True, "history": json.dumps(history)}, Path(folder) if is_first else None)


def train_trial(config: dict, spec: SweepSpec, feature_paths: dict[tuple[str, str], str],
                resume_from: dict[str, str] | None = None, workers_storage: str = "") -> None:
    """Fit one grid point (config["method"] holds its named hyper-parameters); checkpoint
    every epoch; end with the fitted model file. A trial Tune restarts continues from its
    last checkpoint; so does one a resumed sweep starts (`resume_from`: name -> path).
    With `resources.workers_per_trial > 1` the fit runs data-parallel on Ray Train."""
    point = spec.trial_for(config["method"])
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and (resume_from or {}).get(point.name):
        checkpoint = tune.Checkpoint(resume_from[point.name])
    if spec.resources.workers_per_trial > 1:
        _train_data_parallel(spec, point, feature_paths, checkpoint, workers_storage)
        return
    device = _setup(spec)

    def report(metrics: dict, folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    _fit(spec, point, feature_paths, device, checkpoint, report)


def _train_data_parallel(spec: SweepSpec, point: TrialPoint, feature_paths: dict, checkpoint,
                         storage: str) -> None:
    """This Tune trial drives a Ray Train TorchTrainer with `workers_per_trial` workers
    (gloo on CPUs, NCCL on GPUs). Each epoch's metrics and checkpoint path reach Tune
    (the driver notes the checkpoint: a resumed sweep continues from it); Ray Train
    restarts lost workers from it; the fitted model ends as this trial's checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    r = spec.resources
    use_gpu = r.gpus_per_trial > 0
    per_worker = {"CPU": r.cpus_per_trial, **({"GPU": r.gpus_per_trial} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec, "trial": point.name, "feature_paths": feature_paths,
                           "resume_from": checkpoint.path if checkpoint else None},
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"{point.name}-{tune.get_context().get_trial_id()}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        tune.report({"fitted": True, "history": result.metrics["history"]},
                    checkpoint=tune.Checkpoint.from_directory(folder))


def _train_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel trial: the same fit, on its share of each
    batch (the loop shards batches and averages gradients over the process group)."""
    import ray.train
    import ray.train.torch
    spec = config["spec"]
    point = spec.trial_named(config["trial"])
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        checkpoint = ray.train.Checkpoint(config["resume_from"])

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder)
                         if folder else None)

    _fit(spec, point, config["feature_paths"], ray.train.torch.get_device(), checkpoint, report,
         is_first=context.get_world_rank() == 0)


def _member(feature_paths: dict, model: str, sets: list[str], with_features: bool,
            device: torch.device) -> MemberOutputs:
    """One model's cached outputs, on the job's device (the mixtures and the kNN run there)."""
    cached = {s: read_entry(feature_paths[(model, s)], with_features) for s in sets}
    return MemberOutputs(logits={s: c.logits.to(device) for s, c in cached.items()},
                         labels={s: c.labels.to(device) for s, c in cached.items()},
                         features={s: c.features.to(device) for s, c in cached.items()}
                         if with_features else None)


def point_row(point: TrialPoint, ensemble: str, coefficients: dict, per_set: dict,
              shift_names) -> dict:
    """One row of the sweep's table: which point, its flat metrics, its reliability bins."""
    return {"trial": point.name, "method": point.label, "ensemble": ensemble,
            "coefficients": coefficients, **summarize(per_set, shift_names),
            "reliability": reliability_summary(per_set, shift_names)}


def outputs_job(spec: SweepSpec, point: TrialPoint, feature_paths: dict,
                device: torch.device) -> list[dict]:
    """Every point of `point` computable from cached outputs: the model alone, the
    output-space ensembles (all coefficients at once) and the weight-space ensembles'
    endpoints (alpha 0 is the zero-shot model, 1 the fine-tuned one, exactly)."""
    assets = load_assets(spec, device)
    eval_sets = assets.bench.eval_sets()
    shifts = assets.bench.shift_names
    names = list(eval_sets)
    ensembles = spec.ensembles_for(point)
    needs_features = any(e.ensemble.mixes == OUTPUTS and e.ensemble.needs_features
                         for e in ensembles)
    sets = names + ([TRAIN_EVAL] if needs_features else [])
    zero_shot = _member(feature_paths, ZERO_SHOT, sets, needs_features, device)
    if not point.trained:
        per_set = evaluate_logits(zero_shot.logits, zero_shot.labels, eval_sets)
        return [point_row(point, "none", {}, per_set, shifts)]
    fine_tuned = _member(feature_paths, point.name, sets, needs_features, device)
    alone = evaluate_logits(fine_tuned.logits, fine_tuned.labels, eval_sets)
    rows = [point_row(point, "none", {}, alone, shifts)]
    zs_alone = None
    for entry in ensembles:
        ensemble = entry.ensemble
        points = entry.points()
        if ensemble.mixes == OUTPUTS:
            mixture = ensemble.mix(zero_shot, fine_tuned, entry.options, points, names,
                                   device=device)
            extra = _diagnostics(entry.name, mixture.diagnostics or {})
            for coefficients, per_set in zip(points, mixture_metrics(zero_shot, fine_tuned,
                                                                     mixture, eval_sets)):
                rows.append({**point_row(point, entry.name, coefficients, per_set, shifts),
                             **extra})
            continue
        for coefficients in points:
            member = ensemble.endpoint(coefficients) if ensemble.endpoint else None
            if member == FINE_TUNED_MEMBER:
                rows.append(point_row(point, entry.name, coefficients, alone, shifts))
            elif member == ZERO_SHOT_MEMBER:
                if zs_alone is None:
                    zs_alone = evaluate_logits(zero_shot.logits, zero_shot.labels, eval_sets)
                rows.append(point_row(point, entry.name, coefficients, zs_alone, shifts))
    return rows


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


def weight_points(spec: SweepSpec, point: TrialPoint) -> list[tuple[str, dict]]:
    """The weight-space points that need their own forward pass (not the endpoints)."""
    out = []
    for entry in spec.ensembles_for(point):
        if entry.ensemble.mixes == OUTPUTS:
            continue
        endpoint = entry.ensemble.endpoint
        out += [(entry.name, c) for c in entry.points() if not (endpoint and endpoint(c))]
    return out


def weights_job(spec: SweepSpec, point: TrialPoint, ensemble_name: str, coefficients: dict,
                checkpoint: str, device: torch.device) -> list[dict]:
    assets = load_assets(spec, device)
    entry = next(e for e in spec.ensembles if e.name == ensemble_name)
    fine_tuned = load_fitted(assets, checkpoint, device)
    model = entry.ensemble.mix(assets.start.zero_shot, fine_tuned.classifier, coefficients,
                               entry.options)
    per_set = evaluate(model, assets.bench.eval_sets(), device, batch_size=spec.eval.batch_size,
                       num_workers=spec.eval.num_workers, precision=spec.eval.precision)
    return [point_row(point, ensemble_name, coefficients, per_set, assets.bench.shift_names)]


def ensemble_trial(config: dict, spec: SweepSpec, checkpoints: dict[str, str],
                   feature_paths: dict[tuple[str, str], str]) -> None:
    """One job of the ensemble stage: config["job"] = {"trial", "ensemble", coefficients}."""
    device = _setup(spec)
    job = config["job"]
    point = spec.trial_named(job["trial"])
    if job["ensemble"] == OUTPUTS_JOB:
        rows = outputs_job(spec, point, feature_paths, device)
    else:
        coefficients = {k: v for k, v in job.items() if k not in ("trial", "ensemble")}
        rows = weights_job(spec, point, job["ensemble"], coefficients, checkpoints[point.name],
                           device)
    tune.report({"rows": json.dumps(rows)})
