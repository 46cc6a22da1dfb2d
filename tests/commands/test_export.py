"""Getting the result out: `orch export` writes a point as a plain open_clip checkpoint
that a Python without orch loads and that reproduces the sweep's ID accuracy for that
point; the chosen model is logged on the parent run (and registered with --register);
a sweep can ensemble existing checkpoints instead of training."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import TINY_CLASSES, image_task_spec
from orchestrator.cli import main
from orchestrator.records.journal import Journal
from orchestrator.records.mlflow import tracking_uri
from orchestrator.records.row import ALONE, Row

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]     # the suite's full sweep

# A Python that imports torch and open_clip only, and scores the checkpoint on the ID
# test folder exactly as the README shows.
PLAIN = r"""
import sys
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
        image = preprocess(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            logits = F.normalize(model.encode_image(image), dim=-1) @ ckpt["head_weight"].T \
                + ckpt["head_bias"]
        right += int(logits.argmax(1).item() == label)
        total += 1
assert not [m for m in sys.modules if m.split(".")[0] in ("orchestrator", "trainers")]
print(right / total)
"""


@pytest.fixture(scope="module")
def sweep(finished_sweep, tmp_path_factory):
    """The suite's full sweep (conftest): (its journal folder, tracking URI, a scratch dir)."""
    result, uri, sweep_dir = finished_sweep
    assert result.exit_code == 0, result.output
    return sweep_dir, uri, tmp_path_factory.mktemp("export")


def plain_accuracy(checkpoint, folder) -> float:
    done = subprocess.run([sys.executable, "-I", "-c", PLAIN, str(checkpoint), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def rows(sweep_dir) -> list[Row]:
    """Every point the sweep's journal holds."""
    return [r for job in Journal(str(sweep_dir)).points().values() for r in job]


@pytest.mark.parametrize("args, trial, ensemble, coefficients", [
    ((), None, None, None),                                    # the sweep's chosen point
    (("--trial", "flyp-00", "--alpha", "0.5"), "flyp-00", "wise_ft", {"alpha": 0.5}),
    (("--trial", "ft-00_lr=0.001", "--coeffs", "alpha=1.0"), "ft-00_lr=0.001", "wise_ft",
     {"alpha": 1.0}),
])
def test_export_reproduces_the_points_id_accuracy_without_orch(sweep, image_task, args, trial,
                                                                ensemble, coefficients):
    sweep_dir, _, tmp = sweep
    out = tmp / f"model-{len(args)}.pt"
    result = CliRunner().invoke(main, ["export", str(sweep_dir), str(out), *args])
    assert result.exit_code == 0, result.output
    import torch
    point = torch.load(out, weights_only=True)["point"]
    if trial is not None:
        assert (point["trial"], point["ensemble"], point["coefficients"]) == (
            trial, ensemble, coefficients)
    (row,) = [r for r in rows(sweep_dir) if r.trial == point["trial"]
              and r.ensemble == point["ensemble"] and r.coefficients == point["coefficients"]]
    assert plain_accuracy(out, image_task / "task" / "test") == pytest.approx(row["id_acc"])


def test_output_space_points_and_unknown_trials_are_clear_errors(sweep):
    sweep_dir, _, tmp = sweep
    for args, words in ((("--trial", "flyp-00", "--coeffs", "a=1,b=0.5"), "cannot be exported"),
                        (("--trial", "nope-00"), "no trial 'nope-00'"),
                        (("--alpha", "0.5"), "need --trial"),
                        (("--trial", "flyp-00", "--alpha", "2"), "wise_ft:")):
        result = CliRunner().invoke(main, ["export", str(sweep_dir), str(tmp / "x.pt"), *args])
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_failed_trial_is_not_exported_as_the_zero_shot_model(sweep):
    import shutil
    sweep_dir, _, tmp = sweep
    copy = tmp / "failed-copy"
    shutil.copytree(sweep_dir, copy)
    record_file = copy / "trials" / "flyp-00.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "status": "failed", "model": None,
                                       "error": "NaN loss"}))
    result = CliRunner().invoke(main, ["export", str(copy), str(tmp / "f.pt"),
                                       "--trial", "flyp-00"])
    assert result.exit_code == 2 and "failed" in result.output and "NaN loss" in result.output
    assert not (tmp / "f.pt").exists()


def test_an_unwritable_output_is_one_line(sweep):
    sweep_dir, _, tmp = sweep
    result = CliRunner().invoke(main, ["export", str(sweep_dir), "/proc/nope/model.pt"])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: /proc/nope/model.pt")


def test_the_chosen_model_is_logged_with_signature_and_registered(sweep, image_task):
    import mlflow
    import numpy as np
    sweep_dir, uri, _ = sweep
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`orch.kind` = 'sweep'")
    # orch's own scoped setter: mlflow.set_tracking_uri alone would leave
    # $MLFLOW_TRACKING_URI set for every later test's subprocesses
    with tracking_uri(uri):
        model_info = mlflow.models.get_model_info(f"runs:/{parent.info.run_id}/model")
        (version,) = client.search_model_versions("name='orch-e2e'")
        model = mlflow.pytorch.load_model(f"models:/orch-e2e/{version.version}")
    assert model_info.signature is not None and model_info.saved_input_example_info is not None
    assert version.run_id == parent.info.run_id
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    assert model(__import__("torch").from_numpy(example)).shape == (1, len(TINY_CLASSES))
    # the logged model is the sweep's chosen single-model point
    assert parent.data.metrics["model_val_acc"] == max(
        r["val_acc"] for r in rows(sweep_dir) if r.ensemble in (ALONE, "wise_ft"))


def test_a_sweep_can_ensemble_existing_checkpoints(sweep, image_task, tmp_path):
    """model.pretrained is the zero-shot checkpoint, method `checkpoint` the fine-tuned
    one: WiSE-FT and OSE sweep them without training, and the loaded model alone scores
    what the exported point scored."""
    sweep_dir, _, tmp = sweep
    exported = tmp_path / "ft.pt"
    assert CliRunner().invoke(main, ["export", str(sweep_dir), str(exported), "--trial",
                                     "ft-00_lr=0.001"]).exit_code == 0
    spec = image_task_spec(image_task, name="existing", storage_path=str(tmp_path / "runs"),
                           method={"name": "checkpoint", "path": str(exported)}, grid=None,
                           ensemble=None, ensembles=[{"name": "wise_ft", "alpha": [0.0, 0.5, 1.0]},
                                                     {"name": "ose", "alpha": [0.5]}])
    path = tmp_path / "existing.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["sweep", str(path)],
                                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert result.exit_code == 0, result.output
    (new_dir,) = (tmp_path / "runs").glob("*/sweep.json")
    points = rows(new_dir.parent)
    assert {(r.ensemble, json.dumps(r.coefficients)) for r in points} == {
        ("none", "{}"), ("wise_ft", '{"alpha": 0.0}'), ("wise_ft", '{"alpha": 0.5}'),
        ("wise_ft", '{"alpha": 1.0}'), ("ose", '{"alpha": 0.5}')}
    (alone,) = [r for r in points if r.ensemble == ALONE]
    (original,) = [r for r in rows(sweep_dir)
                   if r.trial == "ft-00_lr=0.001" and r.ensemble == ALONE]
    assert alone["id_acc"] == pytest.approx(original["id_acc"])
    assert alone["id_nll"] == pytest.approx(original["id_nll"], rel=1e-4)
