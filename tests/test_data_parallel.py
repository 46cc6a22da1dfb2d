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
    import traceback
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=__import__("datetime").timedelta(seconds=120))
        state = fit(method)
        if rank == 0:
            out.put(("ok", {k: v.numpy() for k, v in state.items()}))
        dist.destroy_process_group()
    except BaseException:
        out.put(("error", f"rank {rank}: {traceback.format_exc()}"))


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
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, method, out), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        status, parallel = out.get(timeout=200)   # before join: a big result blocks its sender
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert status == "ok", parallel
    for key, value in single.items():
        np.testing.assert_allclose(parallel[key], value.numpy(), rtol=1e-4, atol=2e-5, err_msg=key)


def test_shards_partition_each_global_batch_and_trim_the_last():
    one = ShardedBatches(21, 8, seed=3)
    halves = [ShardedBatches(21, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in one.batches] == [8, 8, 5]
    for full, a, b in zip(one.batches, *[h.batches for h in halves]):
        assert sorted(a + b) == sorted(full[:len(full) - len(full) % 2])
        assert len(a) == len(b)


@pytest.mark.timeout(400)
def test_a_sweep_trial_on_two_ray_train_workers_matches_one_worker(image_task, ray_local, tmp_path):
    """`resources.workers_per_trial: 2` runs each training trial on a Ray Train
    TorchTrainer (gloo on CPU) inside its Tune trial: FLYP (its features gathered across
    the workers) ends where the same fit on one worker ends. (FT's case is the test
    above: Ray Train starts a process group, the loop does the rest.)"""
    import json

    import yaml
    from click.testing import CliRunner

    from conftest import image_task_spec
    from orchestrator.build import load_assets
    from orchestrator.cli import main
    from orchestrator.spec import parse_spec
    tiny = {"epochs": 2, "batch_size": 8, "warmup_steps": 1}
    spec = image_task_spec(
        image_task, name="dp", storage_path=str(tmp_path / "runs"), method=None, grid=None,
        ensemble=None, ensembles=[],
        methods=[{"name": "flyp", "lr": 1e-4, **tiny}],
        # no random crops: both fits must see the same pixels
        model={**image_task_spec(image_task)["model"], "augment": False},
        resources={"cpus_per_trial": 0.5, "workers_per_trial": 2, "max_concurrent_trials": 1})
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["sweep", str(path)],
                                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert result.exit_code == 0, result.output
    parallel = {}
    for record in (tmp_path / "runs").glob("*/trials/*.json"):
        trial = json.loads(record.read_text())
        parallel[trial["trial"]] = torch.load(trial["model"], weights_only=True)["classifier"]
    # the same fits, one worker, in this process
    one_worker = parse_spec(spec)
    assets = load_assets(one_worker, torch.device("cpu"))
    for point in one_worker.trials():
        method = get_method(point.method)
        torch.set_num_threads(1)
        one = method.fit(assets.start, point.options,
                         FitContext(assets.bench.train, torch.device("cpu"), point.seed,
                                    Hooks(progress=False))).classifier.state_dict()
        two = parallel[point.name]
        for key, value in one.items():
            other = two[key]
            if key.endswith("attn.in_proj_bias"):
                # The key bias shifts every attention logit of a query alike, so softmax
                # cancels it: its gradient is round-off, which AdamW divides by its own
                # size. Compare the query and value biases, which do act.
                third = value.shape[0] // 3
                value = torch.cat([value[:third], value[2 * third:]])
                other = torch.cat([other[:third], other[2 * third:]])
            assert torch.allclose(other, value, rtol=1e-4, atol=2e-5), (point.name, key)
