"""`orch sweep`: the stages of a sweep, in order.

1. prepare  - the driver builds the cached assets (toy world, toy CLIP) once;
2. features - Ray Data encodes every set with the zero-shot model into the Parquet cache;
3. train    - one Ray Tune trial per grid point of every method, checkpointing each epoch;
4. features - the same for every fitted model;
5. ensemble - Ray Tune jobs: per trained trial one job on cached outputs (the model alone,
              every output-space ensemble, weight-space endpoints), and one job per
              interior weight-space point (WiSE-FT alpha);
6. report   - Pareto table, choice on ID validation per (method, ensemble), plots -> MLflow.

MLflow is checked first and written only by this driver process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.build import TRAIN_EVAL, load_benchmark, load_model, prepare
from orchestrator.features import FeatureCache, trial_ref, zero_shot_ref
from orchestrator.pareto import (NONE, chosen_per_group, coefficients_text, group_label,
                                 pareto_table, plot_calibration, plot_pareto, plot_reliability,
                                 select_on_validation)
from orchestrator.records import SweepRecords, runs_table_url
from orchestrator.spec import SweepSpec, TrialPoint
from orchestrator.trials import MODEL_FILE, OUTPUTS_JOB, weight_points
from trainers.ensembles import OUTPUTS
from trainers.methods import get_method


class SweepError(RuntimeError):
    """A sweep that could not finish; the message is one line for the user."""


@dataclass
class SweepResult:
    sweep_id: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict]        # one per point, with on_front and chosen
    selected: int           # index into rows: the best ID validation accuracy overall
    tracking_uri: str


def new_sweep_id(name: str) -> str:
    """Name, time to the second and a random suffix: two sweeps started in the same
    second never share an id (or a Tune folder)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def spec_params(spec: SweepSpec) -> dict:
    """The sweep's settings as flat MLflow params for the parent run."""
    params = {"methods": ",".join(e.label for e in spec.methods),
              "ensembles": ",".join(e.name for e in spec.ensembles),
              "model.arch": spec.model.arch, "model.pretrained": spec.model.pretrained,
              "benchmark.source": spec.benchmark.source, "num_trials": len(spec.trials()),
              "num_points": spec.num_points()}
    for entry in spec.methods:
        params.update({f"{entry.label}.{k}": v
                       for k, v in dataclasses.asdict(entry.options).items()})
        params.update({f"{entry.label}.grid.{k}": v for k, v in entry.grid.items()})
    for entry in spec.ensembles:
        params.update({f"{entry.name}.{k}": v for k, v in dataclasses.asdict(entry.options).items()})
    return params


def trial_params(point: TrialPoint) -> dict:
    return {"method": point.label, "method_name": point.method, "seed": point.seed,
            "trial": point.name, **dataclasses.asdict(point.options)}


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
        # Ray Data's per-dataset lines, its warning that an actor pool holding every CPU
        # may starve other stages (orch's reads and writes take no CPU) and its stack
        # traces of a failed job (orch reports the cause in one line)
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
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
    cpu, gpu = have.get("CPU", 0), have.get("GPU", 0)
    r, f = spec.resources, spec.features
    actors = f.actors or 1
    checks = [("resources.cpus_per_trial", r.cpus_per_trial, cpu, "CPUs"),
              ("resources.gpus_per_trial", r.gpus_per_trial, gpu, "GPUs"),
              ("features.cpus_per_actor", f.cpus_per_actor * actors, cpu, "CPUs"),
              ("features.gpus_per_actor", f.gpus_per_actor * actors, gpu, "GPUs")]
    for field, asked, has, unit in checks:
        if asked > has:
            what = f"{field}={asked:g}" if actors == 1 or "actor" not in field else \
                f"features.actors x {field.split('.')[1]} = {asked:g}"
            raise SweepError(f"{what} but the Ray cluster has {has:g} {unit}")


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
    sweep_id = new_sweep_id(spec.name)
    records = SweepRecords(tracking_uri, spec.experiment, sweep_id).open()  # fail fast
    points = spec.trials()
    trained = [p for p in points if p.trained]
    echo(f"sweep {sweep_id}: {len(trained)} training trial(s) of {len(spec.methods)} "
         f"method(s), {spec.num_points()} point(s) to evaluate")
    prepare(spec)
    records.start_parent(spec_params(spec), spec.source_file.read_text()
                         if spec.source_file else None)
    try:
        _init_ray(address, verbose)
        _check_resources(spec)
        clip = load_model(spec.model)               # transforms and datasets, on the driver
        bench = load_benchmark(spec.benchmark, clip)
        cache = FeatureCache(spec, bench, echo)
        feature_paths = _zero_shot_features(spec, points, cache, bench)
        checkpoints = _train_stage(spec, sweep_id, trained, records, feature_paths, verbose, echo)
        feature_paths.update(_fine_tuned_features(spec, trained, checkpoints, cache, bench))
        rows = _ensemble_stage(spec, sweep_id, points, checkpoints, feature_paths, verbose, echo)
        table, selected = _report_stage(spec, sweep_id, points, rows, records)
        records.finish(ok=True)
        return SweepResult(sweep_id, records.experiment_id, records.parent_id, table, selected,
                           tracking_uri)
    except BaseException as err:
        records.finish(ok=False, error=str(err).splitlines()[0] if str(err) else repr(err))
        raise


def _needs_train_outputs(spec: SweepSpec, point: TrialPoint) -> bool:
    """VRF builds its zero-shot-failure set from the training split's outputs."""
    return any(e.ensemble.mixes == OUTPUTS and e.ensemble.needs_features
               for e in spec.ensembles_for(point))


def _zero_shot_features(spec: SweepSpec, points: list[TrialPoint], cache: FeatureCache,
                        bench) -> dict[tuple[str, str], str]:
    """Zero-shot outputs of every eval set, and of the training split when a linear probe
    trains on its features or VRF builds its zero-shot-failure set from it."""
    sets = list(bench.eval_sets())
    if any(get_method(p.method).needs_train_features or _needs_train_outputs(spec, p)
           for p in points):
        sets.append(TRAIN_EVAL)
    return cache.ensure([(zero_shot_ref(spec, bench), sets)], "zero-shot model")


def _fine_tuned_features(spec: SweepSpec, trained: list[TrialPoint], checkpoints: dict[str, str],
                         cache: FeatureCache, bench) -> dict[tuple[str, str], str]:
    jobs = []
    for point in trained:
        sets = list(bench.eval_sets()) + ([TRAIN_EVAL] if _needs_train_outputs(spec, point) else [])
        jobs.append((trial_ref(point.name, checkpoints[point.name]), sets))
    return cache.ensure(jobs, f"{len(jobs)} fitted model(s)") if jobs else {}


def _train_stage(spec: SweepSpec, sweep_id: str, points: list[TrialPoint],
                 records: SweepRecords, feature_paths: dict, verbose: bool, echo) -> dict[str, str]:
    """One Tune trial per grid point of every method that trains, all in one Tuner; a
    child run per trial with its loss curve. Returns {trial name: fitted-model file}."""
    if not points:
        return {}
    from ray import tune

    from orchestrator.trials import train_trial
    echo(f"[train] {len(points)} trial(s) on Ray Tune ...")
    # The named hyper-parameters themselves are the search space (`method/lr`, `method/seed`),
    # so a Tune searcher or scheduler sees them; each trial rebuilds its options from them.
    space = [{"label": e.label, **{k: tune.grid_search(v) for k, v in e.grid.items()}}
             for e in spec.methods if get_method(e.method).trained]
    results = _tune(tune.with_parameters(train_trial, spec=spec, feature_paths=feature_paths),
                    {"method": tune.grid_search(space)}, spec, f"{sweep_id}-train", verbose,
                    total=len(points), label="[train] trials finished")
    checkpoints, failures = {}, []
    for result in results:
        point = spec.trial_for(result.config["method"])
        history = json.loads((result.metrics or {}).get("history", "[]"))
        records.child(point.name, "train", trial_params(point), history=history,
                      failed=result.error is not None)
        if result.error is not None:
            failures.append(_trial_error(result, f"training trial {point.name}"))
        else:
            checkpoints[point.name] = str(Path(result.checkpoint.path) / MODEL_FILE)
    if failures:  # every trial is recorded first, then the first failure is reported
        raise failures[0]
    return checkpoints


def _ensemble_stage(spec: SweepSpec, sweep_id: str, points: list[TrialPoint],
                    checkpoints: dict[str, str], feature_paths: dict, verbose: bool,
                    echo) -> list[dict]:
    """Per trial one job on cached outputs, plus one job per interior weight-space point."""
    from ray import tune

    from orchestrator.trials import ensemble_trial
    jobs = []
    for point in points:
        jobs.append({"trial": point.name, "ensemble": OUTPUTS_JOB})
        jobs += [{"trial": point.name, "ensemble": name, **coefficients}
                 for name, coefficients in weight_points(spec, point)]
    echo(f"[ensemble] {spec.num_points()} point(s) in {len(jobs)} job(s) ...")
    results = _tune(tune.with_parameters(ensemble_trial, spec=spec, checkpoints=checkpoints,
                                         feature_paths=feature_paths),
                    {"job": tune.grid_search(jobs)}, spec, f"{sweep_id}-ensemble", verbose,
                    total=len(jobs), label="[ensemble] jobs finished")
    rows = []
    for result in results:
        job = result.config["job"]
        if result.error is not None:
            what = "".join(f", {k}={v:g}" for k, v in job.items() if k not in ("trial", "ensemble"))
            raise _trial_error(result, f"evaluation of {job['trial']} ({job['ensemble']}{what})")
        rows += json.loads(result.metrics["rows"])
    return _sorted_rows(spec, points, rows)


def _sorted_rows(spec: SweepSpec, points: list[TrialPoint], rows: list[dict]) -> list[dict]:
    """Trials in sweep order; per trial the model alone, then each ensemble's points in
    grid order."""
    trial_order = {p.name: i for i, p in enumerate(points)}
    ensemble_order = {NONE: -1, **{e.name: i for i, e in enumerate(spec.ensembles)}}
    grid_order = {(e.name, json.dumps(c, sort_keys=True)): i
                  for e in spec.ensembles for i, c in enumerate(e.points())}
    return sorted(rows, key=lambda r: (
        trial_order[r["trial"]], ensemble_order[r["ensemble"]],
        grid_order.get((r["ensemble"], json.dumps(r["coefficients"], sort_keys=True)), 0)))


def _report_stage(spec: SweepSpec, sweep_id: str, points: list[TrialPoint], rows: list[dict],
                  records: SweepRecords) -> tuple[list[dict], int]:
    """Pareto front, the choice per (method, ensemble) and overall, a child run per point,
    the parent's table, plots and summary."""
    table = pareto_table(rows)
    selected = select_on_validation(table)
    by_name = {p.name: p for p in points}
    for row in table:
        metrics = {k: v for k, v in row.items() if isinstance(v, float)}
        params = {**trial_params(by_name[row["trial"]]), "ensemble": row["ensemble"],
                  "coefficients": coefficients_text(row), **row["coefficients"]}
        name = row["trial"] + ("" if row["ensemble"] == NONE else
                               f" {row['ensemble']} {coefficients_text(row)}")
        row["run_id"] = records.child(name, "eval", params, metrics={
            **metrics, "on_front": float(row["on_front"]), "chosen": float(row["chosen"])})
    figures = {"pareto.png": plot_pareto(table, f"{sweep_id}: ID vs OOD accuracy"),
               "calibration.png": plot_calibration(table, f"{sweep_id}: OOD accuracy vs OOD ECE")}
    for method in dict.fromkeys(r["method"] for r in table):
        figures[f"reliability/{method}.png"] = plot_reliability(
            table, method, f"{sweep_id}: reliability of {method}'s chosen points")
    best = table[selected]
    summary = {f"selected_{k}": best[k] for k in ("id_acc", "ood_acc", "id_ece", "ood_ece",
                                                 "val_acc")}
    summary["front_size"] = sum(r["on_front"] for r in table)
    choices = [{"group": group_label(g), "row": i, "trial": table[i]["trial"],
                "coefficients": table[i]["coefficients"], "run_id": table[i]["run_id"]}
               for g, i in chosen_per_group(table).items()]
    records.summary(table, selected, choices, figures, summary,
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
