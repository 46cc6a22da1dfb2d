"""Benchmark: the WiSE-FT alpha sweep, orchestrated vs. a plain loop, side by side.

Same toy CLIP, same fine-tuned weights, same eval sets, same alphas:
  plain - one process, `for alpha: wise_ft(); evaluate()` (torch with all cores);
  orch  - orch's ensemble stage: one Ray Tune trial per alpha, `cpus_per_trial` each.
Prints both wall times and their ratio. Usage:
  .venv/bin/python bench/wise_sweep.py [--eval-size 1000] [--alphas 11] [--cpus-per-trial 1]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--alphas", type=int, default=11)
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import tune

    from orchestrator.build import load_benchmark, load_model, zero_shot
    from orchestrator.spec import parse_spec
    from orchestrator.sweep import _tune
    from orchestrator.trials import CLASSIFIER_FILE, eval_trial
    from trainers.evaluate import evaluate
    from trainers.methods import FitContext, get_method
    from trainers.methods.ft import FTOptions
    from trainers.methods.wise_ft import wise_ft
    from trainers.train_loop import Hooks

    alphas = [round(i / (args.alphas - 1), 3) for i in range(args.alphas)]
    spec = parse_spec({
        "name": "bench", "benchmark": {"source": "toyworld", "eval_size": args.eval_size},
        "method": {"name": "ft"}, "ensemble": {"name": "wise_ft", "alphas": alphas},
        "resources": {"cpus_per_trial": args.cpus_per_trial},
        "storage_path": tempfile.mkdtemp(prefix="orch-bench-")})
    cpu = torch.device("cpu")
    clip = load_model(spec.model)
    bench = load_benchmark(spec.benchmark, clip)
    zs = zero_shot(clip, bench, cpu)
    ft = get_method("ft").fit(zero_shot(clip, bench, cpu),
                              FTOptions(lr=3e-4, epochs=1, batch_size=128, warmup_steps=6),
                              FitContext(bench.train, cpu, 0, Hooks(progress=False)))
    folder = Path(tempfile.mkdtemp(prefix="orch-bench-ckpt-"))
    torch.save(ft.state_dict(), folder / CLASSIFIER_FILE)
    n_images = sum(len(s.dataset) for s in bench.eval_sets().values())

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    for alpha in alphas:
        evaluate(wise_ft(zs, ft, alpha), bench.eval_sets(), cpu, spec.eval.batch_size)
    plain = time.perf_counter() - start

    ray.init(include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    results = _tune(tune.with_parameters(eval_trial, spec=spec, checkpoints={0: str(folder)}),
                    {"trial": 0, "alpha": tune.grid_search(alphas)}, spec, "bench", False)
    orch = time.perf_counter() - start
    assert not results.errors, results.errors
    ray.shutdown()

    print(f"WiSE-FT sweep: {len(alphas)} alphas x {n_images} eval images, "
          f"{os.cpu_count()} CPU(s), {args.cpus_per_trial:g} CPU per trial")
    print(f"  plain loop, one process       : {plain:7.1f} s  "
          f"({len(alphas) * n_images / plain:,.0f} images/s)")
    print(f"  orch ensemble stage (Ray Tune): {orch:7.1f} s  "
          f"({len(alphas) * n_images / orch:,.0f} images/s)")
    print(f"  ratio orch / plain            : {orch / plain:7.2f}")


if __name__ == "__main__":
    main()
