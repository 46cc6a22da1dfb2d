"""Plug-ins: methods and ensembles that live outside orch, named in a sweep file.

    plugins: [my_lab.methods, ./extra/my_ensemble.py, ./extra/my_package]

Each entry is a module name (installed, or on PYTHONPATH) or a path to a `.py` file or a
package folder. Importing it runs its `register(...)` calls, exactly as orch's own method
and ensemble files do, so a plug-in is one file written like `trainers/methods/ft.py`.

A path's folder is put on `sys.path` and the module imported by its own name, so every
process of the sweep (Ray workers on other machines included, given the path is on a
shared filesystem) imports the same module under the same name. A spec carrying plug-ins
re-imports them before it is unpickled in a worker (`restore_spec`): its options objects
are instances of the plug-ins' classes.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Sequence

from orchestrator.spec.schema import SpecError


def _is_path(entry: str) -> bool:
    return "/" in entry or entry.endswith(".py") or entry.startswith(".")


def _import(entry: str) -> None:
    if _is_path(entry):
        path = Path(entry)
        if not path.exists():
            raise ImportError(f"{path} does not exist")
        folder, name = str(path.parent), path.stem if path.suffix == ".py" else path.name
        if folder not in sys.path:
            sys.path.insert(0, folder)
        importlib.import_module(name)
    else:
        importlib.import_module(entry)


def import_plugins(entries: Sequence[str]) -> tuple[str, ...]:
    """Import every plug-in (paths resolved against the working directory); returns the
    entries with absolute paths. A plug-in that cannot be imported, or that registers a
    name already taken, is a SpecError at its place in the list."""
    resolved = []
    for i, entry in enumerate(entries):
        entry = os.path.expandvars(entry)
        if _is_path(entry):
            entry = str(Path(entry).expanduser().resolve())
        try:
            _import(entry)
        except Exception as err:  # ImportError, a plug-in's own error, a taken name
            text = " ".join(str(err).split()) or type(err).__name__
            raise SpecError(f"plugins[{i}]", f"cannot import {entry}: {text}") from None
        resolved.append(entry)
    return tuple(resolved)


def restore_spec(cls: type, plugins: Sequence[str], state: bytes) -> Any:
    """`cls(**fields)` from a spec's pickled fields, after importing its plug-ins (the
    pickle refers to their classes)."""
    for entry in plugins:
        _import(entry)
    return cls(**pickle.loads(state))
