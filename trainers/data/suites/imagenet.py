"""ImageNet-1k and its five distribution shifts: ImageNetV2, ImageNet-Sketch, ImageNet-R,
ImageNet-A and ObjectNet, the benchmark of the robust fine-tuning papers (WiSE-FT, FLYP,
model soups, VRF, CaRot).

Layout, each folder as its archive unpacks::

    root/train/<wnid>/*.JPEG          ImageNet-1k training images, 1,000 wnid folders
    root/val/<wnid>/*.JPEG            the 50,000 validation images, sorted into wnid folders
    imagenet_v2/<k>/*                 ImageNetV2 (matched frequency): folders 0..999, k = class index
    imagenet_sketch/<wnid>/*          1,000 wnid folders
    imagenet_r/<wnid>/*               200 wnid folders
    imagenet_a/<wnid>/*               200 wnid folders
    objectnet/images/<folder>/*       313 folders, and the release's own mappings/ files

Protocol:

- classes in ImageNet's standard index order (the sorted wnids; timm ships the list),
  named with CLIP's 1,000 cleaned class names and prompted with the 80 OpenAI templates
  (open_clip ships both);
- ID validation: ``val_fraction`` (default 0.02, model soups' "ImageNet2p") of every
  class's training images, seeded; ID test: ``val/``. Nothing is chosen on a test set;
- ImageNet-R and -A cover 200 classes each (timm's lists): a set's logits are restricted
  to its classes before the softmax;
- ObjectNet: the 113 of its classes that overlap ImageNet-1k, each scored by the max of
  its ImageNet classes' logits, as its ``mappings/`` files say; the folders of its other
  200 classes are not read. A 2-px frame is cut from every image before preprocessing;
- ``classes`` (a list of wnids) restricts everything to those classes: R and A to their
  intersection, ObjectNet to the classes that map into it, each onto the subset's columns.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from ..benchmark import ID_TEST, Benchmark, DataError, EvalSet, FileImageDataset, Transform, identity_groups
from ..folders import abspath, image_files
from .common import TRAIN, Suite, SuiteOptions, hold_out_validation, openai_templates

SHIFTS = ("imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet")
PUBLISHED = {TRAIN: 1_281_167, ID_TEST: 50_000, "imagenet_v2": 10_000, "imagenet_sketch": 50_889,
             "imagenet_r": 30_000, "imagenet_a": 7_500, "objectnet": 18_574}
OBJECTNET_BORDER = 2      # px cut from each side of an ObjectNet image (its red frame)
_SUBSET_LISTS = {"imagenet_r": "imagenet_r_synsets.txt", "imagenet_a": "imagenet_a_synsets.txt"}


# ---------------------------------------------------------------------------------------
# Class lists
# ---------------------------------------------------------------------------------------


def _timm_list(name: str) -> tuple[str, ...]:
    """A wnid list that timm (installed with open_clip) ships in ``timm/data/_info/``; found
    without importing timm."""
    spec = importlib.util.find_spec("timm")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataError("the imagenet suite reads ImageNet's wnid lists from timm, which is "
                        "not installed (it comes with open_clip: pip install timm)")
    path = Path(locations[0]) / "data" / "_info" / name
    try:
        return tuple(path.read_text(encoding="utf-8").split())
    except OSError as err:
        raise DataError(f"cannot read timm's wnid list {path}: {err.strerror or err}") from None


@functools.cache
def wnids() -> tuple[str, ...]:
    """ImageNet-1k's 1,000 wnids in its standard class-index order (sorted)."""
    ids = _timm_list("imagenet_synsets.txt")
    if len(ids) != 1000 or list(ids) != sorted(ids):
        raise DataError(f"timm's imagenet_synsets.txt is not the 1,000 sorted ImageNet-1k "
                        f"wnids ({len(ids)} lines)")
    return ids


@functools.cache
def shift_wnids(shift: str) -> tuple[str, ...]:
    """The 200 wnids of ImageNet-R or ImageNet-A, in ImageNet's index order."""
    ids = set(_timm_list(_SUBSET_LISTS[shift]))
    unknown = sorted(ids - set(wnids()))
    if len(ids) != 200 or unknown:
        raise DataError(f"timm's {_SUBSET_LISTS[shift]} is not 200 ImageNet-1k wnids")
    return tuple(w for w in wnids() if w in ids)


def classnames() -> tuple[str, ...]:
    """CLIP's 1,000 cleaned ImageNet class names, in index order. Two pairs of classes share
    a name ("missile", "sunglasses"), as in CLIP's own zero-shot evaluation."""
    return tuple(IMAGENET_CLASSNAMES)


def _chosen(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The wnids the benchmark uses, in ImageNet's index order whatever the file's order."""
    if classes is None:
        return wnids()
    known = set(wnids())
    for i, wnid in enumerate(classes):
        if wnid not in known:
            raise DataError(f"classes[{i}]: {wnid!r} is not an ImageNet-1k wnid "
                            f"(e.g. {wnids()[0]} for {classnames()[0]!r})")
        if wnid in classes[:i]:
            raise DataError(f"classes[{i}]: {wnid!r} is listed twice")
    chosen = set(classes)
    return tuple(w for w in wnids() if w in chosen)


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------


def _class_folders(folder: Path, names: Sequence[str], known: Collection[str], what: str,
                   describe: Callable[[str], str] = lambda name: "") -> list[Path]:
    """``folder/<name>`` for each of ``names``. A sub-folder that is not one of ``known``
    (a foreign folder) is an error, as is a missing one; ``describe(name)`` says which
    class a missing folder stands for."""
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}")
    with os.scandir(folder) as entries:
        found = {e.name: Path(e.path) for e in entries
                 if not e.name.startswith(".") and e.is_dir()}
    foreign = sorted(n for n in found if n not in known)
    if foreign:
        more = f" (nor are {len(foreign) - 1} other folders)" if len(foreign) > 1 else ""
        down = (f"; is the data one level down, in {found[foreign[0]]}?"
                if len(found) == 1 else "")
        raise DataError(f"{found[foreign[0]]} is not {what}{more}{down}")
    missing = [n for n in names if n not in found]
    if missing:
        more = f", nor do {len(missing) - 1} other classes" if len(missing) > 1 else ""
        raise DataError(f"missing folder {folder / missing[0]}{describe(missing[0])}{more}")
    return [found[n] for n in names]


def _listing(folders: Sequence[Path], names: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Every image under ``folders[k]``, labelled ``k``; an empty folder is an error."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = image_files(folder, names[label])
        paths += files
        labels += [label] * len(files)
    return paths, labels


@dataclass(frozen=True)
class _Classes:
    """The benchmark's classes: ``chosen`` wnids, their names, and their positions."""

    chosen: tuple[str, ...]
    names: tuple[str, ...]

    @functools.cached_property
    def position(self) -> dict[str, int]:          # wnid -> label in this benchmark
        return {w: k for k, w in enumerate(self.chosen)}

    def describe(self, wnid: str) -> str:
        return f" (class {self.names[self.position[wnid]]!r})" if wnid in self.position else ""


_WNID_FOLDER = "an ImageNet-1k class folder (one folder per wnid, such as n01440764)"


# ---------------------------------------------------------------------------------------
# Shifts
# ---------------------------------------------------------------------------------------


def _imagenet_v2(name: str, path: Path, classes: _Classes, tf: Transform | None) -> EvalSet:
    index = {w: k for k, w in enumerate(wnids())}
    folders = _class_folders(
        path, [str(index[w]) for w in classes.chosen], {str(k) for k in range(1000)},
        "an ImageNetV2 class folder (they are named by class index, 0 to 999)",
        lambda k: classes.describe(wnids()[int(k)]))
    dataset = FileImageDataset(*_listing(folders, classes.names), tf)
    return EvalSet(name, dataset, classes.names, identity_groups(len(classes.chosen)))


def _imagenet_sketch(name: str, path: Path, classes: _Classes, tf: Transform | None) -> EvalSet:
    folders = _class_folders(path, classes.chosen, set(wnids()), _WNID_FOLDER, classes.describe)
    dataset = FileImageDataset(*_listing(folders, classes.names), tf)
    return EvalSet(name, dataset, classes.names, identity_groups(len(classes.chosen)))


def _class_subset(name: str, path: Path, classes: _Classes, tf: Transform | None) -> EvalSet:
    """ImageNet-R or -A: its own 200 classes (those of the chosen ones), one ImageNet
    column each, so its logits are the chosen logits restricted to them."""
    members = shift_wnids(name)
    kept = [w for w in classes.chosen if w in set(members)]
    if not kept:
        raise DataError(f"none of the {len(classes.chosen)} chosen classes is one of its "
                        f"{len(members)}: drop the shift or add some of its classes")
    names = [classes.names[classes.position[w]] for w in kept]
    folders = _class_folders(path, kept, set(members),
                             f"one of its {len(members)} class folders (wnids)", classes.describe)
    dataset = FileImageDataset(*_listing(folders, names), tf)
    return EvalSet(name, dataset, names, [(classes.position[w],) for w in kept])


MAPPING_FILES = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                 "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")


def _json_mapping(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object")
    return data


@dataclass(frozen=True)
class ObjectNetClass:
    folder: str                     # its folder under images/
    name: str                       # ObjectNet's class name, e.g. "Alarm clock"
    imagenet: tuple[int, ...]       # the ImageNet class indices it stands for (sorted)


def objectnet_classes(mappings: Path) -> tuple[list[ObjectNetClass], set[str]]:
    """The ObjectNet classes that overlap ImageNet-1k (113 in the release), sorted by folder,
    and the names of all its class folders, from the release's ``mappings/`` files:

    - ``folder_to_objectnet_label.json``: folder -> class name (all 313 classes);
    - ``objectnet_to_imagenet_1k.json``: class name -> its ImageNet classes' names, joined
      by ``"; "`` (only the overlapping classes);
    - ``imagenet_to_label_2012_v2``: line ``i`` is the name of ImageNet 2012 id ``i``;
    - ``pytorch_to_imagenet_2012_id.json``: class index (sorted wnids) -> 2012 id.
    """
    folder_name, to_imagenet, index_to_2012 = (
        _json_mapping(mappings / f) for f in MAPPING_FILES[:3])
    lines_path = mappings / MAPPING_FILES[3]
    try:
        lines = lines_path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read {lines_path}: {err.strerror or err}") from None

    index_of_2012: dict[int, int] = {}
    for key, value in index_to_2012.items():
        try:
            index, id_2012 = int(key), int(value)
        except (TypeError, ValueError):
            raise DataError(f"{mappings / MAPPING_FILES[2]}: expected class index -> 2012 id "
                            f"numbers, got {key!r}: {value!r}") from None
        if not 0 <= index < 1000 or not 0 <= id_2012 < len(lines):
            raise DataError(f"{mappings / MAPPING_FILES[2]}: {key!r}: {value!r} is out of "
                            f"range (1,000 classes, {len(lines)} lines in {MAPPING_FILES[3]})")
        index_of_2012[id_2012] = index
    ids_by_name: dict[str, list[int]] = {}
    for id_2012, line in enumerate(lines):
        ids_by_name.setdefault(line.strip(), []).append(id_2012)
    folder_of: dict[str, str] = {}
    for folder, name in folder_name.items():
        if name in folder_of:
            raise DataError(f"{mappings / MAPPING_FILES[0]}: class {name!r} has two folders, "
                            f"{folder_of[name]!r} and {folder!r}")
        folder_of[str(name)] = str(folder)

    where = mappings / MAPPING_FILES[1]
    out = []
    for name, imagenet_names in to_imagenet.items():
        if name not in folder_of:
            raise DataError(f"{where}: class {name!r} has no folder in {MAPPING_FILES[0]}")
        indices = set()
        for imagenet_name in str(imagenet_names).split(";"):
            ids = ids_by_name.get(imagenet_name.strip(), [])
            if len(ids) != 1:
                why = "is no line" if not ids else f"is {len(ids)} lines"
                raise DataError(f"{where}: {name!r} maps to {imagenet_name.strip()!r}, which "
                                f"{why} of {MAPPING_FILES[3]}")
            if ids[0] not in index_of_2012:
                raise DataError(f"{where}: {name!r} maps to 2012 id {ids[0]}, which "
                                f"{MAPPING_FILES[2]} gives no class index")
            indices.add(index_of_2012[ids[0]])
        out.append(ObjectNetClass(folder_of[name], str(name), tuple(sorted(indices))))
    return sorted(out, key=lambda c: c.folder), set(folder_of.values())


def _objectnet(name: str, path: Path, classes: _Classes, tf: Transform | None) -> EvalSet:
    """ObjectNet's classes that map into the chosen ones, each scored by the max over the
    logits of its chosen ImageNet classes; the folders of the others are never listed."""
    overlapping, all_folders = objectnet_classes(path / "mappings")
    label_of_index = {k: classes.position[w] for k, w in enumerate(wnids())
                      if w in classes.position}
    kept, groups = [], []
    for c in overlapping:
        group = tuple(sorted({label_of_index[k] for k in c.imagenet if k in label_of_index}))
        if group:
            kept.append(c)
            groups.append(group)
    if not kept:
        raise DataError(f"none of its {len(overlapping)} ImageNet-overlapping classes maps into "
                        f"the {len(classes.chosen)} chosen classes: drop the shift or add some")
    names = [c.name for c in kept]
    folders = _class_folders(path / "images", [c.folder for c in kept], all_folders,
                             f"an ObjectNet class folder (not in mappings/{MAPPING_FILES[0]})",
                             lambda f: f" (class {next(c.name for c in kept if c.folder == f)!r})")
    dataset = FileImageDataset(*_listing(folders, names), tf, border=OBJECTNET_BORDER)
    return EvalSet(name, dataset, names, groups)


SHIFT_LOADERS = {"imagenet_v2": _imagenet_v2, "imagenet_sketch": _imagenet_sketch,
                 "imagenet_r": _class_subset, "imagenet_a": _class_subset,
                 "objectnet": _objectnet}


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def load(options: SuiteOptions, train_transform: Transform | None = None,
         eval_transform: Transform | None = None) -> Benchmark:
    """The ImageNet benchmark (module docstring) for ``options``; lists files, opens none."""
    root = abspath(options.root)
    chosen = _chosen(options.classes)
    all_names = classnames()
    index = {w: k for k, w in enumerate(wnids())}
    classes = _Classes(chosen, tuple(all_names[index[w]] for w in chosen))
    unknown = [s for s in options.shifts if s not in SHIFT_LOADERS]
    if unknown:
        raise DataError(f"unknown imagenet shift {unknown[0]!r} (known: {', '.join(SHIFTS)})")

    train_dir = root / "train"
    folders = _class_folders(train_dir, chosen, set(wnids()), _WNID_FOLDER, classes.describe)
    every = _listing(folders, classes.names)
    train, val = hold_out_validation(*every, classes.names, options, lambda k: str(folders[k]))
    test_folders = _class_folders(root / "val", chosen, set(wnids()),
                                  _WNID_FOLDER + "; val/ must be sorted into wnid folders",
                                  classes.describe)
    test = _listing(test_folders, classes.names)

    shifts = {}
    for name, path in options.shifts.items():
        try:
            shifts[name] = SHIFT_LOADERS[name](name, abspath(path), classes, eval_transform)
        except DataError as err:
            raise DataError(f"shift {name!r}: {err}") from None
    groups = identity_groups(len(chosen))
    return Benchmark(
        name="imagenet" if options.classes is None else f"imagenet-{len(chosen)}",
        classnames=classes.names,
        templates=options.templates or openai_templates(),
        train=FileImageDataset(*train, train_transform),
        val=EvalSet("id_val", FileImageDataset(*val, eval_transform), classes.names, groups),
        test=EvalSet(ID_TEST, FileImageDataset(*test, eval_transform), classes.names, groups),
        shifts=shifts,
        train_eval=FileImageDataset(*train, eval_transform),
    )


SUITE = Suite(name="imagenet", load=load, shifts=SHIFTS, published=lambda options: dict(PUBLISHED),
              class_ids=wnids)
