"""Sweep files: YAML -> a validated, frozen `SweepSpec`, before anything starts.

Every error names the field (`grid.lr[1]: expected a number, got 'fast'`) and
`orch sweep --dry-run` runs all of these checks, so a bad file never fails mid-sweep.
Relative paths are resolved against the current working directory, on the driver
(Ray Tune changes each trial's working directory).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.schema import SpecError, coerce, field_types, parse_dataclass
from trainers.methods import REGISTRY, get_method

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


@dataclass(frozen=True)
class BenchmarkSpec:
    source: str = "toyworld"
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
    val_fraction: float = 0.0
    folder_names: str = "classnames"
    shifts: dict[str, ShiftSpec] = field(default_factory=dict)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.folder_names not in FOLDER_NAMES:
            raise ValueError(f"folder_names must be classnames or index, got {self.folder_names!r}")
        if isinstance(self.templates, str) and self.templates not in ("openai", "simple"):
            raise ValueError(f"templates must be openai, simple or a list, got {self.templates!r}")
        if isinstance(self.templates, list) and (
                not self.templates or not all("{}" in t for t in self.templates)):
            raise ValueError("templates: each template must contain '{}' for the class name")


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "toy"             # "toy" (orch's toy CLIP) or an open_clip architecture
    pretrained: str | None = None  # open_clip tag ("openai") or a checkpoint file
    config: str | None = None      # an open_clip model-config JSON registering `arch`


@dataclass(frozen=True)
class ResourcesSpec:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 0          # Tune restarts a failed trial this often (from its checkpoint)

    def __post_init__(self):
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

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")


@dataclass(frozen=True)
class TrialPoint:
    """One training trial: the method's options at one grid point, and its seed."""

    index: int
    name: str
    method: str
    options: Any            # the method's options dataclass
    seed: int
    hparams: dict[str, Any]  # the grid values that define this point (for MLflow params)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    benchmark: BenchmarkSpec
    model: ModelSpec
    method: str
    method_options: Any
    grid: dict[str, list[Any]]
    ensemble: str
    ensemble_options: Any
    resources: ResourcesSpec
    eval: EvalSpec
    storage_path: Path
    experiment: str
    source_file: Path | None = None

    def trials(self) -> list[TrialPoint]:
        """The grid expanded in file order (last key fastest)."""
        keys = list(self.grid)
        points = []
        for index, values in enumerate(itertools.product(*(self.grid[k] for k in keys))):
            hparams = dict(zip(keys, values))
            seed = hparams.get("seed", 0)
            overrides = {k: v for k, v in hparams.items() if k != "seed"}
            options = dataclasses.replace(self.method_options, **overrides)
            label = "_".join(f"{k}={v}" for k, v in hparams.items())
            name = f"{self.method}-{index:02d}" + (f"_{label}" if label else "")
            points.append(TrialPoint(index, name, self.method, options, seed, hparams))
        return points

    @property
    def alphas(self) -> tuple[float, ...]:
        # A zero-shot "trial" has nothing to interpolate with: evaluate it once.
        if self.method == "zeroshot":
            return (0.0,)
        return tuple(self.ensemble_options.alphas)


TOP_KEYS = ("name", "experiment", "benchmark", "model", "method", "grid", "ensemble",
            "resources", "eval", "storage_path")


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None,
              check_paths: bool = True) -> SweepSpec:
    """Read and validate a sweep file. Raises SpecError (one line, with the field)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError("", f"{path}: not valid YAML{where}: "
                            f"{getattr(err, 'problem', None) or err}") from None
    spec = parse_spec(raw, source_file=path.resolve())
    if check_paths:
        check_spec_paths(spec)
    return spec


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

    benchmark = parse_dataclass(BenchmarkSpec, raw.get("benchmark"), "benchmark")
    model = parse_dataclass(ModelSpec, raw.get("model"), "model")
    method, method_options = _parse_method(raw.get("method"), "method", post_hoc=False)
    grid = _parse_grid(raw.get("grid"), method, method_options)
    ensemble, ensemble_options = _parse_method(raw.get("ensemble") or {"name": "wise_ft"},
                                               "ensemble", post_hoc=True)
    resources = parse_dataclass(ResourcesSpec, raw.get("resources"), "resources")
    eval_spec = parse_dataclass(EvalSpec, raw.get("eval"), "eval")
    model = _absolute_paths(model, ("pretrained", "config"))
    benchmark = _absolute_paths(benchmark, ("root", "train", "val", "test"))
    benchmark = dataclasses.replace(benchmark, shifts={
        k: _absolute_paths(v, ("path",)) for k, v in benchmark.shifts.items()})
    storage = coerce(raw.get("storage_path", "runs"), str, "storage_path")
    experiment = coerce(raw.get("experiment", name), str, "experiment")
    return SweepSpec(name=name, benchmark=benchmark, model=model, method=method,
                     method_options=method_options, grid=grid, ensemble=ensemble,
                     ensemble_options=ensemble_options, resources=resources, eval=eval_spec,
                     storage_path=Path(storage).expanduser().resolve(), experiment=experiment,
                     source_file=source_file)


def _absolute_paths(obj: Any, names: tuple[str, ...]) -> Any:
    """Resolve path fields against the working directory now, on the driver (a pretrained
    *tag* such as "openai" stays as it is: it names no file)."""
    changes = {}
    for name in names:
        value = getattr(obj, name)
        if value and (name != "pretrained" or Path(value).expanduser().exists()
                      or "/" in value or value.endswith((".pt", ".bin", ".safetensors"))):
            changes[name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(obj, **changes)


def _parse_method(data: Any, path: str, post_hoc: bool) -> tuple[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(path, "expected a mapping with at least 'name'")
    if "name" not in data:
        raise SpecError(f"{path}.name", "required key is missing")
    name = coerce(data["name"], str, f"{path}.name")
    kinds = sorted(n for n, m in REGISTRY.items() if m.post_hoc == post_hoc)
    if name not in kinds:
        raise SpecError(f"{path}.name", f"unknown {'ensemble' if post_hoc else 'method'} "
                                        f"{name!r} (known: {', '.join(kinds)})")
    options_cls = get_method(name).options
    options = parse_dataclass(options_cls, {k: v for k, v in data.items() if k != "name"}, path)
    return name, options


def _parse_grid(data: Any, method: str, options: Any) -> dict[str, list[Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError("grid", "expected a mapping of option -> list of values")
    types_ = field_types(type(options))
    grid: dict[str, list[Any]] = {}
    for key, values in data.items():
        path = f"grid.{key}"
        if key != "seed" and key not in types_:
            raise SpecError(path, f"not an option of method {method!r} (options: "
                                  f"{', '.join(types_) or 'none'}; or 'seed')")
        if not isinstance(values, list) or not values:
            raise SpecError(path, "expected a non-empty list of values")
        tp = int if key == "seed" else types_[key]
        grid[key] = [coerce(v, tp, f"{path}[{i}]") for i, v in enumerate(values)]
        for i, value in enumerate(grid[key]):  # each value must make valid options
            if key == "seed":
                continue
            try:
                dataclasses.replace(options, **{key: value})
            except ValueError as err:
                raise SpecError(f"{path}[{i}]", str(err)) from None
    return grid


def check_spec_paths(spec: SweepSpec) -> None:
    """Missing folders and files fail here, with the field that names them."""
    b = spec.benchmark
    if b.source == "imagefolder":
        if b.root is None:
            raise SpecError("benchmark.root", "required for source imagefolder")
        _require(Path(b.root), "benchmark.root", folder=True)
    if b.source == "csv":
        for split in ("train", "val", "test"):
            if getattr(b, split) is None:
                raise SpecError(f"benchmark.{split}", "required for source csv (a path,label file)")
            _require(Path(getattr(b, split)), f"benchmark.{split}", folder=False)
        if not b.classnames:
            raise SpecError("benchmark.classnames", "required for source csv")
    for name, shift in b.shifts.items():
        _require(Path(shift.path), f"benchmark.shifts.{name}.path",
                 folder=shift.format == "imagefolder")
    if b.source == "toyworld" and b.shifts:
        raise SpecError("benchmark.shifts", "the toy world brings its own shifts")
    if spec.model.pretrained and spec.model.arch == "toy":
        raise SpecError("model.pretrained", "the toy CLIP is pre-trained by orch; leave it unset")
    if spec.model.pretrained and ("/" in spec.model.pretrained or
                                  spec.model.pretrained.endswith((".pt", ".bin", ".safetensors"))):
        _require(Path(spec.model.pretrained), "model.pretrained", folder=False)
    if spec.model.config:
        _require(Path(spec.model.config), "model.config", folder=False)
    if spec.model.arch != "toy":
        import open_clip  # deferred: only real models need the registry lookup
        if spec.model.config:
            open_clip.add_model_config(Path(spec.model.config).expanduser().resolve())
        if spec.model.arch not in open_clip.list_models():
            raise SpecError("model.arch", f"unknown open_clip architecture {spec.model.arch!r}")


def _require(path: Path, where: str, folder: bool) -> None:
    path = path.expanduser()
    if folder and not path.is_dir():
        raise SpecError(where, f"folder {path.resolve()} does not exist")
    if not folder and not path.is_file():
        raise SpecError(where, f"file {path.resolve()} does not exist")
