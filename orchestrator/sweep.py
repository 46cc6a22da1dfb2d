"""`orch sweep`: the stages of a sweep, in order.

1. prepare  - driver builds the cached assets (toy world, toy CLIP) once;
2. train    - one Ray Tune trial per grid point, checkpointing every epoch;
3. ensemble - one Ray Tune trial per (trained trial, alpha): WiSE-FT evaluation;
4. report   - Pareto table, front, selection on ID validation, plot -> MLflow.

MLflow is checked first and written only by this driver process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.build import prepare
from orchestrator.pareto import pareto_table, plot_pareto, select_on_validation
from orchestrator.records import SweepRecords, runs_table_url
from orchestrator.spec import SweepSpec, TrialPoint


class SweepError(RuntimeError):
    """A sweep that could not finish; the message is one line for the user."""


@dataclass
class SweepResult:
    sweep_id: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict]        # one per (trial, alpha), with on_front
    selected: int           # index into rows, chosen on ID validation accuracy
    tracking_uri: str


def spec_params(spec: SweepSpec) -> dict:
    """The sweep's settings as flat MLflow params for the parent run."""
    params = {"method": spec.method, "ensemble": spec.ensemble,
              "alphas": ",".join(f"{a:g}" for a in spec.alphas),
              "model.arch": spec.model.arch, "model.pretrained": spec.model.pretrained,
              "benchmark.source": spec.benchmark.source, "num_trials": len(spec.trials())}
    params.update({f"method.{k}": v for k, v in dataclasses.asdict(spec.method_options).items()})
    params.update({f"grid.{k}": v for k, v in spec.grid.items()})
    return params


def trial_params(spec: SweepSpec, point: TrialPoint) -> dict:
    return {"method": point.method, "seed": point.seed, "trial": point.name,
            **dataclasses.asdict(point.options)}


def _init_ray(address: str | None, verbose: bool) -> None:
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if not verbose:
        # Quiet unless -v: Tune's experiment banners, its snapshot-frequency warning
        # (num_to_keep forces a snapshot per checkpoint, which is what we want) and its
        # tracebacks of failed trials (orch reports one line and the trial's log folder).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        # A Ray started here serves this process only: no token to hand around.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=verbose,
                 logging_level="INFO" if verbose else "WARNING")


def _check_resources(spec: SweepSpec) -> None:
    """Unsatisfiable requests hang in Ray instead of failing: refuse them here."""
    import ray
    have = ray.cluster_resources()
    cpus, gpus = spec.resources.cpus_per_trial, spec.resources.gpus_per_trial
    if cpus > have.get("CPU", 0):
        raise SweepError(f"resources.cpus_per_trial={cpus:g} but the Ray cluster has "
                         f"{have.get('CPU', 0):g} CPUs")
    if gpus > have.get("GPU", 0):
        raise SweepError(f"resources.gpus_per_trial={gpus:g} but the Ray cluster has "
                         f"{have.get('GPU', 0):g} GPUs")


def _progress_callback(total: int, desc: str):
    """A Tune callback that counts finished trials, with an ETA (Tune's own tables stay
    quiet unless -v)."""
    from ray import tune

    from trainers.progress import Progress

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.bar: Progress | None = Progress(total, desc, every_s=0)

        def __getstate__(self):  # Tune pickles callbacks with its state; a terminal is not state
            return {"bar": None}

        def _tick(self) -> None:
            if self.bar is None:
                self.bar = Progress(total, desc, every_s=0)
            self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._tick()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tick()

    return TrialProgress()


def _tune(trainable, param_space: dict, spec: SweepSpec, name: str, verbose: bool,
          total: int | None = None, label: str = "trials"):
    from ray import tune
    callbacks = [_progress_callback(total, label)] if total and not verbose else []
    resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        # reuse_actors: one worker process runs many trials (imports and caches stay warm)
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(spec.storage_path), verbose=1 if verbose else 0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures)))
    return tuner.fit()


def _trial_error(result, what: str) -> SweepError:
    lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
    return SweepError(f"{what} failed: {lines[-1] if lines else type(result.error).__name__} "
                      f"(trial log: {result.path})")


def run_sweep(spec: SweepSpec, tracking_uri: str, address: str | None = None,
              verbose: bool = False, echo: Callable[[str], None] = print) -> SweepResult:
    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    records = SweepRecords(tracking_uri, spec.experiment, sweep_id).open()  # fail fast
    points = spec.trials()
    echo(f"sweep {sweep_id}: {len(points)} training trial(s) x {len(spec.alphas)} alpha(s)")
    prepare(spec)
    records.start_parent(spec_params(spec), spec.source_file.read_text()
                         if spec.source_file else None)
    try:
        _init_ray(address, verbose)
        _check_resources(spec)
        checkpoints = _train_stage(spec, sweep_id, points, records, verbose, echo)
        rows = _ensemble_stage(spec, sweep_id, points, checkpoints, verbose, echo)
        table, selected = _report_stage(spec, sweep_id, points, rows, records)
        records.finish(ok=True)
        return SweepResult(sweep_id, records.experiment_id, records.parent_id, table, selected,
                           tracking_uri)
    except BaseException as err:
        records.finish(ok=False, error=str(err).splitlines()[0] if str(err) else repr(err))
        raise


def _train_stage(spec: SweepSpec, sweep_id: str, points: list[TrialPoint],
                 records: SweepRecords, verbose: bool, echo) -> dict[int, str]:
    """One Tune trial per grid point; a child run per trial with its loss curve.
    Returns {trial index: checkpoint folder holding the fine-tuned weights}."""
    from ray import tune

    from orchestrator.trials import train_trial
    echo(f"[train] {len(points)} trial(s) on Ray Tune ...")
    results = _tune(tune.with_parameters(train_trial, spec=spec),
                    {"trial": tune.grid_search([p.index for p in points])},
                    spec, f"{sweep_id}-train", verbose, total=len(points),
                    label="[train] trials finished")
    checkpoints, failures = {}, []
    for result in results:
        point = points[result.config["trial"]]
        history = json.loads((result.metrics or {}).get("history", "[]"))
        records.child(point.name, "train", trial_params(spec, point), history=history,
                      failed=result.error is not None)
        if result.error is not None:
            failures.append(_trial_error(result, f"training trial {point.name}"))
        else:
            checkpoints[point.index] = result.checkpoint.path
    if failures:  # every trial is recorded first, then the first failure is reported
        raise failures[0]
    return checkpoints


def _ensemble_stage(spec: SweepSpec, sweep_id: str, points: list[TrialPoint],
                    checkpoints: dict[int, str], verbose: bool, echo) -> list[dict]:
    """One Tune trial per (trained trial, alpha); returns one metrics row per pair."""
    from ray import tune

    from orchestrator.trials import eval_trial
    total = len(points) * len(spec.alphas)
    echo(f"[ensemble] {spec.ensemble}: {total} evaluation trial(s) ...")
    results = _tune(tune.with_parameters(eval_trial, spec=spec, checkpoints=checkpoints),
                    {"trial": tune.grid_search([p.index for p in points]),
                     "alpha": tune.grid_search(list(spec.alphas))},
                    spec, f"{sweep_id}-{spec.ensemble}", verbose, total=total,
                    label=f"[ensemble] {spec.ensemble} evaluations finished")
    rows = []
    for result in results:
        point = points[result.config["trial"]]
        if result.error is not None:
            raise _trial_error(result, f"evaluation of {point.name} at "
                                       f"alpha={result.config['alpha']:g}")
        metrics = {k: v for k, v in result.metrics.items()
                   if isinstance(v, float) and not k.startswith(("time_", "timestamp"))}
        rows.append({"trial": point.name, "alpha": float(result.config["alpha"]),
                     "method": point.method, **metrics})
    return sorted(rows, key=lambda r: (r["trial"], r["alpha"]))


def _report_stage(spec: SweepSpec, sweep_id: str, points: list[TrialPoint], rows: list[dict],
                  records: SweepRecords) -> tuple[list[dict], int]:
    """Pareto front, selection on ID validation, a child run per point, the parent's
    table, front and plot."""
    table = pareto_table(rows)
    selected = select_on_validation(table)
    by_name = {p.name: p for p in points}
    for row in table:
        metrics = {k: v for k, v in row.items() if isinstance(v, float) and k != "alpha"}
        row["run_id"] = records.child(
            f"{row['trial']} alpha={row['alpha']:g}", "eval",
            {**trial_params(spec, by_name[row["trial"]]), "alpha": row["alpha"],
             "ensemble": spec.ensemble},
            metrics={**metrics, "on_front": float(row["on_front"])})
    best = table[selected]
    figure = plot_pareto(table, f"{sweep_id}: ID vs OOD accuracy over alpha", selected=selected)
    summary = {f"selected_{k}": best[k]
               for k in ("alpha", "id_acc", "ood_acc", "id_ece", "ood_ece", "val_acc")}
    summary["front_size"] = sum(r["on_front"] for r in table)
    records.summary(table, selected, figure, summary,
                    {"orch.selected_run": best["run_id"], "orch.selected_trial": best["trial"]})
    return table, selected


def mlflow_ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """The command that opens the MLflow UI on this store, and the runs-table link."""
    exe = Path(sys.executable).parent / "mlflow"
    command = "mlflow"
    if exe.exists():  # the project's venv: show it relative to here when it is below here
        relative = os.path.relpath(exe)
        command = relative if not relative.startswith("..") else str(exe)
    return (f"{command} ui --backend-store-uri {tracking_uri} --port 5000\n"
            f"then open {runs_table_url(experiment_id)}")
