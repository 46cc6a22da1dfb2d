"""The benchmark a spec names (the toy world, image folders, CSV lists, or a named suite),
built with the model's transforms, or listed without them to be checked on the driver;
and the caches a sweep needs before any trial starts."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch.utils.data import Dataset

from orchestrator.spec.types import BenchmarkSpec, SweepSpec
from trainers.cache import cache_dir
from trainers.data import Benchmark, DataError, EvalSet, identity_groups, load_csv_split
from trainers.data.benchmark import ID_TRAIN
from trainers.data.folders import load_imagefolder_benchmark, load_shift
from trainers.data.suites import TRAIN, SuiteOptions, count_mismatches, get_suite
from trainers.models import TOY, LoadedClip, native_size_transform
from trainers.progress import progress_callback
from trainers.toyworld import world
from trainers.toyworld.benchmark import toy_benchmark
from trainers.toyworld.pretrain import toy_clip_checkpoint


def prepare(spec: SweepSpec, progress: bool = True) -> None:
    """Driver-side, before Ray: build every cached asset the trials will read, so that
    concurrent trials never race to build them (and the user sees one progress bar)."""
    if spec.model.arch == TOY:
        toy_clip_checkpoint(progress=progress)
    if spec.benchmark.source == "toyworld":
        for split in world.EVAL_SPLITS:
            world.load_or_build_split(world.WorldConfig(), split, cache_dir(),
                                      workers=min(2, os.cpu_count() or 1),
                                      progress=progress_callback(
                                          f"rendering toy world ({split})", progress))


def _format_strings(templates) -> tuple[str, ...]:
    # open_clip's template sets are callables (c -> text); orch keeps "{}" strings
    return tuple(t("{}") if callable(t) else t for t in templates)


def templates_for(b: BenchmarkSpec) -> tuple[str, ...]:
    """The prompt templates: a named open_clip set, the file's list, or the 80 OpenAI
    ImageNet templates (docs/methods.md, "Shared pieces")."""
    if isinstance(b.templates, list):
        return tuple(b.templates)
    named = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    return _format_strings(named[b.templates or "openai"])


def load_benchmark(b: BenchmarkSpec, clip: LoadedClip) -> Benchmark:
    if b.source == "toyworld":
        # The toy world is drawn at 32 px: for a 32 px model skip PIL entirely.
        fast = native_size_transform(clip, 32, 32)
        eval_tf = fast or clip.eval_transform
        train_tf = eval_tf if clip.train_transform is clip.eval_transform else clip.train_transform
        bench = toy_benchmark(train_tf, eval_tf, train_size=b.train_size, eval_size=b.eval_size)
        if b.templates is not None:  # the toy world has its own; the file may override them
            bench = dataclasses.replace(bench, templates=templates_for(b))
        return bench
    return _load_files_benchmark(b, clip.train_transform, clip.eval_transform)


def check_benchmark(b: BenchmarkSpec) -> Benchmark | None:
    """List and check a file-based benchmark on the driver (folders, class names, CSV
    rows), so a bad tree fails before any trial starts; opens no image. Returns the
    benchmark (without transforms), or None for the toy world."""
    if b.source != "toyworld":
        return _load_files_benchmark(b, None, None)
    return None


def suite_options(b: BenchmarkSpec) -> SuiteOptions:
    """What a `suite:` block tells its suite (the templates default to the 80 OpenAI ones)."""
    return SuiteOptions(root=Path(b.root), shifts={n: Path(s.path) for n, s in b.shifts.items()},
                        val_fraction=0.02 if b.val_fraction is None else b.val_fraction,
                        classes=tuple(b.classes) if b.classes is not None else None,
                        domain=b.domain, templates=templates_for(b))


def count_notes(b: BenchmarkSpec, bench: Benchmark | None) -> list[str]:
    """A suite's sets whose image count differs from the published one, one `warning:`
    line each (a partial ObjectNet copy misleads); with a class subset, one note that
    counts are not compared. With `strict_counts` a difference raises DataError."""
    if b.suite is None or bench is None:
        return []
    if b.classes is not None:
        return [f"note: benchmark: a class subset of {b.suite} ({len(b.classes)} classes): "
                "image counts are not compared with the published ones"]
    found = [f"{'train (with id_val)' if name == TRAIN else name} has {n:,} images, the "
             f"published set {count:,}"
             for name, n, count in count_mismatches(get_suite(b.suite), bench, suite_options(b))]
    if found and b.strict_counts:
        more = f" (and {len(found) - 1} more set(s) differ)" if len(found) > 1 else ""
        raise DataError(f"strict_counts: {found[0]}{more}")
    return [f"warning: benchmark: {line}" for line in found]


def _load_files_benchmark(b: BenchmarkSpec, train_tf, eval_tf) -> Benchmark:
    if b.suite is not None:
        return get_suite(b.suite).load(suite_options(b), train_tf, eval_tf)
    shifts = {name: s.source() for name, s in b.shifts.items()}
    if b.source == "imagefolder":
        return load_imagefolder_benchmark(
            Path(b.root), b.classnames, templates_for(b), shifts,
            train_transform=train_tf, eval_transform=eval_tf,
            val_fraction=b.val_fraction or 0.0, folder_names=b.folder_names)
    return _csv_benchmark(b, train_tf, eval_tf, templates_for(b), shifts)


def _csv_benchmark(b: BenchmarkSpec, train_tf, eval_tf, templates, shifts) -> Benchmark:
    classnames = tuple(b.classnames)
    train, _ = load_csv_split(Path(b.train), classnames, train_tf)
    groups = identity_groups(len(classnames))

    def id_set(name: str, path: str) -> EvalSet:
        dataset, _ = load_csv_split(Path(path), classnames, eval_tf)
        return EvalSet(name=name, dataset=dataset, classnames=classnames, class_groups=groups)

    return Benchmark(name=Path(b.train).stem, classnames=classnames, templates=templates,
                     train=train, val=id_set("id_val", b.val), test=id_set("id_test", b.test),
                     shifts={n: load_shift(n, s, classnames, eval_tf) for n, s in shifts.items()},
                     train_eval=train.with_transform(eval_tf))


def feature_datasets(bench: Benchmark) -> dict[str, Dataset]:
    """Every set features can be cached for: the eval sets, and the training split under
    evaluation preprocessing (`id_train`, aligned by index with `train`)."""
    sets = {name: s.dataset for name, s in bench.eval_sets().items()}
    if bench.train_eval is not None:
        sets[ID_TRAIN] = bench.train_eval
    return sets
