"""Adding a method or an ensemble is adding one file, and nothing else in orch knows its
names: a throw-away method and a throw-away weight-space ensemble, each one file in a
temporary folder named under `plugins:`, go through a whole sweep, `orch report` and
`orch export` (the exported point predicts what the sweep measured), each command a
separate process as a user runs them. The sweep runs on an existing Ray cluster
(RAY_ADDRESS), whose worker processes import the plug-in files too."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from ray.cluster_utils import Cluster

from conftest import image_task_spec
from orchestrator.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

METHOD = '''"""Scaled head: the zero-shot classifier with its head multiplied by (1 + scale)."""
import copy
from dataclasses import dataclass

import torch

from trainers.methods import HEAD, Fitted, Method, register


@dataclass(frozen=True)
class ScaledHeadOptions:
    scale: float = 0.5


def fit(start, options, ctx):
    model = copy.deepcopy(start.zero_shot)
    with torch.no_grad():
        model.head.weight.mul_(1 + options.scale)
        model.head.weight[0].add_(1.0)        # and a preference for class 0: a changed model
    return Fitted(model)


register(Method(name="scaled_head", options=ScaledHeadOptions, fit=fit,
                trains=frozenset({HEAD}), paper="(a test)", smoke={"scale": 0.1}))
'''

ENSEMBLE = '''"""Head-only WiSE: the fine-tuned image tower, the two heads mixed with beta."""
import copy
from dataclasses import dataclass

import torch

from trainers.ensembles import FINE_TUNED_MEMBER, WeightEnsemble, check_grid, register
from trainers.methods import Fitted


@dataclass(frozen=True)
class HeadWiseOptions:
    beta: tuple[float, ...] = (0.0, 0.5, 1.0)

    def __post_init__(self):
        check_grid("beta", self.beta, 0.0, 1.0)


def mix(zero_shot, fine_tuned, options, point):
    model = copy.deepcopy(fine_tuned.classifier)
    with torch.no_grad():
        model.head.weight.copy_(torch.lerp(zero_shot.classifier.head.weight,
                                           fine_tuned.classifier.head.weight, point["beta"]))
    return Fitted(model, fine_tuned.text_tower)


def endpoint(point):
    return FINE_TUNED_MEMBER if point["beta"] == 1.0 else None


register(WeightEnsemble(name="head_wise", options=HeadWiseOptions, coefficients=("beta",),
                        mix=mix, endpoint=endpoint, paper="(a test)"))
'''

PLAIN = r"""
import json, sys
from pathlib import Path
import open_clip, torch, torch.nn.functional as F
from PIL import Image
ckpt = torch.load(sys.argv[1], weights_only=True)
model = getattr(open_clip, ckpt["model_class"])(**ckpt["model_cfg"]).eval()
model.load_state_dict(ckpt["state_dict"])
preprocess = open_clip.image_transform(**ckpt["preprocess"], is_train=False)
right = total = 0
for label, name in enumerate(ckpt["classnames"]):
    for path in sorted((Path(sys.argv[2]) / name).iterdir()):
        with torch.no_grad():
            image = preprocess(Image.open(path).convert("RGB"))[None]
            logits = F.normalize(model.encode_image(image), dim=-1) @ ckpt["head_weight"].T \
                + ckpt["head_bias"]
        right += int(logits.argmax(1).item() == label)
        total += 1
print(json.dumps({"acc": right / total, "point": ckpt["point"]}))
"""


def orch(*args, env, cwd):
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_method_and_an_ensemble_from_one_file_each_run_export_and_report(image_task, ray_local,
                                                                           tmp_path):
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "scaled_head.py").write_text(METHOD)
    (plugins / "head_wise.py").write_text(ENSEMBLE)
    spec = image_task_spec(
        image_task, name="plugins", storage_path=str(tmp_path / "runs"), method=None, grid=None,
        ensemble=None,
        methods=[{"name": "zeroshot"}, {"name": "scaled_head", "scale": 0.5}],
        ensembles=[{"name": "head_wise", "beta": [0.0, 0.5, 1.0]},
                   {"name": "ose", "alpha": [0.5]}],
        # more CPUs per trial than this machine has: only the 3-CPU cluster below fits
        resources={"cpus_per_trial": 3})
    # this process's Ray (the suite's, 2 CPUs) refuses, before anything waits (a file
    # without the plug-ins: importing them here would register them in the whole suite)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({**spec, "methods": [{"name": "zeroshot"}],
                                                         "ensembles": [{"name": "ose"}]}))
    local = CliRunner().invoke(main, ["sweep", str(tmp_path / "local.yaml")], env={
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'local.db'}"})
    assert local.exit_code == 1
    assert "resources.cpus_per_trial=3 but the Ray cluster has 2 CPUs" in local.output
    # the files by relative path, from the sweep's folder: resolved once, on the driver
    spec["plugins"] = ["my_plugins/scaled_head.py", "my_plugins/head_wise.py"]
    (tmp_path / "plugins.yaml").write_text(yaml.safe_dump(spec))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        out = orch("sweep", "plugins.yaml", env={**env, "RAY_ADDRESS": cluster.address},
                   cwd=tmp_path)
    finally:
        cluster.shutdown()
    assert "chosen point" in out
    report = json.loads(orch("report", "--json", env=env, cwd=tmp_path))
    points = {(p["trial"], p["ensemble"], p.get("beta")): p for p in report["points"]}
    assert set(points) >= {("scaled_head-00", "none", None),
                           ("scaled_head-00", "head_wise", 0.0),
                           ("scaled_head-00", "head_wise", 0.5),
                           ("scaled_head-00", "head_wise", 1.0),
                           ("scaled_head-00", "ose", None)}
    # beta = 1 is the fine-tuned model itself (its endpoint), beta = 0.5 a model of its own
    alone = points[("scaled_head-00", "none", None)]
    assert points[("scaled_head-00", "head_wise", 1.0)]["id_nll"] == alone["id_nll"]
    assert points[("scaled_head-00", "head_wise", 0.5)]["id_nll"] != alone["id_nll"]

    sweep_id = report["sweep_id"]
    out = tmp_path / "half.pt"
    orch("export", sweep_id, str(out), "--trial", "scaled_head-00", "--coeffs", "beta=0.5",
         env=env, cwd=tmp_path / "runs")           # found by id, from another folder
    loaded = subprocess.run([sys.executable, "-I", "-c", PLAIN, str(out),
                             str(image_task / "task" / "test")],
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout)
    assert result["point"]["ensemble"] == "head_wise"
    assert result["acc"] == pytest.approx(points[("scaled_head-00", "head_wise", 0.5)]["id_acc"])
