"""The training trials Ray Tune runs: one per grid point of every method, checkpointing
every epoch, resuming from the last one.

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
from torch.utils.data import Dataset

import ray.train
import ray.train.torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.assets.loaded import load_assets, load_fitted, save_fitted
from orchestrator.plan import Plan, Trial
from orchestrator.run.cluster import worker_request
from orchestrator.run.features import ZERO_SHOT, read_entry
from orchestrator.spec.types import ResourcesSpec, SweepSpec
from trainers.data.benchmark import ID_TRAIN, ArrayImageDataset
from trainers.evaluate import predict
from trainers.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from trainers.methods import FitContext, get_method
from trainers.train_loop import MAIN_PHASE, Hooks

STATE_FILE = "train_state.pt"        # per-epoch resumable state (model, optimizer, ...)
HISTORY_FILE = "history.json"        # the trial's loss curve so far
MODEL_FILE = "model.pt"              # the fitted model (classifier, fine-tuned text tower)
VAL_ACC = "val_acc"                  # per-epoch ID validation accuracy (early stopping)
EPOCHS_DONE = "epochs_done"          # main-phase epochs done: early stopping's clock
OBJECTIVES = "objectives"            # a searched trial's scores on ID validation (JSON)


def setup(spec: SweepSpec) -> torch.device:
    # Tune gives a trial `cpus_per_trial` cores; more threads than that oversubscribe them
    # (`_fit` hands some of them to loader processes once it knows the data).
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def loader_workers(resources: ResourcesSpec, train: Dataset) -> int:
    """Training-loader processes of one trial (or one data-parallel worker): as set, or
    every CPU of the trial but the one it computes on when images are files to decode
    (JPEG decoding on one core feeds ~200 images/s; a ViT-B/16 step on a GPU takes
    ~2,000), none for in-memory arrays, where a process would only add start-up and
    copying."""
    if resources.loader_workers is not None:
        return resources.loader_workers
    if isinstance(train, ArrayImageDataset):
        return 0
    return max(0, int(resources.cpus_per_trial) - 1)


def _history_row(history: list[dict], phase: str, metrics: dict) -> dict:
    """One row of the trial's loss curve; a multi-phase method's earlier phases get
    their name as prefix (LP-FT: `lp_train_loss`, then `train_loss`)."""
    prefix = "" if phase == MAIN_PHASE else f"{phase}_"
    return {"epoch": len(history), **{f"{prefix}{k}": v for k, v in metrics.items()
                                      if k != "epoch"}}


def _fit(spec: SweepSpec, trial: Trial, feature_paths: dict, device: torch.device,
         checkpoint, report: Callable[[dict, Path | None], None], is_first: bool = True,
         members: dict[str, str] | None = None) -> None:
    """Fit one grid point, continuing from `checkpoint` (a Tune or Train checkpoint, or
    None); `report(metrics, folder)` hands each epoch's state (and at the end the fitted
    model) to whoever runs the fit. Only the first data-parallel worker writes files."""
    method = get_method(trial.method_name)
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
        if EPOCHS_DONE in metrics and metrics[EPOCHS_DONE] == trial.options.epochs:
            # the last epoch: early stopping must not stop a fit that only has its model
            # left to write (ASHA passes over a report without its clock)
            metrics = {k: v for k, v in metrics.items() if k != EPOCHS_DONE}
        with tempfile.TemporaryDirectory() as folder:
            if is_first:
                torch.save(state, Path(folder) / STATE_FILE)
                (Path(folder) / HISTORY_FILE).write_text(json.dumps(history))
            report(metrics, Path(folder) if is_first else None)

    train_features = None
    if (ZERO_SHOT, ID_TRAIN) in feature_paths:
        def train_features():
            cached = read_entry(feature_paths[(ZERO_SHOT, ID_TRAIN)])
            return cached.features, cached.labels

    workers = loader_workers(spec.resources, assets.bench.train)
    if workers:   # the trial computes on the cores its loader processes leave
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial) - workers))
    hooks = Hooks(on_epoch_end=on_epoch_end, resume_state=resume_state, progress=False,
                  num_workers=workers, validate=_validation(spec, trial, assets, device))
    member_models = None
    if trial.merges:              # soups, Model Stock: the member trials' fitted models
        plan = Plan(spec)

        def member_models():
            # members the sweep's search stopped early have no model: left out
            return [load_fitted(assets, members[m.name], device) for m in plan.members(trial)
                    if m.name in members]
    ctx = FitContext(assets.bench.train, device, trial.seed, hooks, train_features=train_features,
                     train_eval_set=assets.bench.train_eval, members=member_models,
                     val_set=assets.bench.val.dataset)
    fitted = method.fit(assets.start, trial.options, ctx)
    final = {"fitted": True, "history": json.dumps(history)}
    if is_first and _searched(spec, trial):     # what the searcher is told
        final[OBJECTIVES] = json.dumps(_objectives(spec, fitted.classifier, assets, device))
    with tempfile.TemporaryDirectory() as folder:
        if is_first:
            save_fitted(fitted, Path(folder) / MODEL_FILE)
        # The whole loss curve rides on the last report, so the driver can log it to
        # MLflow from the final result alone.
        report(final, Path(folder) if is_first else None)


def _searched(spec: SweepSpec, trial: Trial) -> bool:
    return any(e.label == trial.label and e.searched for e in spec.methods)


def _objectives(spec: SweepSpec, classifier: torch.nn.Module, assets,
                device: torch.device) -> dict[str, float]:
    """The fitted model's ID validation accuracy, ECE and NLL (never a test set): what a
    searcher may optimise (`search.objectives`)."""
    logits, labels = predict(classifier, assets.bench.val.dataset, device, spec.eval.batch_size,
                             spec.eval.num_workers, spec.eval.precision)
    return {"val_acc": accuracy(logits, labels),
            "val_ece": expected_calibration_error(logits, labels),
            "val_nll": negative_log_likelihood(logits, labels)}


def _validation(spec: SweepSpec, trial: Trial, assets, device: torch.device):
    """The per-epoch measure early stopping reads: ID validation accuracy (top-1, in the
    ID classes), for the trials the sweep's `search` may stop; None for the others."""
    if not spec.search.searches(trial.label):
        return None
    val = assets.bench.val.dataset

    def validate(classifier: torch.nn.Module) -> dict[str, float]:
        logits, labels = predict(classifier, val, device, spec.eval.batch_size,
                                 spec.eval.num_workers, spec.eval.precision)
        return {VAL_ACC: float((logits.argmax(1) == labels).float().mean())}
    return validate


def train_trial(config: dict, spec: SweepSpec, feature_paths: dict[tuple[str, str], str],
                resume_from: dict[str, str] | None = None, workers_storage: str = "",
                members: dict[str, str] | None = None) -> None:
    """Fit one grid point (config["trial"]: `Trial.config`, its named hyper-parameters);
    checkpoint every epoch; end with the fitted model file. A trial Tune restarts
    continues from its last checkpoint; so does one a resumed sweep starts
    (`resume_from`: name -> path). With `resources.workers_per_trial > 1` the fit runs
    data-parallel on Ray Train."""
    trial = Plan(spec).trial_for(config["trial"])
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and (resume_from or {}).get(trial.name):
        checkpoint = tune.Checkpoint(resume_from[trial.name])
    if spec.resources.workers_per_trial > 1 and not trial.merges:
        _train_data_parallel(spec, trial, feature_paths, checkpoint, workers_storage)
        return
    device = setup(spec)

    def report(metrics: dict, folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    _fit(spec, trial, feature_paths, device, checkpoint, report, members=members)


def _train_data_parallel(spec: SweepSpec, trial: Trial, feature_paths: dict, checkpoint,
                         storage: str) -> None:
    """This Tune trial drives a Ray Train TorchTrainer with `workers_per_trial` workers
    (gloo on CPUs, NCCL on GPUs). Each epoch's metrics and checkpoint path reach Tune
    (the driver notes the checkpoint: a resumed sweep continues from it); Ray Train
    restarts lost workers from it; the fitted model ends as this trial's checkpoint."""
    r = spec.resources
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec, "trial": trial.name, "feature_paths": feature_paths,
                           "resume_from": checkpoint.path if checkpoint else None},
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers_per_trial,
                                               use_gpu=r.gpus_per_trial > 0,
                                               resources_per_worker=worker_request(r)),
        run_config=ray.train.RunConfig(
            name=f"{trial.name}-{tune.get_context().get_trial_id()}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        tune.report({k: v for k, v in result.metrics.items()
                     if k in ("fitted", "history", OBJECTIVES)},
                    checkpoint=tune.Checkpoint.from_directory(folder))


def _train_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel trial: the same fit, on its share of each
    batch (the loop shards batches and averages gradients over the process group)."""
    spec = config["spec"]
    trial = Plan(spec).trial(config["trial"])
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        checkpoint = ray.train.Checkpoint(config["resume_from"])

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder)
                         if folder else None)

    _fit(spec, trial, config["feature_paths"], ray.train.torch.get_device(), checkpoint, report,
         is_first=context.get_world_rank() == 0)
