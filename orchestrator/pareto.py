"""The Pareto front over every (trial, mixing coefficient) point, the selection on
ID validation, and the plot.

Both axes are maximised: ID accuracy (ID test) and OOD accuracy (mean over shifts).
A point is on the front when no other point is at least as good on both and better
on one. Selection never looks at a test set: the chosen point maximises ID
*validation* accuracy, ties broken by lower validation NLL, then the smaller
coefficient (closer to the zero-shot model, which is the robust end).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; the driver may have no display
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """on_front flag for each (x, y) point, maximising both coordinates."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y)
            for j, (ox, oy) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def select_on_validation(rows: Sequence[dict], coefficient: str = "alpha") -> int:
    """Index of the row with the best ID validation accuracy (see module docstring)."""
    if not rows:
        raise ValueError("no points to select from")
    return min(range(len(rows)), key=lambda i: (-rows[i]["val_acc"], rows[i]["val_nll"],
                                                rows[i][coefficient]))


def pareto_table(rows: list[dict]) -> list[dict]:
    """The rows with `on_front` added (rows need id_acc and ood_acc)."""
    flags = pareto_front([(r["id_acc"], r["ood_acc"]) for r in rows])
    return [{**row, "on_front": flag} for row, flag in zip(rows, flags)]


def plot_pareto(rows: Sequence[dict], title: str, coefficient: str = "alpha",
                selected: int | None = None):
    """ID vs OOD accuracy: one curve per trial over the coefficient, endpoints labelled
    (zero-shot at alpha 0, fine-tuned at alpha 1), the front outlined. Returns the Figure."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    trials: dict[str, list[dict]] = {}
    for row in rows:
        trials.setdefault(row["trial"], []).append(row)
    for name, curve in trials.items():
        curve = sorted(curve, key=lambda r: r[coefficient])
        xs = [100 * r["id_acc"] for r in curve]
        ys = [100 * r["ood_acc"] for r in curve]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, label=name)
        if len(curve) > 1:  # the straight line between the endpoints: what mixing beats
            ax.plot([xs[0], xs[-1]], [ys[0], ys[-1]], linestyle=":", color=line.get_color(),
                    linewidth=0.9)
        for end, text in ((curve[0], "zero-shot"), (curve[-1], "fine-tuned")):
            if len(curve) == 1 and text == "fine-tuned":
                continue
            ax.annotate(f"{text} ({coefficient}={end[coefficient]:g})",
                        (100 * end["id_acc"], 100 * end["ood_acc"]), textcoords="offset points",
                        xytext=(6, -10 if text == "fine-tuned" else 6), fontsize=7,
                        color=line.get_color())
    front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r["id_acc"])
    if front:
        ax.plot([100 * r["id_acc"] for r in front], [100 * r["ood_acc"] for r in front],
                color="black", linewidth=2.5, alpha=0.25, label="Pareto front", zorder=0)
    if selected is not None:
        best = rows[selected]
        ax.scatter([100 * best["id_acc"]], [100 * best["ood_acc"]], s=140, facecolors="none",
                   edgecolors="red", linewidths=1.6,
                   label=f"chosen on ID val ({coefficient}={best[coefficient]:g})", zorder=5)
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("OOD accuracy, mean over shifts (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
