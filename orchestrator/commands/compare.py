"""A sweep's points for machines (`orch report --json | --csv`) and two sweeps side by
side (`orch compare`)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.commands.report import FoundSweep, format_summary  # noqa: E402
from orchestrator.records.table import Table, group_label, pareto_front  # noqa: E402


def flat_rows(table: Table) -> list[dict]:
    """One flat dict per point: its names, each coefficient as a column, its metrics,
    `on_front` and `chosen` (on ID validation, within its method and ensemble)."""
    names = list(dict.fromkeys(k for r in table.rows for k in r.coefficients))
    out = []
    for i, row in enumerate(table.rows):
        flat = {"trial": row.trial, "method": row.method, "ensemble": row.ensemble}
        flat.update({k: row.coefficients.get(k) for k in names})
        flat.update(dict(sorted(row.metrics.items())))
        flat["on_front"] = table.on_front[i]
        flat["chosen"] = table.is_chosen(i)
        out.append(flat)
    return out


def to_json(found: FoundSweep) -> str:
    rows = found.table.rows
    chosen = [{"group": group_label(g), "trial": rows[i].trial, "method": rows[i].method,
               "ensemble": rows[i].ensemble, "coefficients": rows[i].coefficients}
              for g, i in found.table.chosen.items()]
    return json.dumps({"sweep_id": found.sweep_id, "experiment": found.experiment,
                       "status": found.status, "points": flat_rows(found.table),
                       "chosen": chosen, "stopped": found.stopped,
                       "notes": found.notes}, indent=1)


def to_csv(table: Table) -> str:
    flat = flat_rows(table)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in flat for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def compare_sweeps(found: list[FoundSweep], out: str) -> str:
    """Both sweeps' Pareto fronts (ID vs OOD accuracy over all their points) on one plot
    written to `out`, and each sweep's chosen points, one table per sweep."""
    fig, ax = plt.subplots(figsize=(8.5, 6), dpi=120)
    lines = []
    for sweep, colour in zip(found, ("tab:blue", "tab:orange")):
        rows = sweep.table.rows
        xs = [100 * r["id_acc"] for r in rows]
        ys = [100 * r["ood_acc"] for r in rows]
        ax.scatter(xs, ys, s=8, color=colour, alpha=0.35, linewidths=0)
        front = sorted((r for r, on in zip(rows, pareto_front(list(zip(xs, ys)))) if on),
                       key=lambda r: r["id_acc"])
        ax.plot([100 * r["id_acc"] for r in front], [100 * r["ood_acc"] for r in front],
                marker="o", markersize=4, color=colour, label=f"{sweep.sweep_id} (front)")
        lines += [f"sweep {sweep.sweep_id} ({sweep.status}): {len(rows)} points, "
                  f"{len(front)} on its front", format_summary(sweep.table), ""]
        best = max(front, key=lambda r: r["ood_acc"], default=None)
        if best is not None:
            lines.insert(-1, f"  best OOD on the front: {100 * best['ood_acc']:.1f} at ID "
                             f"{100 * best['id_acc']:.1f} ({best.name})")
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("OOD accuracy, mean over shifts (%)")
    ax.set_title(" vs ".join(s.sweep_id for s in found), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return "\n".join(lines + [f"plot: {out}"])
