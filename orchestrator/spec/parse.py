"""A sweep file's YAML mapping -> a validated, frozen `SweepSpec`.

Every error names the field (`grid.lr[1]: expected a number, got 'fast'`) and
`orch sweep --dry-run` runs all of these checks, so a bad file never fails mid-sweep.
The v0 one-method form (`method:` + `grid:`, `ensemble:` with `alphas:`) still parses.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec.plugins import import_plugins
from orchestrator.spec.schema import SpecError, coerce, field_types, parse_dataclass
from orchestrator.spec.types import (RANGE_KINDS, BenchmarkSpec, EnsembleEntry, EvalSpec,
                                     FeaturesSpec, MethodEntry, ModelSpec, Range, ReportSpec,
                                     ResourcesSpec, SearchSpec, SweepSpec)
from orchestrator.storage import check_uri, is_uri
from trainers.data.suites import SUITES
from trainers.ensembles import REGISTRY as ENSEMBLES
from trainers.ensembles import get_ensemble
from trainers.methods import REGISTRY as METHODS
from trainers.methods import get_method
from trainers.models import RANDOM_INIT, names_a_file

TOP_KEYS = ("name", "experiment", "plugins", "benchmark", "model", "method", "grid", "methods",
            "ensemble", "ensembles", "resources", "eval", "features", "storage_path", "report",
            "search")


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

    # plugins first: their methods and ensembles are names the file may use
    plugins = import_plugins(coerce(raw.get("plugins", []), list[str], "plugins"))
    benchmark = parse_dataclass(BenchmarkSpec, _shift_shorthands(raw.get("benchmark")),
                                "benchmark")
    model = parse_dataclass(ModelSpec, raw.get("model"), "model")
    methods = _parse_methods(raw)
    ensembles = _parse_ensembles(raw, methods)
    resources = parse_dataclass(ResourcesSpec, raw.get("resources"), "resources")
    eval_spec = parse_dataclass(EvalSpec, raw.get("eval"), "eval")
    features = parse_dataclass(FeaturesSpec, raw.get("features"), "features")
    report = parse_dataclass(ReportSpec, raw.get("report"), "report")
    search = _parse_search(raw.get("search"), methods)
    _check_searched(methods, search, "methods" in raw)
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
                     storage_path=storage, experiment=experiment, plugins=plugins,
                     report=report, search=search, source_file=source_file)


def _parse_search(data: Any, methods: tuple[MethodEntry, ...]) -> SearchSpec:
    """`search:`, whose `methods` name entries that train (by label)."""
    search = parse_dataclass(SearchSpec, data, "search")
    trains = [e.label for e in methods
              if get_method(e.method_name).trained and not get_method(e.method_name).merges]
    for i, label in enumerate(search.methods or []):
        if label not in trains:
            raise SpecError(f"search.methods[{i}]", f"{label!r} is not a trained method entry "
                            f"of this sweep (its label); trained entries: "
                            f"{', '.join(trains) or 'none'}")
    return search


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
        suite = SUITES.get(data.get("suite"))
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
        if value and (name != "pretrained" or names_a_file(value)):
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
    _check_members(entries)
    return tuple(entries)


def _check_members(entries: list) -> None:
    """A merging method's `of` names an entry that trains (not another merge)."""
    trains = {e.label for e in entries if get_method(e.method_name).trained
              and not get_method(e.method_name).merges}
    for i, entry in enumerate(entries):
        if not get_method(entry.method_name).merges:
            continue
        path = f"methods[{i}].of" if len(entries) > 1 else "method.of"
        if entry.options.of not in trains:
            raise SpecError(path, f"{entry.options.of!r} is not a trained method entry of this "
                                  f"sweep (its label); trained entries: "
                                  f"{', '.join(sorted(trains)) or 'none'}")


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


def _parse_grid(data: Any, method: str, options: Any, path: str) -> dict[str, list[Any] | Range]:
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
        if isinstance(values, dict) and key != "seed":
            grid[key] = _parse_range(values, types_[key], options, key, where)
            continue
        if not isinstance(values, list) or not values:
            raise SpecError(where, "expected a non-empty list of values, or a range "
                                   "({loguniform: [low, high]}, uniform or int)")
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


def _parse_range(data: dict, tp: Any, options: Any, key: str, where: str) -> Range:
    """`{loguniform: [low, high]}` (or uniform, int) for a numeric option: a searched one."""
    if len(data) != 1 or next(iter(data)) not in RANGE_KINDS:
        raise SpecError(where, f"a range is one of {', '.join(f'{{{k}: [low, high]}}' for k in RANGE_KINDS)}")
    kind, ends = next(iter(data.items()))
    if tp not in (float, int, float | None, int | None):
        raise SpecError(where, f"a range needs a numeric option; {key} is not one")
    if tp in (int, int | None) and kind != "int":
        raise SpecError(where, f"{key} takes whole numbers: use {{int: [low, high]}}")
    if not isinstance(ends, list) or len(ends) != 2:
        raise SpecError(f"{where}.{kind}", "expected [low, high]")
    low, high = (coerce(v, float, f"{where}.{kind}[{i}]") for i, v in enumerate(ends))
    try:
        found = Range(kind, low, high)
        for end in (low, high):          # both ends must make valid options
            dataclasses.replace(options, **{key: int(end) if kind == "int" else end})
    except ValueError as err:
        raise SpecError(where, str(err)) from None
    return found


def _check_searched(methods: tuple[MethodEntry, ...], search: SearchSpec, multi: bool) -> None:
    """Ranges need a searcher, and a searcher needs a range."""
    searched = [i for i, e in enumerate(methods) if e.searched]
    if searched and search.searcher is None:
        i = searched[0]
        key = next(k for k, v in methods[i].grid.items() if isinstance(v, Range))
        where = f"methods[{i}].grid.{key}" if multi else f"grid.{key}"
        raise SpecError(where, "a range is searched: add `search: {searcher: optuna}` "
                               "(or give a list of values)")
    if search.searcher is not None and not searched:
        raise SpecError("search.searcher", "no method entry has a range in its grid to search "
                                           "(e.g. lr: {loguniform: [1.0e-6, 1.0e-4]})")


def _check_batches_split(methods: tuple[MethodEntry, ...], resources: ResourcesSpec) -> None:
    """Data-parallel workers take equal shares of every batch (contrastive losses gather
    equal shards): each batch size must be a multiple of the number of workers."""
    n = resources.workers_per_trial
    if n == 1:
        return
    for i, entry in enumerate(methods):
        for _, options, _ in entry.points():
            for key in get_method(entry.method_name).batch_size_options:
                value = getattr(options, key)
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
        trained = {e.label for e in methods if get_method(e.method_name).trained}
        for i, label in enumerate(applies):
            if label not in trained:
                raise SpecError(f"{path}.methods[{i}]", f"{label!r} is not a method of this "
                                f"sweep that trains (those are: {', '.join(sorted(trained))})")
    return EnsembleEntry(name, options, applies)
