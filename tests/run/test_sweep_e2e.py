"""`orch sweep` end to end on the real-weights path: an open_clip architecture from a
config file, a checkpoint file, image folders with a class-subset shift and a
many-to-one shift, real Ray Tune and real MLflow (SQLite). Then the failure modes:
a corrupt image, an unreachable tracking server."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import TINY_CLASSES as CLASSES
from conftest import REPO, image_task_spec, write_images
from orchestrator.cli import main

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def workspace(image_task):
    return image_task


def sweep_file(root, **changes):
    spec = image_task_spec(root, **changes)
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def runs_by_kind(client, kind):
    experiment = client.get_experiment_by_name("e2e")
    return client.search_runs([experiment.experiment_id], f"tags.`orch.kind` = '{kind}'")


TRAINED = ("lp-00", "ft-00_lr=0.001", "ft-01_lr=0.0001", "flyp-00", "carot-00", "soup-00",
           "model_stock-00")
TRAIN_IMAGES = 8 * len(CLASSES)           # conftest's image_task: 8 per class in task/train


@pytest.mark.e2e
def test_sweep_succeeds_and_prints_table_and_mlflow_command(finished_sweep):
    result, uri, _ = finished_sweep
    assert result.exit_code == 0, result.output
    assert "chosen point" in result.output and "OOD ECE TS" in result.output
    assert "registered the chosen model as 'orch-e2e', version 1" in result.output
    assert "Successfully registered" not in result.output       # MLflow's own lines
    assert f"ui --backend-store-uri {uri}" in result.output
    assert "runs?workflowType=machine_learning" in result.output


@pytest.mark.e2e
def test_mlflow_has_a_child_run_per_trial_and_point(finished_sweep):
    """LP, FT (two learning rates), FLYP, CaRot, a soup and Model Stock of the two FT
    trials, with WiSE-FT, OSE and VRF: one child run per point with its ensemble and
    coefficients as params, and the metrics of each."""
    _, uri, _ = finished_sweep
    client = MlflowClient(uri)
    (parent,) = runs_by_kind(client, "sweep")
    assert parent.info.status == "FINISHED"
    evals, trains = runs_by_kind(client, "eval"), runs_by_kind(client, "train")
    assert sorted(r.info.run_name for r in trains) == sorted(TRAINED)   # zero-shot trains nothing
    assert len(evals) == 1 + len(TRAINED) * (1 + 3 + 3 + 2)   # alone, WiSE, OSE, VRF
    for run in evals + trains:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    vrf = [r for r in evals if r.data.params["ensemble"] == "vrf"]
    assert {(r.data.params["a"], r.data.params["b"]) for r in vrf} == {("0.5", "0.6"), ("1.5", "0.6")}
    for run in evals:
        m = run.data.metrics
        assert run.data.params["ensemble"] in ("none", "wise_ft", "ose", "vrf")
        if run.data.params["ensemble"] in ("wise_ft", "ose"):
            assert float(run.data.params["alpha"]) in (0.0, 0.5, 1.0)
        for key in ("id_acc", "ood_acc", "id_ece", "ood_ece", "id_nll", "id_ece_ts", "ood_ece_ts",
                    "sketch_acc", "sketch_ece", "objectnet_nll", "val_acc"):
            assert key in m and np.isfinite(m[key]), key
        assert m["ood_acc"] == pytest.approx((m["sketch_acc"] + m["objectnet_acc"]) / 2)
    zsf_sizes: dict[str, set[float]] = {}
    for run in vrf:
        size = run.data.metrics["vrf_zsf_size"]
        assert size == int(size) and size <= TRAIN_IMAGES     # a count of training images
        zsf_sizes.setdefault(run.data.params["trial"], set()).add(size)
        assert "vrf_median_distance_id_test" in run.data.metrics
    # the ZSF set is the trial's, whatever VRF's coefficients
    assert len(zsf_sizes) == len(TRAINED) and all(len(s) == 1 for s in zsf_sizes.values())
    # fine-tuning fixed some zero-shot failures, and VRF's points are not the model alone
    assert max(r.data.metrics["vrf_zsf_size"] for r in vrf) > 0
    alone = {r.data.params["trial"]: r.data.metrics["id_nll"] for r in evals
             if r.data.params["ensemble"] == "none"}
    assert all(r.data.metrics["id_nll"] != pytest.approx(alone[r.data.params["trial"]])
               for r in vrf)
    (ft,) = [r for r in trains if r.info.run_name == "ft-00_lr=0.001"]
    history = client.get_metric_history(ft.info.run_id, "train_loss")
    assert [h.step for h in sorted(history, key=lambda h: h.step)] == [0, 1]
    assert ft.data.params["method"] == "ft" and ft.data.params["lr"] == "0.001"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "calibration.png", "reliability", "pareto.json", "pareto_front.json",
            "sweep.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "reliability")} == {
        f"reliability/{m}.png" for m in ("zeroshot", "lp", "ft", "flyp", "carot", "soup",
                                         "model_stock")}
    assert parent.data.tags["orch.selected_run"] in {r.info.run_id for r in evals}
    assert "selected_val_acc" in parent.data.metrics
    # one chosen point per (method, ensemble)
    assert sum(r.data.metrics["chosen"] for r in evals) == 1 + 6 * 4
    # the merged trials record what they merged
    soup, stock = ({t.info.run_name: t for t in trains}[n] for n in ("soup-00", "model_stock-00"))
    assert soup.data.metrics["soup_size"] == 2 and stock.data.metrics["stock_members"] == 2
    names = {d.dataset.name for d in parent.inputs.dataset_inputs}     # the UI's Datasets column
    assert names == {"id_val", "id_test", "sketch", "objectnet", "train"}


@pytest.mark.e2e
def test_alpha_zero_is_the_same_zero_shot_model_for_every_trial(finished_sweep):
    _, uri, _ = finished_sweep
    evals = runs_by_kind(MlflowClient(uri), "eval")
    wise = [r for r in evals if r.data.params["ensemble"] == "wise_ft"]
    zero = [r.data.metrics["id_nll"] for r in wise if float(r.data.params["alpha"]) == 0.0]
    (zero_shot,) = [r.data.metrics["id_nll"] for r in evals if r.data.params["method"] == "zeroshot"]
    one = {r.data.params["trial"]: r.data.metrics for r in wise
           if float(r.data.params["alpha"]) == 1.0}
    alone = {r.data.params["trial"]: r.data.metrics for r in evals
             if r.data.params["ensemble"] == "none"}
    assert zero == [zero_shot] * len(TRAINED)
    assert len(set(m["id_nll"] for m in one.values())) == len(TRAINED)
    for trial, metrics in one.items():                        # alpha 1 is the model alone
        assert metrics["id_nll"] == alone[trial]["id_nll"]


@pytest.mark.e2e
def test_report_prints_the_last_sweep(finished_sweep):
    _, uri, _ = finished_sweep
    result = CliRunner().invoke(main, ["report"], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:3] == ["method", "ensemble", "chosen"]
    assert "OOD ECE TS" in lines[1]
    assert [line.split()[:2] for line in lines[3:]] == [["zeroshot", "-"]] + [
        [m, e] for m in ("lp", "ft", "flyp", "carot", "soup", "model_stock")
        for e in ("-", "wise_ft", "ose", "vrf")]
    points = CliRunner().invoke(main, ["report", "--points"], env={"MLFLOW_TRACKING_URI": uri})
    assert points.output.count("ft-0") == 2 * 9 and "<- chosen on ID val" in points.output


@pytest.mark.e2e
def test_report_as_json_and_csv(finished_sweep):
    import csv
    import io
    import json
    _, uri, _ = finished_sweep
    env = {"MLFLOW_TRACKING_URI": uri}
    data = json.loads(CliRunner().invoke(main, ["report", "--json"], env=env).output)
    assert data["status"] == "FINISHED" and len(data["points"]) == 1 + len(TRAINED) * 9
    assert len(data["chosen"]) == 1 + 6 * 4
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(main, ["report", "--csv"],
                                                              env=env).output)))
    assert len(rows) == len(data["points"]) and {"alpha", "a", "b", "id_acc"} <= set(rows[0])
    assert sum(r["chosen"] == "True" for r in rows) == len(data["chosen"])


@pytest.mark.e2e
def test_compare_plots_two_fronts(finished_sweep, tmp_path):
    _, uri, _ = finished_sweep
    (parent,) = runs_by_kind(MlflowClient(uri), "sweep")
    sweep_id = parent.data.tags["orch.sweep_id"]
    result = CliRunner().invoke(main, ["compare", sweep_id, sweep_id, "--out",
                                       str(tmp_path / "c.png")], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert result.output.count(f"sweep {sweep_id} (FINISHED)") == 2


def test_corrupt_image_fails_before_anything_starts(workspace, tmp_path):
    """Every image is checked before Ray or MLflow start: one line naming the file,
    exit code 2, no run recorded."""
    task = tmp_path / "task_bad"
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        write_images(task / split, CLASSES, 2, rng)
    bad = task / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    spec = yaml.safe_load(sweep_file(workspace).read_text())
    spec["benchmark"]["root"] = str(task)
    path = sweep_file(workspace, name="e2e-bad", benchmark=spec["benchmark"], grid={"seed": [0]},
                      storage_path=str(tmp_path / "runs"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["sweep", str(path)], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 2, result.output
    (line,) = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert str(bad) in line and "cannot be read" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_unreachable_tracking_server_fails_fast_and_starts_nothing(workspace, tmp_path):
    path = sweep_file(workspace, name="e2e-offline", storage_path=str(tmp_path / "runs"))
    result = CliRunner().invoke(main, ["sweep", str(path)],
                                env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert "cannot use MLflow tracking store http://127.0.0.1:9" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_shrunken_toy_sweep_with_early_stopping(ray_local, toy_clip, tmp_path):
    """The default job on a shrunken toy config (real Ray, real MLflow, the toy world's
    five shifts in the OOD average, the shortcut-free diagnostic outside it), with ASHA
    over two learning rates and a soup of what it kept. lr 1e-9 runs first and stays the
    zero-shot model (~50 % ID validation on this shrunken world); lr 1e-3 with one warmup
    step first falls far below it (~20 % after one epoch of 8 steps) and ASHA stops it
    there, though it would have recovered: early stopping's known bias against fast
    learning rates."""
    from trainers.toyworld import world
    spec = yaml.safe_load((REPO / "sweeps" / "wise_alpha.yaml").read_text())
    ft = {**spec.pop("method"), "epochs": 2, "batch_size": 32, "warmup_steps": 1}
    spec.pop("grid")
    spec.update(name="toy-small", storage_path=str(tmp_path / "runs"),
                methods=[{**ft, "grid": {"lr": [1e-9, 1e-3]}},
                         {"name": "soup", "of": "ft", "kind": "uniform"}],
                search={"scheduler": "asha", "grace_period": 1, "reduction_factor": 2})
    spec["benchmark"].update(train_size=256, eval_size=100)
    spec["ensemble"]["alphas"] = [0.0, 0.5, 1.0]
    spec["resources"]["max_concurrent_trials"] = 1      # lr 1e-9 reaches epoch 1 first
    spec["features"] = {"cache_dir": str(tmp_path / "features")}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    result = CliRunner().invoke(main, ["sweep", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert "stopped early by the search: ft-01_lr=0.001" in result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy-small")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`orch.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    trains = {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`orch.kind` = 'train'")}
    stopped, kept = trains["ft-01_lr=0.001"], trains["ft-00_lr=1e-09"]
    assert stopped.info.status == "KILLED" and stopped.data.tags["orch.trial_status"] == "stopped"
    assert stopped.data.metrics["stopped_epochs_done"] == 1
    first = client.get_metric_history(kept.info.run_id, "val_acc")[0].value
    assert stopped.data.metrics["stopped_val_acc"] < first
    assert kept.info.status == "FINISHED"
    # every epoch of the kept trial was validated (the last one too, for its curve)
    assert [m.step for m in client.get_metric_history(kept.info.run_id, "val_acc")] == [0, 1]
    # the soup left the stopped trial out: a soup of one
    assert trains["soup-00"].data.metrics["soup_size"] == 1
    evals = client.search_runs([experiment.experiment_id], "tags.`orch.kind` = 'eval'")
    assert sorted({r.data.params["trial"] for r in evals}) == ["ft-00_lr=1e-09", "soup-00"]
    assert len(evals) == 2 * (1 + 3)
    for run in evals:
        m = run.data.metrics
        shifts = [m[f"{s}_acc"] for s in world.SHIFT_SPLITS]
        assert m["ood_acc"] == pytest.approx(sum(shifts) / len(shifts))   # id_rand not averaged
        assert 0.0 <= m["id_rand_acc"] <= 1.0 and "objectnet_ece_ts" in m
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "pareto.json"} <= artifacts
    report = CliRunner().invoke(main, ["report"], env=env)
    assert report.exit_code == 0, report.output
    assert "stopped early by the search" in report.output
    assert "ft-01_lr=0.001 stopped after 1 epoch(s), ID val acc" in report.output


@pytest.mark.slow
@pytest.mark.e2e
def test_an_optuna_search_proposes_by_rounds_and_every_command_reads_its_trials(
        ray_local, toy_clip, tmp_path):
    """Three FT trials proposed by Optuna over a log-uniform learning rate and two seeds,
    two at a time (a round of 2, then 1), each told its ID validation accuracy and ECE:
    the proposals are in the journal before they train, every trial is an MLflow run with
    its scores, and `orch report` and `orch export` read the proposed trials back."""
    import json
    spec = {"name": "toy-search", "benchmark": {"source": "toyworld", "train_size": 128,
                                                "eval_size": 50},
            "model": {"arch": "toy"},
            "methods": [{"name": "ft", "lr": 1e-4, "epochs": 1, "batch_size": 32,
                         "warmup_steps": 1,
                         "grid": {"lr": {"loguniform": [1e-5, 1e-2]}, "seed": [0, 1]}}],
            "ensembles": [{"name": "wise_ft", "alpha": [0.0, 0.5, 1.0]}],
            "search": {"searcher": "optuna", "n_trials": 3, "startup_trials": 2,
                       "objectives": ["val_acc", "val_ece"]},
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
            "features": {"cache_dir": str(tmp_path / "features")},
            "storage_path": str(tmp_path / "runs")}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = CliRunner().invoke(main, ["sweep", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert "[search] ft: Optuna proposes 2 trial(s) (2/3)" in result.output
    assert "[search] ft: Optuna proposes 1 trial(s) (3/3)" in result.output
    assert "[search] ft: best on val_acc, val_ece: ft-0" in result.output
    (journal,) = (tmp_path / "runs").glob("*/sweep.json")
    proposals = json.loads(journal.read_text())["search_proposals"]["ft"]
    assert len(proposals) == 3
    for p in proposals:
        assert 1e-5 <= p["lr"] <= 1e-2 and float(f"{p['lr']:.3g}") == p["lr"]
        assert p["seed"] in (0, 1)
    names = [f"ft-{i:02d}_lr={p['lr']}_seed={p['seed']}" for i, p in enumerate(proposals)]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("toy-search")
    trains = {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`orch.kind` = 'train'")}
    assert sorted(trains) == sorted(names)
    for name, p in zip(names, proposals):
        run = trains[name]
        assert float(run.data.params["lr"]) == p["lr"]
        assert 0.0 <= run.data.metrics["search_val_acc"] <= 1.0
        assert 0.0 <= run.data.metrics["search_val_ece"] <= 1.0
    evals = client.search_runs([experiment.experiment_id], "tags.`orch.kind` = 'eval'")
    assert len(evals) == 3 * (1 + 3)
    report = CliRunner().invoke(main, ["report"], env=env)
    assert report.exit_code == 0 and any(n in report.output for n in names), report.output
    exported = CliRunner().invoke(main, ["export", str(journal.parent), str(tmp_path / "model.pt"),
                                         "--trial", names[2]], env=env)
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.e2e
def test_report_names_a_sweep_or_says_there_is_none(finished_sweep, tmp_path):
    _, uri, _ = finished_sweep
    missing = CliRunner().invoke(main, ["report", "no-such-sweep"], env={"MLFLOW_TRACKING_URI": uri})
    assert missing.exit_code == 2 and "no sweep 'no-such-sweep'" in missing.output
    sweep_id = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("e2e").experiment_id],
        "tags.`orch.kind` = 'sweep'")[0].data.tags["orch.sweep_id"]
    named = CliRunner().invoke(main, ["report", sweep_id], env={"MLFLOW_TRACKING_URI": uri})
    assert named.exit_code == 0 and sweep_id in named.output
    empty = CliRunner().invoke(main, ["report"],
                               env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"})
    assert empty.exit_code == 2 and "no sweeps recorded" in empty.output


@pytest.mark.e2e
def test_nan_loss_fails_the_sweep_with_one_line_and_no_traceback(workspace, tmp_path):
    """Run as a user would (a separate process, real stderr): Ray Tune's own traceback of
    the failed trial must not reach the terminal, only orch's one line."""
    import os
    import subprocess
    import sys
    spec = yaml.safe_load(sweep_file(workspace).read_text())
    spec["method"]["lr"] = 1e12
    path = sweep_file(workspace, name="e2e-nan", method=spec["method"], grid={"seed": [0]},
                      storage_path=str(tmp_path / "runs"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [l for l in (done.stdout + done.stderr).splitlines() if l.startswith("error:")]
    assert "training trial ft-00_seed=0 failed" in line and "loss is nan" in line
    assert "Traceback" not in done.stdout + done.stderr
