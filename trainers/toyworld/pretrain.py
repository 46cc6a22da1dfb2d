"""Contrastive pre-training of the toy CLIP on the toy world's captions, and the
pre-trained weights that ship with orch.

This is what makes the embedded default a *zero-shot* model: a tiny open_clip
`CLIP` (config `orch-toy-rn`: ModifiedResNet image tower, open_clip tokenizer) trained
with open_clip's `ClipLoss` on image–caption pairs over all styles (docs/toyworld.md,
'The toy CLIP' and 'Pre-training recipe'; captions with confused class pairs:
'Pre-training captions').

Shipped weights. Pre-training takes 5-9 minutes on 2 cores and is not bit-reproducible
across machines (CPU kernels differ: even `torch.randn` for the initialisation gives other
bits under AVX2 than under the default kernels), so each machine used to get its own
zero-shot model. Instead the repository ships the weights of one pre-training run as a
compact file beside this module (`SHIPPED_WEIGHTS`, ~5.8 MB), and `toy_clip_checkpoint()`
expands it into a full open_clip state dict in the cache (well under a second), byte for
byte the same on every machine. Pre-training runs only when asked (`rebuild=True`,
`make toy-clip`, which also rewrites the compact file) or when the shipped file was made
for another model config, recipe or world than the one requested.

Why the compact file holds only some rows of the token embedding: that table is
49408 x 64 floats (12.6 MB, 70 % of the parameters), pre-training keeps it frozen at its
random initialisation (below), and only the rows of the ~50 token ids that occur in the
pre-training captions and the zero-shot prompts ever enter a computation. So the file
keeps every other tensor in float32 plus just those rows (`token_ids`, `token_rows`);
expansion fills the other rows from a fixed seed (`_filler_rows`) and writes the shipped
rows over them. For any input made of known tokens the expanded model computes exactly
what the pre-trained model did; the filler rows only stand in for words the toy world
never uses (they were random and untrained in the original as well). The filler is made
from integers (PCG64 words, a sum of 12 uniforms: mean 0, std 0.02 as open_clip's
`normal_(std=0.02)`, within +-6 std) so that it is bit-identical on every platform, which
`torch.randn` is not.

The locally pre-trained checkpoint is cached under the user cache dir, keyed by a hash
of the model config, the recipe and the world, and built at most once (file lock).  To
use both cores it trains data-parallel over `world_size` CPU processes (gloo); the
global batch and the per-step maths are the same as one process on the full batch,
except that BatchNorm sees each process's half-batch.

Two choices for speed on 2 CPU cores, measured (batch 128, one thread): the token
embedding stays at its random initialisation (open_clip's 49408-word table is 70 % of
the parameters but only ~50 words occur; training it cost a dense 12.6 MB gradient,
its AdamW update and its all-reduce every step: 0.21 -> 0.18 s/step), and the image
tower runs channels-last (0.26 -> 0.21 s/step). The rest of the text tower (positional
embeddings, transformer, projection) trains, so captions still shape the text space.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import socket
import tempfile
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
from trainers.models import TOY_ARCH, TOY_CONFIG
from trainers.progress import Progress, progress_callback
from trainers.train_loop import warmup_cosine
from trainers.toyworld import world
from trainers.toyworld.benchmark import TEMPLATES, toy_benchmark

PRETRAIN_VERSION = 1  # bump when the training code changes what a recipe produces

# The compact pre-trained weights in the repository (module docstring, 'Shipped weights').
SHIPPED_WEIGHTS = Path(__file__).with_name(f"{TOY_ARCH}-weights.pt")
SHIPPED_FORMAT = 1      # bump when the compact layout or the expansion changes
_EMBEDDING = "token_embedding.weight"
_FILLER_SEED = 0        # PCG64 seed of the token-embedding rows that are not shipped
_FILLER_STD = 0.02      # open_clip's init std of the token embedding (TextTransformer)
_FILE_MODE = 0o644      # mkstemp makes 0600 files; caches may be shared


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
    model_cfg = json.loads(TOY_CONFIG.read_text())
    return fingerprint({"model": model_cfg, "recipe": asdict(recipe),
                        "world": world_cfg.fingerprint(), "version": PRETRAIN_VERSION})


def toy_clip_checkpoint(recipe: PretrainRecipe = PretrainRecipe(),
                        world_cfg: world.WorldConfig = world.WorldConfig(),
                        root: Path | None = None, world_size: int | None = None,
                        progress: bool = True, *, rebuild: bool = False) -> Path:
    """Path of the pre-trained toy CLIP checkpoint (a full open_clip state dict file).

    When the shipped weights (`SHIPPED_WEIGHTS`) were made for this model config, recipe
    and world, it is their expansion, written to the cache once (byte-identical on every
    machine). Otherwise the checkpoint is pre-trained on this machine, once, and cached.
    `rebuild=True` pre-trains from scratch on this machine whatever is shipped or cached
    (and replaces the cached local build), as `make toy-clip` does.
    """
    root = root or cache_dir()
    key = checkpoint_key(recipe, world_cfg)
    if not rebuild:
        shipped = _shipped_header(SHIPPED_WEIGHTS)
        if shipped is not None and shipped["key"] == key:
            return _expanded_checkpoint(SHIPPED_WEIGHTS, shipped, root)
        if (shipped is not None and recipe == PretrainRecipe()
                and world_cfg == world.WorldConfig()):
            warnings.warn(f"{SHIPPED_WEIGHTS.name} was made for another model config, recipe or "
                          f"world (key {shipped['key']}, now {key}): the toy CLIP is pre-trained "
                          f"on this machine instead; `make toy-clip` refreshes the shipped file",
                          stacklevel=2)
    final = root / "toy_clip" / f"{TOY_ARCH}-{key}.pt"
    if final.is_file() and not rebuild:
        return final
    with file_lock(final.with_suffix(".lock")):
        if final.is_file() and not rebuild:  # another process built it while we waited
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


# ---------------------------------------------------------------------------------------
# Shipped weights: compact file <-> full checkpoint (module docstring, 'Shipped weights')
# ---------------------------------------------------------------------------------------


def known_token_ids(world_cfg: world.WorldConfig = world.WorldConfig(),
                    templates: tuple[str, ...] | None = None) -> torch.Tensor:
    """Sorted int64 ids of every token the toy world feeds the text tower: its pre-training
    captions, its prompts (`TEMPLATES` x `CLASSNAMES`), each caption word alone, and the
    tokenizer's start, end and padding tokens. Generating (without pixels) and tokenizing
    the 48,000 captions takes ~10 s."""
    tokenizer = open_clip.get_tokenizer(TOY_ARCH)
    captions, _, _ = world.pretraining_captions(world_cfg)
    prompts = [t.format(c) for c in world.CLASSNAMES for t in (templates or TEMPLATES)]
    texts = sorted(set(captions)) + prompts + list(world.CAPTION_WORDS)
    return torch.unique(tokenizer(texts))                   # sorted; includes pad (0), SOT, EOT


def write_shipped_weights(checkpoint: Path, key: str, out: Path | None = None,
                          token_ids: torch.Tensor | None = None,
                          stats: dict | None = None) -> dict:
    """Write the compact file `out` (default `SHIPPED_WEIGHTS`) from a full toy CLIP
    `checkpoint` pre-trained for `key` (`checkpoint_key`): every tensor but the token
    embedding, plus that table's rows at `token_ids` (default `known_token_ids()`).
    Checks that its expansion gives back every tensor of `checkpoint` and the shipped rows
    bit for bit, records the sha256 of the source and of the expansion, and returns the
    file's metadata."""
    source = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ids = (known_token_ids() if token_ids is None else token_ids).to(torch.int64).unique()
    table = source[_EMBEDDING]
    compact = {
        "format": SHIPPED_FORMAT, "arch": TOY_ARCH, "key": key,
        "source_sha256": _sha256(checkpoint),
        "names": list(source),                                 # state-dict order, kept on expansion
        "tensors": {k: v.contiguous().clone() for k, v in source.items() if k != _EMBEDDING},
        "vocab_size": table.shape[0],
        "token_ids": ids, "token_rows": table[ids].clone(),
        "filler": {"seed": _FILLER_SEED, "std": _FILLER_STD},
        "stats": dict(stats or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        expanded = Path(tmp) / "expanded.pt"
        _save(_expand(compact), expanded)
        compact["expanded_sha256"] = _sha256(expanded)
        full = torch.load(expanded, map_location="cpu", weights_only=True)
    if list(full) != list(source):
        raise AssertionError("expanding the compact toy CLIP changes the state dict's keys")
    for name, tensor in source.items():
        same = (torch.equal(full[name][ids], tensor[ids]) if name == _EMBEDDING
                else torch.equal(full[name], tensor))
        if not (same and full[name].dtype == tensor.dtype and full[name].shape == tensor.shape):
            raise AssertionError(f"expanding the compact toy CLIP changes {name}")
    out = out or SHIPPED_WEIGHTS
    with atomic_path(out, suffix=".pt") as tmp_out:
        _save(compact, tmp_out)
        os.chmod(tmp_out, _FILE_MODE)
    return {k: v for k, v in compact.items() if k not in ("tensors", "token_rows")}


def expand_shipped_weights(shipped: Path, out: Path) -> None:
    """Write the full open_clip state dict of the compact file `shipped` to `out`."""
    _save(_expand(torch.load(shipped, map_location="cpu", weights_only=True)), out)


def _expand(compact: dict) -> dict[str, torch.Tensor]:
    if compact.get("format") != SHIPPED_FORMAT:
        raise ValueError(f"compact toy CLIP weights of format {compact.get('format')!r}; "
                         f"this orch reads format {SHIPPED_FORMAT}")
    rows = compact["token_rows"]
    table = _filler_rows(compact["vocab_size"], rows.shape[1], **compact["filler"])
    table[compact["token_ids"]] = rows
    return {name: table if name == _EMBEDDING else compact["tensors"][name]
            for name in compact["names"]}


def _filler_rows(vocab: int, width: int, seed: int, std: float) -> torch.Tensor:
    """(vocab, width) float32, mean 0 and std `std` (open_clip's init of the table), the
    same bits on every platform: each value is a sum of 12 uniform 32-bit integers from
    PCG64's raw stream (integer maths), scaled by exact float64 operations to
    `std * (U1 + ... + U12 - 6)`. Only integer and correctly rounded float operations, so
    no libm or SIMD kernel can change a bit (`torch.randn` does: AVX2 vs default)."""
    words = np.random.PCG64(seed)
    total = np.zeros(vocab * width, dtype=np.uint64)
    low = np.uint64(0xFFFFFFFF)
    for _ in range(6):                                   # 2 uniforms per 64-bit word
        raw = words.random_raw(vocab * width)
        total += raw >> np.uint64(32)
        total += raw & low
    values = ((total.astype(np.float64) + 6.0) / 2.0**32 - 6.0) * std   # exact, then one rounding
    return torch.from_numpy(values.astype(np.float32)).reshape(vocab, width)


@functools.lru_cache(maxsize=8)
def _shipped_header_cached(path: str, mtime_ns: int, size: int) -> dict:
    compact = torch.load(path, map_location="cpu", weights_only=True)
    return {"key": compact["key"], "format": compact["format"],
            "expanded_sha256": compact.get("expanded_sha256"), "sha256": _sha256(Path(path))}


def _shipped_header(path: Path) -> dict | None:
    """Key, format and digests of a compact weights file (memoised); None if it is absent
    or of another format."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    header = _shipped_header_cached(str(path), st.st_mtime_ns, st.st_size)
    return header if header["format"] == SHIPPED_FORMAT else None


def _expanded_checkpoint(shipped: Path, header: dict, root: Path) -> Path:
    """The cached expansion of `shipped`, written once. Named by the key and the compact
    file's own digest, so a new shipped file never reuses an old expansion (nor a locally
    pre-trained checkpoint)."""
    final = root / "toy_clip" / f"{TOY_ARCH}-{header['key']}-shipped-{header['sha256'][:12]}.pt"
    if final.is_file():
        return final
    with file_lock(final.with_suffix(".lock")):
        if final.is_file():
            return final
        with atomic_path(final, suffix=".pt") as tmp:
            expand_shipped_weights(shipped, tmp)
            os.chmod(tmp, _FILE_MODE)
            digest = _sha256(tmp)
        if header["expanded_sha256"] and digest != header["expanded_sha256"]:
            warnings.warn(
                f"expanding {shipped.name} gave a file with sha256 {digest[:16]}…, not the "
                f"{header['expanded_sha256'][:16]}… recorded in it: the tensors are checked "
                f"equal on write, so this torch likely serialises differently", stacklevel=3)
    return final


def _save(obj, path: Path) -> None:
    """torch.save through a file handle: saved by path, the zip's inner folder is named
    after the file (a random temporary name here), which would change the bytes."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        _save({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    return stats


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    """`python -m trainers.toyworld.pretrain`: find the toy CLIP (expanding the shipped
    weights: a second) and build the toy world's eval splits if missing, with progress.
    `--rebuild` (`make toy-clip`): pre-train the toy CLIP from scratch on this machine
    and rewrite the shipped weights file from it."""
    parser = argparse.ArgumentParser(prog="python -m trainers.toyworld.pretrain",
                                     description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true",
                        help=f"pre-train from scratch and rewrite {SHIPPED_WEIGHTS}")
    args = parser.parse_args(argv)
    if args.rebuild:
        key = checkpoint_key(PretrainRecipe(), world.WorldConfig())
        checkpoint = toy_clip_checkpoint(rebuild=True)
        stats_file = checkpoint.with_suffix(".json")
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        meta = write_shipped_weights(checkpoint, key, stats=stats)
        print(f"toy CLIP: pre-trained {checkpoint} (sha256 {meta['source_sha256'][:16]}…)")
        print(f"shipped weights: {SHIPPED_WEIGHTS} ({SHIPPED_WEIGHTS.stat().st_size / 1e6:.1f} MB, "
              f"{len(meta['token_ids'])} token-embedding rows); commit it")
        return
    print(f"toy CLIP: {toy_clip_checkpoint()}")
    toy_benchmark(None, None, workers=min(2, os.cpu_count() or 1))
    print(f"toy world: {cache_dir() / 'world' / world.WorldConfig().fingerprint()}")


if __name__ == "__main__":
    # Call through the imported module, not this `__main__` copy of it: the spawned
    # pretraining workers must find `_worker` by its importable name.
    import importlib

    importlib.import_module("trainers.toyworld.pretrain").main()
