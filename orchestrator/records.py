"""MLflow records of a sweep: one parent run, a child run per training trial and per
(trial, mixing coefficient), and the Pareto table, front and plot on the parent.

Only the driver writes (SQLite takes one writer at a time), through
`MlflowClient` with explicit run ids, so nothing depends on a global active run.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

# An unreachable server must fail in seconds with one line, not after minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

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


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class SweepRecords:
    """Writes one sweep's runs; `open()` checks the store before anything else starts."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_id: str):
        self.uri, self.experiment, self.sweep_id = tracking_uri, experiment, sweep_id
        self.client = MlflowClient(tracking_uri)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    def open(self) -> "SweepRecords":
        try:
            found = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = (found.experiment_id if found else
                                  self.client.create_experiment(self.experiment))
        except Exception as err:  # MlflowException, connection errors, sqlite errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(f"cannot use MLflow tracking store {self.uri}: {first}") from None
        return self

    def start_parent(self, params: Mapping[str, Any], spec_text: str | None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=self.sweep_id, tags={
            SWEEP_TAG: self.sweep_id, KIND_TAG: "sweep", "git_sha": _git_sha()})
        self.parent_id = run.info.run_id
        self.client.log_batch(self.parent_id, params=_params(params))
        if spec_text is not None:
            self.client.log_text(self.parent_id, spec_text, "sweep.yaml")
        return self.parent_id

    def child(self, name: str, kind: str, params: Mapping[str, Any],
              metrics: Mapping[str, float] | None = None,
              history: list[Mapping[str, float]] | None = None, failed: bool = False) -> str:
        """A finished child run; `history` rows are logged with step = their `epoch`."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            PARENT_TAG: self.parent_id, SWEEP_TAG: self.sweep_id, KIND_TAG: kind})
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        for row in history or []:
            step = int(row.get("epoch", 0))
            batch += [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch"]
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=_params(params))
        for start in range(0, len(batch), 900):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run_id, metrics=batch[start:start + 900])
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        return run_id

    def summary(self, table: list[dict], selected: int, choices: list[dict],
                figures: Mapping[str, Any], metrics: Mapping[str, float],
                tags: Mapping[str, str]) -> None:
        """The parent's table (`pareto.json`, one row per point, coefficients as columns),
        the front and choices (`pareto_front.json`), the figures, summary metrics, tags."""
        coefficient_names = list(dict.fromkeys(k for r in table for k in r["coefficients"]))
        columns = [c for c in table[0] if c not in ("coefficients", "reliability")]
        data = {c: [row[c] for row in table] for c in columns}
        for name in coefficient_names:
            data[name] = [row["coefficients"].get(name) for row in table]
        mlflow.log_table(data, "pareto.json", run_id=self.parent_id)
        # the rows themselves are in pareto.json; this names the front and the choices
        self.client.log_dict(self.parent_id, {
            "front": [i for i, r in enumerate(table) if r["on_front"]],
            "selected": selected, "chosen": choices}, "pareto_front.json")
        for path, figure in figures.items():
            self.client.log_figure(self.parent_id, figure, path)
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id,
                              metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, ok: bool, error: str | None = None) -> None:
        if self.parent_id is None:
            return
        if error:
            self.client.set_tag(self.parent_id, "orch.error", error[:5000])
        self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
