"""MLflow records of a sweep: one parent run, a child run per training trial and per
ensemble point; on the parent the Pareto table and front, the plots, the benchmark's
sets as dataset inputs and the chosen model.

Only the driver writes (SQLite takes one writer at a time), through
`MlflowClient` with explicit run ids, so nothing depends on a global active run.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Mapping

# An unreachable server must fail in seconds with one line, not after minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402
from mlflow.data.http_dataset_source import HTTPDatasetSource  # noqa: E402
from mlflow.data.meta_dataset import MetaDataset  # noqa: E402
from mlflow.entities import (DatasetInput, InputTag, LoggedModelStatus, Metric, Param,  # noqa: E402
                             RunTag)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking._tracking_service import utils as mlflow_tracking_state  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import trainers  # noqa: E402
from trainers.cache import file_lock  # noqa: E402

from orchestrator.records.table import Table  # noqa: E402

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "orch.sweep_id"
KIND_TAG = "orch.kind"          # sweep | train | eval


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable database)."""


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else an absolute SQLite file in the working directory
    (absolute because Ray Tune changes each trial's working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def runs_table_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    # MLflow 3.17's UI opens experiments in its GenAI view, which hides these runs.
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    # an unreachable server: the OS's reason, not urllib3's nested retry message
    refused = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    if refused and "Max retries exceeded" in text:
        return f"cannot connect ({refused.group(0)})"
    # a database error: the driver's own words (SQLAlchemy leads with its context)
    driver = re.search(r"\((?:sqlite3|psycopg2?|pymysql|MySQLdb)\.\w+\) ([^\n]+)", text)
    if driver:
        return driver.group(1)
    return text.splitlines()[0] if text else type(err).__name__


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite URI (`sqlite:///file:/x.db?mode=ro&uri=true` too)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path[len("file:"):] if path.startswith("file:") else path)


@contextlib.contextmanager
def tracking_uri(uri: str):
    """MLflow's fluent API pointed at `uri` for a while, then back as it was.
    `mlflow.set_tracking_uri` also writes $MLFLOW_TRACKING_URI "so that subprocesses
    inherit it": left set, every `orch` command this process starts afterwards would
    take the last sweep's store for its own (an `orch sync` wrote a sweep's records into
    another store so)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    # the URI set in this process, if any (not the variable's: that one is restored below)
    previous = getattr(mlflow_tracking_state, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


class SweepRecords:
    """Writes one sweep's runs.

    `open()` and `start_parent()` are strict: a store that cannot be used stops the sweep
    before anything runs (TrackingError). After that every write is tolerant: the first
    failure is reported once (`echo`), later writes are skipped, and `failed` says why;
    the sweep goes on, its results are in its journal, and `orch sync` writes them later.
    Writes are idempotent: every child run carries a record key (`orch.record`), and a
    key MLflow already has is completed, not duplicated.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_id: str,
                 echo: Callable[[str], None] = print, sync_hint: str = ""):
        self.uri, self.experiment, self.sweep_id = tracking_uri, experiment, sweep_id
        self.echo, self.sync_hint = echo, sync_hint
        self.client: MlflowClient | None = None      # made in open(): it may create the store
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.failed: str | None = None
        self._existing: dict[str, tuple[str, str]] | None = None   # key -> (run id, status)
        self._latest: dict[str, dict[str, float]] = {}   # run id -> its latest metric values

    # -- strict: before anything runs ---------------------------------------------------
    def open(self) -> "SweepRecords":
        db = sqlite_file(self.uri)
        try:
            if db is not None:
                # A new SQLite store is created by its first client (a schema migration):
                # two sweeps doing that at once race, so the first does it under a lock.
                db.parent.mkdir(parents=True, exist_ok=True)
                with file_lock(db.with_name(f".{db.name}.lock")):
                    self._open_experiment(db)
            else:
                self._open_experiment(None)
        except Exception as err:  # MlflowException, connection errors, sqlite errors
            raise TrackingError(f"cannot use MLflow tracking store {self.uri}: "
                                f"{first_line(err)}") from None
        return self

    def _open_experiment(self, db: Path | None) -> None:
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        if found:
            self.experiment_id = found.experiment_id
            return
        # Artifacts of a SQLite store live beside it (not in ./mlruns of wherever orch
        # was started); a tracking server keeps its own artifact root.
        location = (db.parent / "mlartifacts" / self.experiment).as_uri() if db else None
        self.experiment_id = self.client.create_experiment(self.experiment,
                                                           artifact_location=location)

    def start_parent(self, params: Mapping[str, Any], spec_text: str | None,
                     parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """The sweep's parent run: a new one, or (resuming) the existing one, running again."""
        try:
            if parent_id and self._exists(parent_id):
                self.client.update_run(parent_id, status="RUNNING")
                for key, value in (tags or {}).items():
                    self.client.set_tag(parent_id, key, value)
                self.parent_id = parent_id
                return parent_id
            # new, or resumed against a store that lost it (a new head, a new database):
            # a new parent run, and the children are recorded under it again
            run = self.client.create_run(self.experiment_id, run_name=self.sweep_id, tags={
                SWEEP_TAG: self.sweep_id, KIND_TAG: "sweep", "git_sha": _git_sha(),
                **(tags or {})})
            self.parent_id = run.info.run_id
            self.client.log_batch(self.parent_id, params=_params(params))
            if spec_text is not None:
                self.client.log_text(self.parent_id, spec_text, "sweep.yaml")
        except Exception as err:
            raise TrackingError(f"cannot write to MLflow tracking store {self.uri}: "
                                f"{first_line(err)}") from None
        return self.parent_id

    def _exists(self, run_id: str) -> bool:
        """Whether the store holds this run. Only the store's own "no such run" says no:
        any other error (a server still starting, a locked database) propagates, or a
        resumed sweep or a sync would start a second parent and leave the first RUNNING."""
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    # -- tolerant: while the sweep runs ---------------------------------------------------
    def _try(self, what: Callable[[], Any]) -> Any:
        if self.failed is not None:
            return None
        try:
            return what()
        except Exception as err:
            self.failed = first_line(err)
            self.echo(f"MLflow: cannot write to {self.uri} ({self.failed}); the sweep goes "
                      f"on and keeps its results{self.sync_hint}")
            return None

    def existing(self) -> dict[str, tuple[str, str]]:
        """The sweep's child runs already in MLflow: record key -> (run id, status)."""
        if self._existing is None:
            runs = self.client.search_runs(
                [self.experiment_id], f"tags.`{SWEEP_TAG}` = '{self.sweep_id}'",
                max_results=50_000)
            self._existing = {r.data.tags["orch.record"]: (r.info.run_id, r.info.status)
                              for r in runs if "orch.record" in r.data.tags}
            self._latest.update({r.info.run_id: dict(r.data.metrics) for r in runs})
        return self._existing

    def child(self, key: str, name: str, kind: str, params: Mapping[str, Any],
              metrics: Mapping[str, float] | None = None,
              history: list[Mapping[str, float]] | None = None, status: str = "FINISHED",
              tags: Mapping[str, str] | None = None) -> str | None:
        """An ended child run (`status` FINISHED, FAILED or KILLED); `history` rows are
        logged with step = their `epoch`. Returns its run id (None while MLflow is failing)."""
        def write() -> str:
            found = self.existing().get(key)
            if found and found[1] == status:
                return found[0]                    # recorded before (a resumed sweep)
            if found:
                # created, then the driver died; or failed, and its retry finished
                run_id = found[0]
            else:
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
                    PARENT_TAG: self.parent_id, SWEEP_TAG: self.sweep_id, KIND_TAG: kind,
                    "orch.record": key, **(tags or {})}).info.run_id
                self.existing()[key] = (run_id, "RUNNING")
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
            self._latest[run_id] = {k: float(v) for k, v in (metrics or {}).items()}
            logged = self._logged_steps(run_id, history) if found else {}
            for row in history or []:
                step = int(row.get("epoch", 0))
                batch += [Metric(k, float(v), now, step) for k, v in row.items()
                          if k != "epoch" and step not in logged.get(k, ())]
            # again for a run found (the same values): its driver may have died before
            self.client.log_batch(run_id, params=_params(params))
            for start in range(0, len(batch), 900):  # log_batch takes at most 1000 metrics
                self.client.log_batch(run_id, metrics=batch[start:start + 900])
            self.client.set_terminated(run_id, status)
            self.existing()[key] = (run_id, status)
            return run_id
        return self._try(write)

    def _logged_steps(self, run_id: str, history: list[dict] | None) -> dict[str, set[int]]:
        """The epochs of each loss curve a run already holds (a failed trial's retry
        brings its whole history again)."""
        keys = {k for row in history or [] for k in row if k != "epoch"}
        return {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in keys}

    def metrics(self, run_id: str, values: Mapping[str, float]) -> None:
        """Log the values a run does not hold already: MLflow keeps every logged value as
        history, so a second `orch sync` must not append the same ones again."""
        def write() -> None:
            latest = self._latest.get(run_id)
            if latest is None:
                latest = self._latest[run_id] = dict(self.client.get_run(run_id).data.metrics)
            changed = {k: float(v) for k, v in values.items() if latest.get(k) != float(v)}
            if changed:
                now = int(time.time() * 1000)
                self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0)
                                                       for k, v in changed.items()])
                latest.update(changed)
        self._try(write)

    def summary(self, table: Table, run_ids: list[str | None], choices: list[dict],
                figures: Mapping[str, Any], metrics: Mapping[str, float],
                tags: Mapping[str, str]) -> None:
        """The parent's table (`pareto.json`, one row per point, coefficients as columns),
        the front and choices (`pareto_front.json`), the figures, summary metrics, tags.
        Logged again by a resumed sweep or `orch sync`: every artifact is overwritten,
        none appended, and a metric already at its value is not logged again."""
        rows = table.rows
        coefficient_names = list(dict.fromkeys(k for r in rows for k in r.coefficients))
        metric_names = list(dict.fromkeys(k for r in rows for k in r.metrics))
        columns = ["trial", "method", "ensemble", *coefficient_names, *metric_names,
                   "on_front", "chosen", "run_id"]
        data = [[r.trial, r.method, r.ensemble,
                 *(r.coefficients.get(c) for c in coefficient_names),
                 *(r.metrics.get(m) for m in metric_names),
                 table.on_front[i], table.is_chosen(i), run_ids[i]]
                for i, r in enumerate(rows)]

        def write() -> None:
            self.client.log_dict(self.parent_id, {"columns": columns, "data": data},
                                 "pareto.json")
            # the rows themselves are in pareto.json; this names the front and the choices
            self.client.log_dict(self.parent_id, {
                "front": [i for i, on in enumerate(table.on_front) if on],
                "selected": table.selected, "chosen": choices}, "pareto_front.json")
            for path, figure in figures.items():
                self.client.log_figure(self.parent_id, figure, path)
            self.client.log_batch(self.parent_id, tags=[RunTag(k, str(v))
                                                        for k, v in tags.items()])
        self._try(write)
        self.metrics(self.parent_id, metrics)

    def datasets(self, sets: Mapping[str, tuple[str, str, str]]) -> None:
        """The benchmark's sets as the parent run's dataset inputs (the UI's Datasets
        column): name -> (source, digest, context: train / validation / test / shift)."""
        def write() -> None:
            inputs = []
            for name, (source, digest, context) in sets.items():
                dataset = MetaDataset(HTTPDatasetSource(source), name=name, digest=digest[:36])
                inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                           [InputTag("mlflow.data.context", context)]))
            self.client.log_inputs(self.parent_id, datasets=inputs)
        self._try(write)

    def has_model(self) -> bool:
        """Whether the parent already holds the chosen model (a second `orch sync`)."""
        run = self._try(lambda: self.client.get_run(self.parent_id))
        return run is not None and "model_val_acc" in run.data.metrics

    def log_model(self, model, example, register: str | None = None) -> None:
        """The chosen model on the parent run (`model/`), with an input example and its
        signature; registered as `register` in the model registry when given. The model's
        class lives in orch's `trainers` package, which travels with it (code_paths).
        A logged model that an earlier attempt left unfinished (a full disk mid-upload
        leaves it PENDING) is deleted first, and after a failed attempt."""
        # torch and mlflow.pytorch only here: `orch report` reads records without them
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        def write() -> None:
            with torch.no_grad():
                output = model(example).float().numpy()
            # Named, not inferred: MLflow's inference imports and scans for seconds.
            requirements = [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}",
                            f"open_clip_torch=={version('open_clip_torch')}",
                            f"mlflow=={version('mlflow')}"]
            self._delete_unfinished_models()
            try:
                # MLflow prints its own registration lines; orch says it in one line below
                with tracking_uri(self.uri), mlflow.start_run(run_id=self.parent_id), \
                        contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    info = mlflow.pytorch.log_model(
                        model, name="model", input_example=example.numpy(),
                        signature=infer_signature(example.numpy(), output),
                        code_paths=[str(Path(trainers.__file__).parent)],
                        pip_requirements=requirements, registered_model_name=register)
            except Exception:
                try:
                    self._delete_unfinished_models()
                except Exception:  # noqa: BLE001 - the store that just failed may fail again
                    pass
                raise
            if register:
                self.echo(f"registered the chosen model as {register!r}, version "
                          f"{info.registered_model_version}")
        self._try(write)

    def _delete_unfinished_models(self) -> None:
        for logged in self.client.search_logged_models(
                [self.experiment_id], filter_string=f"source_run_id = '{self.parent_id}'"):
            if logged.status != LoggedModelStatus.READY:
                self.client.delete_logged_model(logged.model_id)

    def finish(self, status: str, error: str | None = None) -> None:
        """FINISHED, FAILED or KILLED; the parent never stays RUNNING when we can help it."""
        if self.parent_id is None:
            return

        def write() -> None:
            if error:
                self.client.set_tag(self.parent_id, "orch.error", error[:5000])
            elif status == "FINISHED" and "orch.error" in \
                    self.client.get_run(self.parent_id).data.tags:
                # a resumed sweep that finished: its earlier interruption is history
                self.client.delete_tag(self.parent_id, "orch.error")
            self.client.set_terminated(self.parent_id, status)
            self._delete_duplicates()
        self._try(write)

    def _delete_duplicates(self) -> None:
        """Delete the runs a client retry made twice. MLflow's HTTP client retries every
        request, POSTs included, after a read timeout or a 5xx: a `create_run` the server
        committed but answered too late for a loaded machine leaves a second run with the
        same tags, RUNNING forever. The sweep's identity is its tags, so the copies are
        found: another parent of this sweep, or a second run of one record key (the one
        this process wrote to is kept, else a finished one)."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{SWEEP_TAG}` = '{self.sweep_id}'", max_results=50_000)
        by_key: dict[str, list] = {}
        for run in runs:
            if run.data.tags.get(KIND_TAG) == "sweep":
                if run.info.run_id != self.parent_id:
                    self.client.delete_run(run.info.run_id)
            elif "orch.record" in run.data.tags:
                by_key.setdefault(run.data.tags["orch.record"], []).append(run)
        for key, copies in by_key.items():
            if len(copies) < 2:
                continue
            ours = (self._existing or {}).get(key, (None,))[0]
            keep = next((r for r in copies if r.info.run_id == ours), None) or \
                next((r for r in copies if r.info.status == "FINISHED"), copies[0])
            for run in copies:
                if run is not keep:
                    self.client.delete_run(run.info.run_id)
            if self._existing is not None:
                self._existing[key] = (keep.info.run_id, keep.info.status)
