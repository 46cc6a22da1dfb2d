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

import json
import os
import secrets
import shlex
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ray import tune
from ray.tune.error import TuneError
from ray.tune.schedulers import ASHAScheduler

from orchestrator.assets.benchmarks import load_benchmark, prepare
from orchestrator.assets.models import load_model
from orchestrator.plan import Job, Plan, Trial
from orchestrator.records.journal import FAILED, FINISHED, INTERRUPTED, OK, STOPPED, Journal
from orchestrator.records.mlflow import SweepRecords
from orchestrator.records.publish import (publish, record_journal, record_points, record_trial,
                                          spec_params)
from orchestrator.records.row import Row
from orchestrator.records.table import Table
from orchestrator.run.callbacks import LIVE, InterruptStopper, RecordCallback
from orchestrator.run.cluster import (Have, check_resources, concurrent_trials, init_ray,
                                      trial_request)
from orchestrator.run.errors import cause_line
from orchestrator.run.features import FeatureCache, trial_ref, zero_shot_ref
from orchestrator.run.jobs import ensemble_trial
from orchestrator.run.live import LiveView
from orchestrator.run.search import best_trials, propose, scores_of, study_of
from orchestrator.run.trials import (EPOCHS_DONE, HISTORY_FILE, MODEL_FILE, OBJECTIVES, VAL_ACC,
                                     train_trial)
from orchestrator.spec.types import SweepSpec
from orchestrator.storage import StorageError, check_writable, join
from trainers.data.benchmark import ID_TRAIN
from trainers.methods import get_method

TRAIN, MERGE, ENSEMBLE = "train", "merge", "ensemble"
FITS = (TRAIN, MERGE)      # stages whose trials end in a fitted model


class SweepError(RuntimeError):
    """A sweep that could not finish; the message is one line for the user."""


class SweepInterrupted(RuntimeError):
    """Ctrl-C (or SIGTERM): the sweep stopped, its parent run is KILLED, it can resume."""


@dataclass
class SweepResult:
    sweep_id: str
    experiment_id: str
    parent_run_id: str
    table: Table
    tracking_uri: str
    journal: str                       # the sweep's folder in its storage
    mlflow_failed: str | None = None   # MLflow stopped taking writes mid-sweep


def new_sweep_id(name: str) -> str:
    """Name, time to the second and a random suffix: two sweeps started in the same
    second never share an id (or a Tune folder)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


@dataclass
class Sweep:
    """The state of the sweep this process is running; Tune callbacks report to it."""

    plan: Plan
    journal: Journal
    records: SweepRecords
    echo: Callable[[str], None]
    verbose: bool = False
    live: Any = None               # the LiveView (None with -v: Tune prints its own tables)
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
        if stage in FITS:
            ok = self._train_finished(trial, error)
        else:
            ok = self._job_finished(trial, error)
        if self.live is not None and ok is not None:
            self.live.trial_ended(ok)

    def trial_restarted(self, stage: str, trial: Any) -> None:
        if self.live is not None:          # it starts again (and is counted again)
            self.live.running = max(0, self.live.running - 1)

    def trial_checkpointed(self, stage: str, trial: Any, path: str) -> None:
        if stage in FITS:
            self.journal.save_checkpoint(self.plan.trial_for(trial.config["trial"]).name, path)

    def _train_finished(self, trial: Any, error: str | None) -> bool | None:
        """Journal and MLflow record of an ended trial: True done, False failed, None
        stopped by Ctrl-C (not a result)."""
        name = self.plan.trial_for(trial.config["trial"]).name
        result = trial.last_result or {}
        # "fitted" is orch's mark of a completed fit (Tune sets "done" on stopped trials too)
        done = error is None and result.get("fitted") is True and trial.checkpoint is not None
        stopped = error is None and not done and not self.interrupted
        if error is None and not done and not stopped:
            return None     # stopped by Ctrl-C before it finished: not a result
        # A fit's last report carries its whole loss curve; a trial the search stopped
        # ends on an epoch's report, its curve the epochs it ran (Tune keeps them).
        history = (json.loads(result.get("history", "[]")) if not stopped
                   else _epochs_run(trial))
        record = {"trial": name, "status": OK if done else STOPPED if stopped else "failed",
                  "error": error, "history": history, "restarts": trial.num_failures,
                  # the trial's own time (Tune's time_total_s, restarts included)
                  "seconds": float(result.get("time_total_s", 0.0)), "ended": time.time(),
                  "model": join(trial.checkpoint.path, MODEL_FILE) if done else None}
        if done and OBJECTIVES in result:     # a searched trial's scores (the searcher reads)
            record["objectives"] = json.loads(result[OBJECTIVES])
        if stopped:         # when ASHA stopped it, and what it had reached
            record["stopped"] = {EPOCHS_DONE: result.get(EPOCHS_DONE),
                                 VAL_ACC: result.get(VAL_ACC)}
        notes = get_method(self.plan.trial(name).method_name).notes
        if done and notes is not None:
            record["notes"] = notes(history)
            for note in record["notes"]:
                self.echo(f"note: {name}: {note}")
        self.journal.save_trial(name, record)
        record_trial(self.records, self.plan, record)
        return done or stopped

    def _job_finished(self, trial: Any, error: str | None) -> bool | None:
        job = Job.from_config(trial.config["job"])
        result = trial.last_result or {}
        if error is not None:
            return False    # a failed job fails the stage (reported after fit)
        if "rows" not in result:
            return None     # stopped by Ctrl-C
        rows = [Row.from_dict(r) for r in json.loads(result["rows"])]
        self.journal.save_points(job.key, job.config(), rows)
        record_points(self.records, self.plan, rows)
        if self.live is not None:
            for row in rows:
                self.live.point(row["val_acc"], row.name)
        return True


def _epochs_run(trial: Any) -> list[dict]:
    """The loss curve of a trial stopped between epochs: the history its last epoch's
    checkpoint holds (the checkpoint may live in a bucket: read through Ray's copy)."""
    if trial.checkpoint is None:
        return []
    with trial.checkpoint.as_directory() as folder:
        path = Path(folder) / HISTORY_FILE
        return json.loads(path.read_text()) if path.is_file() else []


def _scheduler(spec: SweepSpec, stage: str):
    """ASHA over the training stage when the sweep's `search` asks for it. Time is a
    trial's main-phase epochs (`epochs_done`); a report without `val_acc` (a method
    with no per-epoch classifier, an entry outside `search.methods`, a fit's final
    report) is passed over by ASHA, so Tune's check that every report carries the
    metric is off for this stage. Trials reaching their last epoch are never stopped
    there: their fit still has to write its model."""
    search = spec.search
    if stage != TRAIN or search.scheduler is None:
        return None
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    epochs = [getattr(t.options, "epochs", 1) for t in Plan(spec).trained]
    return ASHAScheduler(time_attr=EPOCHS_DONE, metric=VAL_ACC, mode="max",
                         max_t=max(epochs + [search.grace_period]),
                         grace_period=search.grace_period,
                         reduction_factor=search.reduction_factor, stop_last_trials=False)


def _tune(trainable, param_space: dict, sweep: Sweep, stage: str, todo: int):
    """One stage's Tune experiment over what is left to do. Each run of a sweep gets its
    own experiment (`train-<run>`): a resumed sweep hands unfinished trials their last
    checkpoint itself (Tune's restore would take trials that Ctrl-C stopped as done)."""
    spec = sweep.plan.spec
    if sweep.live is not None:
        sweep.live.start(stage, todo)
    r = spec.resources
    data_parallel = stage == TRAIN and r.workers_per_trial > 1
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_request(r, data_parallel)),
        param_space=param_space,
        # reuse_actors: one worker process runs many trials (imports and caches stay warm)
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent_trials(r, data_parallel, Have.now()),
            reuse_actors=not data_parallel, scheduler=_scheduler(spec, stage)),
        run_config=tune.RunConfig(
            name=f"{stage}-{sweep.journal.meta().get('runs', 1)}",
            storage_path=sweep.journal.tune_storage, verbose=1 if sweep.verbose else 0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[RecordCallback(sweep.sweep_id, stage)],
            stop=InterruptStopper(sweep.sweep_id),
            # A failed trial restarts (on another node if its node is gone) from its last
            # checkpoint, up to max_failures times.
            failure_config=tune.FailureConfig(max_failures=r.max_failures)))
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


def _trial_error(result, what: str) -> SweepError:
    lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
    return SweepError(f"{what} failed: {lines[-1] if lines else type(result.error).__name__} "
                      f"(trial log: {result.path})")


def resume_command(spec: SweepSpec, sweep_id: str, overrides: Sequence[str] = ()) -> str:
    """The command that continues this sweep: the file and the overrides it started with."""
    words = ["orch", "sweep", str(spec.source_file or "FILE"), *overrides, "--resume", sweep_id]
    return " ".join(shlex.quote(w) for w in words)


def run_sweep(spec: SweepSpec, tracking_uri: str, address: str | None = None,
              verbose: bool = False, echo: Callable[[str], None] = print,
              resume: Journal | None = None, register: str | None = None,
              overrides: Sequence[str] = ()) -> SweepResult:
    """Run a sweep (or continue `resume`); raises SweepInterrupted on Ctrl-C/SIGTERM.
    `overrides`: the command line's KEY=VALUE pairs, for the resume hint."""
    check_writable(spec.storage_path)
    journal = resume or Journal(join(spec.storage_path, new_sweep_id(spec.name)))
    spec = spec.with_proposals(journal.proposals())   # a resumed search's trials so far
    plan = Plan(spec)
    sweep_id = journal.sweep_id
    meta = journal.meta()
    live = None if verbose else LiveView()
    echo = live.echo if live is not None else echo
    records = SweepRecords(tracking_uri, spec.experiment, sweep_id, echo,
                           sync_hint=f" in {journal.root}; `orch sync {journal.root}` writes "
                                     "them to MLflow later").open()     # fail fast
    trained = plan.trained
    searching = sum(spec.search.n_trials - len(e.proposals) for e in spec.methods if e.searched)
    echo(f"sweep {sweep_id}{' (resumed)' if resume else ''}: {len(trained)} training "
         f"trial(s) of {len(spec.methods)} method(s)"
         + (f" and {searching} more to propose by {spec.search.searcher}" if searching else "")
         + f", {plan.num_points()} point(s) to evaluate"
         + (" before the search's" if searching else ""))
    sweep = Sweep(plan, journal, records, echo, verbose, live)
    LIVE[sweep_id] = sweep
    # orch handles Ctrl-C itself (Tune's own handler would swallow the first one and let
    # the sweep go on to its next stage).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {sig: signal.signal(sig, sweep.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        prepare(spec)
        journal.start(spec.name, str(spec.source_file) if spec.source_file else None, spec.text,
                      list(overrides))
        # Where the sweep's journal is and which process runs it: `orch report` can then
        # tell a sweep whose process was killed from one still running.
        records.start_parent(spec_params(plan), spec.text, meta.get("parent_run_id"), tags={
            "orch.journal": journal.root, "orch.pid": str(os.getpid()),
            "orch.host": socket.gethostname()})
        journal.update(parent_run_id=records.parent_id, experiment_id=records.experiment_id,
                       tracking_uri=tracking_uri, experiment=spec.experiment)
        record_journal(records, plan, journal)   # what a previous run finished, MLflow lacks
        init_ray(address, verbose)
        check_resources(spec.resources, spec.features, Have.now())
        clip = load_model(spec.model)               # transforms and datasets, on the driver
        bench = load_benchmark(spec.benchmark, clip)
        cache = FeatureCache(spec, bench, echo)
        records.datasets(_dataset_inputs(spec, bench, cache))
        feature_paths = _features_before_training(plan, cache, bench)
        searched = {e.label for e in spec.methods if e.searched}
        models = _train_stage(sweep, [t for t in trained if not t.merges
                                      and t.label not in searched], feature_paths)
        models.update(_search_stage(sweep, feature_paths))   # the searcher's trials, by rounds
        plan = sweep.plan
        # soups and Model Stock: trials of their own, on the fitted models of their members
        models.update(_train_stage(sweep, [t for t in plan.trained if t.merges], feature_paths,
                                   models, stage=MERGE))
        feature_paths.update(_features_after_training(plan, models, cache, bench))
        table = Table.of(_ensemble_stage(sweep, models, feature_paths))
        publish(records, plan, table, models, register)
        journal.update(status=FINISHED, error=None, mlflow_synced=records.failed is None)
        records.finish("FINISHED")
    except (StorageError, TuneError) as err:
        # the storage failed mid-sweep (a full disk), or Tune itself could not go on: one
        # line with the cause, not Tune's traceback
        cause = str(err) if isinstance(err, StorageError) else cause_line(err)
        message = cause.removeprefix("StorageError: ") if "StorageError: " in cause else \
            f"Ray Tune stopped: {cause}"
        _end(journal, records, FAILED, "FAILED", message)
        raise SweepError(message) from None
    except (KeyboardInterrupt, SweepInterrupted):
        _end(journal, records, INTERRUPTED, "KILLED", "interrupted")
        raise SweepInterrupted(f"sweep {sweep_id} interrupted; continue it with "
                               f"`{resume_command(spec, sweep_id, overrides)}`") from None
    except BaseException as err:
        message = str(err).splitlines()[0] if str(err) else repr(err)
        _end(journal, records, FAILED, "FAILED", message)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        LIVE.pop(sweep_id, None)
    return SweepResult(sweep_id, records.experiment_id, records.parent_id, table,
                       tracking_uri, journal.root, records.failed)


def _end(journal: Journal, records: SweepRecords, status: str, run_status: str,
         error: str) -> None:
    """A sweep that stops early says so in its journal and on its parent run; the journal
    may be what failed (a full disk), and MLflow is told all the same."""
    try:
        if journal.meta():            # not before the sweep started (nothing to resume)
            journal.update(status=status, error=error)
    except (OSError, StorageError):
        pass                          # its process is gone afterwards: `report` says KILLED
    records.finish(run_status, error)


def _dataset_inputs(spec: SweepSpec, bench, cache: FeatureCache) -> dict[str, tuple[str, str, str]]:
    """Each set of the benchmark as an MLflow dataset input: (source, digest, context)."""
    contexts = {"id_val": "validation", "id_test": "test", ID_TRAIN: "train"}
    out = {}
    for name, dataset in cache.datasets.items():
        context = contexts.get(name, "diagnostic" if name in bench.diagnostics else "shift")
        paths = getattr(dataset, "paths", None)
        if paths:
            source = Path(os.path.commonpath([str(p) for p in paths])).as_uri()
        else:
            source = f"orch-{spec.benchmark.source}:{name}"
        out["train" if name == ID_TRAIN else name] = (source, cache.dataset_id(name), context)
    return out


def _zero_shot_job(plan: Plan, bench) -> tuple:
    """The zero-shot model's sets: every eval set, and the training split when a linear
    probe trains on its features or VRF builds its zero-shot-failure set from it."""
    sets = list(bench.eval_sets())
    if any(get_method(t.method_name).needs_train_features or plan.needs_train_outputs(t)
           for t in plan.trials):
        sets.append(ID_TRAIN)
    return zero_shot_ref(plan.spec, bench), sets


def _features_before_training(plan: Plan, cache: FeatureCache,
                              bench) -> dict[tuple[str, str], str]:
    """The zero-shot features, now only when a method trains on them (LP, LP-FT);
    otherwise they join the fitted models' job after training (one actor pool, not two)."""
    if not any(get_method(t.method_name).needs_train_features for t in plan.trials):
        return {}
    return cache.ensure([_zero_shot_job(plan, bench)], "zero-shot model")


def _features_after_training(plan: Plan, checkpoints: dict[str, str], cache: FeatureCache,
                             bench) -> dict[tuple[str, str], str]:
    jobs = [_zero_shot_job(plan, bench)]
    for trial in plan.trained:
        if trial.name not in checkpoints:
            continue            # stopped early by the search: no model
        sets = list(bench.eval_sets()) + ([ID_TRAIN] if plan.needs_train_outputs(trial) else [])
        jobs.append((trial_ref(trial.name, checkpoints[trial.name]), sets))
    return cache.ensure(jobs, f"zero-shot and {len(jobs) - 1} fitted model(s)")


def _train_stage(sweep: Sweep, trials: list[Trial], feature_paths: dict,
                 members: dict[str, str] | None = None, stage: str = TRAIN) -> dict[str, str]:
    """One Tune trial per grid point of every method in `trials`, all in one Tuner; each
    recorded as it ends. `members`: the fitted-model files merging trials read (the
    MERGE stage). Returns {trial name: fitted-model file}."""
    if not trials:
        return {}
    plan, journal = sweep.plan, sweep.journal
    settled = {n: r for n, r in journal.trials().items() if r["status"] in (OK, STOPPED)}
    todo = [t for t in trials if t.name not in settled]
    if todo:
        sweep.echo(f"[{stage}] {len(todo)} trial(s) on Ray Tune"
                   + (f" ({len(settled)} finished before)" if settled else "") + " ...")
        # The named hyper-parameters themselves are the search space (`trial/lr`,
        # `trial/seed`), so a Tune searcher or scheduler sees them; each trial rebuilds
        # its options from them. A resumed sweep lists just the unfinished trials.
        labels = {t.label for t in trials}
        entries = [e for e in plan.spec.methods if e.label in labels]
        if len(todo) == len(trials) and not any(e.searched for e in entries):
            space = [{"label": e.label, **{k: tune.grid_search(v) for k, v in e.grid.items()}}
                     for e in entries]
        else:       # a resumed sweep's unfinished trials, or a searcher's round
            space = [t.config() for t in todo]
        resume_from = {n: path for n, path in journal.checkpoints().items()
                       if n in {t.name for t in todo}}
        results = _tune(tune.with_parameters(train_trial, spec=plan.spec,
                                             feature_paths=feature_paths,
                                             resume_from=resume_from, members=members,
                                             workers_storage=join(journal.tune_storage, "workers")),
                        {"trial": tune.grid_search(space)}, sweep, stage, len(todo))
        failures = [_trial_error(r, f"training trial {plan.trial_for(r.config['trial']).name}")
                    for r in results if r.error is not None and r.config]
        if failures:  # every trial is recorded first, then the first failure is reported
            raise failures[0]
        settled = {n: r for n, r in journal.trials().items() if r["status"] in (OK, STOPPED)}
        if any(t.name not in settled for t in trials):
            raise SweepInterrupted("training stopped before every trial finished")
    stopped = [t.name for t in trials if settled[t.name]["status"] == STOPPED]
    if stopped:
        sweep.echo(f"[{stage}] stopped early by the search: {', '.join(stopped)} "
                   "(no model: ensembles and soups leave them out)")
    return {t.name: settled[t.name]["model"] for t in trials if t.name not in stopped}


def _search_stage(sweep: Sweep, feature_paths: dict) -> dict[str, str]:
    """The trials of every searched entry (`orchestrator.run.search`): per entry, rounds
    of as many trials as run at once, each round proposed by Optuna from every score so
    far, written to the journal, then trained; until `search.n_trials`. Returns {trial
    name: fitted-model file}; `sweep.plan` ends with every proposed trial."""
    spec = sweep.plan.spec
    search, r = spec.search, spec.resources
    entries = [e for e in spec.methods if e.searched]
    if not entries:
        return {}
    have = Have.now()
    width = concurrent_trials(r, r.workers_per_trial > 1, have) or \
        have.fits(r.cpus_per_trial, r.gpus_per_trial)
    proposals = {e.label: list(e.proposals) for e in entries}
    models: dict[str, str] = {}
    for entry in entries:
        while True:
            trials = [t for t in sweep.plan.trials if t.label == entry.label]
            models.update(_train_stage(sweep, trials, feature_paths))
            records = sweep.journal.trials()
            scores = [scores_of(records.get(t.name), search) for t in trials]
            asked = len(proposals[entry.label])
            if asked >= search.n_trials:
                break
            new = propose(entry, search, proposals[entry.label], scores,
                          min(width, search.n_trials - asked))
            proposals[entry.label] += new
            sweep.journal.save_proposals(proposals)      # before they train: --resume
            sweep.plan = Plan(spec.with_proposals(proposals))
            sweep.echo(f"[search] {entry.label}: Optuna proposes {len(new)} trial(s) "
                       f"({asked + len(new)}/{search.n_trials})")
        study = study_of(entry, search, proposals[entry.label], scores)
        best = ", ".join(trials[i].name for i in best_trials(study))
        sweep.echo(f"[search] {entry.label}: best on {', '.join(search.objectives)}: {best}")
    return models


def _ensemble_stage(sweep: Sweep, models: dict[str, str], feature_paths: dict) -> list[Row]:
    """Every ensemble job (`Plan.jobs`), each recorded as it ends."""
    plan, journal = sweep.plan, sweep.journal
    jobs = plan.jobs(skip=journal.stopped())
    done = journal.points()
    todo = [job for job in jobs if job.key not in done]
    if todo:
        sweep.echo(f"[ensemble] {plan.num_points()} point(s) in {len(jobs)} job(s)"
                   + (f", {len(jobs) - len(todo)} finished before" if done else "") + " ...")
        results = _tune(tune.with_parameters(ensemble_trial, spec=plan.spec, checkpoints=models,
                                             feature_paths=feature_paths),
                        {"job": tune.grid_search([job.config() for job in todo])}, sweep,
                        ENSEMBLE, len(todo))
        for result in results:
            if result.error is not None and result.config:
                job = Job.from_config(result.config["job"])
                raise _trial_error(result, f"evaluation of {job.describe()}")
        done = journal.points()
        if any(job.key not in done for job in jobs):
            raise SweepInterrupted("evaluation stopped before every job finished")
    return plan.finished_rows(done)
