"""`orch report`: a sweep's Pareto table, rebuilt from its MLflow child runs."""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from orchestrator.records import KIND_TAG, SWEEP_TAG, TrackingError


class ReportError(RuntimeError):
    """No such sweep in the tracking store."""


@dataclass
class FoundSweep:
    sweep_id: str
    experiment: str
    status: str
    rows: list[dict]
    selected: int | None


COLUMNS = (("id_acc", "ID acc"), ("ood_acc", "OOD acc"), ("id_ece", "ID ECE"),
           ("ood_ece", "OOD ECE"), ("val_acc", "val acc"))


def format_table(rows: list[dict], selected: int | None) -> str:
    """Fixed-width table, percentages with one decimal; `*` on the front, `<- chosen`
    on the point selected by ID validation accuracy."""
    width = max([len("trial")] + [len(r["trial"]) for r in rows])
    header = f"{'trial':<{width}}  {'alpha':>5}  " + "  ".join(f"{t:>7}" for _, t in COLUMNS) \
        + "  front"
    lines = [header, "-" * len(header)]
    for i, row in enumerate(rows):
        cells = "  ".join(f"{100 * row[k]:7.1f}" if k in row else f"{'-':>7}" for k, _ in COLUMNS)
        mark = "  *    " if row.get("on_front") else "       "
        chosen = " <- chosen on ID val" if i == selected else ""
        lines.append(f"{row['trial']:<{width}}  {row['alpha']:5.2f}  {cells}{mark}{chosen}"
                     .rstrip())
    return "\n".join(lines)


def load_sweep(tracking_uri: str, sweep_id: str | None = None) -> FoundSweep:
    client = MlflowClient(tracking_uri)
    try:
        experiments = client.search_experiments()
    except Exception as err:
        raise TrackingError(f"cannot use MLflow tracking store {tracking_uri}: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") \
            from None
    ids = [e.experiment_id for e in experiments]
    names = {e.experiment_id: e.name for e in experiments}
    filter_ = f"tags.`{KIND_TAG}` = 'sweep'"
    if sweep_id:
        filter_ += f" and tags.`{SWEEP_TAG}` = '{sweep_id}'"
    parents = client.search_runs(ids, filter_, order_by=["attributes.start_time DESC"],
                                 max_results=1) if ids else []
    if not parents:
        raise ReportError(f"no sweep {sweep_id!r} in {tracking_uri}" if sweep_id else
                          f"no sweeps recorded in {tracking_uri} yet (run `orch sweep` first)")
    parent = parents[0]
    found_id = parent.data.tags[SWEEP_TAG]
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{SWEEP_TAG}` = '{found_id}' and tags.`{KIND_TAG}` = 'eval'", max_results=10_000)
    rows = []
    for run in children:
        rows.append({"trial": run.data.params.get("trial", run.info.run_name),
                     "alpha": float(run.data.params.get("alpha", "nan")),
                     "on_front": run.data.metrics.get("on_front", 0.0) > 0.5,
                     "run_id": run.info.run_id, **run.data.metrics})
    rows.sort(key=lambda r: (r["trial"], r["alpha"]))
    chosen = parent.data.tags.get("orch.selected_run")
    selected = next((i for i, r in enumerate(rows) if r["run_id"] == chosen), None)
    return FoundSweep(found_id, names[parent.info.experiment_id], parent.info.status, rows,
                      selected)
