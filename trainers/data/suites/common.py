"""What every suite shares: the options a sweep file gives it, the registered suite, the
comparison with published counts, the held-out validation split, the OpenAI templates."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ..benchmark import Benchmark, DataError, Transform
from ..folders import split_train_val

__all__ = ["SuiteOptions", "Suite", "count_mismatches", "hold_out_validation",
           "openai_templates", "TRAIN"]

# The key of a suite's published training-split size: the training images BEFORE the
# held-out validation images are taken from them (train + id_val).
TRAIN = "train"


@dataclass(frozen=True)
class SuiteOptions:
    """What a suite is told: where the data is and which part of it to use.

    - ``root``: the ID data (ImageNet: ``train/`` and ``val/``; DomainNet: the domain
      folders and their ``<domain>_train.txt`` / ``<domain>_test.txt`` lists);
    - ``shifts``: shift name -> its folder (DomainNet: the root holding that domain);
    - ``val_fraction``: the seeded, class-balanced part of the training images held out
      as the ID validation set (nothing is ever chosen on a test set);
    - ``classes``: restrict the suite to these classes (ImageNet wnids, DomainNet class
      folder names); ``None`` = all;
    - ``domain``: the ID domain (DomainNet);
    - ``templates``: prompt templates; ``None`` = the 80 OpenAI ImageNet templates.
    """

    root: Path
    shifts: Mapping[str, Path] = field(default_factory=dict)
    val_fraction: float = 0.02
    classes: tuple[str, ...] | None = None
    domain: str | None = None
    templates: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise DataError(f"val_fraction must be in (0, 1) (the ID validation images are "
                            f"held out of the training images), got {self.val_fraction!r}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            if not self.classes:
                raise DataError("classes: the class subset is empty")
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "shifts", {k: Path(v) for k, v in self.shifts.items()})


@dataclass(frozen=True)
class Suite:
    """A registered suite.

    - ``load(options, train_transform, eval_transform)`` -> the :class:`Benchmark`;
    - ``shifts``: the shift names it knows (DomainNet: its domains);
    - ``published(options)``: the published image count per set name (``TRAIN`` for the
      training images before the validation split);
    - ``class_ids``: the ids ``classes:`` may name, when known without reading the data
      (ImageNet's wnids), else ``None`` (checked when the data is read);
    - ``domains``: the domains one of which is ID (``options.domain``), else empty.
    """

    name: str
    load: Callable[[SuiteOptions, Transform | None, Transform | None], Benchmark]
    shifts: tuple[str, ...]
    published: Callable[[SuiteOptions], dict[str, int]]
    class_ids: Callable[[], tuple[str, ...]] | None = None
    domains: tuple[str, ...] = ()


def count_mismatches(suite: Suite, bench: Benchmark,
                     options: SuiteOptions) -> list[tuple[str, int, int]]:
    """``(set, images found, images published)`` for every set of ``bench`` whose size
    differs from the published one (a partial copy, a different release). Empty for a
    class subset, whose sizes cannot match."""
    if options.classes is not None:
        return []
    found = {TRAIN: len(bench.train) + len(bench.val.dataset)}
    found.update({name: len(s.dataset) for name, s in bench.eval_sets().items()})
    return [(name, found[name], count) for name, count in suite.published(options).items()
            if name in found and found[name] != count]


def hold_out_validation(paths: list[Path], labels: list[int], names: Sequence[str],
                        options: SuiteOptions, source: Callable[[int], str]):
    """Split a suite's training images into (train, ID validation): ``options.val_fraction``
    of every class, seeded (``folders.split_train_val``). A class left without a
    validation image is an error naming it and ``source(label)``, where its images are."""
    train, val = split_train_val(paths, labels, float(options.val_fraction), options.seed)
    in_val = set(val[1])
    short = [k for k in range(len(names)) if k not in in_val]
    if short:
        more = f" (nor do {len(short) - 1} other classes)" if len(short) > 1 else ""
        raise DataError(f"class {names[short[0]]!r} gets no ID validation image: "
                        f"val_fraction={options.val_fraction} of its {labels.count(short[0])} "
                        f"training images in {source(short[0])} rounds to none{more}; "
                        "raise val_fraction")
    return train, val


def openai_templates() -> tuple[str, ...]:
    """The 80 prompt templates of CLIP's ImageNet evaluation, as ``"{}"`` strings."""
    return tuple(t("{}") if callable(t) else t for t in OPENAI_IMAGENET_TEMPLATES)
