"""`orch report`: a sweep's table, rebuilt from its MLflow child runs.

The default view is one line per (method, ensemble): the point chosen on ID validation,
with ID and OOD accuracy and ECE before and after temperature scaling. `--points` lists
every point instead.
"""
from __future__ import annotations

import json
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.records.journal import alive
from orchestrator.records.mlflow import KIND_TAG, SWEEP_TAG, TrackingError, first_line, sqlite_file
from orchestrator.records.publish import NOTES_TAG, POINT_PARAM
from orchestrator.records.row import ALONE, Row
from orchestrator.records.table import Table


class ReportError(RuntimeError):
    """No such sweep in the tracking store."""


@dataclass
class FoundSweep:
    sweep_id: str
    experiment: str
    status: str
    table: Table
    note: str | None = None
    stopped: list[str] = field(default_factory=list)   # trials the search stopped early
    notes: list[str] = field(default_factory=list)     # what trials' methods said of them


SUMMARY_COLUMNS = (("id_acc", "ID acc"), ("ood_acc", "OOD acc"), ("id_ece", "ID ECE"),
                   ("ood_ece", "OOD ECE"), ("id_ece_ts", "ID ECE TS"),
                   ("ood_ece_ts", "OOD ECE TS"), ("val_acc", "val acc"))
POINT_COLUMNS = (("id_acc", "ID acc"), ("ood_acc", "OOD acc"), ("id_ece", "ID ECE"),
                 ("ood_ece", "OOD ECE"), ("val_acc", "val acc"))


def _cells(row: Row, columns) -> str:
    return "  ".join(f"{100 * row.metrics[k]:{len(t)}.1f}" if k in row.metrics
                     else f"{'-':>{len(t)}}" for k, t in columns)


def format_summary(table: Table) -> str:
    """One line per (method, ensemble): its point chosen on ID validation accuracy.
    Percentages; ECE TS = ECE after temperature scaling fitted on ID validation."""
    if not table.rows:
        return "(no points recorded yet)"
    heads = ("method", "ensemble", "chosen point")
    texts = [(m, "-" if e == ALONE else e, table.rows[i].trial
              + ("" if e == ALONE else f" {table.rows[i].coefficients_text}"))
             for (m, e), i in table.chosen.items()]
    widths = [max(len(h), *(len(t[j]) for t in texts)) for j, h in enumerate(heads)]
    header = "  ".join(f"{h:<{w}}" for h, w in zip(heads, widths)) + "  " + \
        "  ".join(t for _, t in SUMMARY_COLUMNS)
    lines = [header, "-" * len(header)]
    for text, index in zip(texts, table.chosen.values()):
        lines.append("  ".join(f"{t:<{w}}" for t, w in zip(text, widths)) + "  "
                     + _cells(table.rows[index], SUMMARY_COLUMNS))
    return "\n".join(lines)


def format_points(table: Table) -> str:
    """Every point: `*` on the Pareto front, `<- chosen` where its (method, ensemble)
    group chose it on ID validation."""
    rows = table.rows
    if not rows:
        return "(no points recorded yet)"
    names = [r.trial for r in rows]
    ens = [("-" if r.ensemble == ALONE else r.ensemble) for r in rows]
    coef = [r.coefficients_text for r in rows]
    w = [max(len("trial"), *map(len, names)), max(len("ensemble"), *map(len, ens)),
         max(len("coefficients"), *map(len, coef))]
    header = (f"{'trial':<{w[0]}}  {'ensemble':<{w[1]}}  {'coefficients':<{w[2]}}  "
              + "  ".join(t for _, t in POINT_COLUMNS) + "  front")
    lines = [header, "-" * len(header)]
    for i, row in enumerate(rows):
        mark = "  *    " if table.on_front[i] else "       "
        note = " <- chosen on ID val" if table.is_chosen(i) else ""
        note += " (best overall)" if i == table.selected else ""
        lines.append((f"{names[i]:<{w[0]}}  {ens[i]:<{w[1]}}  {coef[i]:<{w[2]}}  "
                      + _cells(row, POINT_COLUMNS) + mark + note).rstrip())
    return "\n".join(lines)


SWEEP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")   # what new_sweep_id() makes


def _missing_store(tracking_uri: str) -> str | None:
    """Where a local tracking store (SQLite file, or mlruns folder) should be, if it is
    not there: MLflow would create an empty one just by being asked."""
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////abs/path.db; sqlite:// or :memory: is no file
        db = sqlite_file(tracking_uri)
        if db is not None and str(db) not in ("", ".", ":memory:") \
                and not db.expanduser().is_file():
            return str(db.expanduser())
        return None
    if parsed.scheme == "file" or (not parsed.scheme or len(parsed.scheme) == 1):  # C:\...
        path = urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" \
            else tracking_uri
        if not Path(path).expanduser().is_dir():
            return str(Path(path).expanduser())
    return None


def load_sweep(tracking_uri: str, sweep_id: str | None = None) -> FoundSweep:
    if sweep_id is not None and not SWEEP_ID.fullmatch(sweep_id):
        raise ReportError(f"{sweep_id!r} is not a sweep id (sweep ids have only letters, "
                          "digits, '-', '_' and '.'; `orch report` alone shows the last sweep)")
    missing = _missing_store(tracking_uri)
    if missing:
        raise ReportError(f"no sweeps recorded in {tracking_uri}: {missing} does not exist "
                          "(run `orch sweep` first, or check --tracking-uri)")
    client = MlflowClient(tracking_uri)
    try:
        experiments = client.search_experiments()
    except Exception as err:
        raise TrackingError(f"cannot use MLflow tracking store {tracking_uri}: "
                            f"{first_line(err)}") from None
    ids = [e.experiment_id for e in experiments]
    names = {e.experiment_id: e.name for e in experiments}
    filter_ = f"tags.`{KIND_TAG}` = 'sweep'"
    if sweep_id:
        filter_ += f" and tags.`{SWEEP_TAG}` = '{sweep_id}'"
    parents = client.search_runs(ids, filter_, order_by=["attributes.start_time DESC"],
                                 max_results=1) if ids else []
    if not parents:
        raise ReportError(f"no sweep {sweep_id!r} in {tracking_uri}" if sweep_id else
                          f"no sweeps recorded in {tracking_uri} yet (run `orch sweep` first)")
    parent = parents[0]
    found_id = parent.data.tags[SWEEP_TAG]
    status, note = _status(client, parent)
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{SWEEP_TAG}` = '{found_id}' and tags.`{KIND_TAG}` = 'eval'", max_results=50_000)
    rows, older = [], 0
    for run in children:
        if POINT_PARAM not in run.data.params:
            older += 1                    # recorded by orch 0.1, which kept no point identity
            continue
        metrics = {k: v for k, v in run.data.metrics.items() if k not in ("on_front", "chosen")}
        rows.append(Row.from_dict({**json.loads(run.data.params[POINT_PARAM]),
                                   "metrics": metrics}))
    if older:
        note = (f"{older} point(s) were recorded by orch 0.1 and are not shown"
                + (f"; {note}" if note else ""))
    trains = sorted(client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{SWEEP_TAG}` = '{found_id}' and tags.`{KIND_TAG}` = 'train'",
        max_results=50_000), key=lambda r: r.info.run_name or "")
    return FoundSweep(found_id, names[parent.info.experiment_id], status, Table.of(rows), note,
                      stopped=[_stopped(r) for r in trains
                               if r.data.tags.get("orch.trial_status") == "stopped"],
                      notes=[f"{r.info.run_name}: {r.data.tags[NOTES_TAG]}" for r in trains
                             if NOTES_TAG in r.data.tags])


def _stopped(run) -> str:
    """A training trial the sweep's search stopped early: when, and the ID validation
    accuracy it had reached."""
    m = run.data.metrics
    epochs = f"after {m['stopped_epochs_done']:g} epoch(s)" if "stopped_epochs_done" in m \
        else "early"
    acc = f", ID val acc {100 * m['stopped_val_acc']:.1f}" if "stopped_val_acc" in m else ""
    return f"{run.info.run_name} stopped {epochs}{acc}"


def _status(client: MlflowClient, parent) -> tuple[str, str | None]:
    """The parent's status, and what to do about it. A parent still RUNNING whose process
    on this machine is gone was killed: it is marked KILLED here (no ghost runs)."""
    status, tags = parent.info.status, parent.data.tags
    resume = (f"`orch sweep FILE --resume {tags.get(SWEEP_TAG)}` continues it")
    if status == "RUNNING":
        host, pid = tags.get("orch.host"), int(tags.get("orch.pid", "0") or 0)
        if host == socket.gethostname() and pid and not alive(pid):
            try:                      # a read-only store still gets the report
                client.set_terminated(parent.info.run_id, "KILLED")
            except Exception:  # noqa: BLE001 - MLflow raises many kinds here
                pass
            return "KILLED", f"its process ({pid}) is gone; {resume}"
        return status, f"running on {host} (pid {pid})" if host else None
    if status in ("KILLED", "FAILED"):
        error = tags.get("orch.error")
        return status, (f"{error}; " if error and error != "interrupted" else "") + resume
    return status, None


__all__ = ["FoundSweep", "ReportError", "format_points", "format_summary", "load_sweep"]
