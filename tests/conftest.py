"""Shared fixtures. Ray and MLflow are real: a local Ray with 2 CPUs, SQLite MLflow.

The suite's folders mirror the code's rooms (spec/, plan/, assets/, run/, records/,
commands/, trainers/); `pyproject.toml` puts this folder on the path, so every test file
imports these helpers with `from conftest import ...`.

Marks: `e2e` for a test that starts Ray or runs `orch` or Python in a subprocess (worker
processes included), `slow` for one that needs tens of seconds or the real-size models.
`make test-fast` runs `-m "not e2e"`; the two guards below keep Ray out of that lane."""
from __future__ import annotations

import os
from pathlib import Path

# Before ray is imported anywhere: no token auth, no usage stats, quiet Tune.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)   # each test names its own store
os.environ.pop("RAY_ADDRESS", None)
# Ray's temporary folder for this session alone (RAY_TMPDIR, inherited by every `orch` the
# tests start). Without it, `ray.init()` follows /tmp/ray/ray_current_cluster to whatever
# Ray the machine last started with `ray start` or a test Cluster (a previous run killed
# mid-way leaves one), and the tests' own Rays join a stranger's: seen on CI as "When
# connecting to an existing cluster, num_cpus and num_gpus must not be provided".
# A short name: Ray's socket paths must stay under 108 characters.
import shutil  # noqa: E402
import tempfile  # noqa: E402

RAY_TMPDIR = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _clone_entries() -> set[str] | None:
    """The files `git status` lists as untracked or ignored in the clone (None: not a
    clone). Changes to tracked files are not counted: tests never write those, and people
    may edit them while the suite runs."""
    import subprocess
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return {line[3:] for line in done.stdout.splitlines()
            if line[:2] in ("??", "!!") and "__pycache__" not in line}


@pytest.fixture(scope="session", autouse=True)
def clone_stays_clean(tmp_path_factory):
    """Every test runs in a temporary working folder (so a default `runs/`, `mlflow.db`
    or `mlruns/` lands there), and the session fails if the clone gained any file."""
    before = _clone_entries()
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
    after = _clone_entries()
    if before is not None and after is not None and after - before:
        pytest.fail(f"the test session left files in the clone: {sorted(after - before)}")


# The fixtures that start Ray: a test using one (directly or through another fixture,
# like `finished_sweep`) must be marked e2e, so `make test-fast` (-m "not e2e") never
# starts Ray.
RAY_FIXTURES = ("ray_local",)


@pytest.hookimpl(trylast=True)    # after -m, -k and --deselect have chosen the tests
def pytest_collection_modifyitems(config, items):
    """Refuse to run a test that starts Ray through a fixture without the e2e mark."""
    unmarked = [f"{item.nodeid} (uses {', '.join(f for f in RAY_FIXTURES if f in item.fixturenames)})"
                for item in items
                if any(f in getattr(item, "fixturenames", ()) for f in RAY_FIXTURES)
                and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError("these tests start Ray but are not marked e2e "
                                "(add pytest.mark.e2e):\n  " + "\n  ".join(unmarked))


@pytest.fixture(autouse=True)
def tracking_uri_unchanged():
    """A test that leaves $MLFLOW_TRACKING_URI changed fails: every later `orch` subprocess
    would inherit it (`mlflow.set_tracking_uri` writes it; orch's sweep once left it set,
    and a later `orch sync` wrote into that store)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    if after != before:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        pytest.fail(f"this test left $MLFLOW_TRACKING_URI={after!r} (was {before!r})",
                    pytrace=False)


@pytest.fixture(autouse=True)
def only_e2e_starts_ray(request):
    """A test without the e2e mark that starts Ray by other means (`orch sweep` in this
    process, Ray Data, Tune) fails, naming the mark it lacks."""
    import sys
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    if before or request.node.get_closest_marker("e2e") is not None:
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started Ray: mark it pytest.mark.e2e", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs ~5 s). Only for tests
    marked e2e (`pytest_collection_modifyitems` refuses the others)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


def pytest_unconfigure(config):
    """Ray's session folders (logs, sockets, spilled objects) go with the test session."""
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


@pytest.fixture
def tiny_images():
    """16 random 32x32 RGB images in 4 classes, as the toy world stores them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % 4
    return images, labels


@pytest.fixture(scope="session")
def toy_clip():
    """The pre-trained toy CLIP: the shipped weights, expanded into the cache on first use."""
    from trainers.models import TOY_ARCH, load_clip
    from trainers.toyworld.pretrain import toy_clip_checkpoint
    return load_clip(TOY_ARCH, str(toy_clip_checkpoint()), augment=False)


# Sweep files on the toy world, as dicts, for the tests of the spec and the plan.
TOY_SWEEP = {
    "name": "t",
    "benchmark": {"source": "toyworld", "train_size": 64, "eval_size": 32},
    "model": {"arch": "toy"},
    "method": {"name": "ft", "lr": 3e-4, "epochs": 1, "batch_size": 16},
    "grid": {"lr": [1e-4, 3e-4], "seed": [0, 1]},
    "ensemble": {"name": "wise_ft", "alphas": [0.0, 0.5, 1.0]},
}
MULTI_SWEEP = {
    "name": "multi",
    "benchmark": {"source": "toyworld", "train_size": 64, "eval_size": 32},
    "model": {"arch": "toy"},
    "methods": [
        {"name": "zeroshot"},
        {"name": "ft", "lr": 3e-4, "grid": {"lr": [3e-4, 1e-4], "seed": [0]}},
        {"name": "ft", "label": "ft_ls", "label_smoothing": 0.1},
        {"name": "carot", "ema_every": 6, "grid": {"lambda_sd": [0.0, 1.5]}},
    ],
    "ensembles": [
        {"name": "wise_ft", "alpha": [0.0, 0.5, 1.0]},
        {"name": "vrf", "a": [0.5, 1.0], "b": [0.2, 0.6], "methods": ["ft", "carot"]},
    ],
}


def write_sweep(folder, data, name="sweep.yaml"):
    """A sweep file (a dict as YAML, or text as it is) in `folder`."""
    import yaml
    path = folder / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


# A tiny real-weights task, written by the tests: an open_clip ViT from a config file and a
# checkpoint file, image folders with a class-subset shift and a many-to-one shift.
TINY_ARCH = "orch-test-e2e-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_CLASSES = ["cat", "dog", "car"]
_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "car": (40, 40, 200)}


def write_images(folder, classes, per_class, rng):
    from PIL import Image
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(_COLOURS[name]) + rng.normal(0, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(scope="session")
def image_task(tmp_path_factory):
    """Folder with task/{train,val,test}/<class>/, sketch/ (2 of 3 classes), objectnet/
    (animal -> cat, dog; vehicle -> car), the model config and weights."""
    import json

    import open_clip
    root = tmp_path_factory.mktemp("image_task")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        write_images(root / "task" / split, TINY_CLASSES, n, rng)
    write_images(root / "sketch", ["cat", "dog"], 3, rng)            # a 2-class subset
    write_images(root / "objectnet", ["cat", "car"], 3, rng)
    (root / "objectnet" / "cat").rename(root / "objectnet" / "animal")  # many-to-one map
    (root / "objectnet" / "car").rename(root / "objectnet" / "vehicle")
    config = root / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY_ARCH).state_dict(), root / "weights.pt")
    return root


def image_task_spec(root, **changes) -> dict:
    """A sweep file (as a dict) on `image_task`; a change to None drops that key."""
    spec = {
        "name": "e2e",
        "benchmark": {
            "source": "imagefolder", "root": str(root / "task"), "classnames": TINY_CLASSES,
            "templates": ["a photo of a {}", "a {}"],
            "shifts": {"sketch": {"path": str(root / "sketch")},
                       "objectnet": {"path": str(root / "objectnet"),
                                     "class_map": {"animal": ["cat", "dog"], "vehicle": ["car"]}}},
        },
        "model": {"arch": TINY_ARCH, "config": str(root / f"{TINY_ARCH}.json"),
                  "pretrained": str(root / "weights.pt")},
        "method": {"name": "ft", "lr": 1e-3, "epochs": 2, "batch_size": 8, "warmup_steps": 1},
        "grid": {"lr": [1e-3, 1e-4]},
        "ensemble": {"name": "wise_ft", "alphas": [0.0, 0.5, 1.0]},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        "eval": {"batch_size": 16},
        "features": {"batch_size": 16, "cache_dir": str(root / "features")},
        "storage_path": str(root / "runs"),
    }
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}


# The one full sweep most end-to-end tests read (a sweep costs ~30 s here): every kind
# of method and ensemble on the tiny task, through the CLI, with --register.
TINY = {"epochs": 2, "batch_size": 8, "warmup_steps": 1}
SWEEP_METHODS = [{"name": "zeroshot"}, {"name": "lp", "lr": 1e-2, **TINY},
                 {"name": "ft", "lr": 1e-3, **TINY, "grid": {"lr": [1e-3, 1e-4]}},
                 {"name": "flyp", "lr": 1e-4, **TINY},
                 {"name": "carot", "lr": 1e-4, **TINY, "ema_every": 2},
                 # merging FT's two trials: soups and Model Stock run after them
                 {"name": "soup", "of": "ft", "kind": "uniform"},
                 {"name": "model_stock", "of": "ft"}]
SWEEP_ENSEMBLES = [{"name": "wise_ft", "alpha": [0.0, 0.5, 1.0]},
                   {"name": "ose", "alpha": [0.0, 0.5, 1.0]},
                   {"name": "vrf", "a": [0.5, 1.5], "b": [0.6]}]


@pytest.fixture(scope="session")
def finished_sweep(image_task, ray_local, tmp_path_factory):
    """(CLI result, tracking URI, the sweep's journal folder)."""
    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main
    tmp = tmp_path_factory.mktemp("sweep")
    spec = image_task_spec(image_task, name="e2e", storage_path=str(tmp / "runs"), method=None,
                           grid=None, ensemble=None, methods=SWEEP_METHODS,
                           ensembles=SWEEP_ENSEMBLES)
    path = tmp / "e2e.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["sweep", str(path), "--register", "orch-e2e"],
                                env={"MLFLOW_TRACKING_URI": uri})
    folders = list((tmp / "runs").glob("*/sweep.json"))
    return result, uri, folders[0].parent if folders else None
