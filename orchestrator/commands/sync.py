"""`orch sync SWEEP`: write to MLflow what a sweep's journal holds and MLflow lacks.

For a sweep whose tracking server went down (or whose store was read-only) mid-sweep:
every finished trial and point is in the journal; sync creates the missing child runs
(never a second one for a record MLflow has), redoes the parent's table and plots for a
finished sweep, and sets the parent's status from the journal's. Run twice, it writes
nothing new the second time.
"""
from __future__ import annotations

import os
from typing import Callable

from orchestrator.commands.sweeps import find_journal, journal_spec
from orchestrator.plan import Plan
from orchestrator.records.journal import FINISHED, OK, RUNNING
from orchestrator.records.mlflow import SweepRecords, TrackingError
from orchestrator.records.publish import publish, record_journal, spec_params
from orchestrator.records.table import Table

STATUS = {FINISHED: "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class SyncError(RuntimeError):
    """A sweep still running, or one that names no tracking store."""


def sync_sweep(sweep: str, storage_path: str | None, tracking_uri: str | None,
               echo: Callable[[str], None] = print, force: bool = False) -> str:
    journal = find_journal(sweep, storage_path, tracking_uri)
    meta, status = journal.meta(), journal.status()
    if status == RUNNING and not force:
        raise SyncError(f"sweep {journal.sweep_id} is still running (pid {meta.get('pid')} on "
                        f"{meta.get('host')}); if that machine is gone, sync with --force")
    plan = Plan(journal_spec(journal))
    uri = tracking_uri or meta.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SyncError(f"sweep {journal.sweep_id} names no tracking URI: pass --tracking-uri")
    records = SweepRecords(uri, meta.get("experiment", plan.spec.experiment), journal.sweep_id,
                           echo).open()
    records.start_parent(spec_params(plan), journal.spec_text(), meta.get("parent_run_id"),
                         tags={"orch.journal": journal.root})
    journal.update(parent_run_id=records.parent_id, experiment_id=records.experiment_id,
                   tracking_uri=uri)
    record_journal(records, plan, journal)
    done = journal.points()
    if status == FINISHED and all(job.key in done for job in plan.jobs(skip=journal.stopped())):
        models = {name: record["model"] for name, record in journal.trials().items()
                  if record.get("status") == OK}
        publish(records, plan, Table.of(plan.finished_rows(done)), models)
    records.finish(STATUS.get(status, "FAILED"), meta.get("error"))
    if records.failed:
        raise TrackingError(f"cannot write to MLflow tracking store {uri}: {records.failed}")
    journal.update(mlflow_synced=True)
    return (f"sweep {journal.sweep_id} ({status}): {len(journal.trials())} trial(s) and "
            f"{sum(len(rows) for rows in done.values())} point(s) in MLflow at {uri}")
