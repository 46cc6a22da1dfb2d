"""`orch export`: any single-model point of a sweep (a trial alone, or a point of any
weight-space ensemble, such as WiSE-FT at some alpha) as one plain open_clip checkpoint.

The file is a dict of tensors and plain values (`torch.load(path, weights_only=True)`),
loadable without orch:

    ckpt = torch.load("model.pt", weights_only=True)
    model = getattr(open_clip, ckpt["model_class"])(**ckpt["model_cfg"]).eval()
    model.load_state_dict(ckpt["state_dict"])

then `logits = F.normalize(model.encode_image(x), dim=-1) @ ckpt["head_weight"].T
+ ckpt["head_bias"]` over `ckpt["classnames"]`, with images preprocessed by
`open_clip.image_transform(**ckpt["preprocess"], is_train=False)`.

`state_dict` is the whole CLIP of the point: its image tower, and its text tower (the
fine-tuned one for FLYP/CaRot, mixed by the ensemble for their ensemble points, else the
pre-trained one); `head_*` is the classification head the sweep evaluated. Output-space
ensembles (OSE, VRF) mix two models per sample and have no single state dict.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU

from orchestrator.assets.loaded import Assets, PointModel, load_assets, load_fitted, point_model
from orchestrator.commands.sweeps import SweepNotFound, find_journal, journal_spec
from orchestrator.plan import Plan
from orchestrator.records.journal import OK, STOPPED
from orchestrator.records.publish import chosen_single_model
from orchestrator.records.row import ALONE, Row
from orchestrator.records.table import Table
from trainers.ensembles import REGISTRY, WeightEnsemble
from trainers.models import ModelError

FORMAT = "orch-export-1"


class ExportError(ValueError):
    """A point that cannot be exported (or does not exist); one line."""


def model_config(assets: Assets) -> tuple[str, dict]:
    """(open_clip class name, constructor kwargs) that rebuild this architecture."""
    cfg = copy.deepcopy(open_clip.get_model_config(assets.clip.arch) or {})
    if not cfg:
        raise ExportError(f"no open_clip config for {assets.clip.arch!r} to rebuild it from")
    custom_text = cfg.pop("custom_text", False)
    if any(isinstance(m, QuickGELU) for m in assets.clip.model.modules()):
        cfg["quick_gelu"] = True        # OpenAI weights: open_clip switches this on itself
    name = "CustomTextCLIP" if custom_text or hasattr(assets.clip.model, "text") else "CLIP"
    return name, cfg


def preprocess_config(assets: Assets) -> dict[str, Any]:
    cfg = dict(getattr(assets.clip.model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", assets.clip.model.visual.image_size)
    return {"image_size": tuple(size) if isinstance(size, (list, tuple)) else size,
            "mean": tuple(cfg.get("mean", ())) or None, "std": tuple(cfg.get("std", ())) or None,
            "interpolation": cfg.get("interpolation"), "resize_mode": cfg.get("resize_mode"),
            "fill_color": cfg.get("fill_color", 0)}     # the padding of resize_mode "longest"


def save_export(path: Path, assets: Assets, model: PointModel, point: dict[str, Any]) -> None:
    model_class, cfg = model_config(assets)
    head = model.classifier.head
    data = {"format": FORMAT, "arch": assets.clip.arch, "model_class": model_class,
            "model_cfg": cfg, "state_dict": model.clip_state,
            "head_weight": head.weight.detach().cpu().clone(),
            "head_bias": head.bias.detach().cpu().clone(),
            "classnames": list(assets.bench.classnames), "templates": list(assets.bench.templates),
            "preprocess": preprocess_config(assets), "point": point}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")     # whole file, or none
    try:
        torch.save(data, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def point_summary(row: Row | None, trial: str, ensemble: str, coefficients: dict) -> dict:
    """Plain description of the exported point (with its metrics when the sweep has them)."""
    out: dict[str, Any] = {"trial": trial, "ensemble": ensemble, "coefficients": coefficients}
    if row is not None:
        out.update(row.metrics)
        out["method"] = row.method
    return out


def export_sweep(sweep: str, storage_path: str | None, out: Path, trial: str | None = None,
                 coefficients: dict[str, float] | None = None,
                 tracking_uri: str | None = None) -> str:
    """`orch export`: write one point of a finished sweep to `out`; returns a summary line.
    Without `trial`, the sweep's chosen single-model point."""
    try:
        journal = find_journal(sweep, storage_path, tracking_uri)
    except SweepNotFound as err:
        raise ExportError(str(err)) from None
    plan = Plan(journal_spec(journal))
    table = Table.of(plan.finished_rows(journal.points()))
    if trial is None:
        if coefficients:
            raise ExportError("--alpha/--coeffs need --trial (which trained model to mix)")
        index = chosen_single_model(table)
        if index is None:
            raise ExportError(f"sweep {journal.sweep_id} has no finished single-model point")
        row = table.rows[index]
        trial, ensemble, coefficients = row.trial, row.ensemble, row.coefficients
    else:
        names = [t.name for t in plan.trials]
        if trial not in names:
            raise ExportError(f"no trial {trial!r} in sweep {journal.sweep_id} "
                              f"(trials: {', '.join(names)})")
        coefficients = coefficients or {}
        ensemble = _weight_ensemble_for(coefficients)
        row = next((r for r in table.rows if (r.trial, r.ensemble, r.coefficients)
                    == (trial, ensemble, coefficients)), None)
    record = journal.trials().get(trial)
    trained = plan.trial(trial).trained
    if record is None and trained:
        raise ExportError(f"trial {trial} of sweep {journal.sweep_id} has not finished")
    if trained and record.get("status") == STOPPED:
        raise ExportError(f"trial {trial} of sweep {journal.sweep_id} was stopped early by the "
                          f"search after {record['stopped'].get('epochs_done')} epoch(s): it "
                          "has no model")
    if trained and (record.get("status", OK) != OK or not record.get("model")):
        raise ExportError(f"trial {trial} of sweep {journal.sweep_id} failed: it has no model "
                          f"({record.get('error') or record.get('status')})")
    device = torch.device("cpu")
    try:
        assets = load_assets(plan.spec, device)
    except ModelError as err:     # weights to download offline, a file gone since the sweep
        raise ExportError(str(err)) from None
    fitted = load_fitted(assets, record["model"] if record else None, device)
    if ensemble == ALONE:
        model = point_model(assets, fitted)
    else:
        entries = [e for e in plan.spec.ensembles if e.name == ensemble]
        options = entries[0].options if entries else REGISTRY[ensemble].options()
        model = point_model(assets, fitted, REGISTRY[ensemble], options, coefficients)
    save_export(out, assets, model, point_summary(row, trial, ensemble, coefficients))
    name = row.name if row else f"{trial} {ensemble} " + ", ".join(
        f"{k}={v:g}" for k, v in coefficients.items())
    metrics = f": ID acc {100 * row['id_acc']:.1f}, OOD acc {100 * row['ood_acc']:.1f}" if row else ""
    return f"exported {journal.sweep_id} {name}{metrics} -> {out}"


def _weight_ensemble_for(coefficients: dict[str, float]) -> str:
    """The weight-space ensemble whose coefficients these are (none: the trial alone)."""
    if not coefficients:
        return ALONE
    for name, ensemble in REGISTRY.items():
        if isinstance(ensemble, WeightEnsemble) and set(ensemble.coefficients) == set(coefficients):
            try:                                # the ensemble's own range checks
                ensemble.options(**{k: (v,) for k, v in coefficients.items()})
            except ValueError as err:
                raise ExportError(f"{name}: {err}") from None
            return name
    names = ", ".join(sorted(coefficients))
    raise ExportError(f"no weight-space ensemble takes the coefficients {names} "
                      "(output-space ensembles such as OSE and VRF cannot be exported)")
