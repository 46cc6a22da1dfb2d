"""Pareto front, selection on ID validation, and the plot."""
from __future__ import annotations

from orchestrator.pareto import pareto_front, pareto_table, plot_pareto, select_on_validation


def test_front_on_hand_made_points():
    points = [(0.6, 0.5), (0.8, 0.55), (0.9, 0.45), (0.7, 0.5), (0.9, 0.40), (0.8, 0.55)]
    # (0.6,.5) is dominated by (.8,.55); (.7,.5) too; (.9,.40) by (.9,.45); the two
    # identical (.8,.55) points do not dominate each other.
    assert pareto_front(points) == [False, True, True, False, False, True]


def test_selection_uses_validation_only_and_breaks_ties_towards_zero_shot():
    rows = [
        {"alpha": 0.0, "val_acc": 0.60, "val_nll": 1.0, "id_acc": 0.99},
        {"alpha": 0.5, "val_acc": 0.80, "val_nll": 0.7, "id_acc": 0.10},
        {"alpha": 0.7, "val_acc": 0.80, "val_nll": 0.7, "id_acc": 0.20},
        {"alpha": 1.0, "val_acc": 0.80, "val_nll": 0.9, "id_acc": 0.30},
    ]
    assert select_on_validation(rows) == 1   # test accuracy (id_acc) is never looked at


def test_plot_has_a_curve_per_trial(tmp_path):
    rows = pareto_table([
        {"trial": t, "alpha": a, "id_acc": 0.5 + 0.4 * a, "ood_acc": 0.4 + 0.2 * a * (1 - a) + s}
        for t, s in (("ft-00", 0.0), ("ft-01", 0.01)) for a in (0.0, 0.5, 1.0)])
    fig = plot_pareto(rows, "test", selected=1)
    curves = [line for line in fig.axes[0].get_lines() if line.get_marker() == "o"]
    assert len(curves) == 2
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith("zero-shot") for t in texts) and any(t.startswith("fine-tuned") for t in texts)
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
