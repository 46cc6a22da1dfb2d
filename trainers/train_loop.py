"""The one training loop every fine-tuning method uses.

A method supplies a *task* (the model it trains, the parameters to update, the
loss of one batch, and how to put the model in training mode); the loop owns the
rest, top to bottom: seeded shuffling, loader processes, AdamW, warmup + cosine stepped per iteration,
mixed precision on GPU, gradient clipping after unscaling, a finite-loss check,
and a checkpoint hook at the end of every epoch that can resume bit-for-bit
(the shuffle order depends only on (seed, epoch), a sample's augmentation only on
(seed, epoch, index); a task's own state, such as an EMA teacher or a random-number
generator, rides along in the checkpoint).

Optional task methods: `after_step(step, total_steps)` runs after each optimizer
step (CaRot's EMA teacher), `extra_state()` / `load_extra_state(state)` save and
restore what the task keeps besides `task.model`, and `classifier()` gives the model as
evaluation would see it now (images -> logits), which `Hooks.validate` measures after
every epoch of the main phase (early stopping reads it).

Data-parallel: when a torch.distributed process group is up (Ray Train's TorchTrainer
starts one), every worker walks the same seeded global batches and takes its share of
each (positions rank, rank + world, ...); gradients are averaged across workers before
clipping, so N workers take the same steps as one worker on the whole batch. The last
global batch of an epoch is cut to a multiple of the world size (contrastive losses
gather equal shards from every worker).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers.progress import Progress


MAIN_PHASE = "train"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops instead of writing a broken model."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warmup + cosine to 0 (docs/methods.md, "Shared pieces")."""

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    seed: int = 0


class Task(Protocol):
    model: nn.Module

    def trainable_parameters(self) -> Iterable[nn.Parameter]: ...

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def train_mode(self) -> None: ...


@dataclass
class Hooks:
    """How the loop talks to whoever runs it (a notebook, a Ray Tune trial)."""

    # called after each epoch with (epoch, metrics, checkpoint_state)
    on_epoch_end: Callable[[int, dict, dict], None] | None = None
    resume_state: dict | None = None        # a checkpoint_state from a previous run
    progress: bool = True
    # Loader processes that decode and transform training images (train_loader)
    num_workers: int = 0
    # Methods with several training phases (LP-FT) name each; the name is stored in every
    # checkpoint so a resumed run knows which phase it stopped in. The last (or only)
    # phase is MAIN_PHASE: its losses are the trial's loss curve, the others' are prefixed.
    phase: str = MAIN_PHASE
    # Measures a classifier (images -> logits), e.g. {"val_acc": ...}: called after each
    # epoch of the main phase with `task.classifier()` (tasks without one are not
    # measured); its metrics join the epoch's, with `epochs_done` (main-phase epochs).
    validate: Callable[[nn.Module], dict[str, float]] | None = None

    def for_phase(self, phase: str, resume_state: dict | None) -> "Hooks":
        return dataclasses.replace(self, phase=phase, resume_state=resume_state)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group this process is in; (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedBatches(Sampler[list[int]]):
    """One epoch's global batches (a permutation seeded by (seed, epoch), cut into
    `batch_size` pieces), each reduced to this worker's share."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        if world_size > 1:
            batches = [b[:len(b) - len(b) % world_size] for b in batches]
            batches = [b for b in batches if b]
        self.batches = [b[rank::world_size] for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


_MASK64 = 2**64 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random state one sample's augmentation draws from: a function of (seed, epoch,
    index) only, so which loader process decodes it, how many there are and where a
    resumed run restarts change nothing. torch's CPU generator keeps only the low 32 bits
    of a seed, so the triple is mixed (splitmix64's finaliser) before it is cut to 32."""
    x = ((seed * 100_003 + epoch) * 2**32 + index) & _MASK64
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0xFFFFFFFF


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """`ShardedBatches` for every epoch of one run: `set_epoch(e)` picks the epoch, and
    each index travels with its sample seed, so one persistent loader serves all epochs."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        self.batches = ShardedBatches(self.n, self.batch_size, self.seed * 100_003 + epoch,
                                      self.rank, self.world_size).batches

    def __iter__(self):
        for batch in self.batches:
            yield [(sample_seed(self.seed, self.epoch, i), i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class SeededSamples(Dataset):
    """Reads `dataset[index]` for a (sample seed, index) key with torch's random state set
    to the seed (random crops and flips draw from it) and restored after, so the
    training process's own random state is untouched."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


# Batches each loader process keeps ready (PyTorch's default is 2): enough to ride out a
# slow JPEG without holding much memory (4 x batch x 3 x 224 x 224 floats per process).
PREFETCH_BATCHES = 4


def train_loader(dataset: Dataset, batches: EpochBatches, num_workers: int,
                 device: torch.device) -> DataLoader:
    """The loader of a whole run: `num_workers` processes decode and transform images
    while the model trains, kept alive across epochs (no re-fork per epoch); pinned
    memory on a GPU so copies overlap compute."""
    extra = ({"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES}
             if num_workers > 0 else {})
    return DataLoader(SeededSamples(dataset), batch_sampler=batches, num_workers=num_workers,
                      pin_memory=device.type == "cuda", **extra)


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Mean of every gradient over the workers, in one flat all-reduce. A parameter that
    got no gradient on any worker keeps none, so the optimiser skips it (weight decay
    included) exactly as one worker would."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has)
    params = [p for p, count in zip(params, has.tolist()) if count > 0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # full precision on CPU: no bf16 units on our machines, and exact tests
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train(task: Task, dataset: Dataset, cfg: OptimConfig, device: torch.device,
          hooks: Hooks | None = None) -> None:
    """Train `task.model` in place; each epoch's metrics go to `hooks.on_epoch_end`."""
    hooks = hooks or Hooks()
    rank, world_size = world()
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(ShardedBatches(len(dataset), cfg.batch_size, 0, 0, world_size))
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps))
    amp_dtype = _autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    start_epoch = 0
    if hooks.resume_state is not None:
        state = hooks.resume_state
        if state.get("phase", hooks.phase) != hooks.phase:
            raise ValueError(f"checkpoint is from phase {state['phase']!r}, not {hooks.phase!r}")
        task.model.load_state_dict(state["model"])
        if "task" in state:
            task.load_extra_state(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1

    after_step = getattr(task, "after_step", None)
    batches = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, rank, world_size)
    loader = train_loader(dataset, batches, hooks.num_workers, device)
    with Progress((cfg.epochs - start_epoch) * steps_per_epoch, hooks.phase,
                  enabled=hooks.progress) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            task.train_mode()
            batches.set_epoch(epoch)
            loss_sum, seen = 0.0, 0
            for step, (images, labels) in enumerate(loader):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    loss = task.loss(images, labels)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at epoch {epoch}, step {step}: training stopped; "
                        f"try a lower learning rate (lr={cfg.lr})")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if world_size > 1:
                    _average_gradients(params, world_size)
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if after_step is not None:
                    after_step(epoch * steps_per_epoch + step, total_steps)
                loss_sum += loss.item() * len(labels)
                seen += len(labels)
                bar.update(1, loss=loss.item())
            if world_size > 1:  # the epoch's loss over every worker's samples
                totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64,
                                      device=params[0].device)  # NCCL reduces GPU tensors only
                dist.all_reduce(totals)
                loss_sum, seen = float(totals[0]), int(totals[1])
            metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                       "lr": scheduler.get_last_lr()[0]}
            classifier = getattr(task, "classifier", None)
            if hooks.validate is not None and hooks.phase == MAIN_PHASE and classifier:
                model = classifier()
                if model is not None:
                    metrics.update(hooks.validate(model), epochs_done=epoch + 1)
            if hooks.on_epoch_end is not None:
                state = {"model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch, "phase": hooks.phase}
                if hasattr(task, "extra_state"):
                    state["task"] = task.extra_state()
                hooks.on_epoch_end(epoch, metrics, state)
    # The last step's gradients would live on with the trained model (a whole model's
    # size: 0.6 GB for a ViT-B-32 CLIP), while the method builds its result.
    optimizer.zero_grad(set_to_none=True)
