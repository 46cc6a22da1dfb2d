"""A worker node lost mid-trial: with `resources.max_failures > 0` Tune restarts the
trial on another node from its last epoch checkpoint, the sweep completes, nothing is
recorded twice, and the restart shows on the trial's MLflow run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import image_task_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]     # a Ray cluster, `orch` in a subprocess


def _node_running_the_trial(cluster):
    """The worker node whose raylet is an ancestor of the Tune trial's process."""
    trial = next((p for p in psutil.process_iter(["cmdline"])
                  if any("ImplicitFunc" in part for part in (p.info["cmdline"] or []))), None)
    if trial is None:
        return None
    ancestors = {p.pid for p in trial.parents()}
    for node in cluster.worker_nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        if raylet in ancestors:
            return node
    return None


def test_trial_survives_the_loss_of_its_node(image_task, tmp_path):
    from ray.cluster_utils import Cluster
    spec = image_task_spec(
        image_task, name="nodeloss", storage_path=str(tmp_path / "runs"), grid={"seed": [0]},
        method={"name": "ft", "lr": 1e-4, "epochs": 60, "batch_size": 8, "warmup_steps": 1},
        ensemble={"name": "wise_ft", "alphas": [0.0, 1.0]},
        resources={"cpus_per_trial": 1, "max_failures": 2, "max_concurrent_trials": 1})
    path = tmp_path / "nodeloss.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The head runs the driver only; two one-CPU workers: the trial's and a spare.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": cluster.address})
        deadline = time.monotonic() + 240
        node = None
        while time.monotonic() < deadline and node is None:
            if list((tmp_path / "runs").glob("*/checkpoints/*.json")):   # an epoch is saved
                node = _node_running_the_trial(cluster)
            time.sleep(0.2)
        assert node is not None, "the trial never checkpointed on a worker node"
        cluster.remove_node(node, allow_graceful=False)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:     # a failed wait: no orphan sweep
            proc.kill()
            proc.communicate()
        cluster.shutdown()
    assert proc.returncode == 0, out
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/trials/*.json")]
    assert record["restarts"] >= 1
    assert [row["epoch"] for row in record["history"]] == list(range(60))   # resumed, not redone
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nodeloss").experiment_id])
    keys = Counter(r.data.tags.get("orch.record") for r in runs if "orch.record" in r.data.tags)
    assert max(keys.values()) == 1 and all(r.info.status == "FINISHED" for r in runs)
    (train,) = [r for r in runs if r.data.tags.get("orch.kind") == "train"]
    assert int(train.data.tags["orch.restarts"]) >= 1 and train.data.metrics["restarts"] >= 1
