"""One JSON line per figure into the file $ORCH_BENCH_SUMMARY names, when it is set:
`make bench` sets it, and `bench/summary.py` prints the lines of one run as one table
(each figure, its baseline, the ratio, the target, met or not). Run by hand, a script
only prints its own lines."""
from __future__ import annotations

import json
import os


def record(figure: str, orch: str, baseline: str, ratio: str, target: str = "-",
           met: bool | None = None, note: str = "") -> None:
    """One row: `orch` and `baseline` as read (e.g. "451 img/s"), `ratio` as printed."""
    path = os.environ.get("ORCH_BENCH_SUMMARY")
    if not path:
        return
    row = {"figure": figure, "orch": orch, "baseline": baseline, "ratio": ratio,
           "target": target, "met": met, "note": note}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")
