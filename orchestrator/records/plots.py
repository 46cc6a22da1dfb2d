"""The plots of a sweep's table: ID vs OOD accuracy (the Pareto plot), the same on logit
axes with the zero-shot point and a baseline (the effective-robustness view of Taori et
al. 2020 and WiSE-FT, Wortsman et al. 2022, Fig. 1), OOD accuracy vs OOD ECE, and
reliability diagrams of each method's chosen points.

Colour is the trial (two learning rates of one method are two colours, each named in the
legend by its method and grid values); line style and marker are the ensemble.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # files only; the driver may have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from orchestrator.records.row import ALONE, Row  # noqa: E402
from orchestrator.records.table import Table, group_label, pareto_front  # noqa: E402
from trainers.ensembles import REGISTRY as ENSEMBLES  # noqa: E402
from trainers.ensembles import ZERO_SHOT_MEMBER, WeightEnsemble  # noqa: E402

_LINESTYLES = {ALONE: "", "wise_ft": "-", "ose": "--", "vrf": ":"}
_MARKERS = {ALONE: "*", "wise_ft": "o", "ose": "s", "vrf": "^"}
# An accuracy of exactly 0 or 1 has an infinite logit: clip it to stay on the axes.
_EPS = 1e-4
# Tick candidates of a logit axis, coarse to fine: the first level that puts at least
# four ticks inside the axis' range is used (a narrow range needs the finer ones).
_LOGIT_TICKS = (
    (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999),
    tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.98, 0.99, 0.995, 0.999),
    tuple(round(0.01 * i, 2) for i in range(1, 100)) + (0.995, 0.998, 0.999),
    tuple(round(0.002 * i, 3) for i in range(1, 500)),
)


def _linestyle(ensemble: str) -> str:
    return _LINESTYLES.get(ensemble, "-.")


def _marker(ensemble: str) -> str:
    return _MARKERS.get(ensemble, "D")


def trial_colours(rows: Iterable[Row]) -> dict[str, Any]:
    """A colour per trial from a qualitative colormap (tab10, tab20 beyond ten trials;
    beyond twenty colours repeat, and the legend's labels still tell trials apart)."""
    trials = list(dict.fromkeys(r.trial for r in rows))
    cmap = plt.get_cmap("tab10" if len(trials) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(trials)}


def trial_label(row: Row) -> str:
    """A trial as the legend names it: its method entry and grid values, `ft lr=0.0003,
    seed=0` for the trial `ft-00_lr=0.0003_seed=0` (names as `plan.Plan.trials` makes
    them); a name of another shape is shown as it is."""
    prefix = f"{row.method}-"
    rest = row.trial[len(prefix):] if row.trial.startswith(prefix) else None
    match = re.fullmatch(r"\d{2,}(?:_(?P<values>.+))?", rest or "")
    if match is None:
        return row.trial
    if not match["values"]:
        return row.method
    # keys are identifiers (may hold '_'); a value runs up to the next `_key=`
    pairs = re.findall(r"(?:^|_)([A-Za-z]\w*?)=(.*?)(?=_[A-Za-z]\w*?=|$)", match["values"])
    shown = ", ".join(f"{k}={v}" for k, v in pairs) if pairs else match["values"]
    return f"{row.method} {shown}"


def _curve(points: list[Row]) -> list[Row]:
    """The points of one trial's ensemble as a curve: in grid order along a single
    coefficient; for several coefficients (VRF's a, b) the front of those points."""
    if len({len(p.coefficients) for p in points}) == 1 and len(points[0].coefficients) == 1:
        (name,) = points[0].coefficients
        return sorted(points, key=lambda r: r.coefficients[name])
    flags = pareto_front([(r["id_acc"], r["ood_acc"]) for r in points])
    return sorted((p for p, on in zip(points, flags) if on), key=lambda r: r["id_acc"])


def _by_trial_and_ensemble(rows: tuple[Row, ...]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        out.setdefault((row.trial, row.ensemble), []).append(row)
    return out


def _draw_points(ax, table: Table, colours: dict[str, Any], scale: float) -> None:
    """ID vs OOD accuracy of every point, times `scale` (100: percent): per trial and
    ensemble its curve over the coefficients (gid `<trial>/<ensemble>`), each model alone
    as a star, the point each (method, ensemble) chose on ID validation circled in its
    trial's colour (so the circle also says which trial won)."""
    for (trial, ensemble), pts in _by_trial_and_ensemble(table.rows).items():
        colour = colours[trial]
        xs, ys = [scale * r["id_acc"] for r in pts], [scale * r["ood_acc"] for r in pts]
        if ensemble == ALONE:
            ax.scatter(xs, ys, s=90, marker="*", color=colour, zorder=4)
            continue
        ax.scatter(xs, ys, s=10, marker=_marker(ensemble), color=colour, alpha=0.5,
                   linewidths=0)
        curve = _curve(pts)
        ax.plot([scale * r["id_acc"] for r in curve], [scale * r["ood_acc"] for r in curve],
                linestyle=_linestyle(ensemble), color=colour, linewidth=1.3,
                gid=f"{trial}/{ensemble}")
    for index in table.chosen.values():
        best = table.rows[index]
        ax.scatter([scale * best["id_acc"]], [scale * best["ood_acc"]], s=130,
                   facecolors="none", edgecolors=[colours[best.trial]], linewidths=1.6,
                   zorder=5)


def _key(table: Table, colours: dict[str, Any]) -> list:
    """Legend handles: a colour patch per trial, named by its method and grid values;
    a grey key per ensemble (its line style and marker); the chosen points' circle."""
    first = {}
    for row in table.rows:
        first.setdefault(row.trial, row)
    labels = {t: trial_label(r) for t, r in first.items()}
    # trials whose names hold no grid values would read alike: name those in full
    alike = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    handles: list = [Patch(color=colours[t], label=t if labels[t] in alike else labels[t])
                     for t in first]
    for ensemble in dict.fromkeys(r.ensemble for r in table.rows):
        if ensemble == ALONE:
            handles.append(Line2D([], [], linestyle="", marker="*", markersize=10,
                                  color="grey", label="model alone (no ensemble)"))
        else:
            handles.append(Line2D([], [], linestyle=_linestyle(ensemble),
                                  marker=_marker(ensemble), markersize=4, color="grey",
                                  label=ensemble))
    handles.append(Line2D([], [], linestyle="", marker="o", markersize=10,
                          markerfacecolor="none", color="grey",
                          label="chosen on ID validation"))
    return handles


def plot_pareto(table: Table, title: str):
    """ID vs OOD accuracy (`_draw_points`), the front of all points shaded."""
    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
    colours = trial_colours(table.rows)
    _draw_points(ax, table, colours, 100)
    handles = _key(table, colours)
    front = sorted((r for r, on in zip(table.rows, table.on_front) if on),
                   key=lambda r: r["id_acc"])
    if front:
        handles += ax.plot([100 * r["id_acc"] for r in front],
                           [100 * r["ood_acc"] for r in front], color="black", linewidth=6,
                           alpha=0.12, label="Pareto front (all points)", zorder=0)
    return _finish(fig, ax, "ID accuracy (%)", "OOD accuracy, mean over shifts (%)", title,
                   handles)


def logit(p):
    """ln(p / (1 - p)) of accuracies (fractions), clipped to [_EPS, 1 - _EPS] first."""
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def expit(z):
    """The inverse of `logit`: 1 / (1 + e^-z)."""
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


def _logit_axis(axis, low: float, high: float) -> None:
    """A logit-scaled axis over accuracies [low, high], ticks labelled in percent."""
    ticks = next((level for level in _LOGIT_TICKS
                  if sum(low <= t <= high for t in level) >= 4), _LOGIT_TICKS[-1])
    axis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda p, _: f"{100 * p:.4g}%"))


def _logit_limits(values: list[float]) -> tuple[float, float]:
    """The accuracies' range, padded by 8 % of its width in logit space."""
    z = logit(values)
    pad = max(0.08 * float(z.max() - z.min()), 0.1)
    return float(expit(z.min() - pad)), float(expit(z.max() + pad))


def zero_shot_point(table: Table, untrained: Iterable[str] = ()) -> Row | None:
    """The zero-shot model's point: an untrained trial alone (a `zeroshot` method entry;
    `untrained` names those trials), else a weight-space ensemble's zero-shot endpoint
    (WiSE-FT's alpha 0), which is the zero-shot model exactly."""
    untrained = set(untrained)
    for row in table.rows:
        if row.ensemble == ALONE and row.trial in untrained:
            return row
    for row in table.rows:
        ensemble = ENSEMBLES.get(row.ensemble)
        if isinstance(ensemble, WeightEnsemble) and \
                ensemble.endpoint(row.coefficients) == ZERO_SHOT_MEMBER:
            return row
    return None


def plot_robustness(table: Table, title: str, zero_shot: Row | None = None,
                    line: Any = None):
    """Effective robustness as Taori et al. and WiSE-FT (Fig. 1) draw it: ID vs OOD
    accuracy (the mean over shifts) on logit axes, where accuracy trends across models
    are close to linear, every point as in the Pareto plot, the zero-shot model marked
    and, given `line` (slope, intercept: logit(OOD) = slope * logit(ID) + intercept),
    that baseline; a point's effective robustness is its height above it."""
    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
    colours = trial_colours(table.rows)
    ax.set_xscale("function", functions=(logit, expit))
    ax.set_yscale("function", functions=(logit, expit))
    _draw_points(ax, table, colours, 1)
    handles = _key(table, colours)
    xs = [r["id_acc"] for r in table.rows]
    ys = [r["ood_acc"] for r in table.rows]
    x_low, x_high = _logit_limits(xs)
    if line is not None:
        # straight in logit space, drawn through accuracies: the scale keeps it straight
        ids = expit(np.linspace(logit(x_low), logit(x_high), 50))
        oods = expit(line.slope * logit(ids) + line.intercept)
        ys += [float(oods[0]), float(oods[-1])]
        sign = "+" if line.intercept >= 0 else "-"
        handles += ax.plot(ids, oods, color="black", linestyle="--", linewidth=1.2,
                           gid="robustness_line", zorder=3,
                           label=f"baseline: logit(OOD) = {line.slope:g} logit(ID) "
                                 f"{sign} {abs(line.intercept):g}")
    if zero_shot is not None:
        handles.append(ax.scatter([zero_shot["id_acc"]], [zero_shot["ood_acc"]], s=160,
                                  marker="P", color="black", zorder=6, gid="zero_shot",
                                  label="zero-shot model"))
        ax.annotate("zero-shot", (zero_shot["id_acc"], zero_shot["ood_acc"]),
                    textcoords="offset points", xytext=(8, -12), fontsize=8)
    y_low, y_high = _logit_limits(ys)
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(y_low, y_high)
    _logit_axis(ax.xaxis, x_low, x_high)
    _logit_axis(ax.yaxis, y_low, y_high)
    return _finish(fig, ax, "ID accuracy (logit scale)",
                   "OOD accuracy, mean over shifts (logit scale)", title, handles)


def plot_calibration(table: Table, title: str):
    """OOD accuracy vs OOD ECE per trial (colour) and ensemble (marker); chosen points
    circled in their trial's colour."""
    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    colours = trial_colours(table.rows)
    for (trial, ensemble), pts in _by_trial_and_ensemble(table.rows).items():
        alone = ensemble == ALONE
        ax.scatter([100 * r["ood_ece"] for r in pts], [100 * r["ood_acc"] for r in pts],
                   s=90 if alone else 12, marker=_marker(ensemble), color=colours[trial],
                   alpha=1.0 if alone else 0.6, linewidths=0)
    for index in table.chosen.values():
        best = table.rows[index]
        ax.scatter([100 * best["ood_ece"]], [100 * best["ood_acc"]], s=110,
                   facecolors="none", edgecolors=[colours[best.trial]], linewidths=1.5,
                   zorder=5)
    return _finish(fig, ax, "OOD ECE, mean over shifts (%)  - lower is better",
                   "OOD accuracy, mean over shifts (%)", title, _key(table, colours))


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, handles: list):
    """Labels, grid and the legend outside the axes (a key per trial and per ensemble is
    too many to sit on the data)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0, ncol=1 if len(handles) <= 30 else 2)
    fig.tight_layout()
    return fig


def plot_reliability(table: Table, method: str, title: str):
    """Reliability diagrams of `method`'s chosen points, one row per ensemble, ID test and
    all shifts pooled side by side: accuracy per confidence bin against the diagonal."""
    chosen = {g: i for g, i in table.chosen.items() if g[0] == method}
    fig, axes = plt.subplots(len(chosen), 2, figsize=(7, 3.2 * len(chosen)), dpi=110,
                             squeeze=False)
    for (group, index), row_axes in zip(chosen.items(), axes):
        row = table.rows[index]
        for ax, (part, name, ece) in zip(row_axes, (("id", "ID test", "id_ece"),
                                                     ("ood", "OOD (shifts pooled)", "ood_ece"))):
            bins = row.reliability.get(part)
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
            ax.set_title(f"{group_label(group)} ({row.coefficients_text}): {name}, "
                         f"ECE {100 * row[ece]:.1f}", fontsize=7.5)
            ax.set_xlabel("confidence", fontsize=8)
            ax.set_ylabel("accuracy", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
