"""Benchmark: the training input feed on ImageNet-like JPEGs, orch's loader vs. a plain one.

Writes `--images` JPEGs of 500x375 pixels at quality 90 (ImageNet's typical size) and
reads them through CLIP's training preprocessing (open_clip's: RandomResizedCrop to 224,
normalise), batch `--batch`, for `--epochs` epochs:
  orch  - `trainers.train_loop.train_loader` over `EpochBatches`: `--workers` persistent
          loader processes, 4 batches prefetched each, every sample's crop drawn from its
          own seed (so the worker count never changes what a step sees);
  plain - `torch.utils.data.DataLoader(dataset, batch_size, shuffle=True,
          num_workers=--workers)`, a new loader per epoch, as most training scripts do.
Both get the same number of processes (default: every CPU here); orch's default in a
sweep is one fewer (`resources.loader_workers` unset: cpus_per_trial - 1), leaving the
trial's own process its core, and that row is printed too. Only the feed is timed
(images/s into the training process), no model: the question is whether decoding keeps
up, not how fast a step is. Ratio orch / plain >= 0.9 is the target.
Usage: .venv/bin/python bench/input_feed.py [--images 600] [--batch 64] [--epochs 2]
                                            [--workers N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.data.benchmark import FileImageDataset  # noqa: E402
from trainers.train_loop import EpochBatches, train_loader  # noqa: E402
from _summary import record  # noqa: E402  (bench/ is the script's folder)


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Smooth random images (noise compresses unlike photos; a blurred field is closer)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(loader_for_epoch, epochs: int, n: int) -> float:
    start = time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        for images, labels in loader_for_epoch(epoch):
            seen += len(labels)
    assert seen == n * epochs, (seen, n * epochs)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    _, train_tf, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = write_jpegs(Path(folder), args.images)
        print(f"{args.images} JPEGs 500x375 q90 written in {time.perf_counter() - start:.1f} s; "
              f"{args.epochs} epochs of batch {args.batch}, CLIP training preprocessing (224)")
        dataset = FileImageDataset(paths, [i % 1000 for i in range(len(paths))], train_tf)
        cpu = torch.device("cpu")

        def plain(workers):
            return lambda epoch: DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                            num_workers=workers)

        def orch(workers):
            batches = EpochBatches(len(dataset), args.batch, seed=0)
            loader = train_loader(dataset, batches, workers, cpu)

            def for_epoch(epoch):
                batches.set_epoch(epoch)
                return loader
            return for_epoch

        rows = [("plain", args.workers, plain), ("orch", args.workers, orch),
                ("plain", args.workers, plain), ("orch", args.workers, orch)]
        if args.workers > 1:
            rows.append(("orch, sweep default", args.workers - 1, orch))
        rates: dict[tuple[str, int], list[float]] = {}
        for name, workers, make in rows:   # interleaved twice: this box's noise is ~20 %
            rate = images_per_second(make(workers), args.epochs, len(dataset))
            rates.setdefault((name, workers), []).append(rate)
        print(f"{'loader':>22}  {'processes':>9}  {'images/s (best)':>15}")
        for (name, workers), values in rates.items():
            print(f"{name:>22}  {workers:>9}  {max(values):>15.1f}")
        ratio = max(rates[("orch", args.workers)]) / max(rates[("plain", args.workers)])
        print(f"orch / plain with {args.workers} processes each: {ratio:.2f}x (target >= 0.9x)")
        record(f"training input feed, {args.images} JPEGs 500x375, {args.workers} processes",
               f"{max(rates[('orch', args.workers)]):.0f} img/s",
               f"{max(rates[('plain', args.workers)]):.0f} img/s", f"{ratio:.2f}x", ">= 0.9x",
               ratio >= 0.9)


if __name__ == "__main__":
    main()
