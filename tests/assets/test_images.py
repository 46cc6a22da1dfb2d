"""The check that every image of a benchmark opens, before anything starts: every bad
file is named, in file order, whether the files are read in this process or, above
IN_PROCESS files, chunk by chunk in spawned worker processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.assets import images


def files_with_two_bad_ones(folder: Path) -> list[str]:
    files = []
    for i in range(7):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / f"{i}.png")
        files.append(str(folder / f"{i}.png"))
    for i in (5, 1):
        Path(files[i]).write_bytes(b"not an image")
    return files


def test_the_check_names_every_bad_file_in_order(tmp_path):
    files = files_with_two_bad_ones(tmp_path)
    problems = images._find_problems(files, workers=1)
    assert [path for path, _ in problems] == [files[1], files[5]]
    assert all(why for _, why in problems)


@pytest.mark.e2e                     # spawns two Python worker processes
def test_the_parallel_image_check_names_every_bad_file_in_order(tmp_path, monkeypatch):
    """Above IN_PROCESS files the check runs in spawned worker processes, chunk by chunk:
    the bad files still come back all, in file order."""
    monkeypatch.setattr(images, "IN_PROCESS", 0)
    monkeypatch.setattr(images, "CHUNK", 2)
    files = files_with_two_bad_ones(tmp_path)
    problems = images._find_problems(files, workers=2)
    assert [path for path, _ in problems] == [files[1], files[5]]
