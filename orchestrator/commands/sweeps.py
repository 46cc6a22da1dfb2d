"""Finding a finished (or stopped) sweep from the command line: its journal, by folder or
by id, and the spec it ran. Shared by `orch export` and `orch sync`."""
from __future__ import annotations

import contextlib
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from orchestrator.records.journal import Journal
from orchestrator.records.mlflow import KIND_TAG, SWEEP_TAG, default_tracking_uri
from orchestrator.spec.parse import parse_spec
from orchestrator.spec.types import SweepSpec
from orchestrator.storage import is_uri, join


class SweepNotFound(RuntimeError):
    """No such sweep (the message says where orch looked)."""


def find_journal(sweep: str, storage_path: str | None,
                 tracking_uri: str | None = None) -> Journal:
    """SWEEP is the sweep's folder, or its id: under `storage_path` when given, else where
    the sweep's MLflow parent run says its journal is (`orch.journal`), else under ./runs."""
    candidates = [sweep] if is_uri(sweep) else [str(Path(sweep).resolve())] \
        if Path(sweep).is_dir() else []
    if storage_path is not None:
        candidates.append(join(storage_path if is_uri(storage_path)
                               else str(Path(storage_path).resolve()), sweep))
    else:
        recorded = _recorded_journal(sweep, tracking_uri or default_tracking_uri())
        candidates += [recorded] if recorded else []
        candidates.append(str(Path("runs").resolve() / sweep))
    for root in candidates:
        journal = Journal(root)
        if journal.meta():
            return journal
    raise SweepNotFound(f"no sweep {sweep!r} (looked for "
                        f"{' and '.join(f'{c}/sweep.json' for c in candidates)}; "
                        "--storage-path names where it ran)")


def _recorded_journal(sweep_id: str, tracking_uri: str) -> str | None:
    """The journal folder the sweep's parent run names, if the store has that sweep."""
    if tracking_uri.startswith("sqlite:///") and not Path(
            tracking_uri[len("sqlite:///"):].split("?")[0]).is_file():
        return None                      # asking would create an empty store
    try:
        client = MlflowClient(tracking_uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.`{SWEEP_TAG}` = '{sweep_id}' and "
                                       f"tags.`{KIND_TAG}` = 'sweep'", max_results=1) if ids else []
    except Exception:  # noqa: BLE001 - an unreachable store: look in the other places
        return None
    return runs[0].data.tags.get("orch.journal") if runs else None


def journal_spec(journal: Journal) -> SweepSpec:
    """The effective sweep file a sweep ran, as its spec; its relative paths read from the
    folder the sweep was started in."""
    meta, text = journal.meta(), journal.spec_text() or ""
    cwd = meta.get("cwd")
    with contextlib.chdir(cwd) if cwd and Path(cwd).is_dir() else contextlib.nullcontext():
        spec = parse_spec(yaml.safe_load(text),
                          source_file=Path(meta["source_file"]) if meta.get("source_file")
                          else None)
    return spec.with_proposals(journal.proposals())   # a searcher's trials, as it proposed them


__all__ = ["SweepNotFound", "find_journal", "journal_spec"]
