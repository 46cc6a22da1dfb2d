"""A sweep's table: its rows in the sweep's order, the Pareto front over all of them, and
the point each (method, ensemble) group chooses on ID validation.

Both axes are maximised: ID accuracy (ID test) and OOD accuracy (mean over shifts). A
point is on the front when no other point is at least as good on both and better on one.
The choice never looks at a test set (`row.select`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from orchestrator.records.row import ALONE, Row, select, sort_rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """on_front flag for each (x, y) point, maximising both coordinates."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y)
            for j, (ox, oy) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def groups(rows: Sequence[Row]) -> dict[tuple[str, str], list[int]]:
    """Row indices per (method, ensemble), in first-seen order."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        out.setdefault(row.group, []).append(i)
    return out


def group_label(group: tuple[str, str]) -> str:
    method, ensemble = group
    return method if ensemble == ALONE else f"{method} + {ensemble}"


@dataclass(frozen=True)
class Table:
    """Every point of a sweep, in the sweep's order, with the front and the choices."""

    rows: tuple[Row, ...]
    on_front: tuple[bool, ...]
    chosen: dict[tuple[str, str], int]      # group -> index of its chosen row
    selected: int | None                    # the best ID validation accuracy overall

    @classmethod
    def of(cls, rows: Sequence[Row]) -> "Table":
        rows = tuple(sort_rows(rows))
        flags = tuple(pareto_front([(r["id_acc"], r["ood_acc"]) for r in rows]))
        chosen = {group: select(rows, indices) for group, indices in groups(rows).items()}
        return cls(rows, flags, chosen, select(rows) if rows else None)

    def is_chosen(self, index: int) -> bool:
        return index in self.chosen.values()

    def index_of(self, key: str) -> int | None:
        return next((i for i, r in enumerate(self.rows) if r.key == key), None)
