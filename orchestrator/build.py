"""From a validated spec to the objects trials work on: the CLIP model (toy or real),
the benchmark, and the zero-shot classifier. Used by the driver (to prepare caches
once, before any trial starts) and by every trial (to load them)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from orchestrator.spec import BenchmarkSpec, ModelSpec, SweepSpec
from trainers.data import Benchmark, EvalSet, identity_groups, load_csv_split
from trainers.data.folders import ShiftSource, load_imagefolder_benchmark, load_shift
from trainers.models import (TOY_ARCH, ImageClassifier, LoadedClip, load_clip,
                             native_size_transform, zero_shot_classifier)
from trainers.progress import Progress

# open_clip ships the 80 OpenAI ImageNet templates and the short "simple" set.
try:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
except ImportError:  # pragma: no cover - older open_clip
    OPENAI_IMAGENET_TEMPLATES = SIMPLE_IMAGENET_TEMPLATES = None


def prepare(spec: SweepSpec, progress: bool = True) -> None:
    """Driver-side, before Ray: build every cached asset the trials will read, so that
    concurrent trials never race to build them (and the user sees one progress bar)."""
    if spec.benchmark.source == "toyworld":
        from trainers.toyworld import world
        from trainers.toyworld.pretrain import toy_clip_checkpoint
        workers = min(2, os.cpu_count() or 1)
        bar: dict[str, Progress] = {}

        def report(done: int, total: int, split: str) -> None:
            if split not in bar:
                bar[split] = Progress(total, f"rendering toy world ({split})", enabled=progress)
            bar[split].update(done - bar[split].done)

        toy_clip_checkpoint(progress=progress)
        for split in world.EVAL_SPLITS:
            world.load_or_build_split(world.WorldConfig(), split, _cache(), workers=workers,
                                      progress=lambda d, t, s=split: report(d, t, s))


def _cache() -> Path:
    from trainers.cache import cache_dir
    return cache_dir()


def load_model(model: ModelSpec, augment: bool = True, device: str | torch.device = "cpu") -> LoadedClip:
    if model.arch == "toy":
        from trainers.toyworld.pretrain import toy_clip_checkpoint
        # Eval-only preprocessing for the toy world: augmentation hurt there (TOYWORLD.md W2.8).
        return load_clip(TOY_ARCH, str(toy_clip_checkpoint(progress=False)), augment=False,
                         device=device)
    if model.config:  # a user's own architecture: register it in this process too
        import open_clip
        open_clip.add_model_config(Path(model.config))
    return load_clip(model.arch, model.pretrained, augment=augment, device=device)


def templates_for(b: BenchmarkSpec) -> tuple[str, ...] | None:
    if b.templates is None:
        return None
    if isinstance(b.templates, str):
        named = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
        if b.templates not in named or named[b.templates] is None:
            raise ValueError(f"benchmark.templates: unknown template set {b.templates!r} "
                             f"(use openai, simple, or a list of strings with '{{}}')")
        # open_clip's sets are callables; turn them into format strings
        return tuple(t("{}") if callable(t) else t for t in named[b.templates])
    return tuple(b.templates)


def load_benchmark(b: BenchmarkSpec, clip: LoadedClip) -> Benchmark:
    templates = templates_for(b)
    if b.source == "toyworld":
        from trainers.toyworld.benchmark import TEMPLATES, toy_benchmark
        # The toy world is drawn at 32 px: for a 32 px model skip PIL entirely.
        fast = native_size_transform(clip, 32, 32)
        eval_tf = fast or clip.eval_transform
        train_tf = eval_tf if clip.train_transform is clip.eval_transform else clip.train_transform
        bench = toy_benchmark(train_tf, eval_tf, train_size=b.train_size, eval_size=b.eval_size)
        if templates and templates != TEMPLATES:
            bench = _replace_templates(bench, templates)
        return bench
    shifts = {name: ShiftSource(path=Path(s.path), format=s.format,
                                class_map={k: tuple(v) for k, v in s.class_map.items()}
                                if s.class_map else None,
                                folder_names=s.folder_names)
              for name, s in b.shifts.items()}
    if b.source == "imagefolder":
        return load_imagefolder_benchmark(
            Path(b.root), b.classnames, templates or default_templates(), shifts,
            train_transform=clip.train_transform, eval_transform=clip.eval_transform,
            val_fraction=b.val_fraction, folder_names=b.folder_names)
    return _csv_benchmark(b, clip, templates or default_templates(), shifts)


def default_templates() -> tuple[str, ...]:
    """open_clip's 80 OpenAI ImageNet templates (METHODS.md: zero-shot head)."""
    if OPENAI_IMAGENET_TEMPLATES is None:
        return ("a photo of a {}.",)
    return tuple(t("{}") if callable(t) else t for t in OPENAI_IMAGENET_TEMPLATES)


def _csv_benchmark(b: BenchmarkSpec, clip: LoadedClip, templates, shifts) -> Benchmark:
    classnames = tuple(b.classnames)
    train, _ = load_csv_split(Path(b.train), classnames, clip.train_transform)
    groups = identity_groups(len(classnames))

    def id_set(name: str, path: str) -> EvalSet:
        dataset, _ = load_csv_split(Path(path), classnames, clip.eval_transform)
        return EvalSet(name=name, dataset=dataset, classnames=classnames, class_groups=groups)

    return Benchmark(name=Path(b.train).stem, classnames=classnames, templates=templates,
                     train=train, val=id_set("id_val", b.val), test=id_set("id_test", b.test),
                     shifts={n: load_shift(n, s, classnames, clip.eval_transform)
                             for n, s in shifts.items()},
                     train_eval=train.with_transform(clip.eval_transform))


def _replace_templates(bench: Benchmark, templates) -> Benchmark:
    return dataclasses.replace(bench, templates=templates)


def zero_shot(clip: LoadedClip, bench: Benchmark, device: torch.device) -> ImageClassifier:
    return zero_shot_classifier(clip, bench.classnames, bench.templates, device)
