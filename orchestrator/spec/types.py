"""What a sweep file says, as frozen dataclasses: the benchmark, the model, the methods
and ensembles with their options and grids, resources, evaluation and the feature cache.

The YAML keys are exactly the fields; `orchestrator.spec.parse` builds these from a
file, and each class's `__post_init__` checks its own values (its ValueError becomes a
SpecError at the field it names).
"""
from __future__ import annotations

import dataclasses
import itertools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec.plugins import restore_spec
from trainers.data import DataError
from trainers.data.folders import FOLDER_NAMINGS, FORMATS, ShiftSource
from trainers.data.suites import SUITES
from trainers.ensembles import REGISTRY as ENSEMBLE_NAMES
from trainers.ensembles import Ensemble, get_ensemble
from trainers.evaluate import PRECISIONS
from trainers.models import TOY

SOURCES = ("toyworld", "imagefolder", "csv")


@dataclass(frozen=True)
class ShiftSpec:
    """One OOD set: an image-folder tree or a CSV (path,label); checked as the data layer's
    `ShiftSource` that it becomes."""

    path: str
    format: str = "imagefolder"
    class_map: dict[str, list[str]] | None = None   # shift class -> ID classes (ObjectNet)
    folder_names: str = "classnames"                 # or "index" (ImageNetV2)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.folder_names not in FOLDER_NAMINGS:
            raise ValueError(f"folder_names must be one of {', '.join(FOLDER_NAMINGS)}, "
                             f"got {self.folder_names!r}")
        try:
            self.source()
        except DataError as err:
            raise ValueError(str(err)) from None

    def source(self) -> ShiftSource:
        return ShiftSource(path=Path(self.path), format=self.format,
                           class_map={k: tuple(v) for k, v in self.class_map.items()}
                           if self.class_map else None,
                           folder_names=self.folder_names)


# Metric names are `<set>_<metric>` plus the summaries `id_*`, `val_*`, `ood_*` and the
# ensembles' own numbers (`vrf_*`): a shift may not take a name that would overwrite them.
RESERVED_SET_NAMES = frozenset({"id", "val", "ood", "test", "train", "id_val", "id_test",
                                "id_train", "id_rand", "selected", "temperature"})


def shift_name_problem(name: str) -> str | None:
    if not name or not (name[0].isalpha() and all(c.isalnum() or c in "_-" for c in name)):
        return "a shift name starts with a letter and has only letters, digits, '_' or '-'"
    if name in RESERVED_SET_NAMES or name in ENSEMBLE_NAMES:
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
            check_suite(self)
            object.__setattr__(self, "source", self.suite)   # what records and plans show
        elif self.source not in SOURCES:
            hint = (f" (a named suite is `suite: {self.source}`)"
                    if self.source in SUITES else "")
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}"
                             + hint)
        else:
            for key in ("classes", "domain"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only a suite takes it (suite: "
                                     f"{' or '.join(SUITES)})")
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
        if self.folder_names not in FOLDER_NAMINGS:
            raise ValueError(f"folder_names must be one of {', '.join(FOLDER_NAMINGS)}, "
                             f"got {self.folder_names!r}")
        if isinstance(self.templates, str) and self.templates not in ("openai", "simple"):
            raise ValueError(f"templates must be openai, simple or a list, got {self.templates!r}")
        if isinstance(self.templates, list) and (
                not self.templates or not all("{}" in t for t in self.templates)):
            raise ValueError("templates: each template must contain '{}' for the class name")
        for name in self.shifts:
            problem = shift_name_problem(name)
            if problem:
                raise ValueError(f"shifts.{name}: {problem}")


def check_suite(b: BenchmarkSpec) -> None:
    """The keys of a `suite:` block, each wrong one a ValueError naming it."""
    suites = SUITES
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
    arch: str = TOY               # "toy" (orch's toy CLIP) or an open_clip architecture
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
    # Processes that decode and augment a trial's training images, out of its
    # `cpus_per_trial` (per worker). Unset: all of them but the one the trial computes on
    # when images are files, none for in-memory arrays (nothing to decode).
    loader_workers: int | None = None

    def __post_init__(self):
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
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
    # CPU actors (1 CPU each) that read, decode and transform images ahead of the model
    # actors; 0 decodes in the model actors. Default: 0 when the model actors run on CPUs
    # (they would compete for the same cores), else every CPU the model actors leave.
    decode_actors: int | None = None
    cache_dir: str | None = None    # default: <orch cache>/features (shared storage on a cluster)

    def __post_init__(self):
        if self.decode_actors is not None and self.decode_actors < 0:
            raise ValueError(f"decode_actors must be >= 0, got {self.decode_actors}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")


@dataclass(frozen=True)
class RobustnessLine:
    """A baseline of effective robustness (Taori et al. 2020, WiSE-FT Fig. 1): the line
    logit(OOD) = slope * logit(ID) + intercept, with logit(p) = ln(p / (1 - p)) of
    accuracies as fractions and OOD the mean over the shifts (e.g. a fit of the
    ImageNet-trained models of the paper, recomputed in this logit space)."""

    slope: float
    intercept: float


@dataclass(frozen=True)
class ReportSpec:
    """How the report draws the sweep: `robustness_line` adds a baseline to the
    effective-robustness plot (robustness.png; without it the plot has no line)."""

    robustness_line: RobustnessLine | None = None


SCHEDULERS = ("asha",)
SEARCHERS = ("optuna",)
# what a searcher may optimise: metrics of a trial's fitted model on ID validation, and
# which way (never a test set)
OBJECTIVES = {"val_acc": "maximize", "val_ece": "minimize", "val_nll": "minimize"}
RANGE_KINDS = ("uniform", "loguniform", "int")


@dataclass(frozen=True)
class Range:
    """A searched option's range in a method entry's grid, e.g. `lr: {loguniform: [1e-6,
    1e-4]}` (`int`: whole numbers, both ends included)."""

    kind: str
    low: float
    high: float

    def __post_init__(self):
        if self.kind not in RANGE_KINDS:
            raise ValueError(f"a range is one of {', '.join(RANGE_KINDS)}, got {self.kind!r}")
        if not self.low < self.high:
            raise ValueError(f"a range needs low < high, got [{self.low:g}, {self.high:g}]")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low:g}")
        if self.kind == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int needs whole numbers, got [{self.low:g}, {self.high:g}]")

    def describe(self) -> str:
        return f"{self.kind} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class SearchSpec:
    """Search beyond the grid. `scheduler: asha`: early stopping of training trials with
    Ray Tune's ASHA (asynchronous successive halving, Li et al., MLSys 2020,
    https://arxiv.org/abs/1810.05934). Each trial of the searched entries measures its ID
    validation accuracy after every epoch of its main phase; at epochs grace_period *
    reduction_factor^k a trial below the best 1/reduction_factor of those that reached
    that epoch before it stops. A stopped trial is recorded as stopped (its epoch and last
    metrics) and no ensemble or soup uses it. `searcher: optuna`: Optuna's TPE sampler
    (Bergstra et al. 2011; several objectives: its multi-objective form) proposes the
    trials of every entry whose grid holds a range. Both read ID validation only, never a
    test set."""

    scheduler: str | None = None          # "asha"; unset: every trial runs all its epochs
    # Optuna (TPE) proposes the trials of entries whose grid holds ranges, n_trials each,
    # in rounds of as many as run at once; each told its fitted model's `objectives`
    searcher: str | None = None           # "optuna"
    n_trials: int = 8                     # trials per searched entry
    objectives: list[str] = field(default_factory=lambda: ["val_acc"])
    seed: int = 0                         # the sampler's seed: the same file, the same trials
    startup_trials: int | None = None     # random proposals before TPE (unset: Optuna's 10)
    grace_period: int = 1                 # epochs every trial runs before it may stop
    reduction_factor: float = 3.0         # each rung keeps the best 1/reduction_factor
    # the method entries (labels) it may stop; unset: every entry that trains (entries
    # not listed neither validate per epoch nor stop, e.g. seeds meant for a soup)
    methods: list[str] | None = None

    def __post_init__(self):
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)} or unset, "
                             f"got {self.scheduler!r}")
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1, got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        if self.searcher is not None and self.searcher not in SEARCHERS:
            raise ValueError(f"searcher must be one of {', '.join(SEARCHERS)} or unset, "
                             f"got {self.searcher!r}")
        if self.searcher is not None and self.scheduler is not None:
            raise ValueError("scheduler: early stopping and a searcher are not combined yet "
                             "(the searcher's rounds are separate Tune runs); use one")
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}")
        if not self.objectives:
            raise ValueError("objectives: name at least one")
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ValueError(f"objectives: {name!r} is not one of {', '.join(OBJECTIVES)} "
                                 "(ID validation only: a search never reads a test set)")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives: a metric is listed twice")
        if self.startup_trials is not None and self.startup_trials < 1:
            raise ValueError(f"startup_trials must be >= 1, got {self.startup_trials}")

    def searches(self, label: str) -> bool:
        """Whether the trials of method entry `label` validate each epoch and may stop."""
        return self.scheduler is not None and (self.methods is None or label in self.methods)


@dataclass(frozen=True)
class MethodEntry:
    """A method of the sweep with its options and grid. `label` names it in tables and
    plots (default: the method's name); two entries of one method need two labels."""

    label: str
    method_name: str                # the registered method
    options: Any
    grid: dict[str, list[Any] | Range]      # a Range: searched (search.searcher)
    # the searched entry's trials so far, as the searcher proposed them (the driver adds
    # them round by round; the journal keeps them for --resume)
    proposals: tuple[dict[str, Any], ...] = ()

    @property
    def searched(self) -> bool:
        """Its trials come from a searcher (a range in its grid), not from the grid."""
        return any(isinstance(v, Range) for v in self.grid.values())

    def points(self) -> list[tuple[dict[str, Any], Any, int]]:
        """(grid values, options, seed) per grid point, in file order (last key fastest);
        of a searched entry, per proposal so far."""
        if self.searched:
            combos = [dict(p) for p in self.proposals]
        else:
            keys = list(self.grid)
            combos = [dict(zip(keys, values))
                      for values in itertools.product(*(self.grid[k] for k in keys))]
        out = []
        for hparams in combos:
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
    def ensemble(self) -> Ensemble:
        return get_ensemble(self.name)

    def points(self) -> list[dict[str, float]]:
        return self.ensemble.points(self.options)


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
    plugins: tuple[str, ...] = ()   # modules and files imported for their methods/ensembles
    report: ReportSpec = field(default_factory=ReportSpec)   # plot settings
    search: SearchSpec = field(default_factory=SearchSpec)   # early stopping, a searcher
    source_file: Path | None = None
    text: str = ""             # the effective sweep file (with command-line overrides applied)

    def with_proposals(self, proposals: dict[str, list[dict[str, Any]]]) -> "SweepSpec":
        """The spec with the searched entries' trials so far ({label: [hparams, ...]})."""
        return dataclasses.replace(self, methods=tuple(
            dataclasses.replace(e, proposals=tuple(dict(p) for p in proposals[e.label]))
            if e.label in proposals else e for e in self.methods))

    def __reduce__(self):
        # Ray ships the spec to every worker: there, the plug-ins must be imported before
        # the options objects of their classes can be unpickled.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return restore_spec, (type(self), self.plugins, pickle.dumps(fields))
