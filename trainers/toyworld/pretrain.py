"""Contrastive pre-training of the toy CLIP on the toy world's captions.

This is what makes the embedded default a *zero-shot* model: a tiny open_clip
`CLIP` (config `orch-toy-rn`: ModifiedResNet image tower, open_clip tokenizer) trained
with open_clip's `ClipLoss` on image–caption pairs over all styles (docs/toyworld.md,
'The toy CLIP' and 'Pre-training recipe'; captions with confused class pairs:
'Pre-training captions').

The checkpoint is cached under the user cache dir, keyed by a hash of the model
config, the recipe and the world, and built at most once (file lock).  To use both
cores it trains data-parallel over `world_size` CPU processes (gloo); the global
batch and the per-step maths are the same as one process on the full batch, except
that BatchNorm sees each process's half-batch.

Two choices for speed on 2 CPU cores, measured (batch 128, one thread): the token
embedding stays at its random initialisation (open_clip's 49408-word table is 70 % of
the parameters but only ~50 words occur; training it cost a dense 12.6 MB gradient,
its AdamW update and its all-reduce every step: 0.21 -> 0.18 s/step), and the image
tower runs channels-last (0.26 -> 0.21 s/step). The rest of the text tower (positional
embeddings, transformer, projection) trains, so captions still shape the text space.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss

from trainers.cache import atomic_path, cache_dir, file_lock, fingerprint
from trainers.models import _TOY_CONFIG, TOY_ARCH
from trainers.progress import Progress, progress_callback
from trainers.train_loop import warmup_cosine
from trainers.toyworld import world

PRETRAIN_VERSION = 1  # bump when the training code changes what a recipe produces


@dataclass(frozen=True)
class PretrainRecipe:
    """docs/toyworld.md, 'Pre-training recipe': AdamW lr 1e-3, wd 0.1, betas (0.9, 0.98),
    batch 128, 8 epochs, 200 warmup steps then cosine, learnable logit scale, no
    augmentation."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta2: float = 0.98
    warmup_steps: int = 200
    seed: int = 0


def checkpoint_key(recipe: PretrainRecipe, world_cfg: world.WorldConfig) -> str:
    model_cfg = json.loads(_TOY_CONFIG.read_text())
    return fingerprint({"model": model_cfg, "recipe": asdict(recipe),
                        "world": world_cfg.fingerprint(), "version": PRETRAIN_VERSION})


def toy_clip_checkpoint(recipe: PretrainRecipe = PretrainRecipe(),
                        world_cfg: world.WorldConfig = world.WorldConfig(),
                        root: Path | None = None, world_size: int | None = None,
                        progress: bool = True) -> Path:
    """Path of the pre-trained toy CLIP checkpoint; pre-trains it first if not cached."""
    root = root or cache_dir()
    final = root / "toy_clip" / f"{TOY_ARCH}-{checkpoint_key(recipe, world_cfg)}.pt"
    if final.is_file():
        return final
    with file_lock(final.with_suffix(".lock")):
        if final.is_file():  # another process built it while we waited
            return final
        workers = world_size or min(2, os.cpu_count() or 1)
        images, captions, _ = world.load_or_build_pretraining(
            world_cfg, root, workers=workers, progress=progress_callback("rendering toy-world pretraining set", progress))
        started = time.monotonic()
        with atomic_path(final, suffix=".pt") as tmp:
            stats = pretrain(images, captions, recipe, tmp, world_size=workers,
                             progress=progress)
        stats["seconds"] = round(time.monotonic() - started, 1)
        final.with_suffix(".json").write_text(json.dumps(
            {"recipe": asdict(recipe), "world": world_cfg.fingerprint(), **stats}, indent=2))
    return final


def pretrain(images: np.ndarray, captions: list[str], recipe: PretrainRecipe, out: Path,
             world_size: int = 1, progress: bool = True) -> dict:
    """Train a fresh toy CLIP, save its state dict to `out`, return stats (final loss,
    logit scale, steps). `images` uint8 (N, 32, 32, 3)."""
    tokenizer = open_clip.get_tokenizer(TOY_ARCH)
    tokens = tokenizer(captions)                                  # (N, context) int64
    pixels = torch.from_numpy(np.ascontiguousarray(images))       # (N, 32, 32, 3) uint8
    if world_size <= 1:
        return _train(0, 1, pixels, tokens, recipe, progress, None, out)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, pixels, tokens, recipe,
                                               progress and rank == 0, port, results, out),
                         daemon=True)  # never outlive the parent
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs) or results.empty():
        raise RuntimeError("toy CLIP pretraining failed in a worker process (see its log above)")
    return results.get()


def _worker(rank, world_size, pixels, tokens, recipe, progress, port, results, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # open_clip's gather and DDP's channels-last bucket views warn on every step; the
    # maths is unaffected, so keep the log readable.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Grad strides do not match")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        stats = _train(rank, world_size, pixels, tokens, recipe, progress, dist, out)
        if rank == 0:
            results.put(stats)  # plain numbers only: tensors would need this process alive
    finally:
        dist.destroy_process_group()


def _train(rank: int, world_size: int, pixels: torch.Tensor, tokens: torch.Tensor,
           recipe: PretrainRecipe, progress: bool, distributed, out: Path) -> dict:
    # One thread per process: two threads per process ran ~9x slower on 2 shared cores.
    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)                       # identical init on every rank
    model = open_clip.create_model(TOY_ARCH, pretrained=None)
    model.token_embedding.weight.requires_grad_(False)   # see the module docstring
    model = model.to(memory_format=torch.channels_last)
    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    loss_fn = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, betas=(0.9, recipe.beta2),
                                  weight_decay=recipe.weight_decay)
    steps_per_epoch = len(pixels) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps, total))
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    losses: list[float] = []
    with Progress(total, "pretraining toy CLIP", enabled=progress) as bar:
        for epoch in range(recipe.epochs):
            order = np.random.default_rng([recipe.seed, epoch]).permutation(len(pixels))
            for step in range(steps_per_epoch):
                batch = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
                mine = torch.from_numpy(batch[rank::world_size])   # this rank's share
                x = pixels[mine].permute(0, 3, 1, 2).float().div_(255)   # (b, 3, 32, 32)
                x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
                image_f, text_f, scale = net(x, tokens[mine])[:3]
                loss = loss_fn(image_f, text_f, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():  # as open_clip's trainer: keep s = exp(logit_scale) <= 100
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(loss.item())
                bar.update(1, loss=float(np.mean(losses[-50:])))
    stats = {"first_loss": losses[0], "final_loss": float(np.mean(losses[-steps_per_epoch:])),
             "logit_scale": float(model.logit_scale.detach().exp()), "steps": total,
             "world_size": world_size}
    if rank == 0:
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    return stats


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    # `python -m trainers.toyworld.pretrain`: build (or find) the cached toy CLIP and the
    # toy world's eval splits, with progress; instant when both are cached.
    import importlib

    from trainers.toyworld.benchmark import toy_benchmark

    # Call through the imported module, not this `__main__` copy of it: the spawned
    # pretraining workers must find `_worker` by its importable name.
    module = importlib.import_module("trainers.toyworld.pretrain")
    print(f"toy CLIP: {module.toy_clip_checkpoint()}")
    toy_benchmark(None, None, workers=min(2, os.cpu_count() or 1))
    print(f"toy world: {cache_dir() / 'world' / world.WorldConfig().fingerprint()}")
