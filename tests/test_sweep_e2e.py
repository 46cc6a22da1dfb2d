"""`orch sweep` end to end on the real-weights path: an open_clip architecture from a
config file, a checkpoint file, image folders with a class-subset shift and a
many-to-one shift, real Ray Tune and real MLflow (SQLite). Then the failure modes:
a corrupt image, an unreachable tracking server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main

pytestmark = pytest.mark.timeout(400)

ARCH = "orch-test-e2e-vit"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["cat", "dog", "car"]
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "car": (40, 40, 200)}


def write_images(folder, classes, per_class, rng):
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        write_images(root / "task" / split, CLASSES, n, rng)
    write_images(root / "sketch", ["cat", "dog"], 3, rng)            # a 2-class subset
    write_images(root / "objectnet", ["cat", "car"], 3, rng)
    (root / "objectnet" / "cat").rename(root / "objectnet" / "animal")  # many-to-one map
    (root / "objectnet" / "car").rename(root / "objectnet" / "vehicle")
    config = root / f"{ARCH}.json"
    config.write_text(json.dumps(CONFIG))
    import open_clip
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(ARCH).state_dict(), root / "weights.pt")
    return root


def sweep_file(root, **changes):
    spec = {
        "name": "e2e",
        "benchmark": {
            "source": "imagefolder", "root": str(root / "task"), "classnames": CLASSES,
            "templates": ["a photo of a {}", "a {}"],
            "shifts": {"sketch": {"path": str(root / "sketch")},
                       "objectnet": {"path": str(root / "objectnet"),
                                     "class_map": {"animal": ["cat", "dog"], "vehicle": ["car"]}}},
        },
        "model": {"arch": ARCH, "config": str(root / f"{ARCH}.json"),
                  "pretrained": str(root / "weights.pt")},
        "method": {"name": "ft", "lr": 1e-3, "epochs": 2, "batch_size": 8, "warmup_steps": 1},
        "grid": {"lr": [1e-3, 1e-4]},
        "ensemble": {"name": "wise_ft", "alphas": [0.0, 0.5, 1.0]},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        "eval": {"batch_size": 16},
        "storage_path": str(root / "runs"),
    }
    spec.update(changes)
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished_sweep(workspace, ray_local):
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["sweep", str(sweep_file(workspace))],
                                env={"MLFLOW_TRACKING_URI": uri})
    return result, uri


def runs_by_kind(client, kind):
    experiment = client.get_experiment_by_name("e2e")
    return client.search_runs([experiment.experiment_id], f"tags.`orch.kind` = '{kind}'")


def test_sweep_succeeds_and_prints_table_and_mlflow_command(finished_sweep):
    result, uri = finished_sweep
    assert result.exit_code == 0, result.output
    assert "<- chosen on ID val" in result.output
    assert f"ui --backend-store-uri {uri}" in result.output
    assert "runs?workflowType=machine_learning" in result.output


def test_mlflow_has_parent_and_children(finished_sweep):
    _, uri = finished_sweep
    client = MlflowClient(uri)
    (parent,) = runs_by_kind(client, "sweep")
    assert parent.info.status == "FINISHED"
    evals, trains = runs_by_kind(client, "eval"), runs_by_kind(client, "train")
    assert len(evals) == 2 * 3 and len(trains) == 2
    for run in evals + trains:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["method"] == "ft" and "lr" in run.data.params
    for run in evals:
        m = run.data.metrics
        assert float(run.data.params["alpha"]) in (0.0, 0.5, 1.0)
        for key in ("id_acc", "ood_acc", "id_ece", "ood_ece", "id_nll", "id_ece_ts",
                    "sketch_acc", "sketch_ece", "objectnet_nll", "val_acc"):
            assert key in m and np.isfinite(m[key]), key
        assert m["ood_acc"] == pytest.approx((m["sketch_acc"] + m["objectnet_acc"]) / 2)
    history = client.get_metric_history(trains[0].info.run_id, "train_loss")
    assert [h.step for h in sorted(history, key=lambda h: h.step)] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "pareto.json", "pareto_front.json", "sweep.yaml"} <= artifacts
    assert parent.data.tags["orch.selected_run"] in {r.info.run_id for r in evals}
    assert "selected_alpha" in parent.data.metrics


def test_alpha_zero_is_the_same_zero_shot_model_for_every_trial(finished_sweep):
    _, uri = finished_sweep
    evals = runs_by_kind(MlflowClient(uri), "eval")
    zero = [r.data.metrics for r in evals if float(r.data.params["alpha"]) == 0.0]
    one = [r.data.metrics for r in evals if float(r.data.params["alpha"]) == 1.0]
    assert len(zero) == 2 and zero[0]["id_nll"] == zero[1]["id_nll"]
    assert one[0]["id_nll"] != one[1]["id_nll"]          # two learning rates, two models


def test_report_prints_the_last_sweep(finished_sweep):
    _, uri = finished_sweep
    result = CliRunner().invoke(main, ["report"], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 0, result.output
    assert result.output.count("ft-0") == 6 and "<- chosen on ID val" in result.output


def test_corrupt_image_fails_the_sweep_with_one_line(workspace, ray_local, tmp_path):
    task = workspace / "task_bad"
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        write_images(task / split, CLASSES, 2, rng)
    bad = task / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    spec = yaml.safe_load(sweep_file(workspace).read_text())
    spec["benchmark"]["root"] = str(task)
    spec["grid"] = {"seed": [0]}
    path = sweep_file(workspace, name="e2e-bad", benchmark=spec["benchmark"], grid=spec["grid"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["sweep", str(path)], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 1, result.output
    (line,) = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert str(bad) in line and "cannot read image" in line
    (parent,) = runs_by_kind(MlflowClient(uri), "sweep") if False else MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("e2e-bad").experiment_id], "tags.`orch.kind` = 'sweep'")
    assert parent.info.status == "FAILED"


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
def test_shrunken_toy_sweep_records_every_point(ray_local, toy_clip, tmp_path):
    """The default job on a shrunken toy config: real Ray, real MLflow, the toy world's
    five shifts in the OOD average and the shortcut-free diagnostic outside it."""
    from trainers.toyworld import world
    spec = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "wise_alpha.yaml").read_text())
    spec.update(name="toy-small", storage_path=str(tmp_path / "runs"))
    spec["benchmark"].update(train_size=256, eval_size=100)
    spec["method"].update(epochs=1, warmup_steps=1)
    spec["grid"] = {"seed": [0, 1]}
    spec["ensemble"]["alphas"] = [0.0, 0.5, 1.0]
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["sweep", str(path)], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy-small")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`orch.kind` = 'sweep'")
    evals = client.search_runs([experiment.experiment_id], "tags.`orch.kind` = 'eval'")
    assert len(evals) == 2 * 3 and parent.info.status == "FINISHED"
    for run in evals:
        m = run.data.metrics
        shifts = [m[f"{s}_acc"] for s in world.SHIFT_SPLITS]
        assert m["ood_acc"] == pytest.approx(sum(shifts) / len(shifts))   # id_rand not averaged
        assert 0.0 <= m["id_rand_acc"] <= 1.0 and "objectnet_ece_ts" in m
        assert run.data.params["seed"] in ("0", "1") and run.data.params["lr"] == "0.0003"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "pareto.json"} <= artifacts


def test_report_names_a_sweep_or_says_there_is_none(finished_sweep, tmp_path):
    _, uri = finished_sweep
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


def test_ray_address_points_the_sweep_at_an_existing_cluster(workspace, tmp_path):
    """With RAY_ADDRESS, trials run on that cluster: it has 3 logical CPUs and the sweep
    asks for 3 per trial, which Ray on this 2-core machine refuses (checked first)."""
    import os
    import subprocess
    import sys

    from ray.cluster_utils import Cluster
    path = sweep_file(workspace, name="e2e-address", grid={"seed": [0]},
                      ensemble={"name": "wise_ft", "alphas": [0.0, 1.0]},
                      resources={"cpus_per_trial": 3}, storage_path=str(tmp_path / "runs"))
    base = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)]
    local = subprocess.run(command, capture_output=True, text=True, env=base, timeout=300)
    assert local.returncode == 1
    assert "cpus_per_trial=3 but the Ray cluster has 2 CPUs" in local.stdout + local.stderr
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        remote = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**base, "RAY_ADDRESS": cluster.address})
        assert remote.returncode == 0, remote.stdout + remote.stderr
        assert "<- chosen on ID val" in remote.stdout
    finally:
        cluster.shutdown()
