"""Exact k-nearest-neighbour distances by blocked matrix products (no approximate index).

For L2-normalised vectors the squared Euclidean distance is `2 - 2 q.x`, so the k-th
nearest neighbour of every query is the k-th largest dot product. Memory is bounded in
both directions, whatever the sizes (ImageNet: a zero-shot-failure index of ~300 k rows,
50 k queries a set):

- the index is streamed in blocks of at most `_INDEX_BLOCK_ELEMENTS` values, each moved to
  the device once;
- the queries go through each block in chunks, one (chunk x block) similarity tile of at
  most `_CHUNK_ELEMENTS` values at a time, and `topk` keeps each query's k largest;
- across blocks, each query's running top k ((Q, k): on the device when no bigger than
  an index block, else on the CPU) is merged with the block's: the k largest of a union
  are among the k largest of its parts, so the result is exact, ties included (`topk`
  returns values with their multiplicity).

An index that fits in one block (the common case) is moved once and the queries are
chunked exactly as a plain loop would. The work runs on whatever device is given (a GPU
when the trial has one); the default is float32 throughout. A lower-precision matmul
(`matmul_dtype`, for benchmarks) is faster on a GPU but no longer exact.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 25          # similarities held at once: 128 MiB in float32
_INDEX_BLOCK_ELEMENTS = 1 << 26    # index values on the device at once: 256 MiB in float32


def _block_rows(m: int, d: int) -> int:
    return max(1, min(m, _INDEX_BLOCK_ELEMENTS // max(d, 1)))


def kth_neighbour_sq_distance(queries: torch.Tensor, index: torch.Tensor, k: int,
                              device: torch.device | str = "cpu",
                              matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared L2 distance from each query to its k-th nearest row of `index`.

    queries (Q, d), index (M, d): both L2-normalised, on any device. Returns (Q,) float32
    on the CPU, in [0, 4]. `k` counts from 1 and must not exceed M. `matmul_dtype` other
    than float32 (float16, bfloat16) trades exactness for speed on a GPU."""
    if index.ndim != 2 or queries.ndim != 2 or index.shape[1] != queries.shape[1]:
        raise ValueError(f"kNN: queries {tuple(queries.shape)} and index "
                         f"{tuple(index.shape)} must be (Q, d) and (M, d)")
    if not 1 <= k <= index.shape[0]:
        raise ValueError(f"kNN: k={k} must be between 1 and the index size {index.shape[0]}")
    n_queries, (m, d) = queries.shape[0], index.shape
    if n_queries == 0:
        return torch.empty(0)
    device = torch.device(device)
    block = _block_rows(m, d)
    if block >= m:                                   # one block: no running top-k needed
        kth = _kth_largest_one_block(queries, index.to(device, matmul_dtype), k, device,
                                     matmul_dtype)
    else:
        # The running top k stays on the device when it is no bigger than an index
        # block (ImageNet: 50 k queries x k 234 = 12 M values), else on the CPU.
        keep = device if n_queries * k <= _INDEX_BLOCK_ELEMENTS else torch.device("cpu")
        best = None                                  # (Q, <= k) running k largest
        for start in range(0, m, block):
            part = index[start:start + block].to(device, matmul_dtype)        # (b, d)
            best = _merge_block(queries, part, best, k, device, matmul_dtype, keep)
        kth = best[:, -1]
    return (2.0 - 2.0 * kth.float()).clamp_(min=0.0).cpu()


def _query_chunks(queries: torch.Tensor, block_rows: int, device, dtype):
    rows = max(1, _CHUNK_ELEMENTS // block_rows)
    for start in range(0, queries.shape[0], rows):
        yield slice(start, start + rows), queries[start:start + rows].to(device, dtype)


def _kth_largest_one_block(queries: torch.Tensor, index: torch.Tensor, k: int, device,
                           dtype) -> torch.Tensor:
    """k-th largest of `queries @ index.T` per row, the whole index in one block: (Q,)
    on the device."""
    out = []
    for _, q in _query_chunks(queries, index.shape[0], device, dtype):
        sims = q @ index.T                                               # (q, M)
        out.append(sims.topk(k, dim=1, largest=True, sorted=True).values[:, -1])
    return torch.cat(out)


def _merge_block(queries: torch.Tensor, part: torch.Tensor, best: torch.Tensor | None,
                 k: int, device, dtype, keep: torch.device) -> torch.Tensor:
    """Each query's k largest similarities over the rows seen so far and `part` (b, d).

    `best` (Q, j), sorted descending, j <= k, or None before the first block. Returns
    (Q, min(k, j + b)) on `keep`, sorted descending."""
    width = min(k, part.shape[0] + (best.shape[1] if best is not None else 0))
    merged = torch.empty(queries.shape[0], width, dtype=dtype, device=keep)
    for rows, q in _query_chunks(queries, part.shape[0], device, dtype):
        sims = q @ part.T                                                # (q, b)
        top = sims.topk(min(k, part.shape[0]), dim=1, largest=True, sorted=True).values
        if best is not None:                         # (q, j + min(k, b)) -> (q, width)
            top = torch.cat([best[rows].to(device), top], dim=1)
            top = top.topk(width, dim=1, largest=True, sorted=True).values
        merged[rows] = top.to(keep)
    return merged
