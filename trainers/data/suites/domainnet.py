"""DomainNet (Peng et al., "Moment Matching for Multi-Source Domain Adaptation", ICCV 2019):
345 classes drawn in six domains. One domain is the ID task, others are its shifts (e.g.
Lipsum-FT's real -> painting, clipart, infograph, sketch).

Layout, as distributed (every domain under one root, or a shift under a root of its own)::

    root/<domain>/<class>/<file>.jpg
    root/<domain>_train.txt            lines "<domain>/<class>/<file>.jpg <label>"
    root/<domain>_test.txt

Protocol:

- classes: the lists' labels ``0..344``, named after their class folders with underscores
  as spaces (``aircraft_carrier`` -> "aircraft carrier"); every list must agree on them;
- ID (``domain``): its train list, less ``val_fraction`` of every class held out as ID
  validation (seeded); its test list is ID test;
- each shift: its domain's test list; a class it lacks is left out of its class space;
- ``classes`` (class folder names) restricts everything to those classes.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..benchmark import ID_TEST, Benchmark, DataError, EvalSet, FileImageDataset, Transform, identity_groups
from ..folders import abspath
from .common import TRAIN, Suite, SuiteOptions, hold_out_validation, openai_templates

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
# (train list, test list) lines per domain in the released ("cleaned") lists
PUBLISHED = {"clipart": (33_525, 14_604), "infograph": (36_023, 15_582),
             "painting": (50_416, 21_850), "quickdraw": (120_750, 51_750),
             "real": (120_906, 52_041), "sketch": (48_212, 20_916)}

Row = tuple[str, Path, int, str]       # (file:line, image path, label, class folder)


def _read_list(root: Path, domain: str, split: str) -> list[Row]:
    """The rows of ``root/<domain>_<split>.txt``."""
    list_path = root / f"{domain}_{split}.txt"
    if not list_path.is_file():
        raise DataError(f"missing file {list_path} (DomainNet's {split} list of {domain})")
    rows = []
    with open(list_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{list_path}:{number}"
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{where}: expected '<domain>/<class>/<file> <label>', "
                                f"got {line!r}")
            pieces = parts[0].split("/")
            if len(pieces) != 3 or pieces[0] != domain:
                raise DataError(f"{where}: expected a path {domain}/<class>/<file>, "
                                f"got {parts[0]!r}")
            rows.append((where, root / parts[0], int(parts[1]), pieces[1]))
    if not rows:
        raise DataError(f"{list_path}: no lines")
    return rows


def _class_folders(rows: list[Row]) -> tuple[str, ...]:
    """The class folder of every label ``0..K-1``, as the lists say (they must agree)."""
    folder_of: dict[int, tuple[str, str]] = {}
    label_of: dict[str, tuple[int, str]] = {}
    for where, _, label, folder in rows:
        seen = folder_of.setdefault(label, (folder, where))
        if seen[0] != folder:
            raise DataError(f"{where}: label {label} is class {folder!r} here but "
                            f"{seen[0]!r} at {seen[1]}")
        other = label_of.setdefault(folder, (label, where))
        if other[0] != label:
            raise DataError(f"{where}: class {folder!r} has label {label} here but "
                            f"{other[0]} at {other[1]}")
    missing = [k for k in range(max(folder_of) + 1) if k not in folder_of]
    if missing:
        raise DataError(f"label {missing[0]} is on no line of the lists read, which use "
                        f"labels up to {max(folder_of)}")
    return tuple(folder_of[k][0] for k in range(len(folder_of)))


def load(options: SuiteOptions, train_transform: Transform | None = None,
         eval_transform: Transform | None = None) -> Benchmark:
    """The DomainNet benchmark (module docstring) for ``options``; every listed file must
    exist (checked here), none is opened."""
    domain = options.domain
    if domain not in DOMAINS:
        raise DataError(f"domain: {domain!r} is not a DomainNet domain ({', '.join(DOMAINS)})")
    for name in options.shifts:
        if name not in DOMAINS or name == domain:
            others = ", ".join(d for d in DOMAINS if d != domain)
            raise DataError(f"shift {name!r} is not another DomainNet domain ({others})")
    root = abspath(options.root)
    train_rows, test_rows = _read_list(root, domain, "train"), _read_list(root, domain, "test")
    shift_rows = {name: _read_list(abspath(path), name, "test")
                  for name, path in options.shifts.items()}
    folders = _class_folders(train_rows + test_rows + [r for rows in shift_rows.values()
                                                       for r in rows])
    kept = list(range(len(folders)))
    if options.classes is not None:
        for i, folder in enumerate(options.classes):
            if folder not in folders:
                raise DataError(f"classes[{i}]: {folder!r} is not a DomainNet class folder "
                                f"(such as {folders[0]!r})")
            if folder in options.classes[:i]:
                raise DataError(f"classes[{i}]: {folder!r} is listed twice")
        kept = [k for k, folder in enumerate(folders) if folder in set(options.classes)]
    position = {old: new for new, old in enumerate(kept)}
    names = tuple(folders[k].replace("_", " ") for k in kept)

    def select(rows: list[Row]) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for where, path, label, _ in rows:
            if label in position:
                if not os.path.isfile(path):
                    raise DataError(f"{where}: image file not found: {path}")
                paths.append(path)
                labels.append(position[label])
        return paths, labels

    every = select(train_rows)
    present = set(every[1])
    lacking = [k for k in range(len(kept)) if k not in present]
    if lacking:
        raise DataError(f"class {names[lacking[0]]!r} has no line in {root}/{domain}_train.txt")
    train, val = hold_out_validation(
        *every, names, options, lambda k: f"{root}/{domain}_train.txt ({folders[kept[k]]})")
    groups = identity_groups(len(kept))
    shifts = {}
    for name, rows in shift_rows.items():
        paths, labels = select(rows)
        if not paths:
            raise DataError(f"shift {name!r}: none of its test images is of the chosen classes")
        own = sorted(set(labels))          # a domain may lack a class: its own class space
        local = {k: i for i, k in enumerate(own)}
        shifts[name] = EvalSet(name, FileImageDataset(paths, [local[y] for y in labels],
                                                      eval_transform),
                               [names[k] for k in own], [(k,) for k in own])
    return Benchmark(
        name=f"domainnet-{domain}",
        classnames=names,
        templates=options.templates or openai_templates(),
        train=FileImageDataset(*train, train_transform),
        val=EvalSet("id_val", FileImageDataset(*val, eval_transform), names, groups),
        test=EvalSet(ID_TEST, FileImageDataset(*select(test_rows), eval_transform), names, groups),
        shifts=shifts,
        train_eval=FileImageDataset(*train, eval_transform),
    )


def _published(options: SuiteOptions) -> dict[str, int]:
    train, test = PUBLISHED[options.domain]
    return {TRAIN: train, ID_TEST: test, **{s: PUBLISHED[s][1] for s in options.shifts}}


SUITE = Suite(name="domainnet", load=load, shifts=DOMAINS, published=_published, domains=DOMAINS)
