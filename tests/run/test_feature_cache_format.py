"""The feature cache's format 2: entries hold features and labels only (logits come from
the model's head), each file's sha256 is in the manifest and checked once per process,
an entry of format 1 is never read, and a file damaged in place is rebuilt alone."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.run import features as fc
from orchestrator.run.features import (FORMAT_VERSION, MANIFEST, PARQUET_OPTIONS, FeatureCache,
                                       FeatureCacheError, entry_problem, head_logits,
                                       read_entry)

CPU = torch.device("cpu")


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_entry(folder, features: np.ndarray, labels: np.ndarray, files: int = 1,
                fmt: int = FORMAT_VERSION, logits: np.ndarray | None = None,
                order: np.ndarray | None = None) -> None:
    """An entry in `files` files: format 2 by the cache's own writer (`features.write_entry`,
    one file per part); format 1 by hand, as it was (a logits column, no sha256).
    `order`: the rows' order across the files (Ray Data's blocks finish in any order)."""
    order = np.arange(len(features)) if order is None else order
    parts = np.array_split(order, files)
    if fmt >= 2 and logits is None:
        fc.write_entry(folder, ((rows, labels[rows], features[rows]) for rows in parts),
                       rows_per_file=1)
        return
    folder.mkdir(parents=True)
    entries = []
    for i, rows in enumerate(parts):
        columns = {"index": pa.array(rows), "label": pa.array(labels[rows]),
                   "features": fc._fixed_list(features[rows])}
        if logits is not None:
            columns["logits"] = fc._fixed_list(logits[rows])
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(pa.table(columns), path, **PARQUET_OPTIONS)
        entry = {"name": path.name, "bytes": path.stat().st_size, "rows": len(rows)}
        if fmt >= 2:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append(entry)
    manifest = {"key": folder.name, "format": fmt, "precision": "fp32",
                "rows": len(features), "files": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def flip_middle_bytes(path) -> None:
    """Damage a file in place as bit rot does: same size, same mtime."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_features_take_at_most_1_1x_their_raw_bytes_and_read_back_exactly(tmp_path):
    """50,000 unit-norm float32 rows of 512 (an ImageNet-val-sized entry, in 8 files as
    Ray Data's blocks write it) on disk vs N x d x 4 bytes."""
    n, d = 50_000, 512
    features, labels = unit_rows(n, d), np.arange(n) % 1000
    entry = tmp_path / "entry"
    write_entry(entry, features, labels, files=8)
    on_disk = sum(p.stat().st_size for p in entry.glob("*.parquet"))
    assert on_disk <= 1.1 * n * d * 4, on_disk / (n * d * 4)
    cached = read_entry(entry)
    assert torch.equal(cached.features, torch.from_numpy(features))
    assert torch.equal(cached.labels, torch.from_numpy(labels).long()) and cached.logits is None


def test_logits_are_the_heads_in_chunks(tmp_path, monkeypatch):
    """Chunking splits rows only: each logit is the same dot product, whatever the chunk."""
    features, labels = unit_rows(300, 16), np.arange(300) % 7
    write_entry(tmp_path / "entry", features, labels)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 7)
    whole = read_entry(tmp_path / "entry", head).logits
    with torch.no_grad():
        direct = head(torch.from_numpy(features))
    # |w_c . f| <= |w_c| for unit f: another summation order moves a logit by ~d * u * |w_c|
    tol = head.weight.norm(dim=1) * 16 * 2.0 ** -24 + 1e-7
    assert ((whole - direct).abs() <= tol).all()
    monkeypatch.setattr(fc, "HEAD_CHUNK", 64)
    assert ((head_logits(head, torch.from_numpy(features)) - whole).abs() <= tol).all()
    assert head_logits(head, torch.empty(0, 16)).shape == (0, 7)


def test_a_training_split_is_read_a_batch_at_a_time_keeping_only_the_rows_asked_for(
        tmp_path, monkeypatch):
    """With `top1`, the head runs per record batch (a 1.28 M-row split's features are never
    held whole for it) and `feature_rows` keeps only those rows' features: the same top
    classes as the head on the whole array, and exactly the asked rows, in row order,
    wherever the files and batches put them."""
    n, d, c = 300, 16, 7
    features, labels = unit_rows(n, d), np.arange(n) % c
    order = np.random.default_rng(1).permutation(n)
    write_entry(tmp_path / "entry", features, labels, files=3, order=order)
    monkeypatch.setattr(fc, "READ_BATCH", 32)
    torch.manual_seed(0)
    head = torch.nn.Linear(d, c)
    with torch.no_grad():
        logits = head(torch.from_numpy(features))
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4        # rows whose top class no rounding flips
    keep = torch.from_numpy(np.random.default_rng(2).random(n) < 0.3)
    part = read_entry(tmp_path / "entry", head, top1=True, feature_rows=keep)
    assert torch.equal(part.predictions[clear], logits.argmax(1)[clear])
    assert torch.equal(part.features, torch.from_numpy(features)[keep])
    assert torch.equal(part.feature_rows, keep) and part.logits is None
    assert torch.equal(part.labels, torch.from_numpy(labels).long())
    none = read_entry(tmp_path / "entry", head, with_features=False, top1=True)
    assert none.features.numel() == 0 and torch.equal(none.predictions, part.predictions)
    whole = read_entry(tmp_path / "entry", head, top1=True)
    assert torch.equal(whole.features, torch.from_numpy(features)) and whole.feature_rows is None
    with pytest.raises(ValueError, match="feature_rows"):
        read_entry(tmp_path / "entry", head, top1=True, feature_rows=keep[:10])


def test_files_are_hashed_once_per_process_and_damage_is_named(tmp_path, monkeypatch):
    entry = tmp_path / "entry"
    write_entry(entry, unit_rows(200, 8), np.arange(200) % 3, files=2)
    fc._HASHED.clear()                                    # a process that did not write it
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(fc.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert entry_problem(entry, "entry") is None and entry_problem(entry, "entry") is None
    assert len(hashed) == 2                               # two files, each hashed once
    part = entry / "part-00001.parquet"
    flip_middle_bytes(part)
    assert entry_problem(entry, "entry") is None          # same path, size, mtime: memoised
    fc._HASHED.clear()                                    # ... a new process hashes again
    problem = entry_problem(entry, "entry")
    assert problem is not None and str(part) in problem and "damaged" in problem
    with pytest.raises(FeatureCacheError) as raised:
        read_entry(entry)
    assert str(part) in str(raised.value) and "\n" not in str(raised.value)
    os.utime(part)                                        # a rewrite gets a new mtime
    assert "damaged" in entry_problem(entry, "entry")


def test_a_format_1_entry_is_refused_naming_its_format(tmp_path):
    features = unit_rows(50, 8)
    write_entry(tmp_path / "old", features, np.arange(50) % 3, fmt=1,
                logits=features @ unit_rows(4, 8).T)
    problem = entry_problem(tmp_path / "old", "old")
    assert problem is not None and "format 1" in problem
    with pytest.raises(FeatureCacheError, match="format 1"):
        read_entry(tmp_path / "old")


# -- through Ray Data: `ensure` rebuilds what it must, and only that ------------------

@pytest.fixture
def setup(image_task, ray_local, tmp_path):
    from conftest import image_task_spec
    from orchestrator.assets.benchmarks import load_benchmark
    from orchestrator.assets.loaded import load_assets
    from orchestrator.assets.models import load_model
    from orchestrator.run.features import model_head, zero_shot_ref
    from orchestrator.spec import parse_spec
    spec = parse_spec(image_task_spec(image_task, features={"batch_size": 5,
                                                             "cache_dir": str(tmp_path / "fc")}))
    bench = load_benchmark(spec.benchmark, load_model(spec.model))
    lines: list[str] = []
    head = model_head(load_assets(spec, CPU), None, CPU)
    return FeatureCache(spec, bench, lines.append), zero_shot_ref(spec, bench), head, lines


def read_all(cache, model, sets, head) -> dict:
    return {s: read_entry(cache.path(model, s), head) for s in sets}


def assert_same(got, want) -> None:
    for s in want:
        assert torch.equal(got[s].features, want[s].features), s
        assert torch.equal(got[s].labels, want[s].labels), s
        assert torch.equal(got[s].logits, want[s].logits), s


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_file_damaged_in_place_rebuilds_that_entry_alone(setup):
    cache, model, head, lines = setup
    sets = ["id_val", "id_test"]
    cache.ensure([(model, sets)], "zero-shot")
    before = read_all(cache, model, sets, head)
    test_manifest = (cache.path(model, "id_test") / MANIFEST).read_text()
    part = sorted(cache.path(model, "id_val").glob("*.parquet"))[0]
    flip_middle_bytes(part)
    fc._HASHED.clear()                      # the next sweep is a new process
    with pytest.raises(FeatureCacheError, match=str(part)):
        read_entry(cache.path(model, "id_val"), head)
    cache.ensure([(model, sets)], "zero-shot")
    assert "encoding 1 set(s)" in lines[-2] and "1 reused from the cache" in lines[-2]
    assert (cache.path(model, "id_test") / MANIFEST).read_text() == test_manifest
    assert_same(read_all(cache, model, sets, head), before)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_format_1_entry_is_treated_as_missing_and_rebuilt(setup, monkeypatch):
    cache, model, head, lines = setup
    cache.ensure([(model, ["id_val"])], "zero-shot")
    before = read_all(cache, model, ["id_val"], head)
    # today's key names the format: format 1 wrote its entries under other keys
    key = cache.key(model, "id_val")
    monkeypatch.setattr(fc, "FORMAT_VERSION", 1)
    assert cache.key(model, "id_val") != key
    monkeypatch.undo()
    # and an entry of format 1 where today's one belongs (its layout: features and
    # logits, sizes and no checksums) reads as missing
    folder = cache.path(model, "id_val")
    old = before["id_val"]
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    write_entry(folder, old.features.numpy(), old.labels.numpy(), fmt=1,
                logits=old.logits.numpy())
    assert not cache.is_complete(model, "id_val")
    cache.ensure([(model, ["id_val"])], "zero-shot")
    assert "encoding 1 set(s)" in lines[-2]
    assert json.loads((folder / MANIFEST).read_text())["format"] == FORMAT_VERSION
    assert_same(read_all(cache, model, ["id_val"], head), before)
