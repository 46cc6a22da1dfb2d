"""Metrics of two-member output mixtures at every coefficient point at once.

    p = (1 - w) * softmax(z_zs / T_zs) + w * softmax(z_ft / T_ft),   w per (point, sample)

Logits are projected to each set's own classes BEFORE the softmax (class subsets,
many-to-one maps). Nothing re-runs a model: the inputs are cached logits.

Accuracy, ECE and NLL for P points need only, per (point, sample), the mixture's top
class, its probability and the label's probability. The top class of a two-member
mixture lies among a few candidates: the top-m classes of either member, unless a class
outside both top-m lists could reach the maximum. Any such class has p_zs <= t_zs and
p_ft <= t_ft, the (m+1)-th largest values, so the candidate maximum is exact whenever it
exceeds (1-w) t_zs + w t_ft; the rare (point, sample) pairs where it does not are
recomputed over all classes. That makes a 101-point sweep over 50,000 x 1,000 logits a
matter of (P, N, 2m) arrays instead of (P, N, C) ones.

Temperature-scaled metrics (`*_ts`) need the whole mixed distribution: one temperature
per point, fitted by NLL on ID validation, as for single models; that part runs per
point over all classes (`with_ts=False` skips it).
"""
from __future__ import annotations

from typing import Mapping

import torch

from trainers.data import EvalSet
from trainers.data.benchmark import ID_VAL
from trainers.ensembles import MemberOutputs, Mixture
from trainers.metrics import (confidence_and_nll, confidence_temperature, ece_from_bins,
                              ece_of, fit_temperature, reliability_bins)

CANDIDATES = 5                 # top-m classes of each member
_CHUNK = 1 << 22               # (P, n, 2m) elements per chunk (cache-sized)


def member_temperatures(zero_shot: MemberOutputs, fine_tuned: MemberOutputs) -> tuple[float, float]:
    """Per model, the temperature at which its mean confidence equals its accuracy on ID
    validation (VRF's calibration)."""
    return tuple(confidence_temperature(m.logits[ID_VAL], m.labels[ID_VAL])
                 for m in (zero_shot, fine_tuned))


def _top_class_stats(lp0: torch.Tensor, lp1: torch.Tensor, w: torch.Tensor):
    """Per (point, sample): (top probability, top class) of (1-w) p0 + w p1, from the
    members' log-probabilities lp0, lp1 (N, K); w (P, N). Exact (see module doc); ties go
    to the lowest class. Only the candidates' probabilities are ever exponentiated."""
    n, k = lp0.shape
    m = min(CANDIDATES, k)
    if m == k:
        cand = torch.arange(k, device=lp0.device).expand(n, k)
        t0 = t1 = None
    else:
        v0, i0 = lp0.topk(m + 1, dim=1)
        v1, i1 = lp1.topk(m + 1, dim=1)
        # Sorted, so the first maximum is the lowest class index: ties break as argmax does.
        cand = torch.cat([i0[:, :m], i1[:, :m]], dim=1).sort(dim=1).values   # (N, 2m)
        t0, t1 = v0[:, m].exp(), v1[:, m].exp()                               # (N,)
    c0, c1 = lp0.gather(1, cand).exp(), lp1.gather(1, cand).exp()   # (N, 2m)
    conf = torch.empty_like(w)
    pred = torch.empty(w.shape, dtype=torch.long, device=w.device)
    rows = max(1, _CHUNK // (w.shape[0] * cand.shape[1]))
    for s in range(0, n, rows):
        sl = slice(s, s + rows)
        # which candidate is on top: one fused op over (P, n, 2m). lerp is exact at both
        # ends (w = 1 gives c1 itself; c0 + w (c1 - c0) does not), so a tie at an
        # endpoint goes to the lowest class, as the member's own argmax does
        arg = torch.lerp(c0[None, sl], c1[None, sl], w[:, sl, None]).argmax(dim=2)
        pick = arg[..., None]                                      # (P, n, 1)
        top0 = c0[sl].expand(w.shape[0], -1, -1).gather(2, pick)[..., 0]
        top1 = c1[sl].expand(w.shape[0], -1, -1).gather(2, pick)[..., 0]
        conf[:, sl] = (1 - w[:, sl]) * top0 + w[:, sl] * top1
        pred[:, sl] = cand[sl].expand(w.shape[0], -1, -1).gather(2, pick)[..., 0]
    if t0 is not None:
        bound = (1 - w) * t0[None, :] + w * t1[None, :]            # (P, N)
        unsure = (conf <= bound).nonzero(as_tuple=True)
        step = max(1, _CHUNK // k)          # (u, K) a block of pairs at a time: u is unbounded
        for s in range(0, unsure[0].numel(), step):
            points, samples = unsure[0][s:s + step], unsure[1][s:s + step]
            wu = w[points, samples][:, None]
            full = (1 - wu) * lp0[samples].exp() + wu * lp1[samples].exp()   # (u, K)
            top = full.argmax(dim=1)
            pred[points, samples] = top
            conf[points, samples] = full.gather(1, top[:, None])[:, 0]
    return conf, pred


def _log_label_probability(lp0: torch.Tensor, lp1: torch.Tensor, w: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """log((1-w) p0[y] + w p1[y]) per (point, sample), from the members' log-softmaxes:
    in log space a label probability far below float32's range (a logit 100 below the
    top) still counts as what it is, not as 0."""
    ly0 = lp0.gather(1, labels[:, None])[:, 0].double()
    ly1 = lp1.gather(1, labels[:, None])[:, 0].double()
    w = w.double()
    return torch.logaddexp(torch.log1p(-w) + ly0[None, :], torch.log(w) + ly1[None, :])


def _log_mixture(lp0: torch.Tensor, lp1: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log((1-w) p0 + w p1) in float64 for one point, from the members' log-softmaxes:
    w (N,) -> (N, K), finite everywhere (w = 0 or 1 give the member's log-softmax)."""
    w = w.double()[:, None]
    # in place: two (N, K) float64 arrays at a time, not four (ImageNet-Sketch: 0.4 GB each)
    a = lp0.double().add_(torch.log1p(-w))
    b = lp1.double().add_(torch.log(w))
    return torch.logaddexp(a, b, out=a)


def mixture_metrics(zero_shot: MemberOutputs, fine_tuned: MemberOutputs, mixture: Mixture,
                    eval_sets: Mapping[str, EvalSet], with_ts: bool = True) -> list[dict]:
    """One entry per point: {set name: {acc, ece, nll, ece_ts, nll_ts, temperature,
    bins}}, the same shape as `trainers.evaluate.evaluate_logits` gives a single model.
    `bins` are the 15 reliability bins (count, sum of confidence, number correct)."""
    t0, t1 = mixture.temperatures

    def log_probs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        project = eval_sets[name].project
        return (torch.log_softmax(project(zero_shot.logits[name]).float() / t0, dim=1),
                torch.log_softmax(project(fine_tuned.logits[name]).float() / t1, dim=1))
    n_points = mixture.weights[ID_VAL].shape[0]
    results: list[dict] = [{} for _ in range(n_points)]
    # one temperature per point, from ID validation; then one set at a time (ImageNet's
    # six sets' log-probabilities of both members are 1.4 GB; one set's is at most 0.4;
    # ID validation's are computed again in the loop rather than held meanwhile)
    temperatures = _mixture_temperatures(log_probs(ID_VAL), mixture.weights[ID_VAL],
                                         zero_shot.labels[ID_VAL]) if with_ts else None
    for name in eval_sets:
        lp0, lp1 = log_probs(name)
        labels = zero_shot.labels[name].to(lp0.device)
        w = mixture.weights[name].to(lp0.device).float()           # (P, N)
        conf, pred = _top_class_stats(lp0, lp1, w)
        correct = pred == labels[None, :]
        count, sum_conf, sum_correct = reliability_bins(conf, correct)   # (P, 15) each
        ece = ece_from_bins(count, sum_conf, sum_correct)
        acc = correct.double().mean(1)
        nll = -_log_label_probability(lp0, lp1, w, labels).mean(1)
        for i in range(n_points):
            results[i][name] = {"acc": float(acc[i]), "ece": float(ece[i]), "nll": float(nll[i]),
                                "bins": [count[i].tolist(), sum_conf[i].tolist(),
                                         sum_correct[i].tolist()]}
            if temperatures is not None:
                ece_ts, nll_ts = _scaled_calibration(
                    lp0, lp1, mixture.weights[name][i].to(lp0.device), labels, temperatures[i])
                results[i][name].update(ece_ts=ece_ts, nll_ts=nll_ts, temperature=temperatures[i])
    return results


def _scaled_calibration(lp0: torch.Tensor, lp1: torch.Tensor, w: torch.Tensor,
                        labels: torch.Tensor, temperature: float) -> tuple[float, float]:
    """ECE and NLL of softmax(log p / T) for one point, log p the mixture: a block of rows
    at a time (the whole (N, K) float64 mixture of ImageNet-Sketch would be 0.4 GB), one
    softmax per row for both. Per-sample values are those of `expected_calibration_error`
    and `negative_log_likelihood` on the whole mixture, to the bit."""
    n, k = lp0.shape
    conf = torch.empty(n, dtype=torch.float64, device=lp0.device)
    nll, correct = torch.empty_like(conf), torch.empty(n, dtype=torch.bool, device=lp0.device)
    step = max(1, _CHUNK // k)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        log_p = _log_mixture(lp0[rows], lp1[rows], w[rows])
        conf[rows], nll[rows] = confidence_and_nll(log_p, labels[rows], temperature)
        correct[rows] = log_p.argmax(dim=1) == labels[rows]
    return ece_of(conf, correct), float(nll.mean())


def _mixture_temperatures(log_probs: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                          labels: torch.Tensor) -> list[float]:
    """Per point, the temperature fitted by NLL on ID validation of its mixture."""
    lp0, lp1 = log_probs
    labels = labels.to(lp0.device)
    return [fit_temperature(_log_mixture(lp0, lp1, w.to(lp0.device)), labels) for w in weights]
