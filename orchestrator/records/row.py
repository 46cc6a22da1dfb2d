"""The result of one point of a sweep: one frozen row, the same everywhere it goes (the
ensemble stage makes it; the journal, MLflow, the report, `orch compare`, `orch export`
and `orch sync` read it), with one rule to choose among rows.

A point is a trial alone (`ensemble` "none") or one coefficient point of an ensemble of
it with the zero-shot model. Its metrics are flat: `id_*` (ID test), `val_*` (ID
validation), `ood_*` (the mean over the shifts), `<set>_<metric>` for every set, the
fitted `temperature` and an ensemble's own numbers (`vrf_zsf_size`, ...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ALONE = "none"        # a point's ensemble when it is the trained model alone


@dataclass(frozen=True)
class Row:
    """One point and what it measured (never changed after it is made)."""

    trial: str                          # the trained trial (`plan.Trial.name`)
    method: str                         # its method entry's label
    ensemble: str                       # ALONE or a registered ensemble
    coefficients: dict[str, float]      # {} when ALONE; in the ensemble's coefficient order
    position: int                       # where the point stands in the sweep (`Plan.position`)
    metrics: dict[str, float]
    reliability: dict[str, Any] = field(default_factory=dict)   # bins of ID test and OOD

    def __getitem__(self, metric: str) -> float:
        return self.metrics[metric]

    @property
    def coefficients_text(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.coefficients.items()) or "-"

    @property
    def name(self) -> str:
        """The point as people read it: `ft-00_lr=0.0003`, `ft-00_lr=0.0003 wise_ft alpha=0.4`."""
        return self.trial + ("" if self.ensemble == ALONE else
                             f" {self.ensemble} {self.coefficients_text}")

    @property
    def key(self) -> str:
        """The point's record key (MLflow's `orch.record` tag): unique in its sweep."""
        return f"point/{self.trial}/{self.ensemble}/{self.coefficients_text}"

    @property
    def group(self) -> tuple[str, str]:
        """(method, ensemble): one curve of the plots, one line of the report."""
        return self.method, self.ensemble

    def identity(self) -> dict[str, Any]:
        return {"trial": self.trial, "method": self.method, "ensemble": self.ensemble,
                "coefficients": dict(self.coefficients), "position": self.position}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the identity, `metrics` and `reliability`."""
        return {**self.identity(), "metrics": dict(self.metrics),
                "reliability": dict(self.reliability)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Row":
        return cls(trial=data["trial"], method=data["method"], ensemble=data["ensemble"],
                   coefficients={k: float(v) for k, v in data["coefficients"].items()},
                   position=int(data["position"]),
                   metrics={k: float(v) for k, v in data["metrics"].items()},
                   reliability=dict(data.get("reliability") or {}))

    def identity_json(self) -> str:
        """What MLflow keeps of the point besides its metrics (one param, read back whole)."""
        return json.dumps(self.identity(), sort_keys=True)


def sort_rows(rows: Sequence[Row]) -> list[Row]:
    """The sweep's order (`Plan.position`): the one order of tables, plots and reports."""
    return sorted(rows, key=lambda r: r.position)


def select(rows: Sequence[Row], among: Sequence[int] | None = None) -> int:
    """THE choice among points (never a test set): the best ID validation accuracy, ties to
    the lower ID validation NLL, then to the earlier point in the sweep's order (the first
    point of a WiSE-FT or OSE grid is the one nearest the zero-shot model, the robust end).
    Returns an index into `rows` (among `among`, when given)."""
    indices = list(range(len(rows)) if among is None else among)
    if not indices:
        raise ValueError("no points to select from")
    return min(indices, key=lambda i: (-rows[i]["val_acc"], rows[i]["val_nll"],
                                       rows[i].position))
