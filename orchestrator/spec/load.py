"""Reading a sweep file: strict YAML (a key given twice is an error at its path, with
both lines), UTF-8 whatever the locale, dotted `key=value` overrides applied as if the
file said them, then parsing and the checks of paths and model.

Path fields may use environment variables (`storage_path: $ORCH_STORAGE/sweeps`,
`root: $DATA/imagenet`), so a cluster sets its shared locations in one place. Relative
paths are resolved against the current working directory, on the driver (Ray Tune
changes each trial's working directory).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from orchestrator.spec.checks import check_spec_paths
from orchestrator.spec.parse import parse_spec
from orchestrator.spec.schema import SpecError
from orchestrator.spec.types import SweepSpec


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
