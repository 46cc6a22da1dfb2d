"""The toy world as a `Benchmark`: ID task = photo style with a colour shortcut in its
training split; shifts = V2-like, sketch, cartoon, hard, ObjectNet-like (a 6-class
subset); diagnostic = shortcut-free ID images (`id_rand`, not in the OOD average).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from trainers.cache import cache_dir
from trainers.data import ArrayImageDataset, Benchmark, EvalSet, identity_groups, subset_groups
from trainers.toyworld import world

# The prompt templates, one per caption style (docs/toyworld.md, 'Zero-shot head').
TEMPLATES = ("a photo of a {}", "a picture of a {}", "a {}", "a sketch of a {}",
             "a cartoon of a {}", "a drawing of a {}")


def toy_benchmark(train_transform: Callable | None, eval_transform: Callable | None,
                  cfg: world.WorldConfig = world.WorldConfig(), train_size: int | None = None,
                  eval_size: int | None = None, root: Path | None = None,
                  workers: int = 1, progress: Callable[[int, int], None] | None = None) -> Benchmark:
    """Build (or load from the cache) every split; `*_size` keep the first N images."""
    root = root or cache_dir()

    def split(name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        images, labels = world.load_or_build_split(cfg, name, root, workers=workers,
                                                   progress=progress)
        return images[:limit], labels[:limit]

    classnames = world.CLASSNAMES
    n = len(classnames)

    def eval_set(name: str) -> EvalSet:
        images, labels = split(name, eval_size)
        if name == "objectnet":
            groups = subset_groups(classnames, world.OBJECTNET_CLASSES)
            own = {ids[0]: k for k, ids in enumerate(groups)}     # ID class -> own class
            labels = np.array([own[int(c)] for c in labels], dtype=np.int64)
            names = world.OBJECTNET_CLASSES
        else:
            groups, names = identity_groups(n), classnames
        return EvalSet(name=name, dataset=ArrayImageDataset(images, labels, eval_transform),
                       classnames=tuple(names), class_groups=groups)

    train_images, train_labels = split("id_train", train_size)
    train = ArrayImageDataset(train_images, train_labels, train_transform)
    return Benchmark(
        name="toyworld", classnames=classnames, templates=TEMPLATES, train=train,
        val=eval_set("id_val"), test=eval_set("id_test"),
        shifts={name: eval_set(name) for name in world.SHIFT_SPLITS},
        train_eval=train.with_transform(eval_transform),
        diagnostics={"id_rand": eval_set("id_rand")})
