"""Get a sweep's models out: any single-model point (a trial alone, or a weight-space
ensemble point such as WiSE-FT at some alpha) as one plain open_clip checkpoint.

The file is a dict of tensors and plain values (`torch.load(path, weights_only=True)`),
loadable without orch:

    ckpt = torch.load("model.pt", weights_only=True)
    model = getattr(open_clip, ckpt["model_class"])(**ckpt["model_cfg"]).eval()
    model.load_state_dict(ckpt["state_dict"])

then `logits = F.normalize(model.encode_image(x), dim=-1) @ ckpt["head_weight"].T
+ ckpt["head_bias"]` over `ckpt["classnames"]`, with images preprocessed by
`open_clip.image_transform(**ckpt["preprocess"], is_train=False)`.

`state_dict` is the whole CLIP (image tower of the point; text tower fine-tuned for
FLYP/CaRot, interpolated with the zero-shot one for their WiSE-FT points, else the
pre-trained one); `head_*` is the classification head the sweep evaluated. Output-space
ensembles (OSE, VRF) mix two models per sample and have no single state dict.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.pareto import NONE, coefficients_text, point_name
from trainers.ensembles import WEIGHTS, get_ensemble
from trainers.ensembles.wise_ft import interpolate_state_dicts

FORMAT = "orch-export-1"


class ExportError(ValueError):
    """A point that cannot be exported (or does not exist); one line."""


def exportable(row: dict) -> bool:
    return row["ensemble"] == NONE or get_ensemble(row["ensemble"]).mixes == WEIGHTS


def chosen_exportable(rows: list[dict]) -> int | None:
    """The point a user takes home: the best ID validation accuracy among single models
    (ties: lower validation NLL, then sweep order)."""
    candidates = [i for i, r in enumerate(rows) if exportable(r)]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (-rows[i]["val_acc"], rows[i]["val_nll"], i))


@dataclass
class PointModel:
    classifier: torch.nn.Module      # what the sweep evaluated (image encoder + head)
    clip_state: dict[str, torch.Tensor]   # the whole open_clip model of that point


def point_model(assets, fitted, ensemble: str, coefficients: dict[str, float]) -> PointModel:
    """The model of one point: a fitted trial alone, or a weight-space ensemble of it with
    the zero-shot model (its text tower mixed the same way)."""
    zero_shot = assets.start.zero_shot
    classifier, text = fitted.classifier, fitted.text_tower
    if ensemble != NONE:
        mixer = get_ensemble(ensemble)
        if mixer.mixes != WEIGHTS:
            raise ExportError(f"{ensemble} mixes two models' outputs per sample: there is no "
                              "single model to export (export the trial alone, or a WiSE-FT point)")
        classifier = mixer.mix(zero_shot, classifier, coefficients, mixer.options())
        if text is not None:            # WiSE-FT, the one weight-space ensemble: its alpha
            zs_text = {k: v for k, v in assets.clip.model.state_dict().items()
                       if not k.startswith("visual.")}
            text = interpolate_state_dicts(zs_text, text, coefficients["alpha"])
    state = {k: v.detach().cpu().clone() for k, v in assets.clip.model.state_dict().items()}
    state.update({f"visual.{k}": v.detach().cpu().clone()
                  for k, v in classifier.image_encoder.state_dict().items()})
    if text is not None:
        state.update({k: v.detach().cpu().clone() for k, v in text.items()})
    return PointModel(classifier.eval(), state)


def model_config(assets) -> tuple[str, dict]:
    """(open_clip class name, constructor kwargs) that rebuild this architecture."""
    import open_clip
    from open_clip.transformer import QuickGELU
    cfg = copy.deepcopy(open_clip.get_model_config(assets.clip.arch) or {})
    if not cfg:
        raise ExportError(f"no open_clip config for {assets.clip.arch!r} to rebuild it from")
    custom_text = cfg.pop("custom_text", False)
    if any(isinstance(m, QuickGELU) for m in assets.clip.model.modules()):
        cfg["quick_gelu"] = True        # OpenAI weights: open_clip switches this on itself
    model = assets.clip.model
    name = "CustomTextCLIP" if custom_text or hasattr(model, "text") else "CLIP"
    return name, cfg


def preprocess_config(assets) -> dict[str, Any]:
    cfg = dict(getattr(assets.clip.model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", assets.clip.model.visual.image_size)
    return {"image_size": tuple(size) if isinstance(size, (list, tuple)) else size,
            "mean": tuple(cfg.get("mean", ())) or None, "std": tuple(cfg.get("std", ())) or None,
            "interpolation": cfg.get("interpolation"), "resize_mode": cfg.get("resize_mode"),
            "fill_color": cfg.get("fill_color", 0)}     # the padding of resize_mode "longest"


def save_export(path: Path, assets, model: PointModel, point: dict[str, Any]) -> None:
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


def point_summary(row: dict | None, trial: str, ensemble: str, coefficients: dict) -> dict:
    """Plain description of the exported point (with its metrics when the sweep has them)."""
    out: dict[str, Any] = {"trial": trial, "ensemble": ensemble, "coefficients": coefficients}
    if row is not None:
        out.update({k: v for k, v in row.items() if isinstance(v, float)})
        out["method"] = row["method"]
    return out


def find_row(rows: list[dict], trial: str, ensemble: str, coefficients: dict) -> dict | None:
    text = coefficients_text({"coefficients": coefficients})
    for row in rows:
        if row["trial"] == trial and row["ensemble"] == ensemble \
                and coefficients_text(row) == text:
            return row
    return None


def export_sweep(sweep: str, storage_path: str, out: Path, trial: str | None = None,
                 coefficients: dict[str, float] | None = None) -> str:
    """`orch export`: write one point of a finished sweep to `out`; returns a summary line.
    Without `trial`, the sweep's chosen single-model point."""
    from orchestrator.build import load_assets, load_fitted
    from orchestrator.sweep import finished_rows
    from orchestrator.sync import SyncError, find_journal, journal_spec
    from trainers.models import ModelError
    try:
        journal = find_journal(sweep, storage_path)
    except SyncError as err:
        raise ExportError(str(err)) from None
    spec = journal_spec(journal)
    points = spec.trials()
    rows = finished_rows(spec, points, journal.points())
    if trial is None:
        if coefficients:
            raise ExportError("--alpha/--coeffs need --trial (which trained model to mix)")
        index = chosen_exportable(rows)
        if index is None:
            raise ExportError(f"sweep {journal.sweep_id} has no finished single-model point")
        row = rows[index]
        trial, ensemble, coefficients = row["trial"], row["ensemble"], row["coefficients"]
    else:
        by_name = {p.name: p for p in points}
        if trial not in by_name:
            raise ExportError(f"no trial {trial!r} in sweep {journal.sweep_id} "
                              f"(trials: {', '.join(by_name)})")
        coefficients = coefficients or {}
        ensemble = _weight_ensemble_for(coefficients)
        row = find_row(rows, trial, ensemble, coefficients)
    record = journal.trials().get(trial)
    trained = any(p.trained for p in points if p.name == trial)
    if not points or (record is None and trained):
        raise ExportError(f"trial {trial} of sweep {journal.sweep_id} has not finished")
    if trained and (record.get("status", "ok") != "ok" or not record.get("model")):
        raise ExportError(f"trial {trial} of sweep {journal.sweep_id} failed: it has no model "
                          f"({record.get('error') or record.get('status')})")
    device = torch.device("cpu")
    try:
        assets = load_assets(spec, device)
    except ModelError as err:     # weights to download offline, a file gone since the sweep
        raise ExportError(str(err)) from None
    fitted = load_fitted(assets, record["model"] if record else None, device)
    model = point_model(assets, fitted, ensemble, coefficients)
    save_export(out, assets, model, point_summary(row, trial, ensemble, coefficients))
    name = point_name({"trial": trial, "ensemble": ensemble, "coefficients": coefficients})
    metrics = f": ID acc {100 * row['id_acc']:.1f}, OOD acc {100 * row['ood_acc']:.1f}" if row else ""
    return f"exported {journal.sweep_id} {name}{metrics} -> {out}"


def _weight_ensemble_for(coefficients: dict[str, float]) -> str:
    """The weight-space ensemble whose coefficients these are (none: the trial alone)."""
    if not coefficients:
        return NONE
    from trainers.ensembles import REGISTRY
    for name, ensemble in REGISTRY.items():
        if ensemble.mixes == WEIGHTS and set(ensemble.coefficients) == set(coefficients):
            try:                                # the ensemble's own range checks
                ensemble.options(**{k: (v,) for k, v in coefficients.items()})
            except ValueError as err:
                raise ExportError(f"{name}: {err}") from None
            return name
    names = ", ".join(sorted(coefficients))
    raise ExportError(f"no weight-space ensemble takes the coefficients {names} "
                      "(output-space ensembles such as OSE and VRF cannot be exported)")
