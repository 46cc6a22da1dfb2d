"""Print one `make bench` run's figures (the JSON lines bench scripts wrote into
$ORCH_BENCH_SUMMARY) as one Markdown table, with the machine it ran on: what goes
into bench/RESULTS.md.
Usage: .venv/bin/python bench/summary.py FILE"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()} CPU(s) ({cpu}), {gpu}"


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    path = Path(sys.argv[1])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    print(f"\n## make bench, {datetime.date.today()}: {machine()}\n")
    print("| figure | orch | baseline | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        print(f"| {r['figure']}{note} | {r['orch']} | {r['baseline']} | {r['ratio']} | "
              f"{r['target']} | {met} |")
    if not rows:
        print("| (no figures recorded) | | | | | |")


if __name__ == "__main__":
    main()
