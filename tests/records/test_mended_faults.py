"""Faults found by probing with real processes, each mended and held here: a full disk
under the sweep's storage, a model upload cut short, a create MLflow's client retried.
(The resume hint after an interruption, a finished resume's stale error and `orch sync`
by id alone and twice are held by test_faults.py's bad day.)

A full disk is a small tmpfs mounted by the test (root only: elsewhere those tests say
why they cannot run)."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from conftest import image_task_spec

pytestmark = pytest.mark.timeout(420)
SLOW = {"name": "ft", "lr": 1e-4, "epochs": 30, "batch_size": 8, "warmup_steps": 1}


@contextmanager
def small_disk(folder: Path, size: str, leave: int | None = None):
    """A tmpfs of `size` at `folder` (filled up to `leave` free bytes), unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'not root'})")
    try:
        if leave is not None:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            (folder / "filler").write_bytes(b"\0" * max(0, free - leave))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def orch(*args: str, env: dict | None = None, cwd: Path | None = None,
         **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd, **kwargs)


def parent_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`orch.kind` = 'sweep'")
    return client, parent


@pytest.mark.e2e
def test_a_full_disk_is_one_line_exit_1_and_the_parent_says_why(image_task, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with small_disk(tmp_path / "full", "2m", leave=48 * 1024) as full:
        spec = image_task_spec(image_task, name="full", storage_path=str(full / "runs"),
                               method={**SLOW, "epochs": 3})
        path = tmp_path / "full.yaml"
        path.write_text(yaml.safe_dump(spec))
        proc = orch("sweep", str(path), env={"MLFLOW_TRACKING_URI": uri})
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], out
    assert "Traceback" not in out and "Unhandled error" not in out, out
    _, parent = parent_of(uri, "full")
    assert parent.info.status == "FAILED"
    assert "No space left on device" in parent.data.tags["orch.error"]


def test_a_model_upload_cut_short_leaves_no_pending_model(tmp_path):
    """The chosen model's upload fails on a full artifact disk: MLflow is told (the
    sweep goes on), no PENDING logged model stays behind, and the next attempt (`orch
    sync` with space again) leaves exactly one model, READY."""
    from orchestrator.records.mlflow import SweepRecords
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = torch.nn.Linear(1024, 512)                 # 2 MB of weights
    example = torch.zeros(2, 1024)
    with small_disk(tmp_path / "artifacts", "1m") as artifacts:
        MlflowClient(uri).create_experiment("upload", artifact_location=artifacts.as_uri())
        records = SweepRecords(uri, "upload", "upload-1", echo=lambda line: None).open()
        parent = records.start_parent({}, None)
        records.log_model(model, example)
        assert records.failed is not None and "space" in records.failed.lower()
        client = MlflowClient(uri)
        left = client.search_logged_models([records.experiment_id])
        assert [m.status for m in left if m.status != LoggedModelStatus.READY] == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(artifacts)], check=True)
        again = SweepRecords(uri, "upload", "upload-1", echo=lambda line: None).open()
        again.start_parent({}, None, parent_id=parent)
        again.log_model(model, example)
        assert again.failed is None
        models = client.search_logged_models([records.experiment_id])
        assert [m.status for m in models] == [LoggedModelStatus.READY]


def test_mlflow_retries_a_create_and_the_sweep_deletes_the_copy(tmp_path):
    """MLflow's HTTP client retries every request after a read timeout or a 5xx, POSTs
    included: a `create_run` the server committed but answered late (a loaded machine)
    leaves a copy with the same tags, RUNNING forever (CI once ended a sweep with two
    parents). The parent's end deletes such copies: another parent of the sweep, and
    every second run of one record key, keeping the one the sweep wrote to."""
    from mlflow.utils.request_utils import _get_request_session

    from orchestrator.records.mlflow import KIND_TAG, PARENT_TAG, SWEEP_TAG, SweepRecords
    # the premise, on the installed MLflow: POST is among the retried methods
    session = _get_request_session(max_retries=1, backoff_factor=1, backoff_jitter=1,
                                   retry_codes=(500, 503), raise_on_status=True,
                                   respect_retry_after_header=True)
    retry = session.get_adapter("http://x").max_retries
    assert retry.read == 1 and retry.is_retry("POST", 503)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = SweepRecords(uri, "copies", "copies-1", echo=lambda line: None).open()
    parent = records.start_parent({}, None)
    client = MlflowClient(uri)
    tags = {SWEEP_TAG: "copies-1", PARENT_TAG: parent, KIND_TAG: "train"}
    first_copy = client.create_run(records.experiment_id, tags={**tags, "orch.record": "train/a"})
    ours = records.child("train/a", "a", "train", {}, metrics={"x": 1.0})
    assert ours == first_copy.info.run_id          # found by its key, completed, not doubled
    records._existing = None                        # as a fresh process (orch sync) sees it
    kept = records.child("train/b", "b", "train", {}, metrics={"x": 2.0})
    late_copy = client.create_run(records.experiment_id, tags={**tags, "orch.record": "train/b"})
    parent_copy = client.create_run(records.experiment_id, run_name="copies-1",
                                    tags={SWEEP_TAG: "copies-1", KIND_TAG: "sweep"})
    records.finish("FINISHED")
    assert records.failed is None
    runs = client.search_runs([records.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([parent, ours, kept])
    assert {r.info.status for r in runs} == {"FINISHED"}
    deleted = {client.get_run(r.info.run_id).info.lifecycle_stage
               for r in (late_copy, parent_copy)}
    assert deleted == {"deleted"}


def test_logging_a_model_leaves_the_processs_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """`mlflow.set_tracking_uri` writes $MLFLOW_TRACKING_URI for subprocesses to inherit:
    left set by a sweep run in-process, the next `orch sync` this process started wrote a
    sweep's records into that other store (CI's failure). Logging the chosen model points
    MLflow at the sweep's store only while it logs."""
    import mlflow

    from orchestrator.records.mlflow import SweepRecords
    theirs = f"sqlite:///{tmp_path / 'theirs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = SweepRecords(uri, "env", "env-1", echo=lambda line: None).open()
    records.start_parent({}, None)
    records.log_model(torch.nn.Linear(4, 2), torch.zeros(2, 4))
    assert records.failed is None
    assert os.environ["MLFLOW_TRACKING_URI"] == theirs and mlflow.get_tracking_uri() == theirs
    logged = MlflowClient(uri).search_logged_models([records.experiment_id])
    assert [m.source_run_id for m in logged] == [records.parent_id]      # went to the sweep's
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    records.log_model(torch.nn.Linear(4, 2), torch.zeros(2, 4))
    assert "MLFLOW_TRACKING_URI" not in os.environ
