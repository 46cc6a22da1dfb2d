"""Data-parallel training: two gloo workers take the steps one worker takes on the whole
batch (FT's cross-entropy, and FLYP's contrastive loss with features gathered across
workers, so every sample of the global batch is a negative).

What is compared, and why it holds on any CPU:
- the gradient of the first step: both runs start from the same weights, so the mean of
  the workers' shard gradients must be the full-batch gradient up to float32 summation
  order (a relative error near 1e-6; a missing gather or a wrong average is off by > 10 %);
- the loss of every epoch, a smooth function of the weights;
- the weights after every step when the steps are plain SGD, whose update is lr x the
  gradient, so a rounding difference in a gradient moves a weight by rounding x lr.
Weights after AdamW steps are not compared tightly: AdamW divides each update by the
gradient's own running size, so a weight whose gradient is near zero (all round-off) moves
by up to ~lr a step whatever the rounding, and two runs may differ there by that much on
another machine's arithmetic. For those the test asserts that bound, derived below.
"""
from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.data import ArrayImageDataset
from trainers.methods import FitContext, StartPoint, get_method
from trainers.models import TOY_ARCH, load_clip, zero_shot_classifier
from trainers.train_loop import Hooks, ShardedBatches, warmup_cosine

pytestmark = pytest.mark.timeout(300)
CLASSES = ("circle", "square", "ring", "star")
TEMPLATES = ("a photo of a {}", "a {}")
OPTIONS = {"ft": {"lr": 1e-3, "epochs": 2, "batch_size": 8, "warmup_steps": 1},
           "flyp": {"lr": 1e-4, "epochs": 2, "batch_size": 8, "warmup_steps": 1}}
# Relative error allowed between two float32 computations of one gradient or weight
# change that differ only in summation order: ~1e-6 is typical, a bug is > 1e-1.
REL = 1e-3


class _RecordingSGD(torch.optim.SGD):
    """Plain SGD in AdamW's place (same call), keeping the gradients of its first step."""

    first_gradients: list[torch.Tensor] | None = None

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(list(params), lr=lr, weight_decay=weight_decay)

    def step(self, closure=None):
        if _RecordingSGD.first_gradients is None:
            _RecordingSGD.first_gradients = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for group in self.param_groups for p in group["params"]]
        return super().step(closure)


@contextmanager
def _plain_sgd():
    _RecordingSGD.first_gradients = None
    with mock.patch.object(torch.optim, "AdamW", _RecordingSGD):
        yield


def fit(method: str) -> dict:
    """One fit with SGD steps: its first gradients, epoch losses and final weights."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    clip = load_clip(TOY_ARCH, None, augment=False)
    start = StartPoint(clip, zero_shot_classifier(clip, CLASSES, TEMPLATES), CLASSES, TEMPLATES)
    rng = np.random.default_rng(0)
    data = ArrayImageDataset(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                             np.arange(20) % 4, clip.eval_transform)
    m = get_method(method)
    losses = []
    hooks = Hooks(progress=False, on_epoch_end=lambda e, metrics, s: losses.append(
        metrics["train_loss"]))
    with _plain_sgd():
        fitted = m.fit(start, m.options(**OPTIONS[method]),
                       FitContext(data, torch.device("cpu"), 0, hooks))
        grads = _RecordingSGD.first_gradients
    return {"gradients": [g.numpy() for g in grads], "losses": losses,
            "start": {k: v.numpy() for k, v in start.zero_shot.state_dict().items()},
            "weights": {k: v.clone().numpy()
                        for k, v in fitted.classifier.state_dict().items()}}


def assert_close_in_norm(other: np.ndarray, ref: np.ndarray, scale: float, what: str) -> None:
    """|other - ref| <= REL * (|ref| + scale) in L2 norm: `scale` (the norm of the whole
    model's gradient or change) absorbs tensors whose own value is all round-off."""
    error = float(np.linalg.norm(other.astype(np.float64) - ref))
    bound = REL * (float(np.linalg.norm(ref)) + scale)
    assert error <= bound, f"{what}: off by {error:.3g} in L2 norm (allowed {bound:.3g})"


def _worker(rank: int, world_size: int, port: int, method: str, out) -> None:
    import traceback
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=__import__("datetime").timedelta(seconds=120))
        result = fit(method)
        if rank == 0:
            out.put(("ok", result))
        dist.destroy_process_group()
    except BaseException:
        out.put(("error", f"rank {rank}: {traceback.format_exc()}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e                    # two spawned gloo worker processes
@pytest.mark.parametrize("method", ["ft", "flyp"])
def test_two_workers_take_the_steps_one_worker_takes(method):
    single = fit(method)
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

    # 1. The first step's gradient, from identical weights.
    grads, other = single["gradients"], parallel["gradients"]
    assert len(grads) == len(other)
    total = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)))
    assert total > 0
    for i, (g, h) in enumerate(zip(grads, other)):
        assert g.shape == h.shape
        assert_close_in_norm(h, g, total, f"gradient of parameter {i} {g.shape}")
    # 2. The loss of every epoch.
    np.testing.assert_allclose(parallel["losses"], single["losses"], rtol=REL)
    # 3. Every SGD step: the change of each tensor from the start.
    start = single["start"]
    changes = {k: v.astype(np.float64) - start[k] for k, v in single["weights"].items()}
    moved = float(np.sqrt(sum(float(np.sum(c ** 2)) for c in changes.values())))
    assert moved > 0                                                  # it trained
    for key, change in changes.items():
        assert_close_in_norm(parallel["weights"][key] - start[key], change, moved, key)


def test_a_changed_gradient_fails_the_comparison():
    """The comparison is not too loose to see a data-parallel bug: half a gradient (an
    average divided by the world size twice) or the gradient of half the batch fails."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(64, 32)).astype(np.float32)
    assert_close_in_norm(g * (1 + 1e-6), g, float(np.linalg.norm(g)), "rounding")
    for wrong in (g / 2, g + rng.normal(scale=0.3, size=g.shape).astype(np.float32)):
        with pytest.raises(AssertionError):
            assert_close_in_norm(wrong, g, float(np.linalg.norm(g)), "bug")


def test_shards_partition_each_global_batch_and_trim_the_last():
    one = ShardedBatches(21, 8, seed=3)
    halves = [ShardedBatches(21, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in one.batches] == [8, 8, 5]
    for full, a, b in zip(one.batches, *[h.batches for h in halves]):
        assert sorted(a + b) == sorted(full[:len(full) - len(full) % 2])
        assert len(a) == len(b)


def adamw_step_bound(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The most one bias-corrected AdamW update |m_hat / sqrt(v_hat)| can be within the
    first `steps` steps, for any gradients (eps only makes it smaller). With
    m_hat = sum_i a_i g_i and v_hat = sum_i b_i g_i^2, Cauchy-Schwarz gives
    |m_hat| <= sqrt(sum_i a_i^2 / b_i) * sqrt(v_hat)."""
    worst = 0.0
    for t in range(1, steps + 1):
        a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t) for i in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t) for i in range(1, t + 1)]
        worst = max(worst, math.sqrt(sum(x * x / y for x, y in zip(a, b))))
    return worst


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_sweep_trial_on_two_ray_train_workers_matches_one_worker(image_task, ray_local, tmp_path):
    """`resources.workers_per_trial: 2` runs each training trial on a Ray Train
    TorchTrainer (gloo on CPU) inside its Tune trial: FLYP (its features gathered across
    the workers) ends where the same fit on one worker ends. The sweep takes AdamW steps,
    so: the epoch losses match; each tensor's change from the start matches in norm; and
    no single weight is further off than two runs of AdamW can drift apart on round-off
    gradients (2 x the bound on one update x the sum of the step sizes)."""
    import json

    import yaml
    from click.testing import CliRunner

    from conftest import image_task_spec
    from orchestrator.assets.loaded import load_assets
    from orchestrator.cli import main
    from orchestrator.plan import Plan
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
        parallel[trial["trial"]] = (trial["history"],
                                    torch.load(trial["model"], weights_only=True)["classifier"])
    # the same fits, one worker, in this process
    one_worker = parse_spec(spec)
    assets = load_assets(one_worker, torch.device("cpu"))
    start = assets.start.zero_shot.state_dict()
    for point in Plan(one_worker).trials:
        method = get_method(point.method_name)
        torch.set_num_threads(1)
        losses = []
        hooks = Hooks(progress=False, on_epoch_end=lambda e, metrics, s: losses.append(
            metrics["train_loss"]))
        one = method.fit(assets.start, point.options,
                         FitContext(assets.bench.train, torch.device("cpu"), point.seed,
                                    hooks)).classifier.state_dict()
        history, two = parallel[point.name]
        np.testing.assert_allclose([row["train_loss"] for row in history], losses, rtol=REL)

        steps_per_epoch = len(ShardedBatches(len(assets.bench.train), point.options.batch_size, 0))
        total = steps_per_epoch * point.options.epochs
        step_sizes = [point.options.lr * warmup_cosine(s, point.options.warmup_steps, total)
                      for s in range(total)]
        decay = point.options.weight_decay
        for key, value in one.items():
            if not value.is_floating_point():
                continue
            change = value.double() - start[key].double()
            other = two[key].double() - start[key].double()
            largest = float(torch.maximum(value.abs(), two[key].abs()).max())
            drift = 2 * sum(step_sizes) * (adamw_step_bound(total) + decay * largest)
            assert float((other - change).abs().max()) <= drift, (point.name, key)
            if key.endswith("attn.in_proj_bias"):
                # The key bias shifts every attention logit of a query alike, so softmax
                # cancels it: its gradient is round-off, which AdamW divides by its own
                # size. Compare the query and value biases, which do act.
                third = change.shape[0] // 3
                change = torch.cat([change[:third], change[2 * third:]])
                other = torch.cat([other[:third], other[2 * third:]])
            # In norm: within 5 % of the tensor's change, besides up to 9 weights that
            # drifted by the whole bound (a lost gather or shard is off by far more).
            error = float(torch.linalg.vector_norm(other - change))
            assert error <= 0.05 * float(torch.linalg.vector_norm(change)) + 3 * drift, \
                (point.name, key, error)
