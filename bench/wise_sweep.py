"""Benchmark: the WiSE-FT alpha sweep, orchestrated vs. a plain loop, side by side.

Same toy CLIP, same fine-tuned weights (the `ft` method, one short run, saved with
`orchestrator.assets.loaded.save_fitted`), same eval sets, same alphas:
  plain - one process, torch with --threads threads, the models already in memory:
          `for alpha: evaluate(wise_ft(zero_shot, fine_tuned, alpha), eval_sets)`;
  orch  - orch's ensemble-stage trainable, `orchestrator.run.jobs.ensemble_trial`, one Ray
          Tune job per alpha (a `plan.Job` of wise_ft), `cpus_per_trial`
          each, reused actors (each loads the model and benchmark once per worker, then
          reads the fitted-model file per job). Ray's start-up is not in the figure;
          Tune's and the trial actors' are.
Every alpha, the endpoints 0 and 1 included, runs as a weights job here, so both sides
do the same forward passes; a real `orch sweep` takes alpha 0 and 1 from its feature
cache instead (the outputs job), which this benchmark leaves out.
Warm-up: one plain evaluation batch, and one Tune job on a 64-image benchmark.
Both sides' id_test and OOD accuracies are compared (max absolute difference printed).
Usage:
  .venv/bin/python bench/wise_sweep.py [--eval-size 1000] [--train-size N] [--alphas 11]
      [--cpus-per-trial 1] [--gpus-per-trial G] [--batch-size 256] [--threads T]
      [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _summary import record  # noqa: E402  (bench/ is the script's folder)


def make_spec(args, alphas: list[float], eval_size: int | None, storage: str):
    from orchestrator.spec import parse_spec
    benchmark = {"source": "toyworld"}
    if eval_size:
        benchmark["eval_size"] = eval_size
    if args.train_size:
        benchmark["train_size"] = args.train_size
    return parse_spec({
        "name": "bench", "model": {"arch": "toy"}, "benchmark": benchmark,
        "method": {"name": "ft", "lr": 3e-4, "epochs": args.epochs, "batch_size": 128,
                   "warmup_steps": 6},
        "ensemble": {"name": "wise_ft", "alpha": alphas},
        "resources": {"cpus_per_trial": args.cpus_per_trial,
                      "gpus_per_trial": args.gpus_per_trial},
        "eval": {"batch_size": args.batch_size},
        "storage_path": storage})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-size", type=int, default=1000,
                        help="first N images of each eval set (0: all)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="first M training images for the fine-tuning run (default: all)")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs")
    parser.add_argument("--alphas", type=int, default=11, help="alphas on linspace(0, 1)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="default: 1 with --device cuda, else 0")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the plain loop (and of the fine-tuning run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.alphas < 2:
        parser.error("--alphas must be >= 2")
    device = torch.device(args.device)
    if args.gpus_per_trial is None:
        args.gpus_per_trial = 1.0 if device.type == "cuda" else 0.0
    torch.set_num_threads(args.threads)

    import ray
    from ray import tune

    from orchestrator.assets.loaded import load_assets, save_fitted
    from orchestrator.plan import Job, Plan
    from orchestrator.run.cluster import init_ray
    from orchestrator.run.jobs import ensemble_trial
    from orchestrator.run.trials import MODEL_FILE
    from trainers.ensembles.wise_ft import wise_ft
    from trainers.evaluate import evaluate, predict, summarize
    from trainers.methods import FitContext, get_method
    from trainers.train_loop import Hooks

    alphas = [round(i / (args.alphas - 1), 3) for i in range(args.alphas)]
    storage = Path(tempfile.mkdtemp(prefix="orch-bench-wise-"))
    try:
        spec = make_spec(args, alphas, args.eval_size or None, str(storage / "runs"))
        point = Plan(spec).trials[0]
        assets = load_assets(spec, device)
        start = time.perf_counter()
        fitted = get_method(point.method_name).fit(
            assets.start, point.options,
            FitContext(assets.bench.train, device, point.seed, Hooks(progress=False),
                       train_eval_set=assets.bench.train_eval))
        fit_s = time.perf_counter() - start
        checkpoint = storage / MODEL_FILE
        save_fitted(fitted, checkpoint)
        zero_shot, fine_tuned = assets.start.zero_shot, fitted.classifier.eval()
        eval_sets, shifts = assets.bench.eval_sets(), assets.bench.shift_names
        n_images = sum(len(s.dataset) for s in eval_sets.values())

        # plain: warm-up batch, then every alpha
        first = assets.bench.val.dataset
        predict(wise_ft(zero_shot, fine_tuned, 0.5),
                torch.utils.data.Subset(first, range(min(len(first), args.batch_size))),
                device, args.batch_size)
        plain_rows = []
        start = time.perf_counter()
        for alpha in alphas:
            per_set = evaluate(wise_ft(zero_shot, fine_tuned, alpha), eval_sets, device,
                               args.batch_size)
            plain_rows.append(summarize(per_set, shifts))
        plain = time.perf_counter() - start

        # orch: Ray up (not timed), a one-job warm-up on a tiny benchmark, then the stage
        init_ray(None, verbose=False)
        checkpoints = {point.name: str(checkpoint)}

        def stage(values, stage_spec, name):
            """The ensemble stage as `orch sweep` configures its Tuner (reused actors,
            the spec's resources and concurrency), without MLflow records."""
            r = stage_spec.resources
            trainable = tune.with_resources(
                tune.with_parameters(ensemble_trial, spec=stage_spec, checkpoints=checkpoints,
                                     feature_paths={}),
                {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
            jobs = {"job": tune.grid_search([Job(point.name, "wise_ft", {"alpha": a}).config()
                                             for a in values])}
            return tune.Tuner(
                trainable, param_space=jobs,
                tune_config=tune.TuneConfig(max_concurrent_trials=r.max_concurrent_trials,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=name, storage_path=str(storage / "tune"),
                                          verbose=0)).fit()

        small = make_spec(args, alphas, 64, str(storage / "runs"))
        warm = stage([0.5], small, "warmup")
        assert not warm.errors, warm.errors
        start = time.perf_counter()
        results = stage(alphas, spec, "bench")
        orch = time.perf_counter() - start
        assert not results.errors, results.errors
        cluster = ray.cluster_resources()
        ray.shutdown()
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    orch_rows = {}
    for result in results:
        for row in json.loads(result.metrics["rows"]):
            orch_rows[row["coefficients"]["alpha"]] = row
    keys = ["id_acc"] + (["ood_acc"] if shifts else [])
    diff = max(abs(orch_rows[a]["metrics"][k] - p[k])
               for a, p in zip(alphas, plain_rows) for k in keys)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {args.threads} torch thread(s)")
    concurrent = spec.resources.max_concurrent_trials or "as many as fit"
    print(f"WiSE-FT sweep: {len(alphas)} alphas x {n_images:,} eval images "
          f"({len(eval_sets)} sets), toy CLIP, fine-tuned {args.epochs} epoch(s) on "
          f"{len(assets.bench.train):,} images ({fit_s:.1f} s, in neither figure)")
    print(f"plain on {device.type} ({where}); orch: Ray Tune on {cluster.get('CPU', 0):g} CPU(s)"
          f"{', %g GPU(s)' % cluster['GPU'] if cluster.get('GPU') else ''}, "
          f"{args.cpus_per_trial:g} CPU / {args.gpus_per_trial:g} GPU per trial, "
          f"concurrent trials: {concurrent}")
    print(f"orch: {orch:.2f} s ({len(alphas) * n_images / orch:,.0f} images/s)   "
          f"baseline: {plain:.2f} s ({len(alphas) * n_images / plain:,.0f} images/s)   "
          f"ratio (baseline/orch): {plain / orch:.2f}x")
    print(f"max |orch - plain| over alphas of {', '.join(keys)}: {diff:.1e}")
    record(f"WiSE-FT sweep, {len(alphas)} alphas x {n_images:,} images, toy CLIP",
           f"{orch:.1f} s", f"{plain:.1f} s", f"{plain / orch:.2f}x")


if __name__ == "__main__":
    main()
