"""Pareto front, the choice on ID validation per (method, ensemble), and the plots, on
typed rows (`records.row.Row`) in a table (`records.table.Table`)."""
from __future__ import annotations

import random

import pytest

from orchestrator.records.plots import plot_calibration, plot_pareto, plot_reliability
from orchestrator.records.row import ALONE, Row, select, sort_rows
from orchestrator.records.table import Table, pareto_front


def test_front_on_hand_made_points():
    points = [(0.6, 0.5), (0.8, 0.55), (0.9, 0.45), (0.7, 0.5), (0.9, 0.40), (0.8, 0.55)]
    # (0.6,.5) is dominated by (.8,.55); (.7,.5) too; (.9,.40) by (.9,.45); the two
    # identical (.8,.55) points do not dominate each other.
    assert pareto_front(points) == [False, True, True, False, False, True]


def point(position: int, **metrics: float) -> Row:
    return Row(trial=f"ft-{position:02d}", method="ft", ensemble=ALONE, coefficients={},
               position=position, metrics=metrics)


def test_selection_uses_validation_only_and_breaks_ties_towards_grid_order():
    rows = [
        point(0, val_acc=0.60, val_nll=1.0, id_acc=0.99),
        point(1, val_acc=0.80, val_nll=0.7, id_acc=0.10),
        point(2, val_acc=0.80, val_nll=0.7, id_acc=0.20),
        point(3, val_acc=0.80, val_nll=0.9, id_acc=0.30),
    ]
    assert select(rows) == 1   # test accuracy (id_acc) is never looked at
    assert select(rows, [2, 3]) == 2
    # the tie goes to the earlier point in the sweep's order, not in the list
    rows[1], rows[2] = point(5, **rows[1].metrics), point(4, **rows[2].metrics)
    assert select(rows) == 2
    with pytest.raises(ValueError, match="no points"):
        select(rows, [])


def test_a_row_reads_its_metrics_and_goes_to_json_and_back():
    row = Row(trial="ft-00_lr=0.001", method="ft", ensemble="vrf",
              coefficients={"a": 1.5, "b": 0.6}, position=7,
              metrics={"id_acc": 0.75, "val_acc": 0.5, "vrf_zsf_size": 12.0},
              reliability={"id": bins(0.75)})
    assert row["id_acc"] == 0.75 and row.group == ("ft", "vrf")
    with pytest.raises(KeyError):
        row["ood_acc"]
    assert row.coefficients_text == "a=1.5, b=0.6"
    assert row.name == "ft-00_lr=0.001 vrf a=1.5, b=0.6"
    assert row.key == "point/ft-00_lr=0.001/vrf/a=1.5, b=0.6"
    assert Row.from_dict(row.to_dict()) == row
    alone = Row("ft-00", "ft", ALONE, {}, 0, {"id_acc": 0.7})
    assert alone.name == "ft-00" and alone.coefficients_text == "-"
    with pytest.raises(AttributeError):
        alone.position = 3                             # frozen: never changed once made


def bins(acc):
    return [[0.0] * 14 + [10.0], [0.0] * 14 + [9.5], [0.0] * 14 + [10 * acc]]


def sweep_rows() -> list[Row]:
    """Two trials of ft with WiSE-FT over alpha and VRF over (a, b), plus zero-shot, in
    the sweep's order (their positions)."""
    rows = [Row("zeroshot-00", "zeroshot", ALONE, {}, 0,
                {"id_acc": 0.5, "ood_acc": 0.40, "ood_ece": 0.2, "val_acc": 0.5,
                 "val_nll": 1.0, "id_ece": 0.1},
                {"id": bins(0.5), "ood": bins(0.4)})]
    for trial, shift in (("ft-00", 0.0), ("ft-01", 0.01)):
        for ensemble, grid in ((ALONE, [{}]), ("wise_ft", [{"alpha": a} for a in (0.0, 0.5, 1.0)]),
                               ("vrf", [{"a": a, "b": b} for a in (0.5, 1.0) for b in (0.2, 0.6)])):
            for c in grid:
                x = c.get("alpha", 1.0 if ensemble == ALONE else 0.3 * c.get("a", 0) + c.get("b", 0))
                rows.append(Row(trial, "ft", ensemble, c, len(rows),
                                {"id_acc": 0.5 + 0.4 * x,
                                 "ood_acc": 0.4 + 0.2 * x * (1 - x) + shift,
                                 "ood_ece": 0.3 - 0.1 * x, "id_ece": 0.05,
                                 "val_acc": 0.5 + 0.4 * x - shift, "val_nll": 1 - x},
                                {"id": bins(0.9), "ood": bins(0.5)}))
    return rows


def test_the_table_lists_rows_in_the_sweeps_order_whatever_order_they_came_in():
    rows = sweep_rows()
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    assert shuffled != rows and sort_rows(shuffled) == rows
    table = Table.of(shuffled)
    assert table.rows == tuple(rows) and table == Table.of(rows)
    assert table.index_of(rows[3].key) == 3 and table.index_of("point/nope/none/-") is None


def test_every_group_chooses_its_own_best_validation_point():
    table = Table.of(sweep_rows())
    rows = table.rows
    assert len(table.on_front) == len(rows)
    assert table.on_front == tuple(pareto_front([(r["id_acc"], r["ood_acc"]) for r in rows]))
    assert set(table.chosen) == {("zeroshot", ALONE), ("ft", ALONE), ("ft", "wise_ft"),
                                 ("ft", "vrf")}
    for (method, ensemble), index in table.chosen.items():
        group = [r for r in rows if (r.method, r.ensemble) == (method, ensemble)]
        assert rows[index].group == (method, ensemble)
        assert rows[index]["val_acc"] == max(r["val_acc"] for r in group)
        assert table.is_chosen(index)
    assert sum(table.is_chosen(i) for i in range(len(rows))) == 4
    best = max(r["val_acc"] for r in rows)
    assert rows[table.selected]["val_acc"] == best
    assert Table.of([]).selected is None


def test_plots_have_a_curve_per_trial_and_ensemble_and_mark_the_choices(tmp_path):
    table = Table.of(sweep_rows())
    fig = plot_pareto(table, "test")
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("Pareto")]
    trained = {r.trial for r in table.rows if r.method != "zeroshot"}
    # one curve per (trained trial, ensemble): WiSE-FT solid, VRF dotted
    assert sorted(line.get_linestyle() for line in curves) == \
        sorted(["-"] * len(trained) + [":"] * len(trained))
    # a key per trial (these names hold no grid values, so in full), per ensemble, per mark
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"zeroshot", "ft-00", "ft-01", "wise_ft", "vrf", "model alone (no ensemble)",
            "chosen on ID validation", "Pareto front (all points)"} <= set(labels)
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    calib = plot_calibration(table, "test")
    assert calib.axes[0].get_xlabel().startswith("OOD ECE")
    reliability = plot_reliability(table, "ft", "test")
    assert len(reliability.axes) == 3 * 2            # none, wise_ft, vrf x (ID, OOD)
