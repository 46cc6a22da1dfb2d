"""Checks that run before anything starts (and in `--dry-run`): every image file of the
benchmark opens, read in parallel, and every bad file is reported, not only the first.

A passed check is remembered per dataset fingerprint (paths, sizes, modification times)
in the orch cache, so the second sweep on the same files does not read them again.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from trainers.cache import cache_dir
from trainers.data import Benchmark, DataError

SHOWN = 5      # bad files named in the message; the rest are counted


def _problem(path: Path) -> str | None:
    """Why `path` is not a readable image (header and structure), or None."""
    try:
        with Image.open(path) as image:
            image.verify()          # parses the whole structure without decoding pixels
        return None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as err:
        return " ".join(str(err).split()) or type(err).__name__


def image_files(bench: Benchmark) -> list[Path]:
    """Every image file the benchmark reads: training split and every eval set."""
    datasets = [bench.train] + [s.dataset for s in bench.eval_sets().values()]
    files: dict[Path, None] = {}
    for dataset in datasets:
        for path in getattr(dataset, "paths", ()):
            files[Path(path)] = None
    return list(files)


def check_images(bench: Benchmark, workers: int | None = None) -> int:
    """Raise DataError naming the unreadable files; returns how many files were checked
    (0 when the benchmark has no files or a previous check of the same files passed)."""
    files = image_files(bench)
    if not files:
        return 0
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    marker = cache_dir() / "image_checks" / digest.hexdigest()[:32]
    if marker.is_file():
        return 0
    with ThreadPoolExecutor(max_workers=workers or min(32, 4 * (os.cpu_count() or 1))) as pool:
        problems = [(p, why) for p, why in zip(files, pool.map(_problem, files)) if why]
    if problems:
        shown = "; ".join(f"{p} ({why})" for p, why in problems[:SHOWN])
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"{len(problems)} of {len(files)} image file(s) cannot be read: "
                        f"{shown}{more}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{len(files)} files ok\n")
    return len(files)
