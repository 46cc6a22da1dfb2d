"""Data-parallel training: two gloo workers take exactly the steps one worker takes on
the whole batch (FT's cross-entropy, and FLYP's contrastive loss with features gathered
across workers, so every sample of the global batch is a negative)."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.data import ArrayImageDataset
from trainers.methods import FitContext, StartPoint, get_method
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks, ShardedBatches

pytestmark = pytest.mark.timeout(300)
CLASSES = ("circle", "square", "ring", "star")
TEMPLATES = ("a photo of a {}", "a {}")
OPTIONS = {"ft": {"lr": 1e-3, "epochs": 2, "batch_size": 8, "warmup_steps": 1},
           "flyp": {"lr": 1e-4, "epochs": 2, "batch_size": 8, "warmup_steps": 1}}


def fit(method: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    clip = load_clip(TOY_ARCH, None, augment=False)
    start = StartPoint(clip, zero_shot_classifier(clip, CLASSES, TEMPLATES), CLASSES, TEMPLATES)
    rng = np.random.default_rng(0)
    data = ArrayImageDataset(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                             np.arange(20) % 4, clip.eval_transform)
    m = get_method(method)
    fitted = m.fit(start, m.options(**OPTIONS[method]),
                   FitContext(data, torch.device("cpu"), 0, Hooks(progress=False)))
    return {k: v.clone() for k, v in fitted.classifier.state_dict().items()}


def _worker(rank: int, world_size: int, port: int, method: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        state = fit(method)
        if rank == 0:
            out.put({k: v.numpy() for k, v in state.items()})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["ft", "flyp"])
def test_two_workers_take_the_steps_one_worker_takes(method):
    single = fit(method)
    torch.manual_seed(0)
    clip = load_clip(TOY_ARCH, None, augment=False)
    initial = zero_shot_classifier(clip, CLASSES, TEMPLATES).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in single.items())   # it trained
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, method, out)) for r in range(2)]
    for p in procs:
        p.start()
    parallel = out.get()            # before join: a big result blocks its sender until read
    for p in procs:
        p.join(240)
    assert all(p.exitcode == 0 for p in procs)
    for key, value in single.items():
        np.testing.assert_allclose(parallel[key], value.numpy(), rtol=1e-4, atol=2e-5, err_msg=key)


def test_shards_partition_each_global_batch_and_trim_the_last():
    one = ShardedBatches(21, 8, seed=3)
    halves = [ShardedBatches(21, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in one.batches] == [8, 8, 5]
    for full, a, b in zip(one.batches, *[h.batches for h in halves]):
        assert sorted(a + b) == sorted(full[:len(full) - len(full) % 2])
        assert len(a) == len(b)
