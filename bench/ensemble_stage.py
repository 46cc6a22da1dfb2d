"""Benchmark: one ImageNet-shaped job of the ensemble stage, its peak memory and time.

What a sweep's job on cached outputs does for one fine-tuned trial of CLIP ViT-B/16 on
ImageNet (`orchestrator.run.jobs.cached_points`, the code the stage runs), on feature-cache
entries written synthetically in the cache's own format (Parquet parts and a manifest with
sha256s, `orchestrator.run.features.write_entry`):

  train (ID_TRAIN)   1,281,167 rows (ImageNet's training split under eval preprocessing)
  id_val                25,623 (2 % of train held out, as the imagenet suite does)
  id_test               50,000 (ImageNet val)
  imagenet_v2           10,000
  imagenet_sketch       50,889
  imagenet_r            30,000 (200 of the 1,000 classes)
  imagenet_a             7,500 (200 classes)

d = 512 features, C = 1,000 classes. The job: both members' heads on every eval set, the
training split as top classes (a record batch at a time), VRF's zero-shot-failure set from
the fine-tuned features of the rows the zero-shot model gets wrong, exact kNN of every
eval sample in it, 101 OSE points and 25 VRF points (a in [0.5, 2.5], b = 0.6), each with
temperature scaling fitted on id_val, and the fine-tuned model alone.

Data (seeded): unit class prototypes; a sample is its class prototype plus Gaussian noise,
L2-normalised; a head is its prototypes plus noise (the zero-shot head noisier), times a
logit scale of 100. Both members read the same feature files (hard links: a fine-tuned
tower's features would differ, their size would not), each through its own head.

Each size (`--sizes`, fractions of every set) runs as its own process; its peak RSS is the
kernel's (`wait4`'s ru_maxrss), its time the job's wall time. Target: peak RSS <= 4 GB at
full size; time growing linearly with the size where the work does (kNN, whose work is
queries x failures, grows with the square of it: its time is printed on its own).
Usage: .venv/bin/python bench/ensemble_stage.py [--sizes 0.1 0.3 1.0] [--threads 2]
       [--keep DIR]   (the written cache, reused when it is there)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.run.features import ZERO_SHOT, write_entry  # noqa: E402
from trainers.data import EvalSet  # noqa: E402
from trainers.data.benchmark import ID_TEST, ID_TRAIN, ID_VAL  # noqa: E402
from _summary import record  # noqa: E402  (bench/ is the script's folder)

D, C, SCALE = 512, 1000, 100.0
SETS = {ID_TRAIN: (1_281_167, C), ID_VAL: (25_623, C), ID_TEST: (50_000, C),
        "imagenet_v2": (10_000, C), "imagenet_sketch": (50_889, C),
        "imagenet_r": (30_000, 200), "imagenet_a": (7_500, 200)}
NOISE, ZS_HEAD_NOISE, FT_HEAD_NOISE = 2.5, 2.0, 1.6     # ~70 % / ~92 % top-1, ZSF ~25 %
FINE_TUNED = "ft-00"
CHUNK = 1 << 16


def subset_classes(n_classes: int, seed: int) -> np.ndarray:
    """The ID classes a set of `n_classes` stands for (all 1,000, or 200 like -R and -A)."""
    if n_classes == C:
        return np.arange(C)
    return np.sort(np.random.default_rng(seed).choice(C, n_classes, replace=False))


def prototypes() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(C, D, generator=gen), dim=1)


def heads() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    protos, gen = prototypes(), torch.Generator().manual_seed(1)
    out = []
    for noise in (ZS_HEAD_NOISE, FT_HEAD_NOISE):
        head = torch.nn.Linear(D, C, bias=False)
        weight = protos + torch.randn(C, D, generator=gen) * (noise / D ** 0.5)
        with torch.no_grad():
            head.weight.copy_(torch.nn.functional.normalize(weight, dim=1) * SCALE)
        out.append(head.eval())
    return out[0], out[1]


def write_size(root: Path, size: float) -> None:
    """Every set at `size` of its rows, for both members (hard-linked files)."""
    protos = prototypes().numpy()
    for i, (name, (rows, n_classes)) in enumerate(SETS.items()):
        n = max(1, round(rows * size))
        rng = np.random.default_rng(100 + i)
        classes = subset_classes(n_classes, i)

        def parts():
            for start in range(0, n, CHUNK):
                m = min(CHUNK, n - start)
                labels = rng.integers(0, n_classes, m)
                x = protos[classes[labels]] + rng.standard_normal((m, D), np.float32) * (
                    NOISE / D ** 0.5)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                yield np.arange(start, start + m), labels, x.astype(np.float32)
        zero_shot = root / entry_name(ZERO_SHOT, name)
        write_entry(zero_shot, parts(), rows_per_file=8 * CHUNK)
        fine_tuned = root / entry_name(FINE_TUNED, name)
        fine_tuned.mkdir()
        for path in zero_shot.iterdir():
            if path.suffix == ".parquet":
                os.link(path, fine_tuned / path.name)
        manifest = json.loads((zero_shot / "_manifest.json").read_text())
        (fine_tuned / "_manifest.json").write_text(json.dumps({**manifest,
                                                               "key": fine_tuned.name}))


def entry_name(model: str, set_name: str) -> str:
    return f"{model}-{set_name}"


def run_job(root: Path, threads: int) -> dict:
    """The job itself (in its own process): what `cached_outputs_job` does for one trial."""
    from orchestrator.run.jobs import cached_points
    from orchestrator.spec.types import EnsembleEntry
    from trainers.ensembles.ose import OSEOptions
    from trainers.ensembles.vrf import VRFOptions
    torch.set_num_threads(threads)
    eval_sets = {}
    for i, (name, (_, n_classes)) in enumerate(SETS.items()):
        if name != ID_TRAIN:
            eval_sets[name] = EvalSet(name, None, tuple(map(str, range(n_classes))),
                                      [[int(c)] for c in subset_classes(n_classes, i)])
    paths = {(m, s): str(root / entry_name(m, s)) for m in (ZERO_SHOT, FINE_TUNED) for s in SETS}
    ensembles = [EnsembleEntry("ose", OSEOptions(alpha=tuple(np.linspace(0, 1, 101).round(4)))),
                 EnsembleEntry("vrf", VRFOptions(a=tuple(np.linspace(0.5, 2.5, 25).round(4)),
                                                 b=(0.6,)))]
    zs_head, ft_head = heads()
    start = time.perf_counter()
    points = cached_points(paths, zs_head, (FINE_TUNED, ft_head), ensembles, eval_sets,
                           torch.device("cpu"))
    seconds = time.perf_counter() - start
    alone = points[0][2]
    vrf = next(p for p in points if p[0] == "vrf")[3]
    return {"seconds": seconds, "points": len(points), "zsf_size": vrf["vrf_zsf_size"],
            "k": vrf["vrf_k"], "ft_acc": alone[ID_TEST]["acc"]}


def measure(root: Path, threads: int) -> dict:
    child = subprocess.Popen([sys.executable, __file__, "--job", str(root),
                              "--threads", str(threads)], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"the job at {root} failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_gb": usage.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the synthetic cache here and keep it (reused if present)")
    parser.add_argument("--job", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job is not None:
        print(json.dumps(run_job(args.job, args.threads)))
        return
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        base = args.keep or Path(tmp)
        print(f"ImageNet-shaped ensemble job: {SETS[ID_TRAIN][0]:,} train rows, "
              f"{sum(n for s, (n, _) in SETS.items() if s != ID_TRAIN):,} eval rows in 6 sets, "
              f"d={D}, C={C}; 101 OSE + 25 VRF points with TS; CPU, {args.threads} thread(s)")
        print(f"{'size':>5}  {'train rows':>10}  {'write':>7}  {'job':>8}  {'peak RSS':>8}  "
              f"{'ZSF rows':>8}  {'k':>4}  {'FT acc':>6}")
        results = {}
        for size in args.sizes:
            root = base / f"size-{size:g}"
            start = time.perf_counter()
            if not (root / entry_name(FINE_TUNED, "imagenet_a") / "_manifest.json").exists():
                root.mkdir(parents=True, exist_ok=True)
                write_size(root, size)
            written = time.perf_counter() - start
            r = measure(root, args.threads)
            print(f"{size:>5g}  {round(SETS[ID_TRAIN][0] * size):>10,}  {written:>6.1f}s  "
                  f"{r['seconds']:>7.1f}s  {r['peak_rss_gb']:>6.2f}GB  {r['zsf_size']:>8,.0f}  "
                  f"{r['k']:>4.0f}  {r['ft_acc']:>6.3f}", flush=True)
            results[size] = r
        summarize(base, results)


def summarize(base: Path, results: dict) -> None:
    """Peak RSS at the largest size, time per size against the smallest, cache bytes."""
    largest, smallest = max(results), min(results)
    peak = results[largest]["peak_rss_gb"]
    record(f"ImageNet-shaped ensemble job at {largest:g} of full size, peak RSS",
           f"{peak:.2f} GB", "-", "-", "<= 4 GB", peak <= 4.0,
           f"{results[largest]['seconds']:.0f} s")
    for size in sorted(results):
        if size != smallest:
            growth = results[size]["seconds"] / results[smallest]["seconds"]
            record(f"ImageNet-shaped ensemble job, time at {size:g} vs {smallest:g} of the size",
                   f"{results[size]['seconds']:.0f} s", f"{results[smallest]['seconds']:.0f} s",
                   f"{growth:.1f}x", f"linear: {size / smallest:.0f}x", None,
                   "kNN work grows with the square")
    entry = base / f"size-{largest:g}" / entry_name(ZERO_SHOT, ID_TEST)
    rows = round(SETS[ID_TEST][0] * largest)
    ratio = sum(p.stat().st_size for p in entry.glob("*.parquet")) / (rows * D * 4)
    record(f"cache bytes per (model, set), id_test {rows:,} x {D}", f"{ratio:.2f} x N*d*4",
           "N*d*4", f"{ratio:.2f}x", "<= 1.1x", ratio <= 1.1)


if __name__ == "__main__":
    main()
