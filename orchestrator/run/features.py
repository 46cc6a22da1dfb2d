"""The feature cache: image features of every set, encoded once per (model,
preprocessing, dataset) with Ray Data and kept as Parquet; logits are computed from them
when read, by the model's own head.

LP trains on the zero-shot features of the training split; OSE, VRF, the fine-tuned
and zero-shot points and WiSE-FT's endpoints are computed from cached features (logits
= the model's head on them, as `ImageClassifier.forward` applies it); nothing re-runs an
image tower for them. Keeping logits out of an entry saves C / (d + C) of it: two thirds
for ImageNet (d = 512, C = 1,000), where a head recomputes them in milliseconds.

Layout: one entry per (model, set) under the cache root,

    <root>/<key>/part-*.parquet      columns: index, label, features (d floats)
    <root>/<key>/_manifest.json      key, format, model, preprocessing, precision,
                                     dataset fingerprint, rows, files (bytes, rows, sha256)

`key` hashes the format version, the model's identity (the content of its checkpoint
file, or the pre-trained weights, class names and templates of the zero-shot model), the
evaluation preprocessing and precision, and the dataset's manifest (its images and
labels). An entry is written in a temporary folder and renamed into place after its
manifest, so a crash never leaves a cache that reads as complete. An entry whose files
do not match its manifest (size or sha256: truncated, damaged in place, copied from
elsewhere) or that an older format wrote is rebuilt by `ensure`, and `read_entry`
refuses it in one line naming the file; each file is hashed once per process (memoised
by path, size and mtime). pandas or pyarrow read the files as they are: features are
fixed-size lists of float32 (zstd, byte-stream-split: ~0.85x their raw size).

Encoding runs as one Ray Data job per stage: a range of row ids -> `map_batches` with an
actor pool (each actor loads the benchmark and its models once; GPUs per actor from the
sweep file) -> Parquet partitioned by (model, set).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext
from torch import nn

from orchestrator.assets.benchmarks import feature_datasets
from orchestrator.assets.loaded import Assets, load_assets, load_fitted
from orchestrator.run.cluster import Have, feature_layout
from orchestrator.run.errors import cause_line
from orchestrator.spec.types import SweepSpec
from orchestrator.storage import local_file
from trainers.cache import cache_dir, fingerprint
from trainers.evaluate import autocast, encode_batch
from trainers.models import RANDOM_INIT, TOY, names_a_file, random_init_identity
from trainers.toyworld.pretrain import toy_clip_checkpoint

# 1: features and logits, files checked by size. 2: features only (logits from the
# model's head when read), files checked by sha256. Part of every key, and checked in
# every manifest: an entry of another format is never read, and is rebuilt.
FORMAT_VERSION = 2
MODEL_MEMORY = 2 << 30     # bytes of models a feature actor keeps loaded
MANIFEST = "_manifest.json"   # "_": pyarrow and pandas skip it when reading the folder
ZERO_SHOT = "zeroshot"
# Float32 features barely compress as they are; split into byte streams, their sign and
# exponent bytes do (zstd level 1 reads as fast as uncompressed: ~0.85x of N x d x 4
# bytes for unit-norm fp32 features, less for bf16 ones). No dictionary: floats rarely
# repeat, and byte-stream-split needs the column plain.
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1, "use_dictionary": False,
                   "column_encoding": {"features.list.element": "BYTE_STREAM_SPLIT"}}
HEAD_CHUNK = 1 << 16      # rows per head call when computing logits (bounds temporaries)
TOP1_CHUNK = 1 << 14      # ... when only top classes are kept (a training split's)
READ_BATCH = 1 << 14      # rows per Parquet record batch when reading an entry (33 MB at d=512)
READ_BUFFER = 1 << 20     # bytes of a file read at a time


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
    h = hashlib.sha256()
    with open(local_file(str(path)), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def zero_shot_ref(spec: SweepSpec, bench) -> ModelRef:
    """The zero-shot model's identity: its weights (file content or pretrained tag), its
    architecture config, and the class names and templates its head is built from."""
    if spec.model.arch == TOY:
        weights = file_digest(toy_clip_checkpoint(progress=False))
    elif spec.model.pretrained == RANDOM_INIT:
        weights = random_init_identity()        # seeded: the same weights in every process
    elif spec.model.pretrained and names_a_file(spec.model.pretrained):
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
        actors, decoders = feature_layout(self.spec.features, Have.now(), images)
        layout = f"{actors} model actor(s)" + (f", {decoders} decoder(s)" if decoders else "")
        self.echo(f"[features] {stage}: encoding {todo} set(s), {images:,} images, with Ray "
                  f"Data ({layout}){reused} ...")
        started = time.monotonic()
        self._encode(missing, actors, decoders)
        self.echo(f"[features] {stage}: done in {time.monotonic() - started:.0f}s")
        return paths

    def _encode(self, jobs: list[tuple[ModelRef, list[str]]], actors: int, decoders: int) -> None:
        f = self.spec.features
        # Rows are (model, set, index) triples, numbered 0..total-1 in job order; each
        # (model, set) is one segment, written to its own Parquet partition.
        segments = [(m.name, m.checkpoint, s, len(self.datasets[s])) for m, sets in jobs
                    for s in sets]
        total = sum(n for *_, n in segments)
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
            if decoders:
                # JPEG decoding and resizing on CPU actors, so a GPU model actor never
                # waits on the one core it holds; pixels reach it through the object store
                ids = ids.map_batches(
                    ImageDecoder, fn_constructor_kwargs={
                        "datasets": {s: self.datasets[s] for *_, s, _ in segments},
                        "segments": segments},
                    batch_size=f.batch_size, batch_format="numpy",
                    compute=ActorPoolStrategy(size=decoders), num_cpus=1)
            encoded = ids.map_batches(
                FeatureEncoder, fn_constructor_kwargs={"spec": self.spec, "segments": segments},
                batch_size=f.batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(size=actors),
                num_cpus=f.cpus_per_actor, num_gpus=f.gpus_per_actor)
            encoded.write_parquet(str(staging), partition_cols=["segment"], concurrency=1,
                                  ray_remote_args={"num_cpus": 0}, **PARQUET_OPTIONS)
            pairs = [(m, s) for m, sets in jobs for s in sets]     # segment i = pairs[i]
            for i, (model, s) in enumerate(pairs):
                self._commit(staging / f"segment={i}", model, s)
        except FeatureCacheError:
            raise
        except Exception as err:
            raise FeatureCacheError(f"feature encoding failed: {cause_line(err)}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, folder: Path, model: ModelRef, set_name: str) -> None:
        """Move one (model, set) partition into its entry: files (each with its sha256),
        then the manifest, then one rename. A finished entry that appeared meanwhile
        (another sweep) wins."""
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
                                "rows": pq.read_metadata(target).num_rows,
                                "sha256": _sha256(target)})
            manifest = {"key": key, "format": FORMAT_VERSION, "model": model.identity,
                        "model_name": model.name, "checkpoint": model.checkpoint,
                        "set": set_name, "dataset": self._set_ids[set_name],
                        "preprocessing": self.preprocessing,
                        "precision": self.spec.eval.precision, "rows": rows,
                        "files": entries, "created": time.time()}
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


# sha256 of each cache file this process has hashed, by (path, size, mtime): an entry is
# read many times per process (every ensemble job reads the zero-shot entries) and
# hashed once. A file rewritten in place gets a new mtime; damage that keeps size and
# mtime (bit rot) is caught by the next process.
_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                h.update(block)
        _HASHED[memo] = h.hexdigest()
    return _HASHED[memo]


def entry_problem(folder: Path, key: str) -> str | None:
    """Why an entry cannot be read (one line, naming the file), or None when it is
    complete and ours: its manifest names this key and this format, and every file has
    the size and sha256 it recorded (hashed once per process)."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"{manifest_path} is missing or unreadable"
    try:
        if manifest.get("format") != FORMAT_VERSION:
            return (f"{folder} was written by feature-cache format {manifest.get('format')}; "
                    f"this orch reads format {FORMAT_VERSION} (the sweep rebuilds it)")
        if manifest.get("key") != key:
            return f"{manifest_path} belongs to entry {manifest.get('key')}, not {key}"
        for entry in manifest["files"]:
            path = folder / entry["name"]
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{path} has {path.stat().st_size} bytes, its manifest says {entry['bytes']}"
            if _sha256(path) != entry["sha256"]:
                return f"{path} is damaged: its sha256 differs from the one in {MANIFEST}"
        if sum(entry["rows"] for entry in manifest["files"]) != manifest["rows"]:
            return f"{manifest_path}: its files do not hold its {manifest['rows']} rows"
    except (OSError, TypeError, KeyError, AttributeError) as err:
        return f"{manifest_path} is malformed ({cause_line(err)})"
    return None


def write_entry(folder: Path, parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                rows_per_file: int = 1 << 19, precision: str = "fp32") -> None:
    """An entry in the cache's format, its key the folder's name, from (row indices,
    labels, features) parts: for benchmarks and tests that need an ImageNet-sized entry
    without encoding one (sweeps write theirs through Ray Data and `_commit`)."""
    folder.mkdir(parents=True)
    files, writer, total = [], None, 0

    def close() -> None:
        writer.close()
        path = folder / files[-1]["name"]
        files[-1].update(bytes=path.stat().st_size, sha256=_sha256(path))
    for index, labels, features in parts:
        if writer is None or files[-1]["rows"] >= rows_per_file:
            if writer is not None:
                close()
            files.append({"name": f"part-{len(files):05d}.parquet", "rows": 0})
            writer = None
        table = pa.table({"index": pa.array(np.asarray(index, np.int64)),
                          "label": pa.array(np.asarray(labels, np.int64)),
                          "features": _fixed_list(features)})
        if writer is None:
            writer = pq.ParquetWriter(folder / files[-1]["name"], table.schema, **PARQUET_OPTIONS)
        writer.write_table(table)
        files[-1]["rows"] += len(index)
        total += len(index)
    if writer is not None:
        close()
    manifest = {"key": folder.name, "format": FORMAT_VERSION, "precision": precision,
                "rows": total, "files": files, "created": time.time()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _valid_entry(folder: Path, key: str) -> bool:
    return entry_problem(folder, key) is None


def model_head(assets: Assets, checkpoint: str | None, device: torch.device) -> nn.Module:
    """The head that turns a model's cached features into its logits: the zero-shot
    model's, or the one in a trial's fitted-model file. The file is memory-mapped, so
    only the head's tensors are read, not the image tower's."""
    zero_shot = assets.start.zero_shot.head
    if checkpoint is None:
        return zero_shot.to(device).eval()
    state = torch.load(local_file(str(checkpoint)), map_location="cpu", weights_only=True,
                       mmap=True)["classifier"]
    head = copy.deepcopy(zero_shot)      # the classifier's own module: the same maths
    head.load_state_dict({k[len("head."):]: v for k, v in state.items()
                          if k.startswith("head.")})
    return head.to(device).eval()


@torch.no_grad()
def head_logits(head: nn.Module, features: torch.Tensor, precision: str = "fp32",
                top1: bool = False) -> torch.Tensor:
    """(N, C) float32 logits on the head's device: the head on the features, as the
    classifier applies it (same autocast as `encode_batch`), in chunks of HEAD_CHUNK rows.
    They equal the encoder's own logits up to float32 summation order (other batch sizes
    or device). With `top1`, only each row's top class (N,): the whole (N, C) is never
    held."""
    device = next(head.parameters()).device
    chunks = []
    step = min(HEAD_CHUNK, TOP1_CHUNK) if top1 else HEAD_CHUNK
    for start in range(0, len(features), step):
        rows = features[start:start + step].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = head(rows).float()
        chunks.append(logits.argmax(1) if top1 else logits)
    if not chunks:
        return torch.empty(0, dtype=torch.int64, device=device) if top1 else \
            torch.empty(0, head.out_features, device=device)
    return torch.cat(chunks)


@dataclass(frozen=True)
class CachedSet:
    features: torch.Tensor        # (N, d) float32, L2-normalised (empty when not asked for);
                                  # with `feature_rows`, only those rows, in row order
    labels: torch.Tensor          # (N,) int64, in the set's own class space
    logits: torch.Tensor | None   # (N, C) float32 over the ID classes; None without a head
    predictions: torch.Tensor | None = None   # (N,) top classes, when asked for (top1)
    feature_rows: torch.Tensor | None = None  # (N,) bool: the rows `features` holds (None: all)


def read_entry(path: str | Path, head: nn.Module | None = None, *,
               with_features: bool = True, top1: bool = False,
               feature_rows: torch.Tensor | None = None) -> CachedSet:
    """One cached (model, set), rows in dataset order; with the model's `head`
    (`model_head`), its logits too, computed on the head's device, or with `top1` only
    its top classes, computed a record batch at a time (a training split's features and
    logits are never held whole). `feature_rows` (N,) bool keeps only those rows'
    features (VRF's index: the rows the zero-shot model gets wrong). A missing, damaged
    or older-format entry raises FeatureCacheError naming the file."""
    path = Path(path)
    problem = entry_problem(path, path.name)
    if problem:
        raise FeatureCacheError(f"feature cache entry unusable: {problem}")
    manifest = json.loads((path / MANIFEST).read_text())
    precision, rows = manifest["precision"], manifest["rows"]
    files = [str(p) for p in sorted(path.glob("*.parquet"))]
    streamed = top1 and head is not None
    keep = None if feature_rows is None else np.asarray(feature_rows, dtype=bool)
    if keep is not None and keep.shape != (rows,):
        raise ValueError(f"feature_rows: expected ({rows},) for {path}, got {keep.shape}")
    # Which rows' features are held while reading: all of them when the logits need them
    # (the head then runs over the whole array, in HEAD_CHUNK rows), else the kept ones
    # (`held`, each at its `slot`), or none.
    held = keep if streamed and with_features else None
    n_held = (rows if not streamed else 0 if not with_features else
              rows if held is None else int(held.sum()))
    slot = None if held is None else np.cumsum(held) - 1
    # Rows go straight to their place in one preallocated array, a record batch at a
    # time: the entry is held once (a 1.28 M x 512 split is 2.6 GB), never twice.
    try:
        width = pq.read_schema(files[0]).field("features").type.list_size if files else 0
        features = np.empty((n_held, width), dtype=np.float32)
        labels = np.empty(rows, dtype=np.int64)
        predictions = np.empty(rows, dtype=np.int64) if streamed else None
        seen = np.zeros(rows, dtype=bool)
        for f in files:
            # Column chunks read through a 1 MiB buffer, not pre-buffered whole, and the
            # pool's freed memory handed back after each batch: a 1.28 M-row split then
            # reads in ~0.25 GB above the process's own (0.9 GB more with the defaults,
            # which Arrow's pool kept after the read, too)
            reader = pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)
            for batch in reader.iter_batches(batch_size=READ_BATCH,
                                             columns=["index", "label", "features"]):
                index = batch.column("index").to_numpy()
                if index.size and (index.min() < 0 or index.max() >= rows or seen[index].any()):
                    raise FeatureCacheError(f"feature cache entry {path}: row indices do not "
                                            f"cover 0..{rows - 1} once each ({f})")
                seen[index] = True
                pa.default_memory_pool().release_unused()
                labels[index] = batch.column("label").to_numpy()
                values = batch.column("features").flatten().to_numpy().reshape(-1, width)
                if streamed:     # a copy: Arrow's buffers are read-only, torch wants writable
                    predictions[index] = head_logits(head, torch.from_numpy(values.copy()),
                                                     precision, top1=True).cpu().numpy()
                if not n_held:
                    continue
                if held is None:
                    features[index] = values
                else:
                    mine = held[index]
                    features[slot[index[mine]]] = values[mine]
    except pa.ArrowException as err:
        raise FeatureCacheError(f"feature cache entry {path}: {cause_line(err)}") from err
    if not seen.all():
        raise FeatureCacheError(f"feature cache entry {path}: {int((~seen).sum())} of {rows} "
                                "rows missing")
    features, labels = torch.from_numpy(features), torch.from_numpy(labels)
    if streamed:
        logits, top = None, torch.from_numpy(predictions)
    else:
        computed = None if head is None else head_logits(head, features, precision, top1=top1)
        logits, top = (None, computed) if top1 else (computed, None)
        if keep is not None:
            features = features[torch.from_numpy(keep)]
    kept = keep is not None and with_features
    return CachedSet(features=features if with_features else torch.empty(0), labels=labels,
                     logits=logits, predictions=top,
                     feature_rows=torch.from_numpy(keep) if kept else None)


class _Rows:
    """Row ids -> (segment, index in its set), for the segments of one encoding job."""

    def __init__(self, segments: list[tuple[str, str | None, str, int]]):
        self.segments = segments
        self.starts = np.cumsum([0] + [n for *_, n in segments])

    def split(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """[(segment, positions in `ids`, indices in the segment's set)] per segment."""
        segment = np.searchsorted(self.starts, ids, side="right") - 1
        return [(int(seg), np.flatnonzero(segment == seg), ids[segment == seg] - self.starts[seg])
                for seg in np.unique(segment)]


def decode(dataset, index: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Images (transformed, stacked) and labels of `index` in `dataset`."""
    items = [dataset[int(i)] for i in index]
    return (torch.stack([image for image, _ in items]),
            np.array([label for _, label in items], dtype=np.int64))


class ImageDecoder:
    """A Ray Data CPU actor: reads, decodes and transforms the images of batches of row
    ids, for the model actors (`features.decode_actors`). Its datasets come pickled from
    the driver (paths and the model's transforms): no model is loaded here."""

    def __init__(self, datasets: dict, segments: list[tuple[str, str | None, str, int]]):
        torch.set_num_threads(1)
        self.datasets, self.rows = datasets, _Rows(segments)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # rows leave grouped by segment, each with its own id: the encoder places them
        rows, ids, images, labels = np.asarray(batch["id"]), [], [], []
        for seg, positions, index in self.rows.split(rows):
            pixels, label = decode(self.datasets[self.rows.segments[seg][2]], index)
            ids.append(rows[positions])
            images.append(pixels)
            labels.append(label)
        return {"id": np.concatenate(ids), "label": np.concatenate(labels),
                "pixels": torch.cat(images).numpy()}


class FeatureEncoder:
    """A Ray Data actor: loads the benchmark and models once, encodes batches of row ids
    (decoding their images itself, or taking the pixels an `ImageDecoder` made)."""

    def __init__(self, spec: SweepSpec, segments: list[tuple[str, str | None, str, int]]):
        threads = max(1, int(spec.features.cpus_per_actor))
        torch.set_num_threads(threads)
        use_gpu = spec.features.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.assets = load_assets(spec, self.device)
        self.datasets = feature_datasets(self.assets.bench)
        self.rows = _Rows(segments)
        self.precision = spec.eval.precision
        self._models: dict[str, torch.nn.Module] = {}
        self._sizes: dict[str, int] = {}

    def _classifier(self, name: str, checkpoint: str | None) -> torch.nn.Module:
        """Models stay loaded while they fit in MODEL_MEMORY (blocks of several models
        reach each actor in turn); the oldest goes first."""
        if name not in self._models:
            model = load_fitted(self.assets, checkpoint, self.device).classifier.eval()
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            while self._models and size + sum(self._sizes.values()) > MODEL_MEMORY:
                oldest = next(iter(self._models))
                del self._models[oldest], self._sizes[oldest]
            self._models[name], self._sizes[name] = model, size
        return self._models[name]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = np.asarray(batch["id"])
        tables = []
        for seg, positions, index in self.rows.split(ids):
            name, checkpoint, set_name, _ = self.rows.segments[seg]
            if "pixels" in batch:          # decoded by an ImageDecoder
                images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][positions]))
                labels = np.asarray(batch["label"])[positions]
            else:
                images, labels = decode(self.datasets[set_name], index)
            # the logits encode_batch also gives are not kept: the head recomputes them
            features, _ = encode_batch(self._classifier(name, checkpoint), images,
                                       self.device, self.precision)
            tables.append(pa.table({
                "segment": pa.array(np.full(len(index), seg, dtype=np.int64)),
                "index": pa.array(index.astype(np.int64)), "label": pa.array(labels),
                "features": _fixed_list(features.numpy())}))
        return pa.concat_tables(tables)


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
