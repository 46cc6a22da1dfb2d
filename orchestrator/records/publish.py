"""What a sweep writes to MLflow, in the shapes MLflow shows: the parent's params, a child
run per trial and per point, and the report stage (the table, the front and choices, the
plots, the summary metrics, the chosen model). The driver writes as the sweep runs;
`orch sync` writes what the journal holds and MLflow lacks, through the same functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import matplotlib.pyplot as plt
import torch

from orchestrator.assets.loaded import load_assets, load_fitted, point_model
from orchestrator.plan import Plan, Trial
from orchestrator.records.journal import OK, STOPPED, Journal
from orchestrator.records.mlflow import SweepRecords
from orchestrator.records.plots import (plot_calibration, plot_pareto, plot_reliability,
                                       plot_robustness, zero_shot_point)
from orchestrator.records.row import ALONE, Row, select
from orchestrator.records.table import Table, group_label
from trainers.ensembles import WeightEnsemble, get_ensemble

POINT_PARAM = "orch.point"      # a child run's point identity, as JSON (Row.identity)


def spec_params(plan: Plan) -> dict[str, Any]:
    """The sweep's settings as flat MLflow params for the parent run."""
    spec = plan.spec
    params = {"methods": ",".join(e.label for e in spec.methods),
              "ensembles": ",".join(e.name for e in spec.ensembles),
              "model.arch": spec.model.arch, "model.pretrained": spec.model.pretrained,
              "benchmark.source": spec.benchmark.source, "num_trials": len(plan.trials),
              "num_points": plan.num_points()}
    for entry in spec.methods:
        params.update({f"{entry.label}.{k}": v
                       for k, v in dataclasses.asdict(entry.options).items()})
        params.update({f"{entry.label}.grid.{k}": v for k, v in entry.grid.items()})
    for entry in spec.ensembles:
        params.update({f"{entry.name}.{k}": v for k, v in dataclasses.asdict(entry.options).items()})
    return params


def trial_params(trial: Trial) -> dict[str, Any]:
    return {"method": trial.label, "method_name": trial.method_name, "seed": trial.seed,
            "trial": trial.name, **dataclasses.asdict(trial.options)}


# A trial's MLflow run: a trial stopped early by the search is KILLED (it ended before
# its last epoch, by decision), with its tag orch.trial_status "stopped".
TRIAL_RUN_STATUS = {OK: "FINISHED", STOPPED: "KILLED", "failed": "FAILED"}
NOTES_TAG = "orch.notes"      # what the trial's method says a user should know about it


def record_trial(records: SweepRecords, plan: Plan, record: dict) -> None:
    """A finished (or failed) training trial's child run, with its loss curve."""
    trial = plan.trial(record["trial"])
    stopped = record.get("stopped") or {}
    records.child(f"train/{trial.name}", trial.name, "train", trial_params(trial),
                  metrics={"restarts": float(record.get("restarts", 0)),
                           **({"seconds": record["seconds"]} if "seconds" in record else {}),
                           **{f"stopped_{k}": float(v) for k, v in stopped.items()
                              if v is not None},
                           # what the searcher was told (ID validation of the fitted model)
                           **{f"search_{k}": float(v)
                              for k, v in (record.get("objectives") or {}).items()}},
                  history=record["history"], status=TRIAL_RUN_STATUS[record["status"]],
                  tags={"orch.restarts": str(record.get("restarts", 0)),
                        "orch.trial_status": record["status"],
                        **({NOTES_TAG: " ".join(record["notes"])} if record.get("notes") else {})})


def record_points(records: SweepRecords, plan: Plan, rows: list[Row]) -> None:
    """A child run per point: params say which point (its trial's settings, the ensemble,
    each coefficient; `orch.point` the whole identity), metrics what it measured."""
    for row in rows:
        params = {**trial_params(plan.trial(row.trial)), "ensemble": row.ensemble,
                  "coefficients": row.coefficients_text, **row.coefficients,
                  POINT_PARAM: row.identity_json()}
        records.child(row.key, row.name, "eval", params, metrics=row.metrics)


def record_journal(records: SweepRecords, plan: Plan, journal: Journal) -> None:
    """Everything the journal holds and MLflow lacks (a resumed sweep whose tracking
    server was down, or whose driver died between the two): records are keyed, so
    nothing is written twice."""
    for record in journal.trials().values():
        record_trial(records, plan, record)
    for rows in journal.points().values():
        record_points(records, plan, rows)


def exportable(row: Row) -> bool:
    """A single model: the trial alone, or a point of a weight-space ensemble."""
    return row.ensemble == ALONE or isinstance(get_ensemble(row.ensemble), WeightEnsemble)


def chosen_single_model(table: Table) -> int | None:
    """The point a user takes home: the choice (`row.select`) among single models."""
    among = [i for i, r in enumerate(table.rows) if exportable(r)]
    return select(table.rows, among) if among else None


def publish(records: SweepRecords, plan: Plan, table: Table, models: dict[str, str],
            register: str | None = None) -> None:
    """The report stage: each point's `on_front` and `chosen` flags; on the parent the
    table, the front and choices, the plots, the summary and the chosen single model."""
    sweep_id = records.sweep_id
    existing = records.existing() if records.failed is None else {}
    run_ids = [existing.get(row.key, (None,))[0] for row in table.rows]
    for i, run_id in enumerate(run_ids):
        if run_id:
            records.metrics(run_id, {"on_front": float(table.on_front[i]),
                                     "chosen": float(table.is_chosen(i))})
    figures = {"pareto.png": plot_pareto(table, f"{sweep_id}: ID vs OOD accuracy"),
               "calibration.png": plot_calibration(table, f"{sweep_id}: OOD accuracy vs OOD ECE"),
               "robustness.png": plot_robustness(
                   table, f"{sweep_id}: effective robustness (logit axes)",
                   zero_shot_point(table, (t.name for t in plan.trials if not t.trained)),
                   plan.spec.report.robustness_line)}
    for method in dict.fromkeys(r.method for r in table.rows):
        figures[f"reliability/{method}.png"] = plot_reliability(
            table, method, f"{sweep_id}: reliability of {method}'s chosen points")
    best = table.rows[table.selected]
    summary = {f"selected_{k}": best[k] for k in ("id_acc", "ood_acc", "id_ece", "ood_ece",
                                                 "val_acc")}
    summary["front_size"] = sum(table.on_front)
    choices = [{"group": group_label(g), "row": i, "trial": table.rows[i].trial,
                "coefficients": table.rows[i].coefficients, "run_id": run_ids[i]}
               for g, i in table.chosen.items()]
    records.summary(table, run_ids, choices, figures, summary,
                    {"orch.selected_run": run_ids[table.selected] or "",
                     "orch.selected_trial": best.trial})
    for figure in figures.values():
        plt.close(figure)
    _log_chosen_model(records, plan, table, models, register)


def _log_chosen_model(records: SweepRecords, plan: Plan, table: Table, models: dict[str, str],
                      register: str | None) -> None:
    """The single model chosen on ID validation (a trial alone or a weight-space point),
    logged on the parent run (and registered with `register`)."""
    index = chosen_single_model(table)
    if index is None or records.failed is not None or records.has_model():
        return
    row = table.rows[index]
    cpu = torch.device("cpu")
    assets = load_assets(plan.spec, cpu)
    fitted = load_fitted(assets, models.get(row.trial), cpu)
    if row.ensemble == ALONE:
        model = point_model(assets, fitted)
    else:
        model = point_model(assets, fitted, get_ensemble(row.ensemble),
                            plan.ensemble(row.ensemble).options, row.coefficients)
    val = assets.bench.val.dataset
    example = torch.stack([val[i][0] for i in range(min(2, len(val)))])
    records.log_model(model.classifier, example, register)
    records.metrics(records.parent_id, {"model_val_acc": row["val_acc"],
                                        "model_id_acc": row["id_acc"],
                                        "model_ood_acc": row["ood_acc"]})
