"""Benchmark: exact k-th-nearest-neighbour squared distances (VRF's d(x)), orch vs. plain loops.

Same random L2-normalised float32 data for every contender (queries (Q, d), index (M, d)):
  orch     - `trainers.knn.kth_neighbour_sq_distance(queries, index, k, device)`: the index
             streamed in blocks (one block when it fits in `_INDEX_BLOCK_ELEMENTS`), the
             queries in chunks, a running top-k merged across blocks;
  plain    - one plain chunked loop in torch on the same device: the whole index on the
             device, for each chunk of query rows one GEMM against it and `topk(k)`
             (orch before the index was streamed; same tile budget);
  NumPy    - plain brute-force NumPy on the CPU (first case only): for each block of query
             rows the full pairwise squared distances |q|^2 + |x|^2 - 2 q.x (one
             `np.matmul` against the whole index), then `np.partition(..., k - 1)`.
             `--block` bounds its memory (rows per block; 0 = one (Q, M) matrix).

Cases:
  1. the sizes given (default: 50,000 queries = the ImageNet val set, a zero-shot-failure
     index of 20,000, CLIP ViT-B width 512, k = 100); orch also with the index cut into
     `--stream-rows` blocks, to show what streaming costs;
  2. on a GPU only (`--device cuda`, unless `--no-large`): the ImageNet-scale case
     400,000 x 50,000 x 512 in both orientations (400 k queries against 50 k index rows,
     and 50 k queries against a 400 k index, several blocks), in float32 (exact, the
     default) and with a float16 matmul (not exact; orch's `matmul_dtype`), each against
     the plain loop in the same precision, data already on the GPU. A reference figure:
     exact brute-force kNN 400 k x 50 k x 512 in fp16 on one H100 took 0.195 s.
The maximum absolute difference between the contenders is printed.
Usage:
  .venv/bin/python bench/knn.py [--queries 50000] [--index 20000] [--dim 512] [--k 100]
                                [--block 4096] [--stream-rows 5000] [--repeats 1]
                                [--threads N] [--device cpu|cuda] [--no-large]
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

from trainers import knn  # noqa: E402
from trainers.knn import kth_neighbour_sq_distance  # noqa: E402
from _summary import record  # noqa: E402  (bench/ is the script's folder)

LARGE = ((400_000, 50_000), (50_000, 400_000))    # (queries, index rows), d = 512


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


def plain_kth_sq_distance(queries: torch.Tensor, index: torch.Tensor, k: int,
                          device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The plain loop: whole index on the device, one GEMM + topk per chunk of queries."""
    index = index.to(device, dtype)
    rows = max(1, knn._CHUNK_ELEMENTS // index.shape[0])
    out = []
    for start in range(0, queries.shape[0], rows):
        sims = queries[start:start + rows].to(device, dtype) @ index.T          # (q, M)
        out.append(sims.topk(k, dim=1, largest=True, sorted=True).values[:, -1])
    return (2.0 - 2.0 * torch.cat(out).float()).clamp_(min=0.0).cpu()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(repeats: int, device: torch.device, fn):
    """(best seconds, last result) of `repeats` timed calls."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


class stream_rows:
    """Cap orch's index block at `rows` rows of width `d` (0: the library default)."""

    def __init__(self, rows: int, d: int):
        self.elements = rows * d if rows else knn._INDEX_BLOCK_ELEMENTS

    def __enter__(self):
        self.saved, knn._INDEX_BLOCK_ELEMENTS = knn._INDEX_BLOCK_ELEMENTS, self.elements

    def __exit__(self, *exc):
        knn._INDEX_BLOCK_ELEMENTS = self.saved


def blocks_of(m: int, d: int) -> int:
    rows = max(1, min(m, knn._INDEX_BLOCK_ELEMENTS // d))
    return -(-m // rows)


def first_case(args, device: torch.device, blas: str) -> None:
    rng = np.random.default_rng(args.seed)
    queries_np, index_np = normalised(rng, args.queries, args.dim), normalised(rng, args.index, args.dim)
    queries, index = torch.from_numpy(queries_np), torch.from_numpy(index_np)

    # Warm-up: one small call of each (thread pools, BLAS, CUDA context and kernels).
    small = min(args.queries, 256)
    kth_neighbour_sq_distance(queries[:small], index, args.k, device)
    plain_kth_sq_distance(queries[:small], index, args.k, device)
    sync(device)
    numpy_kth_sq_distance(queries_np[:small], index_np, args.k, args.block)

    orch, ours = best_of(args.repeats, device,
                         lambda: kth_neighbour_sq_distance(queries, index, args.k, device))
    with stream_rows(args.stream_rows, args.dim):
        n_blocks = blocks_of(args.index, args.dim)
        streamed, ours_streamed = best_of(args.repeats, device, lambda: kth_neighbour_sq_distance(
            queries, index, args.k, device))
    plain, theirs_torch = best_of(args.repeats, device,
                                  lambda: plain_kth_sq_distance(queries, index, args.k, device))
    base, theirs = best_of(args.repeats, torch.device("cpu"),
                           lambda: numpy_kth_sq_distance(queries_np, index_np, args.k, args.block))
    diff = max(float(np.abs(ours.numpy() - theirs).max()),
               float(np.abs(ours_streamed.numpy() - theirs).max()))
    same_as_plain = torch.equal(ours, theirs_torch)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{args.threads} torch thread(s)")
    print(f"k-th NN squared distance: {args.queries:,} queries x {args.index:,} index rows, "
          f"d={args.dim}, k={args.k}, float32")
    print(f"orch and plain torch on {device.type} ({where}); NumPy baseline on the CPU ({blas}), "
          f"{args.block or 'all'} query rows per block; best of {args.repeats} run(s)")
    print(f"orch (index in {blocks_of(args.index, args.dim)} block(s)): {orch:.3f} s   "
          f"NumPy: {base:.3f} s   NumPy/orch: {base / orch:.1f}x")
    print(f"orch (index streamed in {n_blocks} blocks of {args.stream_rows:,} rows): "
          f"{streamed:.3f} s   plain torch loop: {plain:.3f} s   "
          f"plain/orch: {plain / orch:.2f}x (one block), {plain / streamed:.2f}x (streamed)")
    print(f"max |orch - NumPy| = {diff:.2e}  (squared distances lie in [0, 4]); "
          f"orch (one block) == plain torch bit for bit: {same_as_plain}")
    shape = f"{args.queries // 1000}k x {args.index // 1000}k x {args.dim}, k={args.k}"
    record(f"exact kNN, {shape}, vs NumPy blocks", f"{orch:.2f} s", f"{base:.2f} s",
           f"{base / orch:.1f}x")
    record(f"exact kNN, {shape}, vs a plain torch loop", f"{orch:.2f} s", f"{plain:.2f} s",
           f"{plain / orch:.2f}x", "-", None, f"streamed in {n_blocks} blocks: "
           f"{plain / streamed:.2f}x")


def large_case(args, device: torch.device) -> None:
    print(f"\nImageNet-scale exact kNN on {torch.cuda.get_device_name(device)}, d=512, "
          f"k={args.k}, data on the GPU; best of {args.repeats} run(s)")
    print(f"{'queries x index':>18}  {'matmul':>8}  {'blocks':>6}  {'orch':>8}  {'plain':>8}  "
          f"{'plain/orch':>10}  {'max |diff|':>10}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for n_q, n_x in LARGE:
        queries = torch.nn.functional.normalize(
            torch.randn(n_q, 512, device=device, generator=gen), dim=1)
        index = torch.nn.functional.normalize(
            torch.randn(n_x, 512, device=device, generator=gen), dim=1)
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            def ours():
                return kth_neighbour_sq_distance(queries, index, args.k, device, dtype)

            def plain():
                return plain_kth_sq_distance(queries, index, args.k, device, dtype)

            ours(), plain()                                      # warm-up
            t_ours, r_ours = best_of(args.repeats, device, ours)
            t_plain, r_plain = best_of(args.repeats, device, plain)
            diff = float((r_ours - r_plain).abs().max())
            print(f"{n_q // 1000:>7}k x {n_x // 1000:>6}k  {name:>8}  "
                  f"{blocks_of(n_x, 512):>6}  {t_ours:>7.3f}s  {t_plain:>7.3f}s  "
                  f"{t_plain / t_ours:>9.2f}x  {diff:>10.2e}")
        del queries, index
        torch.cuda.empty_cache()
    print("(reference: exact kNN 400 k x 50 k x 512 in fp16 on one H100: 0.195 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--index", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--block", type=int, default=4096,
                        help="NumPy baseline query rows per block (0: one full (Q, M) matrix)")
    parser.add_argument("--stream-rows", type=int, default=5000,
                        help="index rows per block for orch's streamed run of the first case")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs each; the best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-large", action="store_true",
                        help="skip the 400 k x 50 k x 512 GPU case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.k <= args.index:
        parser.error(f"--k must be between 1 and --index ({args.index})")
    if args.stream_rows < 1:
        parser.error("--stream-rows must be >= 1")
    torch.set_num_threads(args.threads)
    try:  # NumPy's BLAS gets the same thread count as torch
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads, user_api="blas")
        blas = f"{args.threads} BLAS thread(s)"
    except ImportError:
        blas = "NumPy's default BLAS threads"
    device = torch.device(args.device)

    first_case(args, device, blas)
    if device.type == "cuda" and not args.no_large:
        large_case(args, device)


if __name__ == "__main__":
    main()
