"""Benchmark: the driver's cost per training trial, from 10 to 200 short trials.

Runs `orch sweep` on the toy world with N one-step FT trials (a grid over `seed`), one
trial at a time, for each N in `--trials`. Each trial's own time is what Tune measured
inside it (`seconds` in its journal record: loading the model and data, the step, the
checkpoint); the driver's overhead per trial is the training stage's span (first trial's
start to last trial's end, from the journal) minus the trials' own time, over N: Tune's
scheduling and experiment snapshots, orch's journal and MLflow records, the progress
line. Flat means the 200-trial figure stays within 1.2x of the 10-trial one.
Usage: .venv/bin/python bench/driver_overhead.py [--trials 10 200]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _summary import record  # noqa: E402  (bench/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]
ORCH = Path(sys.executable).with_name("orch")


def sweep_file(folder: Path, n: int) -> Path:
    spec = {
        "name": f"overhead{n}",
        "benchmark": {"source": "toyworld", "train_size": 16, "eval_size": 16},
        "model": {"arch": "toy"},
        "method": {"name": "ft", "lr": 1e-4, "epochs": 1, "batch_size": 16, "warmup_steps": 1},
        "grid": {"seed": list(range(n))},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
        "storage_path": str(folder / "runs"),
    }
    path = folder / f"overhead{n}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        start = time.perf_counter()
        done = subprocess.run([str(ORCH), "sweep", str(sweep_file(folder, n)), "--yes"],
                              cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"orch sweep with {n} trials failed:\n{done.stdout[-2000:]}")
        records = [json.loads(p.read_text()) for p in folder.glob("runs/*/trials/*.json")]
    assert len(records) == n, (len(records), n)
    own = sum(r["seconds"] for r in records)
    first_start = min(r["ended"] - r["seconds"] for r in records)
    span = max(r["ended"] for r in records) - first_start
    return {"n": n, "wall": wall, "span": span, "own": own,
            "overhead": (span - own) / n, "own_per_trial": own / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[10, 200])
    args = parser.parse_args()
    rows = [measure(n) for n in args.trials]
    print(f"{'trials':>6}  {'sweep wall':>10}  {'train span':>10}  {'own/trial':>9}  "
          f"{'overhead/trial':>14}")
    for r in rows:
        print(f"{r['n']:>6}  {r['wall']:>9.1f}s  {r['span']:>9.1f}s  {r['own_per_trial']:>8.2f}s  "
              f"{r['overhead']:>13.3f}s")
    base = rows[0]["overhead"]
    for r in rows[1:]:
        print(f"overhead per trial at {r['n']} / at {rows[0]['n']}: {r['overhead'] / base:.2f}x "
              "(target <= 1.2x)")
        record(f"driver overhead per training trial, {r['n']} vs {rows[0]['n']} trials",
               f"{r['overhead']:.3f} s", f"{base:.3f} s", f"{r['overhead'] / base:.2f}x",
               "<= 1.2x", r["overhead"] / base <= 1.2,
               f"sweep wall {rows[0]['wall']:.0f} s -> {r['wall']:.0f} s")


if __name__ == "__main__":
    main()
