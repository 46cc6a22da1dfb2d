"""Benchmarks, evaluation sets and class-space mappings.

A :class:`Benchmark` is an ID task (train / validation / test splits over one list of ID
classes, plus prompt templates for the zero-shot head) and a set of OOD shifts. Each
:class:`EvalSet` lives in ITS OWN class space (``0..K-1``) and knows how that space maps onto
the ID classes (``class_groups``), so a model's ID logits are turned into the set's logits by
:meth:`EvalSet.project` BEFORE any softmax (docs/methods.md, "Evaluation protocol"):

- ID val / test: identity groups, ``project`` returns the logits unchanged;
- a subset shift (ImageNet-A/-R: 200 of 1000 classes): singleton groups, the set's columns;
- a many-to-one shift (ObjectNet: each class maps to several ID classes): the max of the
  mapped ID logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "ArrayImageDataset",
    "ArrayNormalize",
    "FileImageDataset",
    "EvalSet",
    "Benchmark",
    "identity_groups",
    "subset_groups",
    "mapped_groups",
    "ood_average",
]

Transform = Callable[[Image.Image], Any]
Groups = tuple[tuple[int, ...], ...]

# Names of the two ID evaluation sets inside Benchmark.eval_sets(); shifts may not reuse them.
ID_VAL, ID_TEST = "id_val", "id_test"
# The training split under evaluation preprocessing (`Benchmark.train_eval`), where a set
# name is needed for it (cached features, VRF's zero-shot-failure set).
ID_TRAIN = "id_train"


class DataError(ValueError):
    """Bad dataset input: the message says what is wrong and where (path, file:line, field)."""


def _one_line(text: object) -> str:
    """Collapse an exception message to one line (PIL messages sometimes span several)."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array ``(N, H, W, 3)`` with int labels ``(N,)``.

    ``__getitem__`` returns ``(transform(PIL image), int label)``; with ``transform=None`` the
    PIL image itself. Used by the procedurally generated toy world.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform | None = None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(
                f"images must be a uint8 array (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"labels must be 1-D with one entry per image: {images.shape[0]} images, "
                f"labels shape {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {labels.dtype}")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if isinstance(self.transform, ArrayNormalize):  # fast path, no PIL round trip
            return self.transform(self.images[index]), int(self.labels[index])
        image = Image.fromarray(self.images[index])  # (H, W, 3) uint8 -> RGB
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def with_transform(self, transform: Transform | None) -> "ArrayImageDataset":
        """The same images and labels (shared, not copied) under another transform."""
        return ArrayImageDataset(self.images, self.labels, transform)


class ArrayNormalize:
    """uint8 (H, W, 3) array -> normalised float (3, H, W): what CLIP's eval transform
    does when the image already has the model's input size (resize and centre crop are
    then identities). Skipping PIL halves evaluation time on the toy world."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:  # stable across processes: part of feature-cache keys
        return (f"ArrayNormalize(mean={[round(float(m), 6) for m in self.mean.flatten()]}, "
                f"std={[round(float(s), 6) for s in self.std.flatten()]})")

    def __call__(self, image: np.ndarray) -> Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        return (pixels - self.mean) / self.std


class FileImageDataset(Dataset):
    """Images read from files, converted to RGB; labels given per file.

    ``border``: pixels cut from each side of every image after decoding, before the
    transform (ObjectNet's images carry a 2-px red frame). It is part of what the images
    ARE, not of the preprocessing: the feature cache's dataset fingerprint includes it.

    An unreadable or corrupt file raises ``DataError("cannot read image <path>: <reason>")``
    when that item is read (listing thousands of files does not open them).
    """

    def __init__(
        self, paths: Sequence[Path | str], labels: Sequence[int], transform: Transform | None = None,
        border: int = 0,
    ):
        if len(paths) != len(labels):
            raise DataError(f"{len(paths)} image paths but {len(labels)} labels")
        if border < 0:
            raise DataError(f"border must be >= 0 pixels, got {border}")
        # Path(p) re-parses a Path: at a million files that costs seconds
        self.paths = tuple(p if isinstance(p, Path) else Path(p) for p in paths)
        self.labels = tuple(int(y) for y in labels)
        self.transform = transform
        self.border = int(border)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as raw:
                # convert() forces the full decode inside the try, so truncated files fail here.
                image = raw.convert("RGB")
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {_one_line(exc)}") from exc
        if self.border:
            b = self.border
            if image.width <= 2 * b or image.height <= 2 * b:
                raise DataError(f"cannot read image {path}: {image.width}x{image.height} px "
                                f"is too small to cut a {b}-px border")
            image = image.crop((b, b, image.width - b, image.height - b))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def with_transform(self, transform: Transform | None) -> "FileImageDataset":
        """The same files and labels under another transform (e.g. eval preprocessing of train)."""
        return FileImageDataset(self.paths, self.labels, transform, self.border)


# ---------------------------------------------------------------------------------------
# Class groups: how an evaluation set's classes map onto the ID classes
# ---------------------------------------------------------------------------------------


def identity_groups(n: int) -> Groups:
    """``((0,), (1,), ..., (n-1,))``: a set whose classes are exactly the ID classes."""
    if n < 0:
        raise ValueError(f"number of classes must be >= 0, got {n}")
    return tuple((k,) for k in range(n))


def _index_of(id_classnames: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for k, name in enumerate(id_classnames):
        if name in index:
            raise DataError(f"duplicate ID class name {name!r} (positions {index[name]} and {k})")
        index[name] = k
    return index


def subset_groups(id_classnames: Sequence[str], subset_classnames: Sequence[str]) -> Groups:
    """Singleton groups for a set that covers a subset of the ID classes, in the given order."""
    index = _index_of(id_classnames)
    seen: set[str] = set()
    groups = []
    for name in subset_classnames:
        if name not in index:
            raise DataError(f"class {name!r} is not one of the {len(index)} ID classes")
        if name in seen:
            raise DataError(f"class {name!r} appears twice in the subset")
        seen.add(name)
        groups.append((index[name],))
    return tuple(groups)


def mapped_groups(
    id_classnames: Sequence[str], class_map: Mapping[str, Sequence[str]]
) -> tuple[tuple[str, ...], Groups]:
    """Classes and groups of a many-to-one shift (ObjectNet style).

    ``class_map`` maps each shift class to the ID class names it stands for. Returns the shift's
    classnames (in ``class_map`` order) and, per shift class, the sorted ID indices.
    """
    index = _index_of(id_classnames)
    names, groups = [], []
    for shift_class, id_names in class_map.items():
        if isinstance(id_names, str):  # a bare string would silently map to its characters
            id_names = (id_names,)
        if len(id_names) == 0:
            raise DataError(f"class_map[{shift_class!r}] maps to no ID class")
        unknown = [n for n in id_names if n not in index]
        if unknown:
            raise DataError(
                f"class_map[{shift_class!r}] names unknown ID class(es) {unknown!r}"
            )
        names.append(str(shift_class))
        groups.append(tuple(sorted({index[n] for n in id_names})))
    return tuple(names), tuple(groups)


def ood_average(per_set: Mapping[str, float], shift_names: Sequence[str]) -> float:
    """Unweighted mean of ``per_set`` over the shift sets (each shift counts once, whatever its size)."""
    shift_names = list(shift_names)
    if not shift_names:
        raise ValueError("no shift sets: the OOD average is undefined")
    missing = [name for name in shift_names if name not in per_set]
    if missing:
        raise ValueError(f"no value for shift set(s) {missing!r}; have {sorted(per_set)!r}")
    return math.fsum(float(per_set[name]) for name in shift_names) / len(shift_names)


def _normalise_groups(groups: Sequence[Sequence[int]]) -> Groups:
    out = []
    for k, group in enumerate(groups):
        group = tuple(int(i) for i in group)
        if not group:
            raise DataError(f"class group {k} is empty: every class must map to >= 1 ID class")
        if min(group) < 0:
            raise DataError(f"class group {k} has a negative ID class index: {group}")
        out.append(group)
    return tuple(out)


# ---------------------------------------------------------------------------------------
# EvalSet and Benchmark
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set in its own class space, with the map back to the ID classes.

    ``dataset`` yields ``(image, label)`` with ``label`` in ``0..K-1`` (this set's classes);
    ``class_groups[k]`` lists the ID class indices that own class ``k`` stands for.
    """

    name: str
    dataset: Dataset
    classnames: tuple[str, ...]
    class_groups: Groups
    # Derived in __post_init__; excluded from ==/hash/repr.
    _identity: bool = field(init=False, repr=False, compare=False)
    _singleton_index: Tensor | None = field(init=False, repr=False, compare=False)
    _padded_index: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        classnames = tuple(str(c) for c in self.classnames)
        groups = _normalise_groups(self.class_groups)
        if len(classnames) != len(groups):
            raise DataError(
                f"eval set {self.name!r}: {len(classnames)} classnames but {len(groups)} class groups"
            )
        # Names may repeat (CLIP's ImageNet list calls two pairs of classes alike:
        # "missile", "sunglasses"): a label is a position, never a name.
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "classnames", classnames)
        set_(self, "class_groups", groups)
        set_(self, "_identity", groups == identity_groups(len(groups)))
        singletons = all(len(g) == 1 for g in groups)
        set_(self, "_singleton_index", torch.tensor([g[0] for g in groups], dtype=torch.long) if singletons else None)
        # Many-to-one: pad each group to the longest by repeating its first index, which
        # leaves the max unchanged and lets one gather + amax do every group at once.
        width = max((len(g) for g in groups), default=1)
        padded = [list(g) + [g[0]] * (width - len(g)) for g in groups]
        set_(self, "_padded_index", torch.tensor(padded, dtype=torch.long).reshape(len(groups), width))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def max_id_class(self) -> int:
        """The largest ID class index any group refers to (-1 for an empty set of classes)."""
        return max((max(g) for g in self.class_groups), default=-1)

    def project(self, logits: Tensor) -> Tensor:
        """ID logits ``(..., C_id)`` -> this set's logits ``(..., K)``, BEFORE any softmax.

        Column ``k`` is the max of the ID logits in ``class_groups[k]`` (for singleton groups,
        just that column). Identity groups over exactly ``C_id`` classes return ``logits``
        itself (no copy).
        """
        n_id = logits.shape[-1]
        if self.max_id_class >= n_id:
            raise ValueError(
                f"eval set {self.name!r} refers to ID class {self.max_id_class} but the logits "
                f"have only {n_id} columns"
            )
        if self._identity and n_id == self.num_classes:
            return logits
        if self._singleton_index is not None:
            return logits.index_select(-1, self._singleton_index.to(logits.device))  # (..., K)
        index = self._padded_index.to(logits.device)  # (K, L)
        gathered = logits[..., index]  # (..., K, L)
        return gathered.amax(dim=-1)  # (..., K)


def _as_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    out = tuple(templates)
    if not out:
        raise DataError("a benchmark needs at least one prompt template")
    for t in out:
        if not isinstance(t, str) or "{}" not in t:
            raise DataError(f"prompt template {t!r} must be a string containing '{{}}' for the class name")
    return out


@dataclass(frozen=True)
class Benchmark:
    """An ID task (train/val/test over ``classnames``) plus ordered OOD shift sets.

    ``train_eval``: the training images under EVALUATION preprocessing, aligned by index with
    ``train`` (VRF's zero-shot-failure set and linear-probe feature caching need it); ``None``
    when the source cannot provide it.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train: Dataset
    val: EvalSet
    test: EvalSet
    shifts: dict[str, EvalSet] = field(default_factory=dict)
    train_eval: Dataset | None = None
    # Evaluated and reported like shifts but NOT in the OOD average (e.g. the toy world's
    # shortcut-free ID images, which tell whether fine-tuning learnt something that transfers).
    diagnostics: dict[str, EvalSet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Class names are prompts and labels for people; they may repeat (CLIP's ImageNet
        # names: "missile" and "sunglasses" twice each). Sources that look classes up by
        # name (folders, CSVs, class maps) refuse duplicates themselves.
        classnames = tuple(str(c) for c in self.classnames)
        object.__setattr__(self, "classnames", classnames)
        object.__setattr__(self, "templates", _as_templates(self.templates))
        object.__setattr__(self, "shifts", dict(self.shifts))
        object.__setattr__(self, "diagnostics", dict(self.diagnostics))
        n = len(classnames)
        for role, eval_set in ((ID_VAL, self.val), (ID_TEST, self.test)):
            if eval_set.class_groups != identity_groups(n):
                raise DataError(
                    f"benchmark {self.name!r}: {role} set {eval_set.name!r} must use identity "
                    f"groups over all {n} ID classes"
                )
        extra = {**self.shifts, **self.diagnostics}
        if len(extra) != len(self.shifts) + len(self.diagnostics):
            raise DataError(f"benchmark {self.name!r}: a diagnostic set shares a shift's name")
        for shift_name, shift in extra.items():
            if shift_name in (ID_VAL, ID_TEST):
                raise DataError(f"benchmark {self.name!r}: shift name {shift_name!r} is reserved")
            if shift.max_id_class >= n:
                raise DataError(
                    f"benchmark {self.name!r}: shift {shift_name!r} refers to ID class "
                    f"{shift.max_id_class}, but there are only {n} ID classes"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def shift_names(self) -> tuple[str, ...]:
        return tuple(self.shifts)

    def eval_sets(self) -> dict[str, EvalSet]:
        """``{"id_val": ..., "id_test": ..., **shifts, **diagnostics}`` in that order."""
        return {ID_VAL: self.val, ID_TEST: self.test, **self.shifts, **self.diagnostics}
