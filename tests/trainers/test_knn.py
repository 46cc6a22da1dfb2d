"""Exact kNN with the index streamed in blocks (`trainers.knn`): the same k-th largest
dot product as one block, ties across block boundaries included, with every piece held
on the device bounded by the block sizes. (The one-block cases and input checks are in
test_ensembles.py.)"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trainers import knn


def exact_unit_vectors() -> np.ndarray:
    """24 unit vectors in 4-d whose pairwise dot products are exact in float32 whatever
    the order of summation: the 8 signed one-hots and the 16 (+-1/2, +-1/2, +-1/2, +-1/2).
    Dot products lie in {-1, -1/2, 0, 1/2, 1}: ties everywhere."""
    one_hots = np.concatenate([np.eye(4), -np.eye(4)])
    halves = np.array(list(itertools.product((0.5, -0.5), repeat=4)))
    return np.concatenate([one_hots, halves]).astype(np.float32)


def brute_kth(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """k-th smallest squared distance 2 - 2 q.x, in float64 (exact for the vectors above)."""
    sims = queries.astype(np.float64) @ index.astype(np.float64).T         # (Q, M)
    return np.maximum(2.0 - 2.0 * -np.sort(-sims, axis=1)[:, k - 1], 0.0)


def fp32_tol(d: int) -> float:
    """Bound on |float32 result - float64 brute force| for the distance of two unit vectors:
    the float32 dot product, summed in any order, is within gamma_d = d u / (1 - d u)
    (u = 2^-24) of the exact dot product of the float32 inputs, which are within 2u of the
    float64 ones; distance = 2 - 2 q.x doubles both, and rounds once more."""
    u = 2.0 ** -24
    return 2 * (d * u / (1 - d * u) + 2 * u) + 4 * u


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def set_blocks(monkeypatch, block_rows: int, d: int, chunk: int | None) -> None:
    monkeypatch.setattr(knn, "_INDEX_BLOCK_ELEMENTS", block_rows * d)
    if chunk is not None:
        monkeypatch.setattr(knn, "_CHUNK_ELEMENTS", chunk)


@pytest.mark.parametrize("block_rows,chunk", [(1, None), (2, None), (3, 7), (5, 1),
                                              (7, 40), (47, None), (48, 3)])
def test_ties_across_block_boundaries_give_the_exact_kth_distance(monkeypatch, block_rows,
                                                                  chunk):
    """Every vector twice in a row (so odd block sizes cut duplicate pairs in two), then
    shuffled copies: the k-th value of a multiset with heavy ties, for every k."""
    vectors = exact_unit_vectors()
    rng = np.random.default_rng(0)
    index = np.concatenate([np.repeat(vectors, 2, axis=0)[:40],          # v0 v0 v1 v1 ...
                            vectors[rng.permutation(24)[:8]]])           # (48, 4)
    queries = np.concatenate([vectors, vectors[rng.integers(0, 24, 9)]])  # (33, 4)
    set_blocks(monkeypatch, block_rows, 4, chunk)
    for k in range(1, index.shape[0] + 1):
        got = knn.kth_neighbour_sq_distance(torch.from_numpy(queries), torch.from_numpy(index), k)
        assert got.dtype == torch.float32 and got.shape == (33,)
        assert torch.equal(got, torch.from_numpy(brute_kth(queries, index, k)).float()), k


@pytest.mark.parametrize("block_rows,chunk", [(1, None), (10, 25), (64, 64 * 3), (99, None)])
def test_streamed_index_matches_brute_force(monkeypatch, block_rows, chunk):
    """Random unit vectors, index cut into blocks (the last one shorter), against a
    float64 brute force, to float32 rounding."""
    d = 64
    rng = np.random.default_rng(1)
    queries, index = unit_rows(rng, 37, d), unit_rows(rng, 230, d)
    q32, x32 = queries.astype(np.float32), index.astype(np.float32)
    set_blocks(monkeypatch, block_rows, d, chunk)
    for k in (1, 2, 17, 100, 229, 230):
        got = knn.kth_neighbour_sq_distance(torch.from_numpy(q32), torch.from_numpy(x32), k)
        np.testing.assert_allclose(got.numpy(), brute_kth(queries, index, k), rtol=0,
                                   atol=fp32_tol(d))
        assert float(got.min()) >= 0.0


def test_device_pieces_are_bounded_by_the_block_sizes(monkeypatch):
    """Every index block moved holds at most `_INDEX_BLOCK_ELEMENTS` values, each index
    row is moved exactly once, and every similarity tile holds at most `_CHUNK_ELEMENTS`."""
    d, block_rows, chunk = 8, 16, 16 * 5
    set_blocks(monkeypatch, block_rows, d, chunk)
    rng = np.random.default_rng(2)
    queries_np, index_np = unit_rows(rng, 23, d), unit_rows(rng, 70, d)
    queries = torch.from_numpy(queries_np).float()
    index = torch.from_numpy(index_np).float()
    blocks, tiles = [], []
    real_merge, real_matmul = knn._merge_block, torch.Tensor.__matmul__

    def merge_spy(queries_, part, *args):
        blocks.append(part.clone())
        return real_merge(queries_, part, *args)

    def matmul_spy(a, b):
        out = real_matmul(a, b)
        tiles.append(out.numel())
        return out

    monkeypatch.setattr(knn, "_merge_block", merge_spy)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul_spy)
    got = knn.kth_neighbour_sq_distance(queries, index, 20)
    monkeypatch.undo()
    assert [b.shape[0] for b in blocks] == [16, 16, 16, 16, 6]
    assert all(b.numel() <= block_rows * d for b in blocks)
    assert torch.equal(torch.cat(blocks), index)                 # each row once, in order
    assert tiles and max(tiles) <= chunk
    # every query against every block, chunk // rows queries at a time (16 rows: 5; 6: 13)
    assert len(tiles) == 4 * 5 + 2
    np.testing.assert_allclose(got.numpy(), brute_kth(queries_np, index_np, 20), rtol=0,
                               atol=fp32_tol(d))


def test_a_lower_precision_matmul_is_close_but_not_the_default(monkeypatch):
    """`matmul_dtype=torch.float16` (for GPU benchmarks) is within float16 rounding; the
    default is the float32 answer."""
    d = 8
    rng = np.random.default_rng(3)
    queries, index = unit_rows(rng, 19, d), unit_rows(rng, 41, d)
    q, x = torch.from_numpy(queries).float(), torch.from_numpy(index).float()
    set_blocks(monkeypatch, 9, d, None)
    # float16: inputs rounded to 2^-11 relative each (dot product off by <= 2 * 2^-11),
    # sums of d terms within gamma_d = d 2^-11 / (1 - d 2^-11), the result rounded once
    # more; distance = 2 - 2 q.x doubles it.
    u = 2.0 ** -11
    tol = 2 * (2 * u + d * u / (1 - d * u) + u)
    for k in (1, 5, 41):
        half = knn.kth_neighbour_sq_distance(q, x, k, matmul_dtype=torch.float16)
        assert half.dtype == torch.float32
        np.testing.assert_allclose(half.numpy(), brute_kth(queries, index, k), rtol=0, atol=tol)
        exact = knn.kth_neighbour_sq_distance(q, x, k)
        np.testing.assert_allclose(exact.numpy(), brute_kth(queries, index, k), rtol=0,
                                   atol=fp32_tol(d))
        assert float(np.abs(half.numpy() - exact.numpy()).max()) > fp32_tol(d)   # it did change
