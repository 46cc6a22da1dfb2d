"""`orch sync SWEEP`: write to MLflow what a sweep's journal holds and MLflow lacks.

For a sweep whose tracking server went down (or whose store was read-only) mid-sweep:
every finished trial and point is in the journal; sync creates the missing child runs
(never a second one for a record MLflow has), redoes the parent's table and plots for a
finished sweep, and sets the parent's status from the journal's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from orchestrator.journal import FINISHED, RUNNING, Journal
from orchestrator.records import SweepRecords, TrackingError
from orchestrator.spec import SweepSpec, parse_spec
from orchestrator.storage import is_uri, join

STATUS = {FINISHED: "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class SyncError(RuntimeError):
    """No such sweep, or one still running."""


def find_journal(sweep: str, storage_path: str) -> Journal:
    """SWEEP is the sweep's folder, or its id under `storage_path`."""
    candidates = [sweep] if is_uri(sweep) or Path(sweep).is_dir() else []
    candidates.append(join(storage_path if is_uri(storage_path)
                           else str(Path(storage_path).resolve()), sweep))
    for root in candidates:
        journal = Journal(root)
        if journal.meta():
            return journal
    raise SyncError(f"no sweep {sweep!r} (looked for {' and '.join(candidates)}/sweep.json)")


def journal_spec(journal: Journal) -> SweepSpec:
    """The effective sweep file a sweep ran, as its spec."""
    meta = journal.meta()
    return parse_spec(yaml.safe_load(journal.spec_text() or ""),
                      source_file=Path(meta["source_file"]) if meta.get("source_file") else None)


def sync_sweep(sweep: str, storage_path: str, tracking_uri: str | None,
               echo: Callable[[str], None] = print, force: bool = False) -> str:
    from orchestrator.sweep import (Sweep, _report_stage, _sync_done, ensemble_jobs,
                                    finished_rows, spec_params)
    from orchestrator.journal import job_key
    journal = find_journal(sweep, storage_path)
    meta, status = journal.meta(), journal.status()
    if status == RUNNING and not force:
        raise SyncError(f"sweep {journal.sweep_id} is still running (pid {meta.get('pid')} on "
                        f"{meta.get('host')}); if that machine is gone, sync with --force")
    spec = journal_spec(journal)
    uri = tracking_uri or meta.get("tracking_uri")
    if not uri:
        raise SyncError(f"sweep {journal.sweep_id} names no tracking URI: pass --tracking-uri")
    records = SweepRecords(uri, meta.get("experiment", spec.experiment), journal.sweep_id,
                           echo).open()
    records.start_parent(spec_params(spec), journal.spec_text(), meta.get("parent_run_id"),
                         tags={"orch.journal": journal.root})
    journal.update(parent_run_id=records.parent_id, experiment_id=records.experiment_id,
                   tracking_uri=uri)
    state = Sweep(spec, journal, records, echo)
    _sync_done(state)
    points = spec.trials()
    done = journal.points()
    jobs = ensemble_jobs(spec, points)
    if status == FINISHED and all(job_key(job) in done for job in jobs):
        models = {name: record["model"] for name, record in journal.trials().items()
                  if record.get("status") == "ok"}
        _report_stage(state, finished_rows(spec, points, done), models)
    records.finish(STATUS.get(status, "FAILED"), meta.get("error"))
    if records.failed:
        raise TrackingError(f"cannot write to MLflow tracking store {uri}: {records.failed}")
    journal.update(mlflow_synced=True)
    return (f"sweep {journal.sweep_id} ({status}): {len(journal.trials())} trial(s) and "
            f"{sum(len(d['rows']) for d in done.values())} point(s) in MLflow at {uri}")
