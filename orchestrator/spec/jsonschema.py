"""The sweep file's JSON Schema (`orch schema > sweep.schema.json`), built from the same
dataclasses the parser reads, so editors complete and check sweep files with exactly
the keys, types and defaults orch accepts. Range checks stay in orch (`--dry-run`)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union, get_args, get_origin

from orchestrator.spec.types import (RANGE_KINDS, BenchmarkSpec, EvalSpec, FeaturesSpec,
                                     ModelSpec, ReportSpec, ResourcesSpec, SearchSpec, ShiftSpec)
from trainers.data.suites import SUITES
from trainers.ensembles import REGISTRY as ENSEMBLES
from trainers.methods import REGISTRY as METHODS

SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"


def _type(tp: Any) -> dict:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        nullable = len(options) < len(get_args(tp))
        schemas = [_type(o) for o in options] + ([{"type": "null"}] if nullable else [])
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin in (list, tuple):
        args = get_args(tp)
        return {"type": "array", "items": _type(args[0]) if args else {}}
    if origin is dict:
        args = get_args(tp)
        return {"type": "object", "additionalProperties": _type(args[1]) if args else {}}
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    return {}


def _default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, (bool, int, float, str, list, dict, type(None))) else None


def dataclass_schema(cls: type, extra: dict | None = None, required: tuple[str, ...] = ()) -> dict:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        prop = _type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = _default(f.default)
            if default is not None or f.default is None:
                prop = {**prop, "default": default}
        elif f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
            prop = {**prop, "default": _default(f.default_factory())}   # type: ignore[misc]
        properties[f.name] = prop
    properties.update(extra or {})
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    needed = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING] + list(required)   # type: ignore[misc]
    if needed:
        schema["required"] = needed
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(cls.__doc__.split())
    return schema


def _method_entry(name: str, with_grid: bool) -> dict:
    method = METHODS[name]
    extra = {"name": {"const": name}, "label": {"type": "string"}}
    if with_grid:
        options = dataclass_schema(method.options)["properties"]
        # a list of values (the grid), or a numeric option's range (searched: `search:`)
        ends = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
        searched = {"type": "object", "minProperties": 1, "maxProperties": 1,
                    "additionalProperties": False,
                    "properties": {kind: ends for kind in RANGE_KINDS},
                    "description": "searched by `search: {searcher: optuna}`"}

        def values(p: dict) -> dict:
            listed = {"type": "array", "items": {k2: v for k2, v in p.items() if k2 != "default"}}
            kinds = [p.get("type")] + [o.get("type") for o in p.get("anyOf", [])]
            return {"anyOf": [listed, searched]} if {"number", "integer"} & set(kinds) else listed
        extra["grid"] = {"type": "object", "additionalProperties": False, "properties": {
            "seed": {"type": "array", "items": {"type": "integer"}},
            **{k: values(p) for k, p in options.items()}}}
    schema = dataclass_schema(method.options, extra, required=("name",))
    schema["description"] = f"{name}: {method.paper}"
    return schema


def _ensemble_entry(name: str, legacy: bool = False) -> dict:
    ensemble = ENSEMBLES[name]
    extra = {"name": {"const": name},
             "methods": {"type": "array", "items": {"type": "string"},
                         "description": "method labels it applies to (default: every trained one)"}}
    if legacy and "alpha" in ensemble.coefficients:     # v0 files spell the grid `alphas`
        extra["alphas"] = {"type": "array", "items": {"type": "number"}}
    schema = dataclass_schema(ensemble.options, extra, required=("name",))
    schema["description"] = f"{name} ({ensemble.mixes}): {ensemble.paper}"
    return schema


def _benchmark_schema() -> dict:
    """BenchmarkSpec's schema, with what the parser reads beyond its types: the suite and
    domain names, and a shift given as its folder alone (or, for a suite of domains, a
    list of domain names)."""
    schema = dataclass_schema(BenchmarkSpec)
    props = schema["properties"]
    props["suite"] = {"anyOf": [{"enum": sorted(SUITES)}, {"type": "null"}], "default": None,
                      "description": "a named benchmark suite (docs/benchmarks.md)"}
    domains = sorted({d for suite in SUITES.values() for d in suite.domains})
    props["domain"] = {"anyOf": [{"enum": domains}, {"type": "null"}], "default": None,
                       "description": "suite domainnet: the ID domain"}
    folder = {"type": "string", "description": "the shift's folder"}
    props["shifts"] = {"default": {}, "anyOf": [
        {"type": "object", "additionalProperties": {"anyOf": [dataclass_schema(ShiftSpec), folder]}},
        {"type": "array", "items": {"type": "string"},
         "description": "suite domainnet: shift domains, read from root"}]}
    return schema


def sweep_schema() -> dict:
    methods = sorted(METHODS)
    ensembles = sorted(ENSEMBLES)
    single_methods = {"oneOf": [_method_entry(m, with_grid=False) for m in methods]}
    # v0's `ensemble:` also accepts `alphas` for `alpha`
    single_ensemble = {"oneOf": [_ensemble_entry(e, legacy=True) for e in ensembles]}
    return {
        "$schema": SCHEMA_URL,
        "title": "orch sweep file",
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]+$"},
            "experiment": {"type": "string"},
            "plugins": {"type": "array", "items": {"type": "string"},
                        "description": "modules or .py files that register methods or "
                                       "ensembles (imported first)"},
            "benchmark": _benchmark_schema(),
            "model": dataclass_schema(ModelSpec),
            "method": single_methods,
            "grid": {"type": "object", "description": "one training trial per combination",
                     "additionalProperties": {"type": "array"}},
            "methods": {"type": "array",
                        "items": {"oneOf": [_method_entry(m, with_grid=True) for m in methods]}},
            "ensemble": single_ensemble,
            "ensembles": {"type": "array", "items": {"oneOf": [_ensemble_entry(e) for e in ensembles]}},
            "resources": dataclass_schema(ResourcesSpec),
            "eval": dataclass_schema(EvalSpec),
            "features": dataclass_schema(FeaturesSpec),
            "report": dataclass_schema(ReportSpec),
            "search": dataclass_schema(SearchSpec),
            "storage_path": {"type": "string", "default": "runs",
                             "description": "local folder or s3:// / gs:// URI; $VARS expand"},
        },
    }
