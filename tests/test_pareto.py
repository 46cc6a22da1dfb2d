"""Pareto front, the choice on ID validation per (method, ensemble), and the plots."""
from __future__ import annotations

from orchestrator.pareto import (chosen_per_group, pareto_front, pareto_table, plot_calibration,
                                 plot_pareto, plot_reliability, select_on_validation)


def test_front_on_hand_made_points():
    points = [(0.6, 0.5), (0.8, 0.55), (0.9, 0.45), (0.7, 0.5), (0.9, 0.40), (0.8, 0.55)]
    # (0.6,.5) is dominated by (.8,.55); (.7,.5) too; (.9,.40) by (.9,.45); the two
    # identical (.8,.55) points do not dominate each other.
    assert pareto_front(points) == [False, True, True, False, False, True]


def test_selection_uses_validation_only_and_breaks_ties_towards_grid_order():
    rows = [
        {"val_acc": 0.60, "val_nll": 1.0, "id_acc": 0.99},
        {"val_acc": 0.80, "val_nll": 0.7, "id_acc": 0.10},
        {"val_acc": 0.80, "val_nll": 0.7, "id_acc": 0.20},
        {"val_acc": 0.80, "val_nll": 0.9, "id_acc": 0.30},
    ]
    assert select_on_validation(rows) == 1   # test accuracy (id_acc) is never looked at
    assert select_on_validation(rows, [2, 3]) == 2


def bins(acc):
    return [[0.0] * 14 + [10.0], [0.0] * 14 + [9.5], [0.0] * 14 + [10 * acc]]


def sweep_rows():
    """Two trials of ft with WiSE-FT over alpha and VRF over (a, b), plus zero-shot."""
    rows = [{"trial": "zeroshot-00", "method": "zeroshot", "ensemble": "none", "coefficients": {},
             "id_acc": 0.5, "ood_acc": 0.40, "ood_ece": 0.2, "val_acc": 0.5, "val_nll": 1.0,
             "id_ece": 0.1, "reliability": {"id": bins(0.5), "ood": bins(0.4)}}]
    for trial, shift in (("ft-00", 0.0), ("ft-01", 0.01)):
        for ensemble, grid in (("none", [{}]), ("wise_ft", [{"alpha": a} for a in (0.0, 0.5, 1.0)]),
                               ("vrf", [{"a": a, "b": b} for a in (0.5, 1.0) for b in (0.2, 0.6)])):
            for c in grid:
                x = c.get("alpha", 1.0 if ensemble == "none" else 0.3 * c.get("a", 0) + c.get("b", 0))
                rows.append({"trial": trial, "method": "ft", "ensemble": ensemble,
                             "coefficients": c, "id_acc": 0.5 + 0.4 * x,
                             "ood_acc": 0.4 + 0.2 * x * (1 - x) + shift, "ood_ece": 0.3 - 0.1 * x,
                             "id_ece": 0.05, "val_acc": 0.5 + 0.4 * x - shift, "val_nll": 1 - x,
                             "reliability": {"id": bins(0.9), "ood": bins(0.5)}})
    return rows


def test_every_group_chooses_its_own_best_validation_point():
    rows = pareto_table(sweep_rows())
    chosen = chosen_per_group(rows)
    assert set(chosen) == {("zeroshot", "none"), ("ft", "none"), ("ft", "wise_ft"), ("ft", "vrf")}
    for (method, ensemble), index in chosen.items():
        group = [r for r in rows if (r["method"], r["ensemble"]) == (method, ensemble)]
        assert rows[index]["val_acc"] == max(r["val_acc"] for r in group)
        assert rows[index]["chosen"]
    assert sum(r["chosen"] for r in rows) == 4


def test_plots_have_a_curve_per_trial_and_ensemble_and_mark_the_choices(tmp_path):
    rows = pareto_table(sweep_rows())
    fig = plot_pareto(rows, "test")
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("Pareto")]
    trained = {r["trial"] for r in rows if r["method"] != "zeroshot"}
    # one curve per (trained trial, ensemble): WiSE-FT solid, VRF dotted
    assert sorted(line.get_linestyle() for line in curves) == \
        sorted(["-"] * len(trained) + [":"] * len(trained))
    labels = ax.get_legend_handles_labels()[1]
    assert {"zeroshot", "ft", "ft + wise_ft", "ft + vrf", "chosen on ID validation"} <= set(labels)
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    calib = plot_calibration(rows, "test")
    assert calib.axes[0].get_xlabel().startswith("OOD ECE")
    reliability = plot_reliability(rows, "ft", "test")
    assert len(reliability.axes) == 3 * 2            # none, wise_ft, vrf x (ID, OOD)
