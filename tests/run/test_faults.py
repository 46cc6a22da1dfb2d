"""Nothing lost: a sweep stopped by Ctrl-C, killed with SIGKILL or left without its
tracking server keeps what it finished, ends with its parent run KILLED or FAILED
(never RUNNING), says so in one line, and `--resume` / `orch sync` complete it with
exactly one MLflow run per trial and per point. Each case runs `orch` as a user does:
a separate process, real Ray, real MLflow."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import image_task_spec
from orchestrator.cli import main

pytestmark = pytest.mark.timeout(420)
# The tests marked e2e run `orch` (or Python) in a subprocess; the others stop before Ray.

# Long enough to interrupt: 50 epochs of 3 steps on the tiny task, a few seconds a trial.
SLOW = {"name": "ft", "lr": 1e-4, "epochs": 50, "batch_size": 8, "warmup_steps": 1}


def write_sweep(root: Path, tmp_path: Path, name: str, **changes) -> Path:
    spec = image_task_spec(root, name=name, storage_path=str(tmp_path / "runs"), **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def orch(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


def run(*args: str, env: dict | None = None, timeout: int = 300, **kwargs) -> tuple[int, str]:
    proc = orch(*args, env=env, **kwargs)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(predicate, timeout: float = 180, what: str = "") -> None:
    """Poll the sweep's journal (a file on disk) until `predicate()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def journal(tmp_path: Path) -> Path:
    (root,) = list((tmp_path / "runs").glob("*/sweep.json"))
    return root.parent


def journal_files(tmp_path: Path, folder: str) -> list[str]:
    return [p.stem for p in (tmp_path / "runs").glob(f"*/{folder}/*.json")]


def runs_of(uri: str, name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def assert_one_run_per_record_and_none_running(uri: str, name: str) -> list:
    runs = runs_of(uri, name)
    keys = Counter(r.data.tags["orch.record"] for r in runs if "orch.record" in r.data.tags)
    assert [k for k, n in keys.items() if n > 1] == []
    running = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert running == [], [(r.info.run_name, r.info.run_id, r.info.status, r.info.start_time,
                            r.info.end_time, r.data.tags.get("orch.kind")) for r in runs]
    return runs


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


@pytest.mark.e2e
def test_a_bad_day_loses_nothing(image_task, tmp_path):
    """One sweep of three trials, started with overrides on the command line, through
    every interruption, each ending as it should: Ctrl-C in training (exit 130, one line
    whose resume command carries the overrides, parent KILLED, the stopped trial not
    recorded as finished); SIGKILL of the resumed driver (the next `orch report` marks it
    KILLED, no ghost); Ctrl-C in the next resume's evaluation (one line, no traceback); a
    last resume, the first hint's command copied as printed, that finishes and clears the
    parent's error. Finished trials are never trained again, MLflow ends with one run per
    trial and per point, none RUNNING; then `orch sync SWEEP_ID` alone, run twice from
    another folder, finds the sweep and appends nothing to any metric's history."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(image_task, tmp_path, "badday", method={**SLOW, "epochs": 60},
                       grid={"lr": [1e-4]},
                       ensemble={"name": "wise_ft", "alphas": [0.0, 0.25, 0.5, 0.75, 1.0]},
                       resources={"cpus_per_trial": 1, "max_concurrent_trials": 1})
    overrides = [f"method.epochs={SLOW['epochs']}", "grid.lr=[1.0e-4,2.0e-4,3.0e-4]"]
    env = {"MLFLOW_TRACKING_URI": uri}

    def kinds(runs, kind):
        return {r.info.run_name: r for r in runs if r.data.tags.get("orch.kind") == kind}

    # 1. Ctrl-C once the first trial finished and the second has a checkpoint
    proc = orch("sweep", str(path), *overrides, env=env)
    wait_for(lambda: journal_files(tmp_path, "trials") and journal_files(tmp_path, "checkpoints")
             and set(journal_files(tmp_path, "checkpoints")) - set(journal_files(tmp_path, "trials")),
             what="a finished trial and a checkpoint of the next")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    (line,) = error_lines(out)
    assert "interrupted" in line and "--resume" in line and "Traceback" not in out
    hint = shlex.split(line.split("`")[1])
    assert hint[:3] == ["orch", "sweep", str(path)] and hint[3:5] == overrides, hint
    runs = assert_one_run_per_record_and_none_running(uri, "badday")
    assert [r.info.status for r in kinds(runs, "sweep").values()] == ["KILLED"]
    first = set(journal_files(tmp_path, "trials"))
    trains = kinds(runs, "train")
    assert set(trains) == first and all(r.info.status == "FINISHED" for r in trains.values())
    assert not kinds(runs, "eval")

    # 2. the same command names the unfinished sweep; resume it and kill it (SIGKILL of
    # the driver and the Ray it started) once one more trial reached MLflow
    out = CliRunner().invoke(main, ["sweep", str(path), *overrides, "--dry-run"]).output
    assert "note: sweep badday-" in out and "did not finish" in out
    proc = orch("sweep", str(path), *overrides, "--resume", env=env, start_new_session=True)
    wait_for(lambda: len(kinds([r for r in runs_of(uri, "badday") if r.info.status == "FINISHED"],
                               "train")) > len(first), what="another trial in MLflow")
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert f"({len(first)} finished before)" in out
    result = CliRunner().invoke(main, ["report"], env=env)
    assert result.exit_code == 0 and "(KILLED)" in result.output and "--resume" in result.output
    assert [r.info.status for r in kinds(runs_of(uri, "badday"), "sweep").values()] == ["KILLED"]

    # 3. resume again, Ctrl-C during evaluation
    proc = orch("sweep", str(path), *overrides, "--resume", env=env)
    wait_for(lambda: journal_files(tmp_path, "points"), what="a finished ensemble job")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert len(error_lines(out)) == 1 and "Traceback" not in out and "KeyError" not in out
    assert_one_run_per_record_and_none_running(uri, "badday")

    # 4. the first hint's command, as printed, finishes the sweep and clears its error
    code, out = run(*hint[1:], env=env)
    assert code == 0, out
    runs = assert_one_run_per_record_and_none_running(uri, "badday")
    (parent,) = kinds(runs, "sweep").values()
    assert parent.info.status == "FINISHED" and "orch.error" not in parent.data.tags
    assert Counter(r.data.tags.get("orch.kind") for r in runs) == {"sweep": 1, "train": 3,
                                                                    "eval": 3 * 6}
    for name in journal_files(tmp_path, "trials"):        # each trained once, all epochs
        record = json.loads((journal(tmp_path) / "trials" / f"{name}.json").read_text())
        assert [row["epoch"] for row in record["history"]] == list(range(SLOW["epochs"]))

    # 5. `orch sync SWEEP_ID` from elsewhere finds the sweep by its MLflow records; twice
    # appends nothing
    client = MlflowClient(uri)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    histories = []
    for _ in range(2):
        code, text = run("sync", parent.data.tags["orch.sweep_id"], env=env, cwd=elsewhere)
        assert code == 0, text
        runs = client.search_runs([parent.info.experiment_id], max_results=1000)
        histories.append({(r.info.run_id, key): len(client.get_metric_history(r.info.run_id, key))
                          for r in runs for key in r.data.metrics})
    assert histories[1] == histories[0]
    assert any(key == "selected_val_acc" for _, key in histories[0])


def test_resume_names_the_sweeps_it_could_continue(image_task, tmp_path):
    from orchestrator.records.journal import INTERRUPTED, Journal
    path = write_sweep(image_task, tmp_path, "note")
    Journal(str(tmp_path / "runs" / "note-20260101-000000-abcd")).update(
        sweep_id="note-20260101-000000-abcd", name="note", source_file=str(path),
        status=INTERRUPTED, created=1.0)
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "note: sweep note-20260101-000000-abcd of this file did not finish" in result.output
    result = CliRunner().invoke(main, ["sweep", str(path), "--resume", "--dry-run"])
    assert "would resume sweep note-20260101-000000-abcd" in result.output
    result = CliRunner().invoke(main, ["sweep", str(path), "--resume", "no-such-id"])
    assert result.exit_code == 2 and "no sweep 'no-such-id'" in result.output
    assert "note-20260101-000000-abcd" in result.output
    # a file edited since: its finished trials would be reused under the old settings
    (tmp_path / "runs" / "note-20260101-000000-abcd" / "sweep.yaml").write_text(path.read_text())
    path.write_text("# a comment changes nothing\n" + path.read_text())
    result = CliRunner().invoke(main, ["sweep", str(path), "--resume", "--dry-run"])
    assert "would resume sweep note-20260101-000000-abcd" in result.output
    edited = yaml.safe_load(path.read_text())
    edited["method"]["epochs"] += 1
    path.write_text(yaml.safe_dump(edited))
    for args in (["--resume"], ["--resume", "note-20260101-000000-abcd"]):
        result = CliRunner().invoke(main, ["sweep", str(path), *args, "--dry-run"])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert "ran other settings (method.epochs was 2, is 3)" in line, line
    # the same settings given as an override are the same sweep
    result = CliRunner().invoke(main, ["sweep", str(path), "method.epochs=2", "--resume",
                                       "--dry-run"])
    assert "would resume sweep note-20260101-000000-abcd" in result.output, result.output


def _mlflow_server(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "mlflow"
    return subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(uri: str) -> bool:
    import urllib.request
    try:
        return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
    except OSError:
        return False


@pytest.mark.e2e
def test_tracking_server_down_mid_sweep_loses_nothing_and_sync_writes_it(image_task, tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path / "server.db", tmp_path / "artifacts", port)
    try:
        wait_for(lambda: _up(uri), 90, "the tracking server")
        path = write_sweep(image_task, tmp_path, "down", method={**SLOW, "epochs": 5},
                           grid={"lr": [1e-4, 2e-4]},
                           ensemble={"name": "wise_ft", "alphas": [0.0, 0.5, 1.0]},
                           resources={"cpus_per_trial": 1, "max_concurrent_trials": 1})
        proc = orch("sweep", str(path), env={"MLFLOW_TRACKING_URI": uri})
        wait_for(lambda: journal_files(tmp_path, "trials"), what="a finished trial")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        out, _ = proc.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    (warning,) = [line for line in out.splitlines() if line.startswith("MLflow: cannot write")]
    (line,) = error_lines(out)
    assert "orch sync" in line
    sweep_dir = journal(tmp_path)
    assert json.loads((sweep_dir / "sweep.json").read_text())["status"] == "finished"
    assert len(journal_files(tmp_path, "trials")) == 2 and len(journal_files(tmp_path, "points")) == 2 * 2

    server = _mlflow_server(tmp_path / "server.db", tmp_path / "artifacts", port)
    try:
        wait_for(lambda: _up(uri), 90, "the tracking server again")
        code, out = run("sync", str(sweep_dir))
        assert code == 0, out
        runs = assert_one_run_per_record_and_none_running(uri, "down")
        assert Counter(r.data.tags.get("orch.kind") for r in runs) == {"sweep": 1, "train": 2,
                                                                        "eval": 2 * 4}
        (parent,) = [r for r in runs if r.data.tags.get("orch.kind") == "sweep"]
        assert parent.info.status == "FINISHED"
        client = MlflowClient(uri)
        assert "pareto.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        code, again = run("sync", str(sweep_dir))              # idempotent
        assert code == 0 and len(runs_of(uri, "down")) == len(runs)
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_an_unreachable_tracking_server_is_one_line_before_anything_starts(image_task, tmp_path):
    port = _free_port()                       # nothing listens there
    for args in (["sweep", str(write_sweep(image_task, tmp_path, "nowhere"))], ["report"]):
        result = CliRunner().invoke(main, args, env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        assert result.exit_code != 0
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: cannot use MLflow tracking store") and \
            "Connection refused" in line and len(line) < 200, line
    assert not (tmp_path / "runs").exists()


def test_a_write_protected_store_is_one_line_and_the_sweep_is_not_left_running(
        image_task, tmp_path):
    """A store that can be read but not written (opened read-only: root ignores file
    modes): one line naming the store and SQLite's reason, exit 2, and the journal of
    the sweep that could not start says FAILED, not running."""
    from orchestrator.records.mlflow import SweepRecords
    db = tmp_path / "mlflow.db"
    SweepRecords(f"sqlite:///{db}", "readonly", "setup", print).open()   # experiment exists
    path = write_sweep(image_task, tmp_path, "readonly")
    uri = f"sqlite:///file:{db}?mode=ro&uri=true"
    result = CliRunner().invoke(main, ["sweep", str(path)], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.strip().splitlines() if not x.startswith("sweep ")]
    assert line.startswith(f"error: cannot write to MLflow tracking store {uri}") \
        and "readonly database" in line and "Traceback" not in result.output, line
    assert json.loads((journal(tmp_path) / "sweep.json").read_text())["status"] == "failed"
    report = CliRunner().invoke(main, ["report"], env={"MLFLOW_TRACKING_URI": uri})
    assert report.exit_code == 2 and "no sweeps recorded" in report.output


def test_sweep_ids_never_collide():
    from orchestrator.run.driver import new_sweep_id
    ids = {new_sweep_id("same") for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.e2e
def test_two_sweeps_creating_one_new_sqlite_store_both_work(tmp_path):
    script = ("import sys; from orchestrator.records.mlflow import SweepRecords; "
              "r = SweepRecords(sys.argv[1], sys.argv[2], 's').open(); "
              "r.start_parent({}, None); print('ok', r.experiment_id)")
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, f"exp{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(o.strip().splitlines()[-1].startswith("ok") for o in outs)
    # and a SQLite store's artifacts live beside it, not in ./mlruns of the working folder
    experiment = MlflowClient(uri).get_experiment_by_name("exp0")
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "exp0").as_uri()


def test_a_retried_trial_is_one_run_with_its_params_and_each_epoch_once(tmp_path):
    """A trial recorded FAILED, then finished by its retry: one run, FINISHED, with its
    params, and the loss curve's epochs each logged once."""
    from orchestrator.records.mlflow import SweepRecords
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = SweepRecords(uri, "retry", "retry-1", print).open()
    records.start_parent({}, "", None, tags={})
    first = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}]
    records.child("train/t", "t", "train", {"lr": 0.1}, history=first, status="FAILED")
    records.child("train/t", "t", "train", {"lr": 0.1},
                  history=first + [{"epoch": 2, "loss": 0.2}], status="FINISHED")
    client = MlflowClient(uri)
    (run,) = client.search_runs([records.experiment_id], "tags.`orch.kind` = 'train'")
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(0, 1.0), (1, 0.5), (2, 0.2)]
