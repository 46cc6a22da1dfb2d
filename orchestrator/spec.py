"""Sweep files: YAML -> a validated, frozen `SweepSpec`, before anything starts.

Path fields may use environment variables (`storage_path: $ORCH_STORAGE/sweeps`,
`root: $DATA/imagenet`), so a cluster sets its shared locations in one place.

Every error names the field (`grid.lr[1]: expected a number, got 'fast'`) and
`orch sweep --dry-run` runs all of these checks, so a bad file never fails mid-sweep.
Relative paths are resolved against the current working directory, on the driver
(Ray Tune changes each trial's working directory).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from orchestrator.schema import SpecError, coerce, field_types, parse_dataclass
from orchestrator.storage import check_uri, is_uri
from trainers.ensembles import REGISTRY as ENSEMBLES
from trainers.ensembles import get_ensemble
from trainers.evaluate import PRECISIONS
from trainers.methods import REGISTRY as METHODS
from trainers.methods import get_method

SOURCES = ("toyworld", "imagefolder", "csv")
FOLDER_NAMES = ("classnames", "index")


@dataclass(frozen=True)
class ShiftSpec:
    """One OOD set: an image-folder tree or a CSV (path,label)."""

    path: str
    format: str = "imagefolder"
    class_map: dict[str, list[str]] | None = None   # shift class -> ID classes (ObjectNet)
    folder_names: str = "classnames"                 # or "index" (ImageNetV2)

    def __post_init__(self):
        if self.format not in ("imagefolder", "csv"):
            raise ValueError(f"format must be imagefolder or csv, got {self.format!r}")
        if self.folder_names not in FOLDER_NAMES:
            raise ValueError(f"folder_names must be classnames or index, got {self.folder_names!r}")


# Metric names are `<set>_<metric>` plus the summaries `id_*`, `val_*`, `ood_*` and the
# ensembles' own numbers (`vrf_*`): a shift may not take a name that would overwrite them.
RESERVED_SET_NAMES = frozenset({"id", "val", "ood", "test", "train", "id_val", "id_test",
                                "id_train", "id_rand", "selected", "temperature"})


def shift_name_problem(name: str) -> str | None:
    if not name or not (name[0].isalpha() and all(c.isalnum() or c in "_-" for c in name)):
        return "a shift name starts with a letter and has only letters, digits, '_' or '-'"
    if name in RESERVED_SET_NAMES or name in ENSEMBLES:
        return (f"the name {name!r} is taken: metrics are called `<set>_acc` and the summaries "
                "id_*, val_*, ood_* (give the shift another name)")
    return None


@dataclass(frozen=True)
class BenchmarkSpec:
    source: str = "toyworld"
    # a named suite instead of a source (trainers/data/suites, docs/benchmarks.md):
    # imagenet | domainnet, with `root`, `shifts` and the suite keys at the end
    suite: str | None = None
    # toyworld: use only the first N images of the training set / of each eval set
    train_size: int | None = None
    eval_size: int | None = None
    # imagefolder: root/{train,val,test}/<class>/*; csv: train/val/test are CSV files
    root: str | None = None
    train: str | None = None
    val: str | None = None
    test: str | None = None
    classnames: list[str] | None = None
    templates: str | list[str] | None = None         # "openai", "simple" or a list with "{}"
    # held out of the training images as ID validation; default 0 for imagefolder (its
    # val/ folder is ID validation), 0.02 for a suite
    val_fraction: float | None = None
    folder_names: str = "classnames"
    shifts: dict[str, ShiftSpec] = field(default_factory=dict)
    # suites only
    classes: list[str] | None = None    # restrict to these classes (ImageNet wnids, DomainNet folders)
    domain: str | None = None           # DomainNet: the ID domain
    strict_counts: bool = False         # a set unlike its published size is an error, not a warning

    def __post_init__(self):
        if self.suite is not None:
            _check_suite(self)
            object.__setattr__(self, "source", self.suite)   # what records and plans show
        elif self.source not in SOURCES:
            hint = (f" (a named suite is `suite: {self.source}`)"
                    if self.source in _suites() else "")
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}"
                             + hint)
        else:
            for key in ("classes", "domain"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only a suite takes it (suite: "
                                     f"{' or '.join(_suites())})")
            if self.strict_counts:
                raise ValueError("strict_counts: only a suite has published image counts")
        if self.classnames is not None and len(set(self.classnames)) != len(self.classnames):
            twice = next(c for i, c in enumerate(self.classnames) if c in self.classnames[:i])
            raise ValueError(f"classnames: {twice!r} is listed twice")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.folder_names not in FOLDER_NAMES:
            raise ValueError(f"folder_names must be classnames or index, got {self.folder_names!r}")
        if isinstance(self.templates, str) and self.templates not in ("openai", "simple"):
            raise ValueError(f"templates must be openai, simple or a list, got {self.templates!r}")
        if isinstance(self.templates, list) and (
                not self.templates or not all("{}" in t for t in self.templates)):
            raise ValueError("templates: each template must contain '{}' for the class name")
        for name in self.shifts:
            problem = shift_name_problem(name)
            if problem:
                raise ValueError(f"shifts.{name}: {problem}")


def _suites() -> dict:
    from trainers.data.suites import SUITES
    return SUITES


def _check_suite(b: BenchmarkSpec) -> None:
    """The keys of a `suite:` block, each wrong one a ValueError naming it."""
    suites = _suites()
    if b.suite not in suites:
        raise ValueError(f"suite must be one of {', '.join(suites)}, got {b.suite!r}")
    suite = suites[b.suite]
    for key, how in (("classnames", "restrict them with `classes:`"),
                     ("train", "it reads `root`"), ("val", "it holds out `val_fraction` of train"),
                     ("test", "it reads `root`"), ("train_size", "restrict it with `classes:`"),
                     ("eval_size", "restrict it with `classes:`")):
        if getattr(b, key) is not None:
            raise ValueError(f"{key}: not a key of suite {b.suite}: {how}")
    if b.folder_names != "classnames":
        raise ValueError(f"folder_names: not a key of suite {b.suite}: it knows its folders")
    if b.val_fraction is not None and not 0.0 < b.val_fraction < 1.0:
        raise ValueError(f"val_fraction: suite {b.suite} holds out part of its training images "
                         f"as ID validation: must be in (0, 1), got {b.val_fraction}")
    if suite.domains:
        if b.domain is not None and b.domain not in suite.domains:
            raise ValueError(f"domain: {b.domain!r} is not one of {', '.join(suite.domains)}")
    elif b.domain is not None:
        raise ValueError(f"domain: not a key of suite {b.suite}")
    for name, shift in b.shifts.items():
        known = [s for s in suite.shifts if s != b.domain]
        if name not in known:
            raise ValueError(f"shifts.{name}: not a shift of suite {b.suite} (known: "
                             f"{', '.join(known)})")
        for key, default in (("format", "imagefolder"), ("class_map", None),
                             ("folder_names", "classnames")):
            if getattr(shift, key) != default:
                raise ValueError(f"shifts.{name}.{key}: suite {b.suite} knows how its shifts "
                                 "are stored; give the folder only")
    if b.classes is not None:
        if not b.classes:
            raise ValueError("classes: an empty list (leave it out for every class)")
        known_ids = set(suite.class_ids()) if suite.class_ids else None
        for i, cls in enumerate(b.classes):
            if known_ids is not None and cls not in known_ids:
                raise ValueError(f"classes[{i}]: {cls!r} is not a class of suite {b.suite}")
            if cls in b.classes[:i]:
                raise ValueError(f"classes[{i}]: {cls!r} is listed twice")


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "toy"             # "toy" (orch's toy CLIP) or an open_clip architecture
    # An open_clip tag ("openai"), a checkpoint file, or "none" (random weights, any case):
    # required for a real architecture, unset for the toy CLIP and hf-hub: models.
    pretrained: str | None = None
    config: str | None = None      # an open_clip model-config JSON registering `arch`
    # Train with open_clip's training augmentation (random resized crop); false trains on
    # the evaluation preprocessing. The toy CLIP always trains without augmentation.
    augment: bool = True


@dataclass(frozen=True)
class ResourcesSpec:
    """What a trial gets. With `workers_per_trial: N > 1` a training trial runs data-
    parallel on N Ray Train workers, and `cpus_per_trial` / `gpus_per_trial` are per worker."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 0          # Tune restarts a failed trial this often (from its checkpoint)
    workers_per_trial: int = 1

    def __post_init__(self):
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")
        if self.cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial must be >= 0, got {self.gpus_per_trial}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError("max_concurrent_trials must be >= 1")
        if self.max_failures < 0:
            raise ValueError("max_failures must be >= 0")


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int = 256
    num_workers: int = 0
    # On a GPU: fp32 (the papers' protocol) or bf16 autocast (faster; moves ~0.7 % of
    # ImageNet top-1 predictions). A CPU always evaluates in fp32.
    precision: str = "fp32"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")


@dataclass(frozen=True)
class FeaturesSpec:
    """The Ray Data feature cache: image features and logits encoded once per (model,
    preprocessing, dataset) and stored as Parquet (LP, OSE, VRF and temperature fitting
    read them instead of re-running the image tower)."""

    batch_size: int = 256
    actors: int | None = None       # actor-pool size; default: as many as the cluster fits
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    cache_dir: str | None = None    # default: <orch cache>/features (shared storage on a cluster)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")


@dataclass(frozen=True)
class TrialPoint:
    """One training trial: a method entry's options at one grid point, and its seed."""

    index: int               # position in the whole sweep
    name: str                # unique in the sweep, e.g. "ft-01_lr=0.0001_seed=0"
    label: str               # the method entry it belongs to
    method: str              # the registered method
    options: Any             # the method's options dataclass
    seed: int
    hparams: dict[str, Any]  # the grid values that define this point (for MLflow params)

    @property
    def trained(self) -> bool:
        return get_method(self.method).trained


@dataclass(frozen=True)
class MethodEntry:
    """A method of the sweep with its options and grid. `label` names it in tables and
    plots (default: the method's name); two entries of one method need two labels."""

    label: str
    method: str
    options: Any
    grid: dict[str, list[Any]]

    def points(self) -> list[tuple[dict[str, Any], Any, int]]:
        """(grid values, options, seed) per grid point, in file order (last key fastest)."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            hparams = dict(zip(keys, values))
            overrides = {k: v for k, v in hparams.items() if k != "seed"}
            out.append((hparams, dataclasses.replace(self.options, **overrides),
                        hparams.get("seed", 0)))
        return out


@dataclass(frozen=True)
class EnsembleEntry:
    """An ensemble of the sweep: its options (coefficient grids included) and the method
    labels it applies to (None: every method that trains something)."""

    name: str
    options: Any
    methods: tuple[str, ...] | None = None

    @property
    def ensemble(self):
        return get_ensemble(self.name)

    def points(self) -> list[dict[str, float]]:
        return self.ensemble.points(self.options)

    def applies_to(self, point: TrialPoint) -> bool:
        return point.trained and (self.methods is None or point.label in self.methods)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    benchmark: BenchmarkSpec
    model: ModelSpec
    methods: tuple[MethodEntry, ...]
    ensembles: tuple[EnsembleEntry, ...]
    resources: ResourcesSpec
    eval: EvalSpec
    features: FeaturesSpec
    storage_path: str          # an absolute local path, or a bucket URI passed to Tune as is
    experiment: str
    source_file: Path | None = None
    text: str = ""             # the effective sweep file (with command-line overrides applied)

    def trials(self) -> list[TrialPoint]:
        """Every method's grid expanded, methods in file order."""
        return list(self._trial_points)

    @functools.cached_property
    def _trial_points(self) -> tuple[TrialPoint, ...]:
        # Expanded once per spec (it is frozen): Tune's callbacks look trials up on every
        # trial end and checkpoint, and each expansion validates every point's options.
        points: list[TrialPoint] = []
        for entry in self.methods:
            for i, (hparams, options, seed) in enumerate(entry.points()):
                # names become file and folder names: a path value (`checkpoint`'s grid
                # over `path`) keeps its file name only; the index keeps names unique
                label = "_".join(f"{k}={_name_part(v)}" for k, v in hparams.items())
                name = f"{entry.label}-{i:02d}" + (f"_{label}" if label else "")
                points.append(TrialPoint(len(points), name, entry.label, entry.method, options,
                                         seed, hparams))
        return tuple(points)

    def trial_named(self, name: str) -> TrialPoint:
        return self._trials_by_name[name]

    @functools.cached_property
    def _trials_by_name(self) -> dict[str, TrialPoint]:
        return {p.name: p for p in self._trial_points}

    def trial_for(self, config: dict[str, Any]) -> TrialPoint:
        """The trial a Tune config stands for: {"label": ..., "seed": ..., <option>: value}."""
        hparams = {k: v for k, v in config.items() if k != "label"}
        for point in self._trial_points:
            if point.label == config["label"] and point.hparams == hparams:
                return point
        raise KeyError(f"no trial of {config['label']!r} with {hparams}")

    def method_entry(self, label: str) -> MethodEntry:
        return next(e for e in self.methods if e.label == label)

    def ensembles_for(self, point: TrialPoint) -> list[EnsembleEntry]:
        return [e for e in self.ensembles if e.applies_to(point)]

    def num_points(self) -> int:
        """Rows of the final table: each trial alone, plus every ensemble point."""
        return sum(1 + sum(len(e.points()) for e in self.ensembles_for(p))
                   for p in self.trials())


TOP_KEYS = ("name", "experiment", "benchmark", "model", "method", "grid", "methods", "ensemble",
            "ensembles", "resources", "eval", "features", "storage_path")


class SweepLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML requires
    unique keys; PyYAML itself silently keeps the last value): a SpecError at the key's
    path, with both lines."""

    def construct_document(self, node):
        _check_unique_keys(self, node, "", set())
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        # construct_document checked the whole tree (with paths); this keeps any other
        # use of the loader from dropping a duplicate silently
        _check_unique_keys(self, node, "", set(), recurse=False)
        return super().construct_mapping(node, deep=deep)


_MERGE = "tag:yaml.org,2002:merge"


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, path: str, seen: set[int],
                       recurse: bool = True) -> None:
    if id(node) in seen:     # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode) and recurse:
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, f"{path}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[Any, yaml.Mark] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:   # `<<: *defaults`: keys after it may override its keys
            if recurse:
                _check_unique_keys(loader, value_node, path, seen)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            continue                 # a mapping or list as a key: SafeLoader refuses it
        key = loader.construct_object(key_node, deep=True)
        mark = key_node.start_mark
        where = f"{path}.{key}" if path else str(key)
        try:
            if key in first:
                was = first[key]
                lines = (f"twice on line {mark.line + 1}" if was.line == mark.line else
                         f"on lines {was.line + 1} and {mark.line + 1}")
                raise SpecError(where, f"duplicate key, {lines} (remove one)")
            first[key] = mark
        except TypeError:            # an unhashable key: SafeLoader reports it itself
            pass
        if recurse:
            _check_unique_keys(loader, value_node, where, seen)


def read_sweep_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is allowed), whatever the locale says."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError("", f"cannot read sweep file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError("", f"the file is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                            f"position {err.start}); save it as UTF-8") from None


def load_spec(path: str | Path, overrides: Sequence[str] = (),
              check_paths: bool = True) -> SweepSpec:
    """Read and validate a sweep file, with dotted `key=value` overrides applied first
    (`method.lr=1e-4`, `grid.seed=[0,1,2]`, `methods.1.lr=3e-5`): an override is checked
    exactly as if the file said it. Raises SpecError (one line, with the field)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", f"sweep file {path} does not exist")
    text = read_sweep_text(path)
    try:
        raw = yaml.load(text, Loader=SweepLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError("", f"not valid YAML{where}: "
                            f"{getattr(err, 'problem', None) or err}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
        text = yaml.safe_dump(raw, sort_keys=False)
    spec = dataclasses.replace(parse_spec(raw, source_file=path.resolve()), text=text)
    if check_paths:
        check_spec_paths(spec)
    return spec


def apply_overrides(raw: Any, overrides: Sequence[str]) -> dict:
    """A copy of the YAML mapping with each `dotted.key=value` set; the value is read as
    YAML (`1e-4`, `[0, 1, 2]`, `null`, `{a: 1}`). List items are addressed by index
    (`methods.1.lr` or `methods[1].lr`); missing mappings along the path are created."""
    import copy
    out = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError("", f"override {item!r}: expected key=value, e.g. method.lr=1e-4")
        parts = [p for p in re.split(r"\.|\[|\]", key.strip()) if p != ""]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise SpecError(key, f"override value {text!r} is not valid YAML: "
                                 f"{getattr(err, 'problem', None) or err}") from None
        node: Any = out
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(where, f"override {item!r}: no item {part} in a list of "
                                           f"{len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise SpecError(".".join(parts[:depth]), f"override {item!r}: not a mapping "
                                                         "or list to set a key in")
    return out


def parse_spec(raw: Any, source_file: Path | None = None) -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError("", "a sweep file must be a YAML mapping at the top level")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise SpecError(str(unknown[0]), f"unknown key (allowed: {', '.join(TOP_KEYS)})")
    name = coerce(raw.get("name"), str, "name") if "name" in raw else None
    if not name:
        raise SpecError("name", "required key is missing")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise SpecError("name", f"use letters, digits, '-', '_' or '.', got {name!r}")

    benchmark = parse_dataclass(BenchmarkSpec, _shift_shorthands(raw.get("benchmark")),
                                "benchmark")
    model = parse_dataclass(ModelSpec, raw.get("model"), "model")
    methods = _parse_methods(raw)
    ensembles = _parse_ensembles(raw, methods)
    resources = parse_dataclass(ResourcesSpec, raw.get("resources"), "resources")
    eval_spec = parse_dataclass(EvalSpec, raw.get("eval"), "eval")
    features = parse_dataclass(FeaturesSpec, raw.get("features"), "features")
    _check_batches_split(methods, resources)
    model = _absolute_paths(model, ("pretrained", "config"))
    benchmark = _absolute_paths(benchmark, ("root", "train", "val", "test"))
    benchmark = dataclasses.replace(benchmark, shifts={
        k: _absolute_paths(v, ("path",)) for k, v in benchmark.shifts.items()})
    if features.cache_dir:
        features = dataclasses.replace(features, cache_dir=os.path.expandvars(features.cache_dir))
    if not (features.cache_dir and is_uri(features.cache_dir)):
        features = _absolute_paths(features, ("cache_dir",))
    storage = os.path.expandvars(coerce(raw.get("storage_path", "runs"), str, "storage_path"))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:(?!//)", storage):    # `s3:/b`, not `C:\\`
        raise SpecError("storage_path", f"{storage!r} looks like a bucket URI but lacks "
                                        "'//' (e.g. s3://bucket/prefix)")
    if is_uri(storage):
        problem = check_uri(storage)
        if problem:
            raise SpecError("storage_path", problem)
    else:
        storage = str(Path(storage).expanduser().resolve())
    if features.cache_dir and is_uri(features.cache_dir):
        raise SpecError("features.cache_dir", "must be a folder every node can read (a local "
                                              "path or a shared mount), not a bucket URI")
    experiment = coerce(raw.get("experiment", name), str, "experiment")
    return SweepSpec(text=yaml.safe_dump(raw, sort_keys=False),
                     name=name, benchmark=benchmark, model=model, methods=methods,
                     ensembles=ensembles, resources=resources, eval=eval_spec, features=features,
                     storage_path=storage, experiment=experiment,
                     source_file=source_file)


def _shift_shorthands(data: Any) -> Any:
    """The `benchmark:` mapping with its shorter shift forms spelt out: `name: FOLDER` for
    `name: {path: FOLDER}`, and (a suite of domains) a list of names for shifts under
    `root`. A suite block may not also name a `source`."""
    if not isinstance(data, dict):
        return data
    if "suite" in data and "source" in data:
        raise SpecError("benchmark.source", "a suite brings its own layout: give `suite:` or "
                                            "`source:`, not both")
    shifts = data.get("shifts")
    if isinstance(shifts, list):
        suite = _suites().get(data.get("suite"))
        if suite is None or not suite.domains:
            raise SpecError("benchmark.shifts", "a list of shift names is for a suite of "
                            "domains (suite: domainnet); give `name: folder` pairs")
        spelt = {}
        for i, name in enumerate(shifts):
            if not isinstance(name, str):
                raise SpecError(f"benchmark.shifts[{i}]", f"expected a domain name, got {name!r}")
            if name in spelt:
                raise SpecError(f"benchmark.shifts[{i}]", f"{name!r} is listed twice")
            if not isinstance(data.get("root"), str):
                raise SpecError("benchmark.root", f"required: the shifts {shifts} are "
                                                  "read from it")
            spelt[name] = {"path": data["root"]}
        return {**data, "shifts": spelt}
    if isinstance(shifts, dict):
        return {**data, "shifts": {k: {"path": v} if isinstance(v, str) else v
                                   for k, v in shifts.items()}}
    return data


def _absolute_paths(obj: Any, names: tuple[str, ...]) -> Any:
    """Resolve path fields against the working directory now, on the driver (a pretrained
    *tag* such as "openai" stays as it is: it names no file)."""
    changes = {}
    for name in names:
        value = getattr(obj, name)
        if value:
            value = os.path.expandvars(value)   # $DATA/imagenet: one place to set a mount
        if name == "pretrained" and value and value.strip().lower() == RANDOM_INIT:
            changes[name] = RANDOM_INIT         # random weights, never a file called "none"
            continue
        if value and (name != "pretrained" or Path(value).expanduser().exists()
                      or "/" in value or value.endswith((".pt", ".bin", ".safetensors"))):
            changes[name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(obj, **changes)


def _parse_methods(raw: dict) -> tuple[MethodEntry, ...]:
    """`methods:` (a list of entries, each with its own `grid:`), or v0's single
    `method:` with a top-level `grid:`."""
    if "methods" in raw:
        for key in ("method", "grid"):
            if key in raw:
                raise SpecError(key, "use either `methods:` (a list, each with its own grid) "
                                     "or `method:` and `grid:`, not both")
        items = raw["methods"]
        if not isinstance(items, list) or not items:
            raise SpecError("methods", "expected a non-empty list of methods")
        entries = [_parse_method_entry(item, f"methods[{i}]") for i, item in enumerate(items)]
    else:
        data = raw.get("method")
        if isinstance(data, dict) and "grid" in raw:
            data = {**data, "grid": raw["grid"]}
        entries = [_parse_method_entry(data, "method", grid_path="grid")]
    labels = [e.label for e in entries]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise SpecError(f"methods[{i}].label", f"two entries are called {label!r}: give "
                                                   "each a distinct `label:`")
    return tuple(entries)


def _name_part(value: Any) -> str:
    text = Path(value).name if isinstance(value, str) and "/" in value else str(value)
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", text)


def _entry_name(data: Any, path: str, kind: str, registry) -> str:
    """The registered `name` of a method or ensemble entry."""
    if not isinstance(data, dict):
        raise SpecError(path, "expected a mapping with at least 'name'")
    if "name" not in data:
        raise SpecError(f"{path}.name", "required key is missing")
    name = coerce(data["name"], str, f"{path}.name")
    if name not in registry:
        raise SpecError(f"{path}.name", f"unknown {kind} {name!r} (known: "
                                        f"{', '.join(sorted(registry))})")
    return name


def _parse_method_entry(data: Any, path: str, grid_path: str | None = None) -> MethodEntry:
    name = _entry_name(data, path, "method", METHODS)
    label = coerce(data.get("label", name), str, f"{path}.label")
    if not label or not all(c.isalnum() or c in "-_" for c in label):
        raise SpecError(f"{path}.label", f"use letters, digits, '-' or '_', got {label!r}")
    options_cls = get_method(name).options
    fields = {k: v for k, v in data.items() if k not in ("name", "label", "grid")}
    options = parse_dataclass(options_cls, fields, path)
    grid = _parse_grid(data.get("grid"), name, options, grid_path or f"{path}.grid")
    return MethodEntry(label, name, options, grid)


def _parse_grid(data: Any, method: str, options: Any, path: str) -> dict[str, list[Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(path, "expected a mapping of option -> list of values")
    types_ = field_types(type(options))
    grid: dict[str, list[Any]] = {}
    for key, values in data.items():
        where = f"{path}.{key}"
        if key != "seed" and key not in types_:
            raise SpecError(where, f"not an option of method {method!r} (options: "
                                   f"{', '.join(types_) or 'none'}; or 'seed')")
        if not isinstance(values, list) or not values:
            raise SpecError(where, "expected a non-empty list of values")
        tp = int if key == "seed" else types_[key]
        grid[key] = [coerce(v, tp, f"{where}[{i}]") for i, v in enumerate(values)]
        for i, value in enumerate(grid[key]):
            if value in grid[key][:i]:
                raise SpecError(f"{where}[{i}]", f"duplicate value {value!r}")
            if key == "seed":
                continue
            try:  # each value must make valid options
                dataclasses.replace(options, **{key: value})
            except ValueError as err:
                raise SpecError(f"{where}[{i}]", str(err)) from None
    return grid


def _check_batches_split(methods: tuple[MethodEntry, ...], resources: ResourcesSpec) -> None:
    """Data-parallel workers take equal shares of every batch (contrastive losses gather
    equal shards): each batch size must be a multiple of the number of workers."""
    n = resources.workers_per_trial
    if n == 1:
        return
    for i, entry in enumerate(methods):
        for _, options, _ in entry.points():
            for key in ("batch_size", "lp_batch_size"):
                value = getattr(options, key, None)
                if value is not None and value % n:
                    raise SpecError(f"methods[{i}].{key}", f"{value} is not a multiple of "
                                                           f"resources.workers_per_trial={n}")


def _parse_ensembles(raw: dict, methods: tuple[MethodEntry, ...]) -> tuple[EnsembleEntry, ...]:
    """`ensembles:` (a list), or v0's single `ensemble:`; default: WiSE-FT."""
    if "ensembles" in raw:
        if "ensemble" in raw:
            raise SpecError("ensemble", "use either `ensembles:` (a list) or `ensemble:`")
        items = raw["ensembles"]
        if not isinstance(items, list):
            raise SpecError("ensembles", "expected a list of ensembles (may be empty)")
        paths = [f"ensembles[{i}]" for i in range(len(items))]
    else:
        items, paths = [raw.get("ensemble") or {"name": "wise_ft"}], ["ensemble"]
    entries = [_parse_ensemble_entry(item, path, methods) for item, path in zip(items, paths)]
    names = [e.name for e in entries]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise SpecError(f"{paths[i]}.name", f"ensemble {name!r} is listed twice")
    return tuple(entries)


def _parse_ensemble_entry(data: Any, path: str, methods: tuple[MethodEntry, ...]) -> EnsembleEntry:
    name = _entry_name(data, path, "ensemble", ENSEMBLES)
    ensemble = get_ensemble(name)
    fields = {k: v for k, v in data.items() if k not in ("name", "methods")}
    if "alphas" in fields and "alpha" in ensemble.coefficients and "alpha" not in fields:
        fields["alpha"] = fields.pop("alphas")       # v0 spelling
    try:
        options = parse_dataclass(ensemble.options, fields, path)
    except SpecError as err:
        old = f"{path}.alpha"
        if "alphas" in data and "alpha" not in data and (
                err.path == old or err.path.startswith(old + "[")):
            raise SpecError(f"{path}.alphas{err.path[len(old):]}", err.message) from None
        raise
    applies = None
    if "methods" in data:
        applies = tuple(coerce(data["methods"], list[str], f"{path}.methods"))
        trained = {e.label for e in methods if get_method(e.method).trained}
        for i, label in enumerate(applies):
            if label not in trained:
                raise SpecError(f"{path}.methods[{i}]", f"{label!r} is not a method of this "
                                f"sweep that trains (those are: {', '.join(sorted(trained))})")
    return EnsembleEntry(name, options, applies)


def check_spec_paths(spec: SweepSpec) -> None:
    """Missing folders and files fail here, with the field that names them."""
    b = spec.benchmark
    if b.source == "imagefolder":
        if b.root is None:
            raise SpecError("benchmark.root", "required for source imagefolder")
        _require(Path(b.root), "benchmark.root", folder=True)
    if b.source == "csv":
        from trainers.data import DataError
        from trainers.data.folders import check_csv_classes
        for split in ("train", "val", "test"):
            if getattr(b, split) is None:
                raise SpecError(f"benchmark.{split}", "required for source csv (a path,label file)")
            _require(Path(getattr(b, split)), f"benchmark.{split}", folder=False)
        if not b.classnames:
            raise SpecError("benchmark.classnames", "required for source csv")
        for split in ("train", "val", "test"):   # every class has rows in every ID split
            try:
                check_csv_classes(Path(getattr(b, split)), b.classnames)
            except DataError as err:
                raise SpecError(f"benchmark.{split}", str(err)) from None
    if b.suite is not None:
        if b.root is None:
            raise SpecError("benchmark.root", f"required for suite {b.suite}")
        _require(Path(b.root), "benchmark.root", folder=True)
        if _suites()[b.suite].domains and b.domain is None:
            raise SpecError("benchmark.domain", f"required for suite {b.suite}: its ID domain, "
                            f"one of {', '.join(_suites()[b.suite].domains)}")
    for name, shift in b.shifts.items():
        _require(Path(shift.path), f"benchmark.shifts.{name}" + ("" if b.suite else ".path"),
                 folder=shift.format == "imagefolder")
    if b.source == "toyworld" and b.shifts:
        raise SpecError("benchmark.shifts", "the toy world brings its own shifts")
    _check_model(spec.model)


HF_HUB = "hf-hub:"
RANDOM_INIT = "none"       # `pretrained: none`: random weights (trainers.models.RANDOM_INIT)
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _close_names(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def _check_model(model: ModelSpec) -> None:
    """The architecture is known to open_clip (or an `hf-hub:<org>/<name>` model, checked
    by its form only: no network here), and a real architecture says which weights: a
    tag open_clip has for it, a file, or "none" (random weights). Whether weights to
    download can be had is `orch sweep`'s check at its start (build.download_problem)."""
    random_init = model.pretrained == RANDOM_INIT
    pretrained_file = bool(model.pretrained) and not random_init and (
        "/" in model.pretrained or model.pretrained.endswith((".pt", ".bin", ".safetensors")))
    if model.pretrained and model.arch == "toy":
        raise SpecError("model.pretrained", "the toy CLIP is pre-trained by orch; leave it unset")
    if pretrained_file:
        _require(Path(model.pretrained), "model.pretrained", folder=False)
    if model.config:
        _require(Path(model.config), "model.config", folder=False)
    if model.arch == "toy":
        return
    if model.arch.startswith(HF_HUB):
        if not _HF_REPO.fullmatch(model.arch[len(HF_HUB):]):
            raise SpecError("model.arch", f"expected hf-hub:<org>/<name>, got {model.arch!r}")
        if model.pretrained:
            raise SpecError("model.pretrained", "an hf-hub: model brings its own weights; "
                                                "leave pretrained unset")
        return
    import open_clip  # deferred: only real models need the registry lookup
    if model.config:
        open_clip.add_model_config(Path(model.config).expanduser().resolve())
    archs = open_clip.list_models()
    if model.arch not in archs:
        hint = _close_names(model.arch, archs) or \
            "see open_clip.list_models(), or use hf-hub:<org>/<name>"
        raise SpecError("model.arch", f"unknown open_clip architecture {model.arch!r}; {hint}")
    tags = open_clip.list_pretrained_tags_by_model(model.arch)
    if model.pretrained is None:
        which = (f"one of its pretrained tags ({', '.join(tags)}), a checkpoint file"
                 if tags else "a checkpoint file (open_clip has no pretrained tags for it)")
        raise SpecError("model.pretrained", f"required for {model.arch}: {which}, or `none` "
                                            "for random weights")
    if not random_init and not pretrained_file and not Path(model.pretrained).is_file():
        tag = model.pretrained.lower().replace("-", "_")   # how open_clip reads a tag
        if tag not in tags:
            hint = _close_names(tag, tags) or (
                f"its tags: {', '.join(tags[:6])}" + (f", ... ({len(tags)} in all)"
                                                      if len(tags) > 6 else "")
                if tags else "open_clip has none for it: give a checkpoint file")
            raise SpecError("model.pretrained", f"{model.pretrained!r} is neither a file nor a "
                                                f"pretrained tag of {model.arch}; {hint}")


def _require(path: Path, where: str, folder: bool) -> None:
    path = path.expanduser()
    if folder and not path.is_dir():
        raise SpecError(where, f"folder {path.resolve()} does not exist")
    if not folder and not path.is_file():
        raise SpecError(where, f"file {path.resolve()} does not exist")
