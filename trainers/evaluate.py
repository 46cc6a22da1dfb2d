"""Evaluation protocol (docs/methods.md): logits per eval set, metrics, OOD average.

One temperature is fitted by NLL on the ID validation split and applied to every
set for the `_ts` metrics. Sets covering a subset of the classes (or mapping each
of their classes to several ID classes) are projected BEFORE softmax.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from trainers.data import EvalSet, ood_average
from trainers.data.benchmark import ID_TEST as TEST_SET
from trainers.data.benchmark import ID_VAL as VAL_SET
from trainers.metrics import fit_temperature, reliability, set_metrics

METRIC_KEYS = ("acc", "ece", "nll", "ece_ts", "nll_ts")
# Evaluation precision on a GPU. fp32 by default: the papers evaluate in full precision,
# and bf16 autocast moves the top-1 class of ~0.7 % of ImageNet samples at CLIP's logit
# scale (100), enough to shift reproduced numbers. On a CPU evaluation is always fp32.
PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16" and device.type == "cuda")


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, device: torch.device,
            batch_size: int = 256, num_workers: int = 0,
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 (N, C) on CPU, labels int64 (N,)), in dataset order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    logits, labels = [], []
    for images, targets in loader:
        with autocast(device, precision):
            out = model(images.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(logits), torch.cat(labels).long()


@torch.no_grad()
def encode_batch(classifier: torch.nn.Module, images: torch.Tensor, device: torch.device,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised image features (B, d), logits (B, C)) of one batch, float32 on CPU.
    One image-tower pass gives both (the head is linear on the features)."""
    with autocast(device, precision):
        features = classifier.features(images.to(device, non_blocking=True))
        logits = classifier.head(features)
    return features.float().cpu(), logits.float().cpu()


@torch.no_grad()
def encode(classifier: torch.nn.Module, dataset: Dataset, device: torch.device,
           batch_size: int = 256, num_workers: int = 0, precision: str = "fp32"
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, d), logits (N, C), labels (N,)) of a whole dataset, in its order."""
    classifier.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    features, logits, labels = [], [], []
    for images, targets in loader:
        f, z = encode_batch(classifier, images, device, precision)
        features.append(f)
        logits.append(z)
        labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(logits), torch.cat(labels).long()


def evaluate_logits(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                    eval_sets: Mapping[str, EvalSet]) -> dict[str, dict[str, float]]:
    """Metrics per set from ID-class logits; the temperature is fitted on `id_val`."""
    if VAL_SET not in logits:
        raise ValueError(f"temperature scaling needs the {VAL_SET!r} split")
    temperature = fit_temperature(logits[VAL_SET], labels[VAL_SET])
    results = {}
    for name, eval_set in eval_sets.items():
        projected = eval_set.project(logits[name])  # (N, K) in the set's own classes
        results[name] = set_metrics(projected, labels[name], temperature)
        results[name]["temperature"] = temperature
        results[name]["bins"] = [t.tolist() for t in reliability(projected, labels[name])]
    return results


def evaluate(model: torch.nn.Module, eval_sets: Mapping[str, EvalSet], device: torch.device,
             batch_size: int = 256, num_workers: int = 0,
             precision: str = "fp32") -> dict[str, dict[str, float]]:
    logits, labels = {}, {}
    for name, eval_set in eval_sets.items():
        logits[name], labels[name] = predict(model, eval_set.dataset, device, batch_size,
                                             num_workers, precision)
    return evaluate_logits(logits, labels, eval_sets)


def summarize(per_set: Mapping[str, Mapping[str, float]], shift_names: Sequence[str]) -> dict[str, float]:
    """Flat metric names: `id_*` (ID test), `val_*` (ID val), `ood_*` (unweighted mean over
    the shifts), and `<set>_<metric>` for every set."""
    flat: dict[str, float] = {}
    for name, metrics in per_set.items():
        for key in METRIC_KEYS:
            flat[f"{name}_{key}"] = float(metrics[key])
    for key in METRIC_KEYS:
        flat[f"id_{key}"] = float(per_set[TEST_SET][key])
        flat[f"val_{key}"] = float(per_set[VAL_SET][key])
        if shift_names:
            flat[f"ood_{key}"] = ood_average({s: per_set[s][key] for s in shift_names},
                                             shift_names)
    flat["temperature"] = float(per_set[VAL_SET]["temperature"])
    return flat


def reliability_summary(per_set: Mapping[str, Mapping], shift_names: Sequence[str]) -> dict:
    """Reliability-diagram bins (count, sum of confidence, number correct per bin) of the
    ID test set and of all shift samples pooled: {"id": [...], "ood": [...]}."""
    def total(names):
        return [[sum(vals) for vals in zip(*(per_set[n]["bins"][part] for n in names))]
                for part in range(3)]
    out = {"id": per_set[TEST_SET]["bins"]}
    if shift_names:
        out["ood"] = total(shift_names)
    return out
