"""Benchmark: orch's Ray Data feature cache vs. a plain encode loop, side by side.

Same toy world (`benchmark: {source: toyworld, eval_size: N, train_size: M}`), same toy
CLIP zero-shot classifier (`model: {arch: toy}`, the cached one under ~/.cache/orch),
same sets (every eval set plus `id_train` under evaluation preprocessing, as a sweep
with VRF or LP caches them), same batch size:
  orch  - `FeatureCache(spec, bench)` (fingerprints every dataset), `zero_shot_ref` (hashes
          the model file) and `.ensure([(zero_shot_ref, sets)], ...)` on a fresh temporary
          cache dir (spec `features.cache_dir`, removed at the end): one Ray Data
          job, an actor pool of `features.actors` actors (default: as many as the cluster
          fits, `cpus_per_actor` CPUs and threads each) encoding batches of row ids, then
          Parquet files committed into cache entries. Its time INCLUDES the actor start-up
          (each actor imports torch, loads the toy CLIP and the benchmark and builds the
          zero-shot head: part of what orch costs) and the Parquet writes; it EXCLUDES Ray's
          own start-up (`ray.init(num_cpus=os.cpu_count(), include_dashboard=False)`, done
          before any timing).
  plain - one process, `torch.set_num_threads(--threads)`, the model already loaded:
          `trainers.evaluate.encode(zero_shot, dataset, device, batch_size)` for every set
          (features, logits and labels kept in memory, nothing written). Loading the model
          and benchmark and building the head is timed on its own and NOT in this figure.
With `--models N` both sides encode N models (copies of the zero-shot classifier with
their heads nudged apart, so each is its own cache entry), as a sweep's post-training
feature stage does in one job; the plain loop then loads each model from its file
(inside its figure, as the actors load them inside orch's).
Target: orch >= 0.9x the plain loop's throughput, i.e. ratio (plain / orch time) >= 0.9.
Also timed: a second `ensure()` on the now complete cache (the reuse path: manifests and
Parquet footers checked, nothing encoded). Warm-up before timing: one plain batch, and
one `ensure()` of a single small set on a separate throw-away cache dir (loads Ray
Data and starts Ray's worker processes; the timed job still starts its own actors); the
timer starts once the warm-up's actors have given back their CPUs/GPUs.
Usage:
  .venv/bin/python bench/feature_cache.py [--eval-size N] [--train-size M] [--batch-size 256]
      [--actors A] [--cpus-per-actor 1] [--gpus-per-actor G] [--threads T] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # a local Ray for this process only

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _summary import record  # noqa: E402  (bench/ is the script's folder)


# `--jpegs`: a tiny open_clip ViT at CLIP's 224 resolution (2 blocks a tower, width 64),
# random weights, on an image-folder task of JPEGs as ImageNet's are stored
TINY_VIT = "orch-bench-tiny-vit"
TINY_VIT_CONFIG = {"embed_dim": 64,
                   "vision_cfg": {"image_size": 224, "layers": 2, "width": 64,
                                  "patch_size": 32, "head_width": 32},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64,
                                "heads": 2, "layers": 2}}
JPEG_CLASSES = ["cat", "dog", "car", "ship"]


def write_jpeg_task(root: Path, n: int) -> dict:
    """n JPEGs of 500x375 at q90 (as bench/input_feed.py writes them) in
    root/task/{train,val,test}/<class>/ and root/sketch/<class>/ (60/10/15/15 %), and the
    tiny ViT's config; returns the `benchmark` and `model` blocks of a sweep file."""
    import json
    from input_feed import write_jpegs
    counts = {"task/train": 0.6, "task/val": 0.1, "task/test": 0.15, "sketch": 0.15}
    for i, (folder, share) in enumerate(counts.items()):
        per_class = max(1, round(n * share / len(JPEG_CLASSES)))
        for j, name in enumerate(JPEG_CLASSES):
            (root / folder / name).mkdir(parents=True)
            write_jpegs(root / folder / name, per_class, seed=100 * i + j)
    config = root / f"{TINY_VIT}.json"
    config.write_text(json.dumps(TINY_VIT_CONFIG))
    return {"benchmark": {"source": "imagefolder", "root": str(root / "task"),
                          "classnames": JPEG_CLASSES, "templates": ["a photo of a {}"],
                          "shifts": {"sketch": str(root / "sketch")}},
            "model": {"arch": TINY_VIT, "config": str(config), "pretrained": "none"}}


def make_spec(args, cache: str, eval_size: int | None, train_size: int | None):
    from orchestrator.spec import parse_spec
    if args.task is not None:                       # JPEG files (sizes: all of them)
        blocks = dict(args.task)
    else:
        blocks = {"benchmark": {"source": "toyworld"}, "model": {"arch": "toy"}}
        if eval_size:
            blocks["benchmark"]["eval_size"] = eval_size
        if train_size:
            blocks["benchmark"]["train_size"] = train_size
    features = {"batch_size": args.batch_size, "cpus_per_actor": args.cpus_per_actor,
                "gpus_per_actor": args.gpus_per_actor, "cache_dir": cache}
    if args.actors:
        features["actors"] = args.actors
    return parse_spec({"name": "bench", **blocks, "method": {"name": "zeroshot"},
                       "features": features, "storage_path": cache})


def wait_for_idle_cluster(ray, timeout: float = 60.0) -> float:
    """Until the warm-up job's actors have released their CPUs/GPUs (their teardown is
    asynchronous), so the timed job does not wait for them. Returns the seconds waited."""
    start = time.perf_counter()
    total = ray.cluster_resources()
    while time.perf_counter() - start < timeout:
        free = ray.available_resources()
        if all(free.get(r, 0) >= total[r] for r in ("CPU", "GPU") if r in total):
            break
        time.sleep(0.1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-size", type=int, default=None,
                        help="first N images of each eval set (default: all)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="first M training images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=None,
                        help="actor-pool size (default: orch's, as many as the cluster fits)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=None,
                        help="default: 1 with --device cuda, else 0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the plain loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=int, default=1,
                        help="models to encode in one job (a sweep's fitted models)")
    parser.add_argument("--jpegs", type=int, default=None,
                        help="encode N JPEG files (500x375 q90) with a tiny ViT at 224 "
                             "instead of the toy world; the plain loop's DataLoader then "
                             "decodes with every CPU")
    args = parser.parse_args()
    args.task = None
    device = torch.device(args.device)
    if args.gpus_per_actor is None:
        args.gpus_per_actor = 1.0 if device.type == "cuda" else 0.0
    torch.set_num_threads(args.threads)

    import ray

    from orchestrator.assets.benchmarks import feature_datasets, load_benchmark
    from orchestrator.assets.loaded import Assets, load_fitted, save_fitted
    from orchestrator.assets.models import load_model
    from orchestrator.run.features import FeatureCache, trial_ref, zero_shot_ref
    from trainers.models import zero_shot_classifier
    from trainers.evaluate import encode
    from trainers.methods import Fitted, StartPoint

    root = Path(tempfile.mkdtemp(prefix="orch-bench-features-"))
    try:
        if args.jpegs:
            args.task = write_jpeg_task(root / "jpegs", args.jpegs)
        spec = make_spec(args, str(root / "cache"), args.eval_size, args.train_size)
        loader_workers = (os.cpu_count() or 1) if args.jpegs else 0

        # plain: set-up (not in its figure), warm-up batch, then every set
        start = time.perf_counter()
        clip = load_model(spec.model, device=device)
        bench = load_benchmark(spec.benchmark, clip)
        classifier = zero_shot_classifier(clip, bench.classnames, bench.templates, device)
        setup_s = time.perf_counter() - start
        datasets = feature_datasets(bench)
        sets = list(datasets)
        n_images = sum(len(ds) for ds in datasets.values())
        first = datasets[sets[0]]
        encode(classifier, torch.utils.data.Subset(first, range(min(len(first), args.batch_size))),
               device, args.batch_size)
        files = []
        if args.models > 1:                # N fitted-model files, as trials leave them
            (root / "models").mkdir()
            for i in range(args.models):
                model = __import__("copy").deepcopy(classifier)
                with torch.no_grad():
                    model.head.weight.add_(1e-3 * i)
                files.append(root / "models" / f"m{i}.pt")
                save_fitted(Fitted(model), files[-1])
        assets = Assets(clip, bench, StartPoint(clip, classifier, bench.classnames,
                                                bench.templates))
        start = time.perf_counter()
        for path in files or [None]:
            model = load_fitted(assets, str(path) if path else None, device).classifier
            for ds in datasets.values():
                encode(model, ds, device, args.batch_size, num_workers=loader_workers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        plain = time.perf_counter() - start
        n_images *= max(1, len(files))

        # orch: Ray up first (not timed), a warm-up job, then the timed ensure()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        import ray.data  # noqa: F401  (configures its loggers on import; quiet them after)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        lines: list[str] = []
        small = make_spec(args, str(root / "warmup"), args.batch_size, args.batch_size)   # id_val only
        small_bench = load_benchmark(small.benchmark, clip)
        FeatureCache(small, small_bench, lines.append).ensure(
            [(zero_shot_ref(small, small_bench), ["id_val"])], "warm-up")
        lines.clear()
        idle_wait = wait_for_idle_cluster(ray)
        start = time.perf_counter()
        cache = FeatureCache(spec, bench, lines.append)     # fingerprints every dataset
        refs = ([trial_ref(p.stem, str(p)) for p in files] if files   # hash the model files
                else [zero_shot_ref(spec, bench)])
        setup_orch = time.perf_counter() - start
        paths = cache.ensure([(ref, sets) for ref in refs], f"{len(refs)} model(s)")
        orch = time.perf_counter() - start
        start = time.perf_counter()
        again = cache.ensure([(ref, sets) for ref in refs], f"{len(refs)} model(s), again")
        reuse = time.perf_counter() - start
        assert again == paths and all(cache.is_complete(r, s) for r in refs for s in sets)
        cluster = ray.cluster_resources()
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {args.threads} torch thread(s)")
    actors = args.actors or "orch's default"
    what = (f"tiny ViT (224, random weights) on {args.jpegs:,} JPEG files, plain loop "
            f"decoding with {loader_workers} DataLoader workers" if args.jpegs
            else "toy CLIP on the toy world")
    print(f"Feature cache, {what}: {max(1, len(files))} model(s) x "
          f"{len(sets)} sets ({', '.join(sets)}), {n_images:,} images, batch {args.batch_size}; "
          f"{os.cpu_count()} CPU(s)")
    print(f"plain loop on {device.type} ({where}); orch: Ray with {cluster.get('CPU', 0):g} CPU(s)"
          f"{', %g GPU(s)' % cluster['GPU'] if cluster.get('GPU') else ''}, actors {actors}, "
          f"{args.cpus_per_actor:g} CPU / {args.gpus_per_actor:g} GPU per actor")
    for line in lines:
        print(f"  {line}")
    print(f"  (waited {idle_wait:.1f} s after the warm-up for its actors to release the cluster)")
    print(f"plain set-up (load model + benchmark, zero-shot head), in neither figure: {setup_s:.2f} s")
    print(f"orch: {orch:.2f} s ({n_images / orch:,.0f} images/s, actor start-up included)   "
          f"plain: {plain:.2f} s ({n_images / plain:,.0f} images/s)   "
          f"ratio (plain/orch): {plain / orch:.2f}x   (target >= 0.9x)")
    print(f"  orch figure includes {setup_orch:.2f} s of FeatureCache() and zero_shot_ref() "
          f"(dataset and model fingerprints)")
    print(f"orch reuse (second ensure, all {len(sets)} sets cached): {reuse:.3f} s")
    what = (f"{n_images:,} JPEGs, tiny ViT" if args.jpegs else
            f"{n_images:,} toy images, {max(1, len(files))} model(s)")
    record(f"feature encoding, {what}", f"{n_images / orch:,.0f} img/s",
           f"{n_images / plain:,.0f} img/s", f"{plain / orch:.2f}x", ">= 0.9x",
           plain / orch >= 0.9, "actor start-up included")


if __name__ == "__main__":
    main()
