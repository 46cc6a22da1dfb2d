"""Real-data sources: image-folder trees and CSV lists turned into a :class:`Benchmark`.

Layout of a benchmark root::

    root/train/<class>/**/*.jpg     # required
    root/val/<class>/...            # optional when val_fraction > 0 (then a seeded split of train)
    root/test/<class>/...           # required

``<class>`` is a class name (``folder_names="classnames"``) or the class's index in the class
list (``folder_names="index"``, e.g. ImageNetV2's ``0..999``). Labels ALWAYS follow the
benchmark's class list, never the order folders have on disk (torchvision's ``ImageFolder``
numbers sorted folders, which is why it is not used here).

Each shift is a :class:`ShiftSource`: an image folder or a ``path,label`` CSV, covering all ID
classes, a subset of them, or (with ``class_map``) its own classes that map onto ID classes.
Every problem raises :class:`DataError` with one line naming the path (or ``file:line``).
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .benchmark import (
    Benchmark,
    DataError,
    EvalSet,
    FileImageDataset,
    Transform,
    identity_groups,
    mapped_groups,
    subset_groups,
)

__all__ = [
    "FOLDER_NAMINGS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "ShiftSource",
    "load_imagefolder_benchmark",
    "check_csv_classes",
    "load_csv_split",
    "load_shift",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
FOLDER_NAMINGS = ("classnames", "index")
FORMATS = ("imagefolder", "csv")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def abspath(path: Path | str) -> Path:
    """Absolute, normalised path WITHOUT resolving symlinks (so messages show the user's path)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _check_folder_names(folder_names: str, where: str) -> None:
    if folder_names not in FOLDER_NAMINGS:
        raise DataError(f"{where}: folder_names must be one of {FOLDER_NAMINGS}, got {folder_names!r}")


@dataclass(frozen=True)
class ShiftSource:
    """Where an OOD shift's images are and how its classes relate to the ID classes.

    - ``format``: ``"imagefolder"`` (``path/<class>/...``) or ``"csv"`` (``path`` is a CSV file
      with header ``path,label``).
    - ``class_map``: ``None`` -> the shift's classes are ID classes (all or a subset); otherwise
      shift class -> the ID class names it stands for (ObjectNet style), and the shift's class
      space is exactly the ``class_map`` keys, in that order.
    - ``folder_names``: ``"classnames"`` or ``"index"`` (index into the ID classes, or into the
      ``class_map`` keys when a class map is given). Only used by ``"imagefolder"``.
    """

    path: Path
    format: str = "imagefolder"
    class_map: Mapping[str, tuple[str, ...]] | None = None
    folder_names: str = "classnames"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", abspath(self.path))
        if self.format not in FORMATS:
            raise DataError(f"shift {self.path}: format must be one of {FORMATS}, got {self.format!r}")
        _check_folder_names(self.folder_names, f"shift {self.path}")
        if self.class_map is not None:
            normalised = {
                str(k): (v,) if isinstance(v, str) else tuple(str(x) for x in v)
                for k, v in self.class_map.items()
            }
            if not normalised:
                raise DataError(f"shift {self.path}: class_map is empty")
            object.__setattr__(self, "class_map", normalised)


# ---------------------------------------------------------------------------------------
# Listing image folders
# ---------------------------------------------------------------------------------------


def _class_dirs(split_dir: Path) -> list[Path]:
    """Sorted class sub-folders of ``split_dir`` (hidden ones such as ``.ipynb_checkpoints`` skipped)."""
    if not split_dir.is_dir():
        raise DataError(f"missing folder {split_dir}")
    dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"no class folders in {split_dir}")
    return dirs


def _parts(path: Path) -> tuple[str, ...]:
    """A sort key in Path's own order, compared in C (Path.__lt__ is slow at a million files)."""
    return path.parts


def image_files(class_dir: Path, classname: str | None = None) -> list[Path]:
    """Image files under ``class_dir`` (recursively, following symlinks), sorted for determinism."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(base / name)
    files.sort(key=_parts)
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        what = f"class {classname!r}: " if classname is not None else ""
        raise DataError(f"{what}no images in class folder {class_dir} (looked for {exts})")
    return files


def _folder_label(class_dir: Path, classnames: Sequence[str], index: dict[str, int], folder_names: str) -> int:
    """Label of a class folder in the ``classnames`` space."""
    name = class_dir.name
    if folder_names == "classnames":
        if name not in index:
            raise DataError(
                f"class folder {class_dir} is not one of the {len(classnames)} classes "
                f"(folder names must equal class names; use folder_names='index' for 0..C-1)"
            )
        return index[name]
    if not name.isdigit():
        raise DataError(f"class folder {class_dir} is not a class index (folder_names='index')")
    label = int(name)
    if label >= len(classnames):
        raise DataError(f"class folder {class_dir}: index {label} out of range for {len(classnames)} classes")
    return label


def _folder_of(split_dir: Path, classnames: Sequence[str], label: int, folder_names: str) -> Path:
    return split_dir / (classnames[label] if folder_names == "classnames" else str(label))


def _missing(classnames: Sequence[str], missing: Sequence[int], what: str) -> str:
    """'class 'dog' has no folder /x/train/dog' (+ how many other classes lack one)."""
    others = len(missing) - 1
    more = f" (nor do {others} other class{'es' if others > 1 else ''})" if others else ""
    return f"class {classnames[missing[0]]!r} has {what}{more}"


def _require_every_class(
    split_dir: Path, classnames: Sequence[str], labels: Sequence[int], folder_names: str
) -> None:
    present = set(labels)
    missing = [k for k in range(len(classnames)) if k not in present]
    if missing:
        folder = _folder_of(split_dir, classnames, missing[0], folder_names)
        raise DataError(_missing(classnames, missing, f"no folder {folder}"))


def _list_imagefolder(
    split_dir: Path, classnames: Sequence[str], folder_names: str, require_all: bool = False
) -> tuple[list[Path], list[int]]:
    """All image paths and their labels (in the ``classnames`` space) under ``split_dir``.

    Ordered by label, then path, so the listing does not depend on the file system. Every
    class folder must hold images; with ``require_all`` every class must have a folder.
    """
    index = {name: k for k, name in enumerate(classnames)}
    by_label: dict[int, list[Path]] = {}
    for class_dir in _class_dirs(split_dir):
        label = _folder_label(class_dir, classnames, index, folder_names)
        if label in by_label:
            raise DataError(f"class folder {class_dir}: a second folder for class {classnames[label]!r}")
        by_label[label] = image_files(class_dir, classnames[label])
    if require_all:
        _require_every_class(split_dir, classnames, list(by_label), folder_names)
    paths, labels = [], []
    for label in sorted(by_label):
        paths += by_label[label]
        labels += [label] * len(by_label[label])
    return paths, labels


# ---------------------------------------------------------------------------------------
# CSV lists
# ---------------------------------------------------------------------------------------


def _read_csv_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    """``(line number, path, label)`` for each data row of a ``path,label`` CSV."""
    if not csv_path.is_file():
        raise DataError(f"missing CSV file {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: tolerate a BOM from Excel
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        if not header:
            raise DataError(f"{csv_path}: empty file, expected a header line 'path,label'")
        header = [h.strip() for h in header]
        reader.fieldnames = header
        if "path" not in header or "label" not in header:
            raise DataError(f"{csv_path}: header must have columns 'path' and 'label', got {header}")
        rows = []
        for row in reader:
            line = reader.line_num
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not path or not label:
                raise DataError(f"{csv_path}:{line}: empty 'path' or 'label' field")
            rows.append((line, path, label))
    if not rows:
        raise DataError(f"{csv_path}: no rows after the header")
    return rows


def _csv_label(label: str, index: dict[str, int], n: int, where: str) -> int:
    """A CSV label -> class index. A class NAME wins over an integer reading (classes may be digits)."""
    if label in index:
        return index[label]
    try:
        value = int(label)
    except ValueError:
        raise DataError(f"{where}: unknown label {label!r} (not a class name or index)") from None
    if not 0 <= value < n:
        raise DataError(f"{where}: label index {value} out of range for {n} classes")
    return value


def check_csv_classes(csv_path: Path | str, classnames: Sequence[str]) -> None:
    """Every class of ``classnames`` has at least one row in the ``path,label`` CSV (and
    every label is a class): the check for an ID split, which must cover all classes.
    Reads the labels only (``load_csv_split`` checks the image files)."""
    csv_path = abspath(csv_path)
    classnames = tuple(classnames)
    index = {name: k for k, name in enumerate(classnames)}
    present = {
        _csv_label(label, index, len(classnames), f"{csv_path}:{line}")
        for line, _, label in _read_csv_rows(csv_path)
    }
    missing = [k for k in range(len(classnames)) if k not in present]
    if missing:
        raise DataError(_missing(classnames, missing, f"no rows in {csv_path}"))


def load_csv_split(
    csv_path: Path | str, classnames: Sequence[str], transform: Transform | None = None
) -> tuple[FileImageDataset, tuple[str, ...]]:
    """A ``path,label`` CSV -> (dataset, classes present).

    ``label`` is a class name or an integer index into ``classnames``; relative paths are
    resolved against the CSV's folder; extra columns are ignored. The dataset's labels index
    ``classnames`` (NOT the present subset); the present classes come in ``classnames`` order.
    Every referenced file must exist (checked here, so a typo fails before any training).
    """
    csv_path = abspath(csv_path)
    classnames = tuple(classnames)
    index = {name: k for k, name in enumerate(classnames)}
    paths, labels = [], []
    for line, raw_path, raw_label in _read_csv_rows(csv_path):
        where = f"{csv_path}:{line}"
        labels.append(_csv_label(raw_label, index, len(classnames), where))
        path = Path(os.path.expanduser(raw_path))
        path = abspath(path if path.is_absolute() else csv_path.parent / path)
        if not path.is_file():
            raise DataError(f"{where}: image file not found: {path}")
        paths.append(path)
    present = tuple(classnames[k] for k in sorted(set(labels)))
    return FileImageDataset(paths, labels, transform), present


# ---------------------------------------------------------------------------------------
# Shifts
# ---------------------------------------------------------------------------------------


def _remap(labels: Sequence[int], kept: Sequence[int]) -> list[int]:
    """Labels in a large space -> positions in ``kept`` (the classes a subset set keeps)."""
    position = {old: new for new, old in enumerate(kept)}
    return [position[y] for y in labels]


def load_shift(
    name: str, source: ShiftSource, id_classnames: Sequence[str], transform: Transform | None = None
) -> EvalSet:
    """Build one shift's :class:`EvalSet` (its own class space + groups onto the ID classes)."""
    id_classnames = tuple(id_classnames)
    where = f"shift {name!r} ({source.path})"
    if source.class_map is not None:
        # The shift's class space is the class_map keys; labels are read directly in it.
        try:
            shift_classes, groups = mapped_groups(id_classnames, source.class_map)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
        space = shift_classes
    else:
        space = id_classnames

    # A shift may cover a subset of the ID classes (no folder or rows for the others), but a
    # class folder it has must hold images; with a class_map, every mapped class needs some.
    mapped = source.class_map is not None
    try:
        if source.format == "csv":
            dataset, present = load_csv_split(source.path, space, transform)
            paths, labels = list(dataset.paths), list(dataset.labels)
            missing = [k for k, c in enumerate(space) if c not in present]
            if mapped and missing:
                raise DataError(_missing(space, missing, f"no rows in {source.path}"))
        else:
            if not source.path.is_dir():
                raise DataError(f"missing folder {source.path}")
            paths, labels = _list_imagefolder(source.path, space, source.folder_names,
                                              require_all=mapped)
    except DataError as exc:
        raise DataError(f"shift {name!r}: {exc}") from None

    if source.class_map is None:
        # Subset (or all) of the ID classes: keep the present ones, in ID-class order.
        kept = sorted(set(labels))
        shift_classes = tuple(id_classnames[k] for k in kept)
        groups = subset_groups(id_classnames, shift_classes)
        labels = _remap(labels, kept)
    return EvalSet(name, FileImageDataset(paths, labels, transform), shift_classes, groups)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def split_train_val(
    paths: list[Path], labels: list[int], val_fraction: float, seed: int
) -> tuple[tuple[list[Path], list[int]], tuple[list[Path], list[int]]]:
    """Seeded, per-class (stratified) split of train into (train, val); disjoint, deterministic.

    Each class gives ``round(val_fraction * n_c)`` of its images to val, but always keeps at
    least one for training. The shuffle uses Python's ``random.Random(seed)``, whose stream is
    stable across platforms and versions, over the path-sorted listing.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[Path]] = {}
    for path, label in zip(paths, labels):
        by_label.setdefault(label, []).append(path)
    train, val = ([], []), ([], [])
    for label in sorted(by_label):
        files = sorted(by_label[label], key=_parts)
        rng.shuffle(files)
        n_val = min(round(val_fraction * len(files)), len(files) - 1)
        for part, chunk in ((val, files[:n_val]), (train, files[n_val:])):
            part[0].extend(sorted(chunk, key=_parts))
            part[1].extend([label] * len(chunk))
    return train, val


def _default_classnames(train_dir: Path, folder_names: str) -> tuple[str, ...]:
    if folder_names == "index":
        raise DataError(
            f"{train_dir}: class folders are named by index (folder_names='index'), so classnames must be given"
        )
    return tuple(d.name for d in _class_dirs(train_dir))


def load_imagefolder_benchmark(
    root: Path | str,
    classnames: Sequence[str] | None,
    templates: Sequence[str] | None,
    shifts: Mapping[str, ShiftSource] | None = None,
    train_transform: Transform | None = None,
    eval_transform: Transform | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    name: str | None = None,
    folder_names: str = "classnames",
) -> Benchmark:
    """A :class:`Benchmark` from ``root/{train,val,test}/<class>/*`` and shift sources.

    - ``classnames``: the ID class list; label ``k`` is ``classnames[k]`` whatever the disk
      order. ``None`` -> the sorted folder names of ``root/train``.
    - ``templates``: prompt templates with ``{}`` for the class name; ``None`` -> ``("a photo of a {}.",)``.
    - ``val_fraction``: 0 -> ``root/val`` must exist; > 0 -> ``root/val`` must NOT exist and val
      is a seeded per-class split of ``root/train`` (both at once would be ambiguous).
    - ``train_transform`` is used for ``train``; ``eval_transform`` for val, test, shifts and
      ``train_eval`` (the training images under eval preprocessing).
    """
    root = abspath(root)
    if not root.is_dir():
        raise DataError(f"benchmark root not found: {root}")
    _check_folder_names(folder_names, str(root))
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"{root}: val_fraction must be in [0, 1), got {val_fraction!r}")
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"

    classnames = tuple(classnames) if classnames is not None else _default_classnames(train_dir, folder_names)
    if not classnames:
        raise DataError(f"{root}: the class list is empty")
    if len(set(classnames)) != len(classnames):
        raise DataError(f"{root}: duplicate names in classnames")

    # Every ID class needs images in train, val and test (a class missing from a split would
    # train without examples, or be scored on nothing); the splits are listed first, so a
    # stray or misnamed folder is reported before the class it leaves without a folder.
    train = _list_imagefolder(train_dir, classnames, folder_names)
    if val_fraction > 0:
        if val_dir.exists():
            raise DataError(f"{val_dir} exists but val_fraction={val_fraction}: use one or the other")
        _require_every_class(train_dir, classnames, train[1], folder_names)
        train, val = split_train_val(*train, float(val_fraction), seed)
        if not val[0]:
            raise DataError(f"{train_dir}: val_fraction={val_fraction} leaves no validation images")
        in_val = set(val[1])
        missing = [k for k in range(len(classnames)) if k not in in_val]
        if missing:
            folder = _folder_of(train_dir, classnames, missing[0], folder_names)
            raise DataError(_missing(classnames, missing, (
                f"no validation images: val_fraction={val_fraction} takes none of its "
                f"{train[1].count(missing[0])} in {folder}"))
                + f"; add images, raise val_fraction, or make {val_dir}")
    else:
        if not val_dir.is_dir():
            raise DataError(f"missing folder {val_dir} (or set val_fraction > 0 to split train)")
        val = _list_imagefolder(val_dir, classnames, folder_names)
    test = _list_imagefolder(test_dir, classnames, folder_names)
    for split_dir, (_, labels) in ((train_dir, train), (val_dir, val), (test_dir, test)):
        _require_every_class(split_dir, classnames, labels, folder_names)

    groups = identity_groups(len(classnames))
    shift_sets = {
        shift_name: load_shift(shift_name, source, classnames, eval_transform)
        for shift_name, source in (shifts or {}).items()
    }
    return Benchmark(
        name=name or root.name,
        classnames=classnames,
        templates=tuple(templates) if templates is not None else DEFAULT_TEMPLATES,
        train=FileImageDataset(*train, train_transform),
        val=EvalSet("id_val", FileImageDataset(*val, eval_transform), classnames, groups),
        test=EvalSet("id_test", FileImageDataset(*test, eval_transform), classnames, groups),
        shifts=shift_sets,
        train_eval=FileImageDataset(*train, eval_transform),
    )
