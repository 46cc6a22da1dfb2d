"""The plan of a sweep, from its spec alone (no Ray, no files): the training trials (every
method entry's grid expanded and named), the ensemble stage's jobs, and the one order in
which the sweep's points are listed everywhere (tables, plots, MLflow, report).

Words, one per idea:
- a *trial* is one training grid point of one method entry (`Trial`);
- a *point* is one row of the sweep's table: a trial alone, or one coefficient point of an
  ensemble of it with the zero-shot model (`orchestrator.records.row.Row`);
- *coefficients* are an ensemble's values at a point (`{"alpha": 0.3}`);
- a *job* is one unit of the ensemble stage (`Job`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.records.row import ALONE, Row, sort_rows
from orchestrator.spec.types import EnsembleEntry, SweepSpec
from trainers.ensembles import OUTPUTS, WEIGHTS
from trainers.methods import get_method

@dataclass(frozen=True)
class Trial:
    """One training trial: a method entry's options at one grid point, and its seed."""

    name: str                # unique in the sweep, e.g. "ft-01_lr=0.0001_seed=0"
    label: str               # the method entry it belongs to (what tables call "method")
    method_name: str         # the registered method
    options: Any             # the method's options dataclass
    seed: int
    hparams: dict[str, Any]  # the grid values that define this trial (for MLflow params)

    @property
    def trained(self) -> bool:
        return get_method(self.method_name).trained

    @property
    def merges(self) -> bool:
        """Merges other trials' fitted models (soups, Model Stock): it runs after them."""
        return get_method(self.method_name).merges

    def config(self) -> dict[str, Any]:
        """What Ray Tune's search space holds for this trial: its entry and grid values."""
        return {"label": self.label, **self.hparams}


@dataclass(frozen=True)
class Job:
    """One job of the ensemble stage. `ensemble` None: the job on CACHED outputs, which
    computes the trial alone, every output-space point and the weight-space endpoints;
    else one interior point of a weight-space ensemble, which needs its own forward pass."""

    trial: str
    ensemble: str | None = None
    coefficients: dict[str, float] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {"trial": self.trial, "ensemble": self.ensemble,
                "coefficients": dict(self.coefficients)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Job":
        return cls(config["trial"], config["ensemble"], dict(config["coefficients"]))

    @property
    def key(self) -> str:
        """A file name for the job's record: readable, and unique through a short hash."""
        digest = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()
        return f"{self.trial}.{self.ensemble or 'cached'}.{digest[:10]}"

    def describe(self) -> str:
        if self.ensemble is None:
            return f"{self.trial} (cached outputs)"
        values = ", ".join(f"{k}={v:g}" for k, v in self.coefficients.items())
        return f"{self.trial} ({self.ensemble}, {values})"


def _name_part(value: Any) -> str:
    """A grid value as part of a trial name, which becomes a file and folder name: a path
    (`checkpoint`'s grid over `path`) keeps its file name only."""
    text = Path(value).name if isinstance(value, str) and "/" in value else str(value)
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", text)


class Plan:
    """Trials, jobs and the order of points of one spec (expanded once: Tune's callbacks
    look trials up on every trial end and checkpoint)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    @functools.cached_property
    def trials(self) -> tuple[Trial, ...]:
        """Every method entry's grid expanded, entries in file order, last key fastest."""
        out: list[Trial] = []
        for entry in self.spec.methods:
            for i, (hparams, options, seed) in enumerate(entry.points()):
                values = "_".join(f"{k}={_name_part(v)}" for k, v in hparams.items())
                name = f"{entry.label}-{i:02d}" + (f"_{values}" if values else "")
                out.append(Trial(name, entry.label, entry.method_name, options, seed, hparams))
        return tuple(out)

    @property
    def trained(self) -> list[Trial]:
        return [t for t in self.trials if t.trained]

    @functools.cached_property
    def _by_name(self) -> dict[str, Trial]:
        return {t.name: t for t in self.trials}

    def members(self, trial: Trial) -> list[Trial]:
        """The trials a merging trial merges: those of the entry its `of` names."""
        return [t for t in self.trials if t.label == trial.options.of]

    def trial(self, name: str) -> Trial:
        return self._by_name[name]

    def trial_for(self, config: dict[str, Any]) -> Trial:
        """The trial a Tune config stands for (`Trial.config`)."""
        for trial in self.trials:
            if trial.config() == config:
                return trial
        raise KeyError(f"no trial of {config.get('label')!r} with {config}")

    def ensembles_for(self, trial: Trial) -> list[EnsembleEntry]:
        return [e for e in self.spec.ensembles
                if trial.trained and (e.methods is None or trial.label in e.methods)]

    def ensemble(self, name: str) -> EnsembleEntry:
        return next(e for e in self.spec.ensembles if e.name == name)

    def num_points(self) -> int:
        """Rows of the final table: each trial alone, plus every ensemble point."""
        return sum(1 + sum(len(e.points()) for e in self.ensembles_for(t)) for t in self.trials)

    def needs_train_outputs(self, trial: Trial) -> bool:
        """An output-space ensemble of this trial reads image features of the training
        split (VRF's zero-shot-failure set)."""
        return any(e.ensemble.mixes == OUTPUTS and e.ensemble.needs_features
                   for e in self.ensembles_for(trial))

    def weight_points(self, trial: Trial) -> list[tuple[str, dict[str, float]]]:
        """(ensemble, coefficients) of every weight-space point that needs its own forward
        pass: all but the endpoints, which are the members themselves."""
        out = []
        for entry in self.ensembles_for(trial):
            if entry.ensemble.mixes != WEIGHTS:
                continue
            endpoint = entry.ensemble.endpoint
            out += [(entry.name, c) for c in entry.points() if endpoint(c) is None]
        return out

    def jobs(self, trials: list[Trial] | None = None, skip: set[str] = frozenset()) -> list[Job]:
        """Per trial the job on cached outputs, then one job per interior weight-space
        point; `skip`: names of trials with no model (stopped early by the search)."""
        out = []
        for trial in self.trials if trials is None else trials:
            if trial.name in skip:
                continue
            out.append(Job(trial.name))
            out += [Job(trial.name, name, c) for name, c in self.weight_points(trial)]
        return out

    def finished_rows(self, done: dict[str, list[Row]]) -> list[Row]:
        """The rows of every finished job (`done`: the journal's points), in sweep order."""
        return sort_rows([row for job in self.jobs() if job.key in done
                          for row in done[job.key]])

    @functools.cached_property
    def _positions(self) -> dict[tuple[str, str, str], int]:
        order: dict[tuple[str, str, str], int] = {}
        for trial in self.trials:
            order[(trial.name, ALONE, "{}")] = len(order)
            for entry in self.ensembles_for(trial):
                for coefficients in entry.points():
                    order[(trial.name, entry.name, _coefficients_key(coefficients))] = len(order)
        return order

    def position(self, trial: str, ensemble: str, coefficients: dict[str, float]) -> int:
        """THE order of points: trials in sweep order; per trial the model alone, then each
        ensemble (in file order) over its grid (last coefficient fastest)."""
        return self._positions[(trial, ensemble, _coefficients_key(coefficients))]


def _coefficients_key(coefficients: dict[str, float]) -> str:
    return json.dumps({k: float(v) for k, v in coefficients.items()}, sort_keys=True)
