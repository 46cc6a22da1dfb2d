"""Benchmark: orch's training step and feature encoding vs. a plain open_clip loop, on a GPU.

Per model (ViT-B/16 and ViT-B/32 at random init, `pretrained=None`: no download), on
synthetic tensors (the input pipeline is measured elsewhere), side by side in one run:

  training, images/s over the steps after the warm-up:
    orch FT      `trainers.train_loop.train` with FT's task (`FTTask`: image tower + a
                 1,000-class head, cross-entropy, clipping at 1.0), bf16 autocast as the
                 loop does; the batches come through the loop's own DataLoader from an
                 in-memory dataset of float tensors (collate, pin, copy: the loop's cost,
                 no decoding), `--num-workers` workers (0: a sweep's default);
    orch FLYP    the same loop with FLYP's task (both towers, one caption per image,
                 symmetric contrastive loss, no clipping);
    ... + ckpt   the same with `grad_checkpointing: true` (activation checkpointing);
    plain CE     the same model and weights, one batch already on the GPU, AdamW,
                 `torch.autocast(bfloat16)`, cross-entropy, clipping at 1.0: eager and
                 `torch.compile`d;
    plain contr. the same CLIP, the same captions, CLIP's contrastive loss: eager and
                 compiled;
  encoding, images/s, no gradients:
    orch         `trainers.evaluate.encode_batch(classifier, batch, device, "bf16")`
                 (features and logits, back on the CPU as float32);
    plain        `clip.encode_image(batch)` under bf16 autocast, left on the GPU.
Ratios are orch / plain eager (training) and orch / plain (encoding). On a GPU the peak
memory of each training row is printed too.

Reference, one H100, plain loop, bf16 (img/s): ViT-B/16 encode 6,649, CE step 2,235
eager / 3,319 compiled, contrastive 1,740; ViT-B/32 21,859 / 5,661 / 8,721 / 3,560.

Without a GPU it says so in one line and exits 0. `--device cpu --tiny` runs the same
code on the CPU with a tiny ViT CLIP and a tiny batch (float32, as the loop trains on a
CPU), to show the script works before anyone has a GPU; its figures mean nothing for GPUs.
Usage:
  .venv/bin/python bench/gpu.py [--archs ViT-B-16,ViT-B-32] [--batch 512] [--steps 20]
      [--warmup 5] [--encode-batch 512] [--num-workers 0] [--no-compile]
      [--no-checkpointing] [--device cuda|cpu] [--tiny] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.evaluate import encode_batch  # noqa: E402
from trainers.methods._common import optim_config, set_grad_checkpointing  # noqa: E402
from trainers.methods.flyp import FLYPOptions, FLYPTask  # noqa: E402
from trainers.methods.ft import FTOptions, FTTask  # noqa: E402
from trainers.models import ImageClassifier, load_clip  # noqa: E402
from trainers.train_loop import Hooks, train  # noqa: E402
from _summary import record  # noqa: E402  (bench/ is the script's folder)

N_CLASSES = 1000
TINY_ARCH = "orch-bench-tiny-vit"
TINY_CONFIG = {   # tests/conftest.py's TINY_CONFIG with two blocks per tower
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class SyntheticImages(Dataset):
    """`length` samples cycling through a pool of ready float images (3, H, W) and labels:
    what the loop's DataLoader collates, pins and copies, with nothing to decode."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int):
        self.images, self.labels, self.length = images, labels, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        j = i % self.images.shape[0]
        return self.images[j], self.labels[j]


class Timed:
    """A task that times the loop: synchronises once, after the warm-up's last step."""

    def __init__(self, task, warmup: int, device: torch.device):
        self.task, self.model, self.warmup, self.device = task, task.model, warmup, device
        self.start = None

    def trainable_parameters(self):
        return self.task.trainable_parameters()

    def train_mode(self) -> None:
        self.task.train_mode()

    def loss(self, images, labels):
        return self.task.loss(images, labels)

    def after_step(self, step: int, total_steps: int) -> None:
        inner = getattr(self.task, "after_step", None)
        if inner is not None:
            inner(step, total_steps)
        if step == self.warmup - 1:
            sync(self.device)
            self.start = time.perf_counter()


class PlainClassifier(nn.Module):
    """The plain loop's classifier: head(normalize(tower(x))), nothing else."""

    def __init__(self, tower: nn.Module, head: nn.Linear):
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, images):
        return self.head(F.normalize(self.tower(images), dim=-1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """What orch's loop autocasts to: bf16 on a GPU that has it, nothing on a CPU (the
    plain loops have no gradient scaler, so an fp16-only GPU is refused in main())."""
    return torch.bfloat16 if device.type == "cuda" else None


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclasses.dataclass
class Row:
    what: str
    rate: float | None                   # images/s; None: did not run
    peak: float | None = None            # GiB
    note: str = ""


def run_row(what: str, device: torch.device, fn) -> Row:
    """fn() -> images/s; a GPU out of memory becomes a row that says so."""
    peak_reset(device)
    try:
        rate = fn()
    except torch.cuda.OutOfMemoryError:
        return Row(what, None, note="out of GPU memory")
    except Exception as err:  # e.g. torch.compile without a working compiler
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return Row(what, None, note=f"failed: {type(err).__name__}: {line[:100]}")
    finally:
        torch._dynamo.reset()            # compiled graphs of one row do not serve the next
    return Row(what, rate, peak_gib(device))


def orch_train(task, pool: torch.Tensor, labels: torch.Tensor, options, args,
               device: torch.device) -> float:
    """images/s of `trainers.train_loop.train` over the steps after the warm-up."""
    n = (args.warmup + args.steps) * args.batch
    timed = Timed(task, args.warmup, device)
    train(timed, SyntheticImages(pool, labels, n), optim_config(options, seed=0), device,
          Hooks(progress=False, num_workers=args.num_workers))
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - timed.start)


def plain_train(step, args, device: torch.device) -> float:
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def plain_ce_step(model: nn.Module, images, labels, lr: float, clip: float | None,
                  device: torch.device, compiled: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    forward = torch.compile(model) if compiled else model
    dtype = amp_dtype(device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return step


class PlainContrastive(nn.Module):
    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, images, texts):
        image_f = self.clip.encode_image(images, normalize=True)
        text_f = self.clip.encode_text(texts, normalize=True)
        logits = self.clip.logit_scale.exp() * image_f.float() @ text_f.float().T   # (B, B)
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def plain_contrastive_step(clip_model: nn.Module, images, texts, lr: float,
                           device: torch.device, compiled: bool):
    model = PlainContrastive(clip_model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    forward = torch.compile(model) if compiled else model
    dtype = amp_dtype(device)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward(images, texts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@torch.no_grad()
def encode_rate(fn, args, device: torch.device) -> float:
    for _ in range(args.warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        fn()
    sync(device)
    return args.steps * args.encode_batch / (time.perf_counter() - start)


def load(arch: str, tiny: bool):
    if tiny:
        folder = Path(tempfile.mkdtemp(prefix="orch-bench-"))
        (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
        import open_clip
        open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
        arch = TINY_ARCH
    return load_clip(arch, None, augment=False)


def bench_model(arch: str, args, device: torch.device) -> list[Row]:
    clip = load(arch, args.tiny)
    base = clip.model.to(device)
    size = base.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(args.batch, 3, *size, generator=gen)              # (B, 3, H, W) CPU
    labels = torch.randint(N_CLASSES, (args.batch,), generator=gen)
    images, targets = pool.to(device), labels.to(device)
    torch.manual_seed(0)
    head = nn.Linear(base.visual.output_dim, N_CLASSES).to(device)
    # FLYP's prompts: one template per class, so the plain loop can use the same captions
    texts = [f"a photo of a class {i}." for i in range(N_CLASSES)]
    tokens = clip.tokenizer(texts).to(device).unsqueeze(1)               # (C, 1, L)
    captions = tokens[targets, 0]                                        # (B, L)
    lr = 1e-5
    ft_opts = FTOptions(lr=lr, epochs=1, batch_size=args.batch, warmup_steps=0)
    flyp_opts = FLYPOptions(lr=lr, epochs=1, batch_size=args.batch, warmup_steps=0)

    def orch_ft(checkpointing: bool):
        def run():
            classifier = ImageClassifier(copy.deepcopy(base.visual), copy.deepcopy(head))
            if checkpointing:
                set_grad_checkpointing(classifier.image_encoder, True)
            return orch_train(FTTask(classifier, ft_opts), pool, labels, ft_opts, args, device)
        return run

    def orch_flyp(checkpointing: bool):
        def run():
            model = copy.deepcopy(base)
            model.visual.to(memory_format=torch.channels_last)      # as fit_contrastive does
            if checkpointing:
                set_grad_checkpointing(model, True)
            return orch_train(FLYPTask(model, tokens, flyp_opts, seed=0), pool, labels,
                              flyp_opts, args, device)
        return run

    def plain_ce(compiled: bool):
        def run():
            model = PlainClassifier(copy.deepcopy(base.visual), copy.deepcopy(head))
            return plain_train(plain_ce_step(model, images, targets, lr, ft_opts.grad_clip,
                                             device, compiled), args, device)
        return run

    def plain_contr(compiled: bool):
        def run():
            return plain_train(plain_contrastive_step(copy.deepcopy(base), images, captions, lr,
                                                      device, compiled), args, device)
        return run

    rows = [run_row("orch FT", device, orch_ft(False))]
    if not args.no_checkpointing:
        rows.append(run_row("orch FT + ckpt", device, orch_ft(True)))
    rows.append(run_row("plain CE eager", device, plain_ce(False)))
    if not args.no_compile:
        rows.append(run_row("plain CE compiled", device, plain_ce(True)))
    rows.append(run_row("orch FLYP", device, orch_flyp(False)))
    if not args.no_checkpointing:
        rows.append(run_row("orch FLYP + ckpt", device, orch_flyp(True)))
    rows.append(run_row("plain contr. eager", device, plain_contr(False)))
    if not args.no_compile:
        rows.append(run_row("plain contr. compiled", device, plain_contr(True)))

    # Encoding: a batch already on the device for both.
    enc_images = torch.randn(args.encode_batch, 3, *size, generator=gen).to(device)
    classifier = ImageClassifier(copy.deepcopy(base.visual), copy.deepcopy(head)).eval()
    base.eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    precision = "bf16" if device.type == "cuda" else "fp32"

    def plain_encode():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return base.encode_image(enc_images)

    rows.append(run_row("orch encode_batch", device, lambda: encode_rate(
        lambda: encode_batch(classifier, enc_images, device, precision), args, device)))
    rows.append(run_row("plain encode_image", device,
                        lambda: encode_rate(plain_encode, args, device)))
    return rows


def report(arch: str, rows: list[Row], device: torch.device) -> None:
    by = {r.what: r for r in rows}

    def ratio(a: str, b: str) -> str:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None or ra.rate is None or rb.rate is None:
            return ""
        return f"{ra.rate / rb.rate:.2f}x of {b}"

    compare = {"orch FT": "plain CE eager", "orch FT + ckpt": "plain CE eager",
               "plain CE compiled": "plain CE eager", "orch FLYP": "plain contr. eager",
               "orch FLYP + ckpt": "plain contr. eager",
               "plain contr. compiled": "plain contr. eager",
               "orch encode_batch": "plain encode_image"}
    print(f"\n{arch}")
    mem = device.type == "cuda"
    print(f"  {'':<22}{'img/s':>10}" + (f"{'peak GiB':>10}" if mem else "") + "  ratio")
    for r in rows:
        rate = f"{r.rate:>10,.0f}" if r.rate is not None else f"{'-':>10}"
        peak = (f"{r.peak:>10.1f}" if r.peak is not None else f"{'-':>10}") if mem else ""
        note = r.note or (ratio(r.what, compare[r.what]) if r.what in compare else "")
        print(f"  {r.what:<22}{rate}{peak}  {note}")
    targets = (("orch FT", "plain CE compiled", 1.0), ("orch FLYP", "plain contr. compiled", 1.0),
               ("orch encode_batch", "plain encode_image", 0.9))
    for mine, theirs, target in targets:
        a, b = by.get(mine), by.get(theirs)
        if a is not None and b is not None and a.rate and b.rate:
            record(f"{arch}: {mine} vs {theirs}", f"{a.rate:,.0f} img/s", f"{b.rate:,.0f} img/s",
                   f"{a.rate / b.rate:.2f}x", f">= {target}x", a.rate / b.rate >= target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="ViT-B-16,ViT-B-32")
    parser.add_argument("--batch", type=int, default=None, help="training batch (GPU: 512)")
    parser.add_argument("--encode-batch", type=int, default=None, help="(GPU: 512)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (GPU: 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU: 5)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers of orch's loop (a sweep's default: 0)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny ViT CLIP and a tiny batch (to check the script on a CPU)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no GPU here (torch.cuda.is_available() is False); nothing measured "
              "(`--device cpu --tiny` checks the script on the CPU)")
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("bench/gpu.py: this GPU has no bf16; the plain loops here are bf16 only")
        return
    small = args.tiny
    args.batch = args.batch or (8 if small else 512)
    args.encode_batch = args.encode_batch or (8 if small else 512)
    args.steps = args.steps or (4 if small else 20)
    args.warmup = args.warmup or (2 if small else 5)
    if min(args.batch, args.encode_batch, args.steps, args.warmup) < 1:
        parser.error("--batch, --encode-batch, --steps and --warmup must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = ["tiny ViT (conftest's, 2 blocks)"] if small else args.archs.split(",")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    dtype = amp_dtype(device)
    print(f"bench/gpu.py on {where}: training batch {args.batch}, encode batch "
          f"{args.encode_batch}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{'bf16' if dtype is torch.bfloat16 else dtype or 'float32'} training, random init, "
          f"orch's DataLoader workers: {args.num_workers}")
    start = time.perf_counter()
    for arch in archs:
        rows = bench_model(arch, args, device)
        report(arch, rows, device)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
