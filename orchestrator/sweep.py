"""`orch sweep`: the stages of a sweep, in order.

1. prepare  - the driver builds the cached assets (toy world, toy CLIP) once;
2. features - Ray Data encodes every set with the zero-shot model into the Parquet
              cache here, when a linear probe trains on the cached training split (else
              this joins step 4's job);
3. train    - one Ray Tune trial per grid point of every method, checkpointing each epoch;
4. features - every set, with the zero-shot model and every fitted model (one job);
5. ensemble - Ray Tune jobs: per trained trial one job on cached outputs (the model alone,
              every output-space ensemble, weight-space endpoints), and one job per
              interior weight-space point (WiSE-FT alpha);
6. report   - Pareto table, choice on ID validation per (method, ensemble), plots -> MLflow.

Nothing finished is lost: each trial and each ensemble job is written to the sweep's
journal (in its storage folder) when it ends, then to MLflow. A sweep interrupted in any
way ends FAILED or KILLED, never RUNNING, and `--resume` continues it: finished trials
and jobs are not run again, unfinished trials continue from their last epoch checkpoint
(handed to them by the driver, from the journal), and MLflow ends with one child run per
trial and per point.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestrator.build import TRAIN_EVAL, load_benchmark, load_model, prepare
from orchestrator.features import FeatureCache, trial_ref, zero_shot_ref
from orchestrator.journal import FAILED, FINISHED, INTERRUPTED, Journal, job_key
from orchestrator.pareto import (NONE, chosen_per_group, coefficients_text, group_label,
                                 pareto_table, plot_calibration, plot_pareto, plot_reliability,
                                 point_name, select_on_validation)
from orchestrator.records import SweepRecords, runs_table_url
from orchestrator.spec import SweepSpec, TrialPoint
from orchestrator.storage import check_writable, join
from orchestrator.trials import MODEL_FILE, OUTPUTS_JOB, weight_points
from trainers.ensembles import OUTPUTS
from trainers.methods import get_method

TRAIN, ENSEMBLE = "train", "ensemble"


class SweepError(RuntimeError):
    """A sweep that could not finish; the message is one line for the user."""


class SweepInterrupted(RuntimeError):
    """Ctrl-C (or SIGTERM): the sweep stopped, its parent run is KILLED, it can resume."""


@dataclass
class SweepResult:
    sweep_id: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict]        # one per point, with on_front and chosen
    selected: int           # index into rows: the best ID validation accuracy overall
    tracking_uri: str
    journal: str                       # the sweep's folder in its storage
    mlflow_failed: str | None = None   # MLflow stopped taking writes mid-sweep


def new_sweep_id(name: str) -> str:
    """Name, time to the second and a random suffix: two sweeps started in the same
    second never share an id (or a Tune folder)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


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
        # "Token authentication is enabled for this Ray cluster": as it should be
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        # Ray Data's per-dataset lines, its warning that an actor pool holding every CPU
        # may starve other stages (orch's reads and writes take no CPU) and its stack
        # traces of a failed job (orch reports the cause in one line)
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        # Ray's processes listen on every interface; its token authentication (on by
        # default since 2.52) is what keeps others out, so orch leaves it on, and makes
        # the token itself readable by this user only (Ray would write it world-readable).
        _private_token()
        ray.init(include_dashboard=False, log_to_driver=verbose,
                 logging_level="INFO" if verbose else "WARNING")


def _private_token() -> None:
    """Create Ray's token file (~/.ray/auth_token, Ray's own format: 64 hex digits) with
    mode 0600 before Ray does, or tighten an existing one."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # written whole under a private name, then linked into place: a second orch
        # starting at the same moment finds either no file or a complete one
        tmp = path.with_name(f".auth_token.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass                          # the other one was first: its token it is
        finally:
            tmp.unlink(missing_ok=True)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)


def _check_resources(spec: SweepSpec) -> None:
    """Unsatisfiable requests hang in Ray instead of failing: refuse them here."""
    import ray
    have = ray.cluster_resources()
    cpu, gpu = have.get("CPU", 0), have.get("GPU", 0)
    r, f = spec.resources, spec.features
    actors = f.actors or 1
    n = r.workers_per_trial
    checks = [("resources.cpus_per_trial", r.cpus_per_trial * n, cpu, "CPUs"),
              ("resources.gpus_per_trial", r.gpus_per_trial * n, gpu, "GPUs"),
              ("features.cpus_per_actor", f.cpus_per_actor * actors, cpu, "CPUs"),
              ("features.gpus_per_actor", f.gpus_per_actor * actors, gpu, "GPUs")]
    for key, asked, has, unit in checks:
        if asked > has:
            if "actor" in key and actors > 1:
                what = f"features.actors x {key.split('.')[1]} = {asked:g}"
            elif "trial" in key and n > 1:
                what = f"resources.workers_per_trial x {key.split('.')[1]} = {asked:g}"
            else:
                what = f"{key}={asked:g}"
            raise SweepError(f"{what} but the Ray cluster has {has:g} {unit}")


def point_key(row: dict) -> str:
    """The record key of one point: trial, ensemble and coefficients."""
    return f"point/{row['trial']}/{row['ensemble']}/{coefficients_text(row)}"


def point_params(point: TrialPoint, row: dict) -> dict:
    return {**trial_params(point), "ensemble": row["ensemble"],
            "coefficients": coefficients_text(row), **row["coefficients"]}


def point_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, float)}


@dataclass
class Sweep:
    """The state of the sweep this process is running; Tune callbacks report to it."""

    spec: SweepSpec
    journal: Journal
    records: SweepRecords
    echo: Callable[[str], None]
    verbose: bool = False
    live: Any = None               # the LiveView (None with -v: Tune prints its own tables)
    register: str | None = None    # model-registry name for the chosen model
    interrupted: bool = False      # Ctrl-C / SIGTERM seen: Tune is stopping the trials
    in_tune: bool = False

    def on_signal(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM. Inside a Tune experiment: ask Tune to stop every trial
        (InterruptStopper) so it saves its state; a second one, or one outside Tune,
        stops at once."""
        if self.in_tune and not self.interrupted:
            self.interrupted = True
            self.echo("stopping: Ray Tune is stopping the running trials (Ctrl-C again to "
                      "stop at once) ...")
            return
        raise KeyboardInterrupt

    @property
    def sweep_id(self) -> str:
        return self.journal.sweep_id

    # -- called from Tune's callbacks, as each trial ends ---------------------------------
    def trial_started(self, stage: str, trial: Any) -> None:
        if self.live is not None:
            self.live.trial_started()

    def trial_finished(self, stage: str, trial: Any, error: str | None) -> None:
        if stage == TRAIN:
            ok = self._train_finished(trial, error)
        else:
            ok = self._job_finished(trial, error)
        if self.live is not None and ok is not None:
            self.live.trial_ended(ok)

    def trial_restarted(self, stage: str, trial: Any) -> None:
        if self.live is not None:          # it starts again (and is counted again)
            self.live.running = max(0, self.live.running - 1)

    def trial_checkpointed(self, stage: str, trial: Any, path: str) -> None:
        if stage == TRAIN:
            self.journal.save_checkpoint(self.spec.trial_for(trial.config["method"]).name, path)

    def _train_finished(self, trial: Any, error: str | None) -> bool | None:
        """Journal and MLflow record of an ended trial: True done, False failed, None
        stopped by Ctrl-C (not a result)."""
        point = self.spec.trial_for(trial.config["method"])
        result = trial.last_result or {}
        history = json.loads(result.get("history", "[]"))
        # "fitted" is orch's mark of a completed fit (Tune sets "done" on stopped trials too)
        done = error is None and result.get("fitted") is True and trial.checkpoint is not None
        if error is None and not done:
            return None     # stopped by Ctrl-C before it finished: not a result
        record = {"trial": point.name, "status": "ok" if done else "failed", "error": error,
                  "history": history, "restarts": trial.num_failures,
                  "model": join(trial.checkpoint.path, MODEL_FILE) if done else None}
        self.journal.save_trial(point.name, record)
        self.record_trial(record)
        return done

    def record_trial(self, record: dict) -> None:
        point = self.spec.trial_named(record["trial"])
        self.records.child(f"train/{point.name}", point.name, "train", trial_params(point),
                           metrics={"restarts": float(record.get("restarts", 0))},
                           history=record["history"], failed=record["status"] != "ok",
                           tags={"orch.restarts": str(record.get("restarts", 0))})

    def _job_finished(self, trial: Any, error: str | None) -> bool | None:
        job = trial.config["job"]
        result = trial.last_result or {}
        if error is not None:
            return False    # a failed job fails the stage (reported after fit)
        if "rows" not in result:
            return None     # stopped by Ctrl-C
        rows = json.loads(result["rows"])
        self.journal.save_points(job, rows)
        self.record_points(rows)
        if self.live is not None:
            for row in rows:
                self.live.point(row["val_acc"], point_name(row))
        return True

    def record_points(self, rows: list[dict]) -> None:
        for row in rows:
            self.records.child(point_key(row), point_name(row), "eval",
                               point_params(self.spec.trial_named(row["trial"]), row),
                               metrics=point_metrics(row))


def _tune(trainable, param_space: dict, sweep: Sweep, stage: str, todo: int):
    """One stage's Tune experiment over what is left to do. Each run of a sweep gets its
    own experiment (`train-<run>`): a resumed sweep hands unfinished trials their last
    checkpoint itself (Tune's restore would take trials that Ctrl-C stopped as done)."""
    from ray import tune

    from orchestrator.callbacks import InterruptStopper, RecordCallback
    spec = sweep.spec
    if sweep.live is not None:
        sweep.live.start(stage, todo)
    r = spec.resources
    data_parallel = stage == TRAIN and r.workers_per_trial > 1
    # A data-parallel trial only drives its Ray Train workers, which ask for the
    # resources themselves: the trial takes a sliver of a CPU.
    trainable = tune.with_resources(trainable, {"cpu": 0.01} if data_parallel else
                                    {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        # reuse_actors: one worker process runs many trials (imports and caches stay warm)
        tune_config=tune.TuneConfig(max_concurrent_trials=_concurrency(spec, data_parallel),
                                    reuse_actors=not data_parallel),
        run_config=tune.RunConfig(
            name=f"{stage}-{sweep.journal.meta().get('runs', 1)}",
            storage_path=sweep.journal.tune_storage, verbose=1 if sweep.verbose else 0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[RecordCallback(sweep.sweep_id, stage)],
            stop=InterruptStopper(sweep.sweep_id),
            # A failed trial restarts (on another node if its node is gone) from its last
            # checkpoint, up to max_failures times.
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures)))
    sweep.in_tune = True
    try:
        results = tuner.fit()
    finally:
        sweep.in_tune = False
        if sweep.live is not None:
            sweep.live.finish()
    if sweep.interrupted:
        raise SweepInterrupted(f"{stage} stage stopped")
    return results


def _concurrency(spec: SweepSpec, data_parallel: bool) -> int | None:
    """How many trials run at once. Data-parallel trials: as many as have all their
    workers' resources (more would start drivers that wait for workers forever)."""
    r = spec.resources
    if not data_parallel:
        return r.max_concurrent_trials
    import ray
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // (r.cpus_per_trial * r.workers_per_trial))
    if r.gpus_per_trial:
        fits = min(fits, int(have.get("GPU", 0) // (r.gpus_per_trial * r.workers_per_trial)))
    return max(1, min(fits, r.max_concurrent_trials or fits))


def _trial_error(result, what: str) -> SweepError:
    lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
    return SweepError(f"{what} failed: {lines[-1] if lines else type(result.error).__name__} "
                      f"(trial log: {result.path})")


def run_sweep(spec: SweepSpec, tracking_uri: str, address: str | None = None,
              verbose: bool = False, echo: Callable[[str], None] = print,
              resume: Journal | None = None, register: str | None = None) -> SweepResult:
    """Run a sweep (or continue `resume`); raises SweepInterrupted on Ctrl-C/SIGTERM."""
    from orchestrator.callbacks import LIVE
    from orchestrator.live import LiveView
    check_writable(spec.storage_path)
    journal = resume or Journal(join(spec.storage_path, new_sweep_id(spec.name)))
    sweep_id = journal.sweep_id
    meta = journal.meta()
    live = None if verbose else LiveView()
    echo = live.echo if live is not None else echo
    records = SweepRecords(tracking_uri, spec.experiment, sweep_id, echo,
                           sync_hint=f" in {journal.root}; `orch sync {journal.root}` writes "
                                     "them to MLflow later").open()     # fail fast
    points = spec.trials()
    trained = [p for p in points if p.trained]
    echo(f"sweep {sweep_id}{' (resumed)' if resume else ''}: {len(trained)} training "
         f"trial(s) of {len(spec.methods)} method(s), {spec.num_points()} point(s) to evaluate")
    sweep = Sweep(spec, journal, records, echo, verbose, live, register)
    LIVE[sweep_id] = sweep
    # orch handles Ctrl-C itself (Tune's own handler would swallow the first one and let
    # the sweep go on to its next stage).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {sig: signal.signal(sig, sweep.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        prepare(spec)
        journal.start(spec.name, str(spec.source_file) if spec.source_file else None, spec.text)
        # Where the sweep's journal is and which process runs it: `orch report` can then
        # tell a sweep whose process was killed from one still running.
        records.start_parent(spec_params(spec), spec.text, meta.get("parent_run_id"), tags={
            "orch.journal": journal.root, "orch.pid": str(os.getpid()),
            "orch.host": socket.gethostname()})
        journal.update(parent_run_id=records.parent_id, experiment_id=records.experiment_id,
                       tracking_uri=tracking_uri, experiment=spec.experiment)
        _sync_done(sweep)                 # what a previous run finished but MLflow lacks
        _init_ray(address, verbose)
        _check_resources(spec)
        clip = load_model(spec.model)               # transforms and datasets, on the driver
        bench = load_benchmark(spec.benchmark, clip)
        cache = FeatureCache(spec, bench, echo)
        records.datasets(_dataset_inputs(spec, bench, cache))
        feature_paths = _features_before_training(spec, points, cache, bench)
        models = _train_stage(sweep, trained, feature_paths)
        feature_paths.update(_features_after_training(spec, points, trained, models, cache, bench))
        rows = _ensemble_stage(sweep, points, models, feature_paths)
        table, selected = _report_stage(sweep, rows, models)
        journal.update(status=FINISHED, error=None, mlflow_synced=records.failed is None)
        records.finish("FINISHED")
    except (KeyboardInterrupt, SweepInterrupted):
        if journal.meta():                # not before the sweep started (nothing to resume)
            journal.update(status=INTERRUPTED)
        records.finish("KILLED", "interrupted")
        raise SweepInterrupted(f"sweep {sweep_id} interrupted; continue it with "
                               f"`orch sweep {spec.source_file or 'FILE'} --resume {sweep_id}`") \
            from None
    except BaseException as err:
        message = str(err).splitlines()[0] if str(err) else repr(err)
        if journal.meta():
            journal.update(status=FAILED, error=message)
        records.finish("FAILED", message)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        LIVE.pop(sweep_id, None)
    return SweepResult(sweep_id, records.experiment_id, records.parent_id, table, selected,
                       tracking_uri, journal.root, records.failed)


def _sync_done(sweep: Sweep) -> None:
    """Write to MLflow whatever the journal holds and MLflow lacks (a resumed sweep whose
    tracking server was down, or whose driver died between the two)."""
    for record in sweep.journal.trials().values():
        sweep.record_trial(record)
    for entry in sweep.journal.points().values():
        sweep.record_points(entry["rows"])


def _dataset_inputs(spec: SweepSpec, bench, cache: FeatureCache) -> dict[str, tuple[str, str, str]]:
    """Each set of the benchmark as an MLflow dataset input: (source, digest, context)."""
    contexts = {"id_val": "validation", "id_test": "test", TRAIN_EVAL: "train"}
    out = {}
    for name, dataset in cache.datasets.items():
        context = contexts.get(name, "diagnostic" if name in bench.diagnostics else "shift")
        paths = getattr(dataset, "paths", None)
        if paths:
            source = Path(os.path.commonpath([str(p) for p in paths])).as_uri()
        else:
            source = f"orch-{spec.benchmark.source}:{'id_train' if name == TRAIN_EVAL else name}"
        out["train" if name == TRAIN_EVAL else name] = (source, cache.dataset_id(name), context)
    return out


def _needs_train_outputs(spec: SweepSpec, point: TrialPoint) -> bool:
    """VRF builds its zero-shot-failure set from the training split's outputs."""
    return any(e.ensemble.mixes == OUTPUTS and e.ensemble.needs_features
               for e in spec.ensembles_for(point))


def _zero_shot_job(spec: SweepSpec, points: list[TrialPoint], bench) -> tuple:
    """The zero-shot model's sets: every eval set, and the training split when a linear
    probe trains on its features or VRF builds its zero-shot-failure set from it."""
    sets = list(bench.eval_sets())
    if any(get_method(p.method).needs_train_features or _needs_train_outputs(spec, p)
           for p in points):
        sets.append(TRAIN_EVAL)
    return zero_shot_ref(spec, bench), sets


def _features_before_training(spec: SweepSpec, points: list[TrialPoint], cache: FeatureCache,
                              bench) -> dict[tuple[str, str], str]:
    """The zero-shot features, now only when a method trains on them (LP, LP-FT);
    otherwise they join the fitted models' job after training (one actor pool, not two)."""
    if not any(get_method(p.method).needs_train_features for p in points):
        return {}
    return cache.ensure([_zero_shot_job(spec, points, bench)], "zero-shot model")


def _features_after_training(spec: SweepSpec, points: list[TrialPoint], trained: list[TrialPoint],
                             checkpoints: dict[str, str], cache: FeatureCache,
                             bench) -> dict[tuple[str, str], str]:
    jobs = [_zero_shot_job(spec, points, bench)]
    for point in trained:
        sets = list(bench.eval_sets()) + ([TRAIN_EVAL] if _needs_train_outputs(spec, point) else [])
        jobs.append((trial_ref(point.name, checkpoints[point.name]), sets))
    return cache.ensure(jobs, f"zero-shot and {len(trained)} fitted model(s)")


def _train_stage(sweep: Sweep, points: list[TrialPoint], feature_paths: dict) -> dict[str, str]:
    """One Tune trial per grid point of every method that trains, all in one Tuner; each
    recorded as it ends. Returns {trial name: fitted-model file}."""
    if not points:
        return {}
    from ray import tune

    from orchestrator.trials import train_trial
    spec, journal = sweep.spec, sweep.journal
    done = {n: r for n, r in journal.trials().items() if r["status"] == "ok"}
    todo = [p for p in points if p.name not in done]
    if todo:
        sweep.echo(f"[train] {len(todo)} trial(s) on Ray Tune"
                   + (f" ({len(done)} finished before)" if done else "") + " ...")
        # The named hyper-parameters themselves are the search space (`method/lr`,
        # `method/seed`), so a Tune searcher or scheduler sees them; each trial rebuilds
        # its options from them. A resumed sweep lists just the unfinished points.
        if len(todo) == len(points):
            space = [{"label": e.label, **{k: tune.grid_search(v) for k, v in e.grid.items()}}
                     for e in spec.methods if get_method(e.method).trained]
        else:
            space = [{"label": p.label, **p.hparams} for p in todo]
        resume_from = {n: path for n, path in journal.checkpoints().items()
                       if n in {p.name for p in todo}}
        results = _tune(tune.with_parameters(train_trial, spec=spec, feature_paths=feature_paths,
                                             resume_from=resume_from,
                                             workers_storage=join(journal.tune_storage, "workers")),
                        {"method": tune.grid_search(space)}, sweep, TRAIN, len(todo))
        failures = [_trial_error(r, f"training trial {spec.trial_for(r.config['method']).name}")
                    for r in results if r.error is not None and r.config]
        if failures:  # every trial is recorded first, then the first failure is reported
            raise failures[0]
        done = {n: r for n, r in journal.trials().items() if r["status"] == "ok"}
        if any(p.name not in done for p in points):
            raise SweepInterrupted("training stopped before every trial finished")
    return {p.name: done[p.name]["model"] for p in points}


def ensemble_jobs(spec: SweepSpec, points: list[TrialPoint]) -> list[dict]:
    """Per trial one job on cached outputs, plus one per interior weight-space point."""
    jobs = []
    for point in points:
        jobs.append({"trial": point.name, "ensemble": OUTPUTS_JOB})
        jobs += [{"trial": point.name, "ensemble": name, **coefficients}
                 for name, coefficients in weight_points(spec, point)]
    return jobs


def _ensemble_stage(sweep: Sweep, points: list[TrialPoint], models: dict[str, str],
                    feature_paths: dict) -> list[dict]:
    """Every ensemble job (`ensemble_jobs`), each recorded as it ends."""
    from ray import tune

    from orchestrator.trials import ensemble_trial
    spec, journal = sweep.spec, sweep.journal
    jobs = ensemble_jobs(spec, points)
    done = journal.points()
    todo = [job for job in jobs if job_key(job) not in done]
    if todo:
        sweep.echo(f"[ensemble] {spec.num_points()} point(s) in {len(jobs)} job(s)"
                   + (f", {len(jobs) - len(todo)} finished before" if done else "") + " ...")
        results = _tune(tune.with_parameters(ensemble_trial, spec=spec, checkpoints=models,
                                             feature_paths=feature_paths),
                        {"job": tune.grid_search(todo)}, sweep, ENSEMBLE, len(todo))
        for result in results:
            if result.error is not None and result.config:
                job = result.config["job"]
                what = "".join(f", {k}={v:g}" for k, v in job.items()
                               if k not in ("trial", "ensemble"))
                raise _trial_error(result, f"evaluation of {job['trial']} "
                                           f"({job['ensemble']}{what})")
        done = journal.points()
        if any(job_key(job) not in done for job in jobs):
            raise SweepInterrupted("evaluation stopped before every job finished")
    return finished_rows(spec, points, done)


def finished_rows(spec: SweepSpec, points: list[TrialPoint], done: dict[str, dict]) -> list[dict]:
    """The rows of every finished ensemble job (`done`: the journal's points), in sweep
    order."""
    rows = [row for job in ensemble_jobs(spec, points) if job_key(job) in done
            for row in done[job_key(job)]["rows"]]
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


def _report_stage(sweep: Sweep, rows: list[dict], models: dict[str, str]) -> tuple[list[dict], int]:
    """Pareto front, the choice per (method, ensemble) and overall; the flags on each
    point's run; the parent's table, plots and summary; the chosen model."""
    import matplotlib.pyplot as plt
    sweep_id, records = sweep.sweep_id, sweep.records
    table = pareto_table(rows)
    selected = select_on_validation(table)
    existing = records.existing() if records.failed is None else {}
    for row in table:
        run_id = existing.get(point_key(row), (None,))[0]
        row["run_id"] = run_id
        if run_id:
            records.metrics(run_id, {"on_front": float(row["on_front"]),
                                     "chosen": float(row["chosen"])})
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
    for figure in figures.values():
        plt.close(figure)
    _log_chosen_model(sweep, table, models)
    return table, selected


def _log_chosen_model(sweep: Sweep, table: list[dict], models: dict[str, str]) -> None:
    """The single model chosen on ID validation (a trial alone or a WiSE-FT point), logged
    on the parent run (and registered with --register)."""
    import torch

    from orchestrator.build import load_assets, load_fitted
    from orchestrator.export import chosen_exportable, point_model
    index = chosen_exportable(table)
    if index is None or sweep.records.failed is not None or sweep.records.has_model():
        return
    row = table[index]
    cpu = torch.device("cpu")
    assets = load_assets(sweep.spec, cpu)
    fitted = load_fitted(assets, models.get(row["trial"]), cpu)
    model = point_model(assets, fitted, row["ensemble"], row["coefficients"]).classifier
    val = assets.bench.val.dataset
    example = torch.stack([val[i][0] for i in range(min(2, len(val)))])
    sweep.records.log_model(model, example, sweep.register)
    sweep.records.metrics(sweep.records.parent_id, {"model_val_acc": row["val_acc"],
                                                     "model_id_acc": row["id_acc"],
                                                     "model_ood_acc": row["ood_acc"]})


def mlflow_ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to look at the sweep: for a SQLite store, the command that opens the MLflow UI
    on it and the runs-table link; for a tracking server, the link on that server."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {runs_table_url(experiment_id, tracking_uri.rstrip('/'))}"
    exe = Path(sys.executable).parent / "mlflow"
    command = "mlflow"
    if exe.exists():  # the project's venv: show it relative to here when it is below here
        relative = os.path.relpath(exe)
        command = relative if not relative.startswith("..") else str(exe)
    return (f"{command} ui --backend-store-uri {tracking_uri} --port 5000\n"
            f"then open {runs_table_url(experiment_id)}")
