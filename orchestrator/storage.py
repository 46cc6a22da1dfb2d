"""A sweep's storage: a local (or NFS) folder, or a bucket URI (s3://, gs://) that Ray
Tune and pyarrow understand. orch keeps each sweep's own record there first (its spec,
every finished trial and point), so nothing computed depends on MLflow being up.

Paths are plain strings: a local path is absolute; a URI is passed to Tune untouched.
Writes of small files are atomic (local: temporary file + rename; buckets: one PUT).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs

from trainers.cache import cache_dir

URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


class StorageError(RuntimeError):
    """The sweep's storage cannot be used; the message is one line."""


def is_uri(path: str) -> bool:
    return "://" in path


def check_uri(path: str) -> str | None:
    """None if `path` is a well-formed bucket URI, else what is wrong with it."""
    parsed = urlparse(path)
    if parsed.scheme not in URI_SCHEMES:
        return f"unsupported storage scheme {parsed.scheme!r} (use a local path or " \
               f"{', '.join(s + '://' for s in URI_SCHEMES[:2])})"
    if not parsed.netloc:
        return f"{path!r} names no bucket"
    return None


def check_writable(path: str) -> None:
    """A local storage path can be written: the folder, or the nearest folder above it
    that exists, takes a probe (made and removed again, so a dry run leaves nothing). A
    URI is only checked for its form (a bucket is checked when Tune first writes to it)."""
    if is_uri(path):
        problem = check_uri(path)
        if problem:
            raise StorageError(problem)
        return
    folder = Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".orch-write-probe-"))
    except OSError as err:
        raise StorageError(f"cannot write to {folder}: {err.strerror or err} "
                           f"({err.filename or existing})") from None


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _fs(path: str):
    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def write_text(path: str, text: str) -> None:
    """Write a small file atomically: never a half file that a reader would take as
    complete (local: temporary file + rename; bucket: one PUT)."""
    try:
        if is_uri(path):
            fs, key = _fs(path)
            with fs.open_output_stream(key) as out:
                out.write(text.encode())
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)     # gone after the replace; else a full disk
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}") from None


def read_text(path: str) -> str | None:
    """The text at `path`, or None when there is none (or it is unreadable)."""
    try:
        if is_uri(path):
            fs, key = _fs(path)
            with fs.open_input_stream(key) as handle:
                return handle.read().decode()
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: str) -> Any | None:
    """The JSON at `path`, or None when there is none (or it is unreadable)."""
    text = read_text(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def list_json(folder: str) -> list[str]:
    """Paths of the .json files directly in `folder` (none if it does not exist)."""
    return _list(folder, dirs=False)


def list_dirs(folder: str) -> list[str]:
    """Paths of the folders directly in `folder` (none if it does not exist)."""
    return _list(folder, dirs=True)


def _list(folder: str, dirs: bool) -> list[str]:
    try:
        if is_uri(folder):
            fs, key = _fs(folder)
            infos = fs.get_file_info(pyarrow.fs.FileSelector(key, allow_not_found=True))
            return sorted(join(folder, Path(i.path).name) for i in infos
                          if (i.type == pyarrow.fs.FileType.Directory) == dirs
                          and (dirs or i.path.endswith(".json")))
        local = Path(folder)
        return sorted(str(p) for p in (local.iterdir() if dirs else local.glob("*.json"))
                      if p.is_dir() == dirs)
    except OSError:
        return []


def local_file(path: str, cache: Path | None = None) -> Path:
    """A local path for a file in the storage: itself when local, else a copy fetched
    once into `cache` (a file's URI names it for good: checkpoints are never rewritten)."""
    if not is_uri(path):
        return Path(path)
    folder = (cache or cache_dir() / "fetched") / hashlib.sha256(path.encode()).hexdigest()[:24]
    target = folder / Path(urlparse(path).path).name
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fs, key = _fs(path)
        tmp = folder / f".{target.name}.{uuid.uuid4().hex[:8]}"
        pyarrow.fs.copy_files(key, str(tmp), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        os.replace(tmp, target)
    return target
