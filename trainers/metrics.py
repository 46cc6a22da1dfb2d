"""Classification metrics over a whole evaluation set: accuracy, ECE, NLL, temperature scaling.

Every function takes the logits of the WHOLE set at once (never per-batch averages: ECE and
temperature scaling are not decomposable over batches) and returns a Python float.

Conventions (see docs/methods.md, "Evaluation protocol"):

- ``logits`` is ``(N, C)`` and finite; ``labels`` is ``(N,)`` integer in ``[0, C)``. Class
  subsets are applied BEFORE these functions (``EvalSet.project``), never by masking with
  ``-inf``, so non-finite logits are rejected with a ``ValueError``.
- The prediction is ``argmax(logits)``; ties go to the lowest class index (``torch.argmax``
  returns the first maximum), so accuracy and ECE agree on what "correct" means.
- Probabilities are ``softmax(logits / temperature)`` computed in float64 in row chunks, so
  memory stays bounded for ``N`` up to ~1e6 and results do not depend on the chunk size
  beyond float64 round-off.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "expected_calibration_error",
    "negative_log_likelihood",
    "fit_temperature",
    "confidence_temperature",
    "reliability",
    "reliability_bins",
    "ece_from_bins",
    "set_metrics",
]

# Rows per chunk are chosen so a chunk holds about this many logits (32 MiB in float64):
# float64 softmax of a 1e6 x 1000 set at once would need 8 GB.
_CHUNK_ELEMENTS = 1 << 22

# Temperature search range. T outside it means the logits carry (almost) no usable
# confidence information or the data are separable; the fit then returns the boundary.
_T_MIN, _T_MAX = 0.05, 20.0


# ---------------------------------------------------------------------------------------
# Input validation and chunked per-sample statistics
# ---------------------------------------------------------------------------------------


def _check_inputs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes, dtypes and values; return ``(logits, labels)`` as CPU-agnostic tensors."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per row of logits: logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    n, c = logits.shape
    if n == 0:
        raise ValueError("metrics need at least one sample, got an empty set")
    if c == 0:
        raise ValueError("logits have no class columns")
    n_nan = int(torch.isnan(logits).any(dim=1).sum())
    if n_nan:
        raise ValueError(f"logits contain NaN in {n_nan} of {n} rows; the model output is broken")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "logits contain +/-inf; restrict class subsets with EvalSet.project instead of "
            "masking columns with -inf"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"labels must lie in [0, {c}), got values in [{lo}, {hi}]")
    return logits, labels.long()


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _confidence_and_nll(logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-sample max probability and NLL of ``softmax(logits / T)``, both ``(N,)`` float64."""
    conf = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    nll = torch.empty_like(conf)
    for rows in _row_chunks(*logits.shape):
        logp = torch.log_softmax(logits[rows].double() / temperature, dim=1)  # (n, C)
        conf[rows] = logp.max(dim=1).values.exp()
        nll[rows] = -logp.gather(1, labels[rows, None]).squeeze(1)
    return conf, nll


def confidence_and_nll(logits: Tensor, labels: Tensor, temperature: float = 1.0
                       ) -> tuple[Tensor, Tensor]:
    """Per-sample max probability and NLL of ``softmax(logits / T)``, both ``(N,)`` float64,
    without the input checks of the metrics above: for callers that compute ECE and NLL
    of one large set a block of rows at a time (then ``ece_of`` and ``nll.mean()``), on
    values finite by construction."""
    return _confidence_and_nll(logits, labels, _check_temperature(temperature))


def ece_of(conf: Tensor, correct: Tensor, n_bins: int = 15) -> float:
    """``expected_calibration_error`` from per-sample confidence and correctness ``(N,)``."""
    return _ece_from(conf, correct, n_bins)


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` bool: argmax (ties -> lowest index) equals the label."""
    return logits.argmax(dim=1) == labels


def reliability_bins(conf: Tensor, correct: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin: (sample count, sum of confidences, number correct), each
    ``(n_bins,)`` float64; the bins of ``expected_calibration_error``. Inputs may carry
    leading dimensions ``(..., N)``: the outputs are then ``(..., n_bins)``."""
    conf = conf.double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)
    # bucketize(right=False) returns i with edges[i-1] < c <= edges[i]; bin = i - 1.
    bins = (torch.bucketize(conf, edges, right=False) - 1).clamp_(0, n_bins - 1)  # (..., N)
    rows = bins.reshape(-1, conf.shape[-1])                                       # (R, N)
    row_offset = torch.arange(rows.shape[0], device=conf.device)[:, None] * n_bins
    flat = (rows + row_offset).reshape(-1)                   # one bincount for every row
    size = rows.shape[0] * n_bins
    count = torch.bincount(flat, minlength=size).double()
    sum_conf = torch.bincount(flat, weights=conf.reshape(-1), minlength=size)
    sum_correct = torch.bincount(flat, weights=correct.reshape(-1).double(), minlength=size)
    shape = (*conf.shape[:-1], n_bins)
    return count.view(shape), sum_conf.view(shape), sum_correct.view(shape)


def ece_from_bins(count: Tensor, sum_conf: Tensor, sum_correct: Tensor) -> Tensor:
    """ECE from ``reliability_bins`` (any leading dimensions):
    ``sum_b |B_b|/N * |acc_b - conf_b| == sum_b |sum_correct_b - sum_conf_b| / N``."""
    return (sum_correct - sum_conf).abs().sum(-1) / count.sum(-1)


def _ece_from(conf: Tensor, correct: Tensor, n_bins: int) -> float:
    """ECE from per-sample confidence ``(N,)`` and correctness ``(N,)``.

    Bin edges are ``linspace(0, 1, n_bins + 1)``; confidence ``c`` falls in bin ``b`` when
    ``edges[b] < c <= edges[b + 1]`` (right-closed, as in the reference implementations of
    Guo et al. 2017). ``c == 0`` cannot come out of a softmax but is put in bin 0 so every
    sample counts.
    """
    return float(ece_from_bins(*reliability_bins(conf, correct, n_bins)))


# ---------------------------------------------------------------------------------------
# Public metrics
# ---------------------------------------------------------------------------------------


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1]. Ties in the logits go to the lowest class index."""
    logits, labels = _check_inputs(logits, labels)
    return float(_correct(logits, labels).double().mean())


def expected_calibration_error(
    logits: Tensor, labels: Tensor, n_bins: int = 15, temperature: float = 1.0
) -> float:
    """Expected calibration error of ``softmax(logits / temperature)`` over the whole set.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` with ``n_bins`` equal-width bins on the
    max probability; edges ``linspace(0, 1, n_bins + 1)``, a confidence ``c`` goes in bin
    ``b`` when ``edges[b] < c <= edges[b + 1]``.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    logits, labels = _check_inputs(logits, labels)
    conf, _ = _confidence_and_nll(logits, labels, _check_temperature(temperature))
    return _ece_from(conf, _correct(logits, labels), int(n_bins))


def negative_log_likelihood(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of the labels under ``softmax(logits / temperature)``."""
    logits, labels = _check_inputs(logits, labels)
    _, nll = _confidence_and_nll(logits, labels, _check_temperature(temperature))
    return float(nll.mean())


def _nll_derivatives(logits: Tensor, labels: Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative of the mean NLL of ``softmax(beta * z)`` w.r.t. ``beta``.

    ``NLL(beta) = mean_i [logsumexp(beta z_i) - beta z_i,y_i]``, so
    ``NLL'(beta) = mean_i [E_p(z_i) - z_i,y_i]`` and ``NLL''(beta) = mean_i Var_p(z_i) >= 0``
    with ``p = softmax(beta z_i)``.
    """
    n = logits.shape[0]
    grad = curv = 0.0
    for rows in _row_chunks(*logits.shape):
        z = logits[rows].double()  # (n, C)
        p = torch.softmax(beta * z, dim=1)  # (n, C)
        mean_z = (p * z).sum(dim=1)  # (n,)
        # Variance as E[(z - mean)^2]: avoids the cancellation of E[z^2] - E[z]^2.
        var_z = (p * (z - mean_z[:, None]).square()).sum(dim=1)  # (n,)
        grad += float((mean_z - z.gather(1, labels[rows, None]).squeeze(1)).sum())
        curv += float(var_z.sum())
    return grad / n, curv / n


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature ``T > 0`` minimising the mean NLL of ``softmax(logits / T)``.

    Fit it on an ID validation split, then apply it to every eval set (``set_metrics``).

    How: with ``beta = 1 / T`` the NLL is CONVEX in ``beta`` (its second derivative is a mean
    of variances), so the minimiser is the single root of ``NLL'(beta)``. A safeguarded
    Newton iteration (Newton steps inside a shrinking bracket, bisection when a step leaves
    it) finds that root in a handful of full passes, deterministically, with no learning
    rate or initialisation to tune. Each pass is a chunked float64 softmax, so N ~ 1e6
    takes seconds on a CPU.

    The search range is ``T in [0.05, 20]``. If the optimum lies outside (e.g. separable
    data, where the NLL keeps falling as ``T -> 0``) the nearest boundary is returned. If the
    NLL does not depend on ``T`` at all (every row constant), ``1.0`` is returned.
    """
    logits, labels = _check_inputs(logits, labels)
    lo, hi = 1.0 / _T_MAX, 1.0 / _T_MIN  # bracket on beta
    g_lo, _ = _nll_derivatives(logits, labels, lo)
    g_hi, _ = _nll_derivatives(logits, labels, hi)
    # NLL' is non-decreasing (convexity); its signs at the bracket ends decide the cases.
    if g_lo >= 0.0 and g_hi <= 0.0:
        return 1.0  # NLL' == 0 on the whole range: the temperature does not matter
    if g_lo >= 0.0:
        return _T_MAX
    if g_hi <= 0.0:
        return _T_MIN

    beta = 1.0  # start at "no scaling"; it lies inside (lo, hi)
    for _ in range(100):
        grad, curv = _nll_derivatives(logits, labels, beta)
        if grad == 0.0:
            break
        if grad < 0.0:
            lo = beta
        else:
            hi = beta
        step = grad / curv if curv > 0.0 else math.inf
        candidate = beta - step
        if not lo < candidate < hi:
            # Newton left the bracket: bisect it (geometrically, since beta is a scale).
            candidate = math.sqrt(lo * hi)
        converged = abs(candidate - beta) <= 1e-10 * beta or (hi - lo) <= 1e-12 * beta
        beta = candidate
        if converged:
            break
    return 1.0 / beta


def reliability(logits: Tensor, labels: Tensor, n_bins: int = 15,
                temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The reliability-diagram bins of ``softmax(logits / temperature)``: per bin the
    sample count, the sum of confidences and the number correct (``reliability_bins``)."""
    logits, labels = _check_inputs(logits, labels)
    conf, _ = _confidence_and_nll(logits, labels, _check_temperature(temperature))
    return reliability_bins(conf, _correct(logits, labels), n_bins)


def confidence_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature ``T`` at which the mean max-probability of ``softmax(logits / T)``
    equals the accuracy (VRF's calibration of each ensemble member, fitted on ID
    validation). The mean max-probability falls monotonically as ``T`` grows, so a
    bisection on ``log T`` over ``[0.05, 20]`` finds it; outside that range the nearest
    boundary is returned."""
    logits, labels = _check_inputs(logits, labels)
    target = float(_correct(logits, labels).double().mean())

    def mean_confidence(t: float) -> float:
        conf, _ = _confidence_and_nll(logits, labels, t)
        return float(conf.mean())

    lo, hi = math.log(_T_MIN), math.log(_T_MAX)
    if mean_confidence(_T_MIN) <= target:
        return _T_MIN
    if mean_confidence(_T_MAX) >= target:
        return _T_MAX
    while hi - lo > 1e-7:  # about 27 halvings of a range of 6 in log T
        mid = (lo + hi) / 2
        if mean_confidence(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def set_metrics(logits: Tensor, labels: Tensor, temperature: float) -> dict[str, float]:
    """All per-set metrics: ``{"acc", "ece", "nll", "ece_ts", "nll_ts"}``.

    ``ece``/``nll`` use the raw logits; ``ece_ts``/``nll_ts`` use ``softmax(logits / temperature)``
    where ``temperature`` was fitted by the caller on the ID validation split
    (``fit_temperature``). Accuracy does not change with a positive temperature.
    """
    logits, labels = _check_inputs(logits, labels)
    temperature = _check_temperature(temperature)
    correct = _correct(logits, labels)
    conf, nll = _confidence_and_nll(logits, labels, 1.0)
    conf_ts, nll_ts = _confidence_and_nll(logits, labels, temperature)
    return {
        "acc": float(correct.double().mean()),
        "ece": _ece_from(conf, correct, 15),
        "nll": float(nll.mean()),
        "ece_ts": _ece_from(conf_ts, correct, 15),
        "nll_ts": float(nll_ts.mean()),
    }
