"""Where orch caches what it builds once (toy world, toy CLIP, features), and how.

Everything cached is keyed by a hash of what produced it, written to a temporary
file first and renamed into place, so an interrupted build never leaves a half file
that a later run would trust. A file lock makes concurrent builders (two trials,
two test processes) build once and share.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import platformdirs


def cache_dir() -> Path:
    """`$ORCH_CACHE_DIR`, else the user cache dir (e.g. ~/.cache/orch); absolute."""
    root = os.environ.get("ORCH_CACHE_DIR") or platformdirs.user_cache_dir("orch")
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(obj: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing); blocks until free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)
