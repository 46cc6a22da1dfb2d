"""The feature cache: image features and logits of every set, encoded once per (model,
preprocessing, dataset) with Ray Data and kept as Parquet.

LP trains on the zero-shot features of the training split; OSE, VRF, the fine-tuned
and zero-shot points and WiSE-FT's endpoints are computed from cached logits and
features; nothing re-runs an image tower for them.

Layout: one entry per (model, set) under the cache root,

    <root>/<key>/part-*.parquet      columns: index, label, features (d floats), logits (C floats)
    <root>/<key>/_manifest.json      key, model, preprocessing, dataset fingerprint, rows, files

`key` hashes the model's identity (the content of its checkpoint file, or the
pre-trained weights, class names and templates of the zero-shot model), the evaluation
preprocessing and the dataset's manifest (its images and labels). An entry is written in
a temporary folder and renamed into place after its manifest, so a crash never leaves a
cache that reads as complete; an entry whose files do not match its manifest (truncated,
copied from elsewhere) is rebuilt. pandas or pyarrow read the files as they are:
features and logits are fixed-size lists of float32.

Encoding runs as one Ray Data job per stage: a range of row ids -> `map_batches` with an
actor pool (each actor loads the benchmark and its models once; GPUs per actor from the
sweep file) -> Parquet partitioned by (model, set).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orchestrator.spec import SweepSpec
from trainers.cache import cache_dir, fingerprint

FORMAT_VERSION = 1
MODEL_MEMORY = 2 << 30     # bytes of models a feature actor keeps loaded
MANIFEST = "_manifest.json"   # "_": pyarrow and pandas skip it when reading the folder
ZERO_SHOT = "zeroshot"


class FeatureCacheError(RuntimeError):
    """The feature cache could not be built or read."""


@dataclass(frozen=True)
class ModelRef:
    """A model whose features to cache: the zero-shot model (checkpoint None) or a
    trial's fitted-model file."""

    name: str                     # the trial name, or ZERO_SHOT
    checkpoint: str | None
    identity: str                 # content hash: what makes two models the same


def file_digest(path: str | Path) -> str:
    from orchestrator.storage import local_file
    h = hashlib.sha256()
    with open(local_file(str(path)), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def zero_shot_ref(spec: SweepSpec, bench) -> ModelRef:
    """The zero-shot model's identity: its weights (file content or pretrained tag), its
    architecture config, and the class names and templates its head is built from."""
    from trainers.models import RANDOM_INIT, random_init_identity
    if spec.model.arch == "toy":
        from trainers.toyworld.pretrain import toy_clip_checkpoint
        weights = file_digest(toy_clip_checkpoint(progress=False))
    elif spec.model.pretrained == RANDOM_INIT:
        weights = random_init_identity()        # seeded: the same weights in every process
    elif spec.model.pretrained and Path(spec.model.pretrained).is_file():
        weights = file_digest(spec.model.pretrained)
    else:
        weights = spec.model.pretrained or "hf-hub"   # a tag, or the weights an hf-hub: arch names
    config = file_digest(spec.model.config) if spec.model.config else None
    identity = fingerprint({"arch": spec.model.arch, "weights": weights, "config": config,
                            "classnames": bench.classnames, "templates": bench.templates}, 32)
    return ModelRef(ZERO_SHOT, None, identity)


def trial_ref(name: str, checkpoint: str) -> ModelRef:
    return ModelRef(name, checkpoint, file_digest(checkpoint))


def dataset_fingerprint(dataset) -> str:
    """What the images and labels of a dataset are: array contents for in-memory sets,
    (path, label, size, mtime) per file for image files, and the border cut from each
    image (so an uncropped entry of the same files is never reused)."""
    h = hashlib.sha256()
    if hasattr(dataset, "images"):                       # ArrayImageDataset
        h.update(np.ascontiguousarray(dataset.images).data)
        h.update(np.ascontiguousarray(dataset.labels).data)
    elif hasattr(dataset, "paths"):                      # FileImageDataset
        for path, label in zip(dataset.paths, dataset.labels):
            stat = os.stat(path)
            h.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        if getattr(dataset, "border", 0):                # cut frame (ObjectNet): other pixels
            h.update(f"border={dataset.border}\n".encode())
    else:
        raise FeatureCacheError(f"cannot fingerprint a {type(dataset).__name__} for the cache")
    h.update(str(len(dataset)).encode())
    return h.hexdigest()[:32]


class FeatureCache:
    """Entries of one sweep's benchmark and preprocessing; `ensure` builds what is missing."""

    def __init__(self, spec: SweepSpec, bench, echo: Callable[[str], None] = print):
        from orchestrator.build import feature_datasets
        self.spec, self.echo = spec, echo
        self.root = Path(spec.features.cache_dir or cache_dir() / "features")
        self.datasets = feature_datasets(bench)
        self.preprocessing = repr(bench.test.dataset.transform)
        self._set_ids = {name: dataset_fingerprint(ds) for name, ds in self.datasets.items()}

    def dataset_id(self, set_name: str) -> str:
        """The fingerprint of a set's images and labels."""
        return self._set_ids[set_name]

    def key(self, model: ModelRef, set_name: str) -> str:
        return fingerprint({"version": FORMAT_VERSION, "model": model.identity,
                            "preprocessing": self.preprocessing,
                            "precision": self.spec.eval.precision,
                            "dataset": self._set_ids[set_name]}, 32)

    def path(self, model: ModelRef, set_name: str) -> Path:
        return self.root / self.key(model, set_name)

    def is_complete(self, model: ModelRef, set_name: str) -> bool:
        return _valid_entry(self.path(model, set_name), self.key(model, set_name))

    def ensure(self, jobs: list[tuple[ModelRef, list[str]]], stage: str) -> dict[tuple[str, str], str]:
        """Entry paths {(model name, set): path} for every job, encoding what is missing
        in one Ray Data job."""
        paths = {(m.name, s): str(self.path(m, s)) for m, sets in jobs for s in sets}
        missing = [(m, [s for s in sets if not self.is_complete(m, s)]) for m, sets in jobs]
        missing = [(m, sets) for m, sets in missing if sets]
        total = sum(len(sets) for _, sets in jobs)
        if not missing:
            self.echo(f"[features] {stage}: all {total} cached set(s) reused from {self.root}")
            return paths
        todo = sum(len(sets) for _, sets in missing)
        images = sum(len(self.datasets[s]) for _, sets in missing for s in sets)
        reused = f", {total - todo} reused from the cache" if total > todo else ""
        self.echo(f"[features] {stage}: encoding {todo} set(s), {images:,} images, with Ray "
                  f"Data{reused} ...")
        started = time.monotonic()
        self._encode(missing)
        self.echo(f"[features] {stage}: done in {time.monotonic() - started:.0f}s")
        return paths

    def _encode(self, jobs: list[tuple[ModelRef, list[str]]]) -> None:
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        f = self.spec.features
        # Rows are (model, set, index) triples, numbered 0..total-1 in job order; each
        # (model, set) is one segment, written to its own Parquet partition.
        segments = [(m.name, m.checkpoint, s, len(self.datasets[s])) for m, sets in jobs
                    for s in sets]
        total = sum(n for *_, n in segments)
        # a small job is not worth starting (and loading the model in) many actors
        actors = f.actors or max(1, min(_pool_size(f), total // (4 * f.batch_size)))
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = False
        staging = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        try:
            # Row ids live in the object store from the start (no read tasks) and the
            # Parquet writes take no CPU: the actor pool may hold every CPU without
            # starving the stages around it (with a CPU-bound read or write, a pool that
            # fills the cluster deadlocks).
            blocks = max(actors * 2, min(total // f.batch_size + 1, 200))
            ids = ray.data.from_arrow([pa.table({"id": chunk})
                                       for chunk in np.array_split(np.arange(total), blocks)])
            encoded = ids.map_batches(
                FeatureEncoder, fn_constructor_kwargs={"spec": self.spec, "segments": segments},
                batch_size=f.batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(size=actors),
                num_cpus=f.cpus_per_actor, num_gpus=f.gpus_per_actor)
            encoded.write_parquet(str(staging), partition_cols=["segment"], concurrency=1,
                                  ray_remote_args={"num_cpus": 0})
            pairs = [(m, s) for m, sets in jobs for s in sets]     # segment i = pairs[i]
            for i, (model, s) in enumerate(pairs):
                self._commit(staging / f"segment={i}", model, s)
        except FeatureCacheError:
            raise
        except Exception as err:
            raise FeatureCacheError(f"feature encoding failed: {_one_line(err)}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, folder: Path, model: ModelRef, set_name: str) -> None:
        """Move one (model, set) partition into its entry: files, then the manifest, then
        one rename. A finished entry that appeared meanwhile (another sweep) wins."""
        key = self.key(model, set_name)
        files = sorted(folder.glob("*.parquet"))
        rows = sum(pq.read_metadata(p).num_rows for p in files)
        expected = len(self.datasets[set_name])
        if rows != expected:
            raise FeatureCacheError(f"feature encoding of {set_name} for {model.name} gave "
                                    f"{rows} rows, expected {expected}")
        tmp = self.root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            entries = []
            for i, source in enumerate(files):
                target = tmp / f"part-{i:05d}.parquet"
                shutil.move(str(source), target)
                entries.append({"name": target.name, "bytes": target.stat().st_size,
                                "rows": pq.read_metadata(target).num_rows})
            manifest = {"key": key, "format": FORMAT_VERSION, "model": model.identity,
                        "model_name": model.name, "checkpoint": model.checkpoint,
                        "set": set_name, "dataset": self._set_ids[set_name],
                        "preprocessing": self.preprocessing, "rows": rows, "files": entries,
                        "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            final = self.root / key
            if final.exists() and not _valid_entry(final, key):    # stale: it failed checks
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                # another sweep committed this entry between the check and the rename
                if not _valid_entry(final, key):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)      # gone after a rename; else cleaned


def _pool_size(f) -> int:
    import ray
    have = ray.cluster_resources()
    by_cpu = int(have.get("CPU", 1) // f.cpus_per_actor)
    by_gpu = int(have.get("GPU", 0) // f.gpus_per_actor) if f.gpus_per_actor else by_cpu
    return max(1, min(by_cpu, by_gpu))


def _valid_entry(folder: Path, key: str) -> bool:
    """Complete and ours: the manifest names this key and every file has the size and
    row count it recorded."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
            return False
        rows = 0
        for entry in manifest["files"]:
            path = folder / entry["name"]
            if path.stat().st_size != entry["bytes"]:
                return False
            rows += pq.read_metadata(path).num_rows
        return rows == manifest["rows"]
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return False


@dataclass(frozen=True)
class CachedSet:
    features: torch.Tensor    # (N, d) float32, L2-normalised
    logits: torch.Tensor      # (N, C) float32, over the ID classes
    labels: torch.Tensor      # (N,) int64, in the set's own class space


def read_entry(path: str | Path, with_features: bool = True) -> CachedSet:
    """One cached (model, set), rows in dataset order."""
    path = Path(path)
    if not _valid_entry(path, path.name):
        raise FeatureCacheError(f"feature cache entry {path} is missing or incomplete")
    columns = ["index", "label", "logits"] + (["features"] if with_features else [])
    files = [str(p) for p in sorted(path.glob("*.parquet"))]
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in files).sort_by("index")

    def matrix(name: str) -> torch.Tensor:
        column = table[name].combine_chunks()
        width = column.type.list_size
        return torch.from_numpy(column.flatten().to_numpy().reshape(-1, width).copy())

    return CachedSet(features=matrix("features") if with_features else torch.empty(0),
                     logits=matrix("logits"),
                     labels=torch.from_numpy(table["label"].to_numpy().astype(np.int64)))


def _one_line(err: BaseException) -> str:
    """The user-facing cause of a failed Ray Data job. Ray wraps the actor's exception in
    layers whose own messages say nothing about it, so search the whole chain's text for
    the original `SomeError: message` line (a corrupt image's DataError, say)."""
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    for text in texts:
        for line in reversed(text.splitlines()):
            match = re.match(r"^\s*(?:[\w.]+\.)?(\w*Error|\w*Exception): (.+)$", line)
            if match and not match.group(1).startswith(("Ray", "UserCode")):
                return f"{match.group(1)}: {match.group(2)}"
    lines = [line for line in texts[0].strip().splitlines() if line.strip()] if texts else []
    return lines[-1] if lines else "unknown error"


class FeatureEncoder:
    """A Ray Data actor: loads the benchmark and models once, encodes batches of row ids."""

    def __init__(self, spec: SweepSpec, segments: list[tuple[str, str | None, str, int]]):
        from orchestrator.build import feature_datasets, load_assets, load_fitted
        threads = max(1, int(spec.features.cpus_per_actor))
        torch.set_num_threads(threads)
        use_gpu = spec.features.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.assets = load_assets(spec, self.device)
        self.datasets = feature_datasets(self.assets.bench)
        self.segments = segments
        self.precision = spec.eval.precision
        self.starts = np.cumsum([0] + [n for *_, n in segments])
        self._load_fitted = load_fitted
        self._models: dict[str, torch.nn.Module] = {}
        self._sizes: dict[str, int] = {}

    def _classifier(self, name: str, checkpoint: str | None) -> torch.nn.Module:
        """Models stay loaded while they fit in MODEL_MEMORY (blocks of several models
        reach each actor in turn); the oldest goes first."""
        if name not in self._models:
            model = self._load_fitted(self.assets, checkpoint, self.device).classifier.eval()
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            while self._models and size + sum(self._sizes.values()) > MODEL_MEMORY:
                oldest = next(iter(self._models))
                del self._models[oldest], self._sizes[oldest]
            self._models[name], self._sizes[name] = model, size
        return self._models[name]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from trainers.evaluate import encode_batch
        ids = np.asarray(batch["id"])
        segment = np.searchsorted(self.starts, ids, side="right") - 1
        tables = []
        for seg in np.unique(segment):
            name, checkpoint, set_name, _ = self.segments[seg]
            index = ids[segment == seg] - self.starts[seg]
            dataset = self.datasets[set_name]
            items = [dataset[int(i)] for i in index]
            images = torch.stack([image for image, _ in items])
            labels = np.array([label for _, label in items], dtype=np.int64)
            features, logits = encode_batch(self._classifier(name, checkpoint), images,
                                            self.device, self.precision)
            tables.append(pa.table({
                "segment": pa.array(np.full(len(index), seg, dtype=np.int64)),
                "index": pa.array(index.astype(np.int64)), "label": pa.array(labels),
                "features": _fixed_list(features.numpy()), "logits": _fixed_list(logits.numpy())}))
        return pa.concat_tables(tables)


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
