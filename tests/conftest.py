"""Shared fixtures. Ray and MLflow are real: a local Ray with 2 CPUs, SQLite MLflow."""
from __future__ import annotations

import os

# Before ray is imported anywhere: no token auth, no usage stats, quiet Tune.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)   # each test names its own store
os.environ.pop("RAY_ADDRESS", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs ~5 s)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_images():
    """16 random 32x32 RGB images in 4 classes, as the toy world stores them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % 4
    return images, labels


@pytest.fixture(scope="session")
def toy_clip():
    """The cached, pre-trained toy CLIP (built once, ~10 minutes, on first use)."""
    from trainers.models import TOY_ARCH, load_clip
    from trainers.toyworld.pretrain import toy_clip_checkpoint
    return load_clip(TOY_ARCH, str(toy_clip_checkpoint()), augment=False)
