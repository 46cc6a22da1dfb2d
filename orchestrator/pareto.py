"""The Pareto front over every point of a sweep, the choice on ID validation, and the
plots.

A row is one point: a trained trial alone (ensemble "none"), or one coefficient point of
an ensemble of it with the zero-shot model. Rows group by (method, ensemble); each group
is one curve in the plots and one line of the report.

Both axes are maximised: ID accuracy (ID test) and OOD accuracy (mean over shifts). A
point is on the front when no other point is at least as good on both and better on one.
The choice never looks at a test set: within a group it maximises ID *validation*
accuracy, ties broken by lower validation NLL, then by grid order (the first point of a
WiSE-FT or OSE grid is the one nearest the zero-shot model, the robust end).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; the driver may have no display
import matplotlib.pyplot as plt  # noqa: E402

NONE = "none"   # the trained model alone


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """on_front flag for each (x, y) point, maximising both coordinates."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y)
            for j, (ox, oy) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def group_of(row: dict) -> tuple[str, str]:
    return row["method"], row["ensemble"]


def group_label(group: tuple[str, str]) -> str:
    method, ensemble = group
    return method if ensemble == NONE else f"{method} + {ensemble}"


def coefficients_text(row: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in row["coefficients"].items()) or "-"


def point_name(row: dict) -> str:
    """A point as people read it: `ft-00_lr=0.0003`, `ft-00_lr=0.0003 wise_ft alpha=0.4`."""
    return row["trial"] + ("" if row["ensemble"] == NONE else
                           f" {row['ensemble']} {coefficients_text(row)}")


def groups(rows: Sequence[dict]) -> dict[tuple[str, str], list[int]]:
    """Row indices per (method, ensemble), in first-seen order."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        out.setdefault(group_of(row), []).append(i)
    return out


def select_on_validation(rows: Sequence[dict], indices: Sequence[int] | None = None) -> int:
    """Index of the row (among `indices`) chosen on ID validation (module docstring)."""
    indices = list(range(len(rows)) if indices is None else indices)
    if not indices:
        raise ValueError("no points to select from")
    return min(indices, key=lambda i: (-rows[i]["val_acc"], rows[i]["val_nll"], i))


def pareto_table(rows: list[dict]) -> list[dict]:
    """The rows with `on_front` (over all points) and `chosen` (the choice of its
    group) added. Rows need id_acc, ood_acc, val_acc and val_nll."""
    flags = pareto_front([(r["id_acc"], r["ood_acc"]) for r in rows])
    chosen = set(chosen_per_group(rows).values())
    return [{**row, "on_front": flag, "chosen": i in chosen}
            for i, (row, flag) in enumerate(zip(rows, flags))]


def chosen_per_group(rows: Sequence[dict]) -> dict[tuple[str, str], int]:
    return {group: select_on_validation(rows, indices) for group, indices in groups(rows).items()}


_LINESTYLES = {NONE: "", "wise_ft": "-", "ose": "--", "vrf": ":"}
_MARKERS = {NONE: "*", "wise_ft": "o", "ose": "s", "vrf": "^"}


def _colours(rows: Sequence[dict]):
    """A colour per method (line styles and markers tell the ensembles apart)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _curve(points: list[dict]) -> list[dict]:
    """The points of one trial's ensemble as a curve: in grid order along a single
    coefficient; for several coefficients (VRF's a, b) the front of those points."""
    if len({len(p["coefficients"]) for p in points}) == 1 and len(points[0]["coefficients"]) == 1:
        (name,) = points[0]["coefficients"]
        return sorted(points, key=lambda r: r["coefficients"][name])
    flags = pareto_front([(r["id_acc"], r["ood_acc"]) for r in points])
    return sorted((p for p, on in zip(points, flags) if on), key=lambda r: r["id_acc"])


def plot_pareto(rows: Sequence[dict], title: str):
    """ID vs OOD accuracy. Per trial and ensemble its curve over the coefficients (colour =
    method, line style = ensemble), each trained model alone as a star, the point each
    (method, ensemble) chose on ID validation circled, the front of all points shaded."""
    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
    colours = _colours(rows)
    labelled: set[tuple[str, str]] = set()
    for (trial, ensemble), indices in _by_trial_and_ensemble(rows).items():
        pts = [rows[i] for i in indices]
        group = group_of(pts[0])
        colour = colours[group[0]]
        label = group_label(group) if group not in labelled else None
        labelled.add(group)
        xs, ys = [100 * r["id_acc"] for r in pts], [100 * r["ood_acc"] for r in pts]
        if ensemble == NONE:
            ax.scatter(xs, ys, s=90, marker="*", color=colour, label=label, zorder=4)
            continue
        ax.scatter(xs, ys, s=10, marker=_MARKERS.get(ensemble, "D"), color=colour, alpha=0.5,
                   linewidths=0)
        curve = _curve(pts)
        ax.plot([100 * r["id_acc"] for r in curve], [100 * r["ood_acc"] for r in curve],
                linestyle=_LINESTYLES.get(ensemble, "-."), color=colour, linewidth=1.3,
                label=label)
    for group, index in chosen_per_group(rows).items():
        best = rows[index]
        ax.scatter([100 * best["id_acc"]], [100 * best["ood_acc"]], s=130, facecolors="none",
                   edgecolors=colours[group[0]], linewidths=1.6, zorder=5)
    front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r["id_acc"])
    if front:
        ax.plot([100 * r["id_acc"] for r in front], [100 * r["ood_acc"] for r in front],
                color="black", linewidth=6, alpha=0.12, label="Pareto front (all points)",
                zorder=0)
    ax.scatter([], [], s=130, facecolors="none", edgecolors="grey",
               label="chosen on ID validation")
    return _finish(fig, ax, "ID accuracy (%)", title)


def _by_trial_and_ensemble(rows: Sequence[dict]) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        out.setdefault((row["trial"], row["ensemble"]), []).append(i)
    return out


def plot_calibration(rows: Sequence[dict], title: str):
    """OOD accuracy vs OOD ECE per (method, ensemble); chosen points circled."""
    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    colours = _colours(rows)
    chosen = chosen_per_group(rows)
    for group, indices in groups(rows).items():
        method, ensemble = group
        pts = [rows[i] for i in indices]
        colour = colours[method]
        ax.scatter([100 * r["ood_ece"] for r in pts], [100 * r["ood_acc"] for r in pts],
                   s=12 if ensemble != NONE else 90, marker=_MARKERS.get(ensemble, "D"),
                   color=colour, alpha=0.6 if ensemble != NONE else 1.0, linewidths=0,
                   label=group_label(group))
        best = rows[chosen[group]]
        ax.scatter([100 * best["ood_ece"]], [100 * best["ood_acc"]], s=110, facecolors="none",
                   edgecolors=colour, linewidths=1.5, zorder=5)
    return _finish(fig, ax, "OOD ECE, mean over shifts (%)  - lower is better", title)


def _finish(fig, ax, xlabel: str, title: str):
    """Labels, grid and a legend outside the axes (a curve per method x ensemble is
    too many to sit on the data)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("OOD accuracy, mean over shifts (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_reliability(rows: Sequence[dict], method: str, title: str):
    """Reliability diagrams of `method`'s chosen points, one row per ensemble, ID test and
    all shifts pooled side by side: accuracy per confidence bin against the diagonal."""
    chosen = {g: i for g, i in chosen_per_group(rows).items() if g[0] == method}
    fig, axes = plt.subplots(len(chosen), 2, figsize=(7, 3.2 * len(chosen)), dpi=110,
                             squeeze=False)
    for (group, index), row_axes in zip(chosen.items(), axes):
        row = rows[index]
        for ax, (part, name, ece) in zip(row_axes, (("id", "ID test", "id_ece"),
                                                     ("ood", "OOD (shifts pooled)", "ood_ece"))):
            bins = row["reliability"].get(part)
            if bins is None:
                ax.set_axis_off()
                continue
            count, sum_conf, sum_correct = bins
            n_bins = len(count)
            centres = [(b + 0.5) / n_bins for b in range(n_bins)]
            acc = [c and a / c for a, c in zip(sum_correct, count)]
            conf = [c and s / c for s, c in zip(sum_conf, count)]
            ax.bar(centres, acc, width=1 / n_bins, edgecolor="black", linewidth=0.4,
                   color="#4c72b0", label="accuracy")
            ax.bar(centres, [c - a if n else 0 for c, a, n in zip(conf, acc, count)],
                   bottom=acc, width=1 / n_bins, color="#dd8452", alpha=0.5, label="gap")
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{group_label(group)} ({coefficients_text(row)}): {name}, "
                         f"ECE {100 * row[ece]:.1f}", fontsize=7.5)
            ax.set_xlabel("confidence", fontsize=8)
            ax.set_ylabel("accuracy", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
