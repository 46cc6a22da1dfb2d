"""What `orch report` prints (the chosen point per method and ensemble; every point with
its front and choice marks) and what `--json` / `--csv` give machines, from a table of
typed rows: the same table whatever order the rows were recorded in."""
from __future__ import annotations

import csv
import io
import json

import pytest

from orchestrator.commands.compare import to_csv, to_json
from orchestrator.commands.report import FoundSweep, format_points, format_summary
from orchestrator.records.row import ALONE, Row
from orchestrator.records.table import Table


def metrics(id_acc: float, ood_acc: float, val_acc: float) -> dict[str, float]:
    return {"id_acc": id_acc, "ood_acc": ood_acc, "val_acc": val_acc, "val_nll": 1 - val_acc,
            "id_ece": 0.05, "ood_ece": 0.2, "id_ece_ts": 0.04, "ood_ece_ts": 0.15}


def table() -> Table:
    """zero-shot; ft alone; ft + WiSE-FT at three alphas (alpha 0.5 best on ID val and
    on OOD; alpha 0 and 1 dominated by nothing else)."""
    rows = [Row("zeroshot-00", "zeroshot", ALONE, {}, 0, metrics(0.50, 0.40, 0.50)),
            Row("ft-00_lr=0.001", "ft", ALONE, {}, 1, metrics(0.90, 0.30, 0.88))]
    for i, (alpha, m) in enumerate([(0.0, metrics(0.50, 0.40, 0.50)),
                                    (0.5, metrics(0.85, 0.45, 0.89)),
                                    (1.0, metrics(0.90, 0.30, 0.88))]):
        rows.append(Row("ft-00_lr=0.001", "ft", "wise_ft", {"alpha": alpha}, 2 + i, m))
    return Table.of(rows[::-1])                 # recorded in any order: listed in the sweep's


def test_the_summary_is_one_line_per_method_and_ensemble_with_its_chosen_point():
    lines = format_summary(table()).splitlines()
    assert lines[0].split()[:3] == ["method", "ensemble", "chosen"] and "OOD ECE TS" in lines[0]
    assert set(lines[1]) == {"-"}
    body = [line.split() for line in lines[2:]]
    assert [b[:2] for b in body] == [["zeroshot", "-"], ["ft", "-"], ["ft", "wise_ft"]]
    assert body[2][2:4] == ["ft-00_lr=0.001", "alpha=0.5"]
    assert body[2][4:] == ["85.0", "45.0", "5.0", "20.0", "4.0", "15.0", "89.0"]
    assert format_summary(Table.of([])) == "(no points recorded yet)"


def test_points_are_listed_in_the_sweeps_order_with_front_and_choice_marks():
    t = table()
    lines = format_points(t).splitlines()[2:]
    assert [line.split()[0] for line in lines] == [r.trial for r in t.rows]
    assert [line.split()[1] for line in lines] == ["-", "-", "wise_ft", "wise_ft", "wise_ft"]
    assert sum("  *" in line for line in lines) == sum(t.on_front)
    chosen = [i for i, line in enumerate(lines) if "<- chosen on ID val" in line]
    assert chosen == sorted(t.chosen.values())
    (best,) = [i for i, line in enumerate(lines) if "(best overall)" in line]
    assert best == t.selected == 3 and "alpha=0.5" in lines[best]


def test_csv_and_json_hold_every_point_its_coefficients_and_the_choices():
    t = table()
    rows = list(csv.DictReader(io.StringIO(to_csv(t))))
    assert [(r["trial"], r["ensemble"], r["alpha"]) for r in rows] == [
        ("zeroshot-00", ALONE, ""), ("ft-00_lr=0.001", ALONE, ""),
        ("ft-00_lr=0.001", "wise_ft", "0.0"), ("ft-00_lr=0.001", "wise_ft", "0.5"),
        ("ft-00_lr=0.001", "wise_ft", "1.0")]
    assert [float(r["id_acc"]) for r in rows] == [r["id_acc"] for r in t.rows]
    assert [r["chosen"] == "True" for r in rows] == [t.is_chosen(i) for i in range(5)]
    assert [r["on_front"] == "True" for r in rows] == list(t.on_front)
    data = json.loads(to_json(FoundSweep("s-1", "e2e", "FINISHED", t)))
    assert (data["sweep_id"], data["status"]) == ("s-1", "FINISHED")
    assert len(data["points"]) == 5 and data["points"][3]["alpha"] == 0.5
    assert [(c["group"], c["coefficients"]) for c in data["chosen"]] == [
        ("zeroshot", {}), ("ft", {}), ("ft + wise_ft", {"alpha": 0.5})]
    assert data["points"][3]["val_acc"] == pytest.approx(0.89)
