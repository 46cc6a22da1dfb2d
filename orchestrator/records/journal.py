"""A sweep's own record, kept in its storage folder as it runs:

    <storage_path>/<sweep_id>/
        sweep.json              id, name, file, effective spec, status, MLflow ids, pid,
                                the searcher's proposals (written before they train)
        sweep.yaml              the effective sweep file
        trials/<trial>.json     a finished training trial: its loss curve, its model file
        checkpoints/<trial>.json    an unfinished trial's latest epoch checkpoint
        points/<job>.json       a finished ensemble job: its rows (one per point)
        tune/train-<run>, tune/ensemble-<run>   Ray Tune's experiments, one per run of the
                                sweep (their trials' checkpoints)

It is written before MLflow is, so a sweep whose tracking server fails loses nothing
(`orch sync` writes what MLflow lacks), and `orch sweep FILE --resume` knows what is done.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.records.row import Row
from orchestrator.storage import (join, list_dirs, list_json, read_json, read_text,
                                  write_json, write_text)

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
# A trial's record: fitted (its model is in "model"), failed, or stopped early by the
# sweep's search (ASHA), which leaves no model: no ensemble or soup uses it.
OK, STOPPED = "ok", "stopped"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Journal:
    root: str                       # <storage_path>/<sweep_id>

    @property
    def sweep_id(self) -> str:
        return Path(self.root.rstrip("/")).name

    @property
    def tune_storage(self) -> str:
        return join(self.root, "tune")

    # -- the sweep ---------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return read_json(join(self.root, "sweep.json")) or {}

    def update(self, **fields: Any) -> dict[str, Any]:
        meta = {**self.meta(), **fields, "updated": time.time()}
        write_json(join(self.root, "sweep.json"), meta)
        return meta

    def start(self, name: str, source_file: str | None, spec_text: str,
              overrides: list[str] | None = None) -> None:
        """Mark the sweep as running in this process (a later command can then tell a
        live sweep from one whose process was killed)."""
        meta = self.meta()
        # cwd: where the file's relative paths point (a later `orch export` or `orch sync`
        # reads the effective file again, maybe from elsewhere)
        self.update(sweep_id=self.sweep_id, name=name, source_file=source_file,
                    created=meta.get("created", time.time()), status=RUNNING,
                    pid=os.getpid(), host=socket.gethostname(), cwd=os.getcwd(),
                    overrides=overrides or [], runs=meta.get("runs", 0) + 1)
        write_text(join(self.root, "sweep.yaml"), spec_text)

    def spec_text(self) -> str | None:
        return read_text(join(self.root, "sweep.yaml"))

    def status(self) -> str:
        """The recorded status; a sweep recorded as running whose process on this host is
        gone was killed (`kill -9`, a crash, a lost machine)."""
        meta = self.meta()
        status = meta.get("status", RUNNING)
        if status == RUNNING and meta.get("host") == socket.gethostname() \
                and not alive(int(meta.get("pid", 0))):
            return INTERRUPTED
        return status

    def save_proposals(self, proposals: dict[str, list[dict[str, Any]]]) -> None:
        """The searched entries' trials so far ({label: [hparams, ...]}), before they train:
        a resumed sweep, `orch report`, `export` and `sync` rebuild the same trials."""
        self.update(search_proposals=proposals)

    def proposals(self) -> dict[str, list[dict[str, Any]]]:
        return self.meta().get("search_proposals") or {}

    # -- what is done ---------------------------------------------------------------------
    def save_trial(self, name: str, record: dict) -> None:
        write_json(join(self.root, "trials", f"{name}.json"), record)

    def trials(self) -> dict[str, dict]:
        return {record["trial"]: record for record in self._records("trials")}

    def stopped(self) -> set[str]:
        """The trials the sweep's search stopped early."""
        return {name for name, record in self.trials().items() if record["status"] == STOPPED}

    def save_checkpoint(self, name: str, path: str) -> None:
        """The latest epoch checkpoint of an unfinished trial (where a resume continues)."""
        write_json(join(self.root, "checkpoints", f"{name}.json"), {"trial": name, "path": path})

    def checkpoints(self) -> dict[str, str]:
        return {record["trial"]: record["path"] for record in self._records("checkpoints")}

    def save_points(self, key: str, job: dict, rows: list[Row]) -> None:
        """A finished ensemble job (`plan.Job`: its key and config) and its rows."""
        write_json(join(self.root, "points", f"{key}.json"),
                   {"key": key, "job": job, "rows": [row.to_dict() for row in rows]})

    def points(self) -> dict[str, list[Row]]:
        """{job key: its rows} of every finished ensemble job."""
        return {record["key"]: [Row.from_dict(r) for r in record["rows"]]
                for record in self._records("points")}

    def _records(self, folder: str) -> list[dict]:
        """The readable records in one of the journal's folders."""
        return [r for r in map(read_json, list_json(join(self.root, folder))) if r]


def find_sweeps(storage: str, name: str | None = None) -> list[tuple[Journal, dict]]:
    """The sweeps recorded under a storage path (a folder or a bucket), oldest first."""
    found = []
    for folder in list_dirs(storage):
        journal = Journal(folder)
        meta = journal.meta()
        if meta and (name is None or meta.get("name") == name):
            found.append((journal, meta))
    return sorted(found, key=lambda item: item[1].get("created", 0))


def unfinished(storage: str, name: str, source_file: str | None,
               spec_text: str | None = None) -> list[Journal]:
    """Sweeps of this file that did not finish (interrupted, failed, or killed): same
    sweep name, and the same file path or the same text (a copy of the file that
    `ray job submit` uploaded sits at another path)."""
    out = []
    for journal, meta in find_sweeps(storage, name):
        same = meta.get("source_file") == source_file or (
            spec_text is not None and journal.spec_text() == spec_text)
        if same and journal.status() not in (FINISHED, RUNNING):
            out.append(journal)
    return out


def open_journal(storage: str, sweep_id: str) -> Journal:
    return Journal(join(storage, sweep_id))
