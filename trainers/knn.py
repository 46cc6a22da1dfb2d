"""Exact k-nearest-neighbour distances by chunked matrix products (no approximate index).

For L2-normalised vectors the squared Euclidean distance is `2 - 2 q.x`, so the k-th
nearest neighbour of every query is the k-th largest dot product: one (queries x index)
matrix product per chunk and a `topk`. Chunks keep memory bounded; the work runs on
whatever device the inputs are moved to (a GPU when the trial has one).
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 25   # similarities held at once: 128 MiB in float32


def kth_neighbour_sq_distance(queries: torch.Tensor, index: torch.Tensor, k: int,
                              device: torch.device | str = "cpu") -> torch.Tensor:
    """Squared L2 distance from each query to its k-th nearest row of `index`.

    queries (Q, d), index (M, d): both L2-normalised. Returns (Q,) float32 on the CPU,
    in [0, 4]. `k` counts from 1 and must not exceed M."""
    if index.ndim != 2 or queries.ndim != 2 or index.shape[1] != queries.shape[1]:
        raise ValueError(f"kNN: queries {tuple(queries.shape)} and index "
                         f"{tuple(index.shape)} must be (Q, d) and (M, d)")
    if not 1 <= k <= index.shape[0]:
        raise ValueError(f"kNN: k={k} must be between 1 and the index size {index.shape[0]}")
    index = index.to(device, torch.float32)
    rows = max(1, _CHUNK_ELEMENTS // index.shape[0])
    out = []
    for start in range(0, queries.shape[0], rows):
        q = queries[start:start + rows].to(device, torch.float32)       # (q, d)
        sims = q @ index.T                                              # (q, M)
        kth = sims.topk(k, dim=1, largest=True, sorted=True).values[:, -1]
        out.append((2.0 - 2.0 * kth).clamp_(min=0.0).cpu())            # (q,)
    return torch.cat(out) if out else torch.empty(0)
