"""Benchmark: exact k-th-nearest-neighbour squared distances (VRF's d(x)), orch vs. NumPy.

Same random L2-normalised float32 data for both (queries (Q, d), index (M, d)):
  orch     - `trainers.knn.kth_neighbour_sq_distance(queries, index, k, device)`: chunked
             torch matmul of similarities, `topk(k)`, d = 2 - 2 * k-th largest similarity;
  baseline - plain brute-force NumPy on the CPU: for each block of query rows the full
             pairwise squared distances |q|^2 + |x|^2 - 2 q.x (one `np.matmul` against the
             whole index), then `np.partition(..., k - 1, axis=1)[:, k - 1]` for the k-th
             smallest. `--block` bounds memory (rows per block; 0 = all queries in one
             (Q, M) matrix, 4 GB at the default sizes).
Defaults are sized like VRF on ImageNet-scale sets (50,000 queries = the ImageNet val
set, a zero-shot-failure index of 20,000, CLIP ViT-B feature width 512, k = 100) but
run on 2 cores. The maximum absolute difference between the two results is printed.
Usage:
  .venv/bin/python bench/knn.py [--queries 50000] [--index 20000] [--dim 512] [--k 100]
                                [--block 4096] [--repeats 1] [--threads N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.knn import kth_neighbour_sq_distance  # noqa: E402


def normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def numpy_kth_sq_distance(queries: np.ndarray, index: np.ndarray, k: int, block: int) -> np.ndarray:
    """Brute force: full pairwise squared distances per block of queries, np.partition."""
    x_sq = np.einsum("ij,ij->i", index, index)                  # (M,)
    out = np.empty(queries.shape[0], dtype=np.float32)
    step = block or queries.shape[0]
    for start in range(0, queries.shape[0], step):
        q = queries[start:start + step]
        q_sq = np.einsum("ij,ij->i", q, q)                      # (q,)
        dist = q_sq[:, None] + x_sq[None, :] - 2.0 * np.matmul(q, index.T)   # (q, M)
        out[start:start + step] = np.partition(dist, k - 1, axis=1)[:, k - 1]
    return np.maximum(out, 0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--index", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--block", type=int, default=4096,
                        help="baseline query rows per block (0: one full (Q, M) matrix)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs each; the best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.k <= args.index:
        parser.error(f"--k must be between 1 and --index ({args.index})")
    torch.set_num_threads(args.threads)
    try:  # NumPy's BLAS gets the same thread count as torch
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads, user_api="blas")
        blas = f"{args.threads} BLAS thread(s)"
    except ImportError:
        blas = "NumPy's default BLAS threads"
    device = torch.device(args.device)

    rng = np.random.default_rng(args.seed)
    queries_np, index_np = normalised(rng, args.queries, args.dim), normalised(rng, args.index, args.dim)
    queries, index = torch.from_numpy(queries_np), torch.from_numpy(index_np)

    # Warm-up: one small call of each (thread pools, BLAS, CUDA context and kernels).
    small = min(args.queries, 256)
    kth_neighbour_sq_distance(queries[:small], index, args.k, device)
    sync(device)
    numpy_kth_sq_distance(queries_np[:small], index_np, args.k, args.block)

    orch_times, base_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = kth_neighbour_sq_distance(queries, index, args.k, device)   # back on the CPU
        sync(device)
        orch_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = numpy_kth_sq_distance(queries_np, index_np, args.k, args.block)
        base_times.append(time.perf_counter() - start)
    orch, base = min(orch_times), min(base_times)
    diff = float(np.abs(ours.numpy() - theirs).max())

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{args.threads} torch thread(s)")
    print(f"k-th NN squared distance: {args.queries:,} queries x {args.index:,} index rows, "
          f"d={args.dim}, k={args.k}, float32")
    print(f"orch on {device.type} ({where}); NumPy baseline on the CPU ({blas}), "
          f"{args.block or 'all'} query rows per block; best of {args.repeats} run(s)")
    print(f"orch: {orch:.3f} s   baseline: {base:.3f} s   ratio (baseline/orch): {base / orch:.1f}x")
    print(f"max |orch - baseline| = {diff:.2e}  (squared distances lie in [0, 4])")


if __name__ == "__main__":
    main()
