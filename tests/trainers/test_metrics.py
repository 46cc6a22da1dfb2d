"""Metrics against hand-computed cases, and class-subset projection (EvalSet.project)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.data import EvalSet, identity_groups, mapped_groups, subset_groups
from trainers.metrics import (
    accuracy,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    set_metrics,
)

LN = math.log


def _two_class(p: float) -> list[float]:
    """2-class logits whose softmax is (p, 1-p): [log(p/(1-p)), 0]."""
    return [LN(p / (1 - p)), 0.0]


# Four samples with known probabilities (2 classes):
#   s0: p = (0.9, 0.1),  label 0 -> conf 0.90, correct
#   s1: p = (0.9, 0.1),  label 1 -> conf 0.90, wrong
#   s2: p = (0.3, 0.7),  label 1 -> conf 0.70, correct
#   s3: p = (0.75, 0.25), label 1 -> conf 0.75, wrong
HAND_LOGITS = torch.tensor(
    [_two_class(0.9), _two_class(0.9), [0.0, LN(7 / 3)], _two_class(0.75)], dtype=torch.float64
)
HAND_LABELS = torch.tensor([0, 1, 1, 1])


def test_accuracy_hand_case():
    # s0 and s2 correct -> 2/4.
    assert accuracy(HAND_LOGITS, HAND_LABELS) == 0.5


def test_ece_hand_case_15_bins():
    # 15 bins of width 1/15 = 0.0667, right-closed:
    #   conf 0.90 -> bin 13 = (0.8667, 0.9333]; conf 0.70 -> bin 10 = (0.6667, 0.7333];
    #   conf 0.75 -> bin 11 = (0.7333, 0.8].
    # bin 13: 2 samples, acc 1/2, conf 0.9 -> 2/4 * |0.5 - 0.9|  = 0.2
    # bin 10: 1 sample,  acc 1,   conf 0.7 -> 1/4 * |1.0 - 0.7|  = 0.075
    # bin 11: 1 sample,  acc 0,   conf .75 -> 1/4 * |0.0 - 0.75| = 0.1875
    # ECE = 0.2 + 0.075 + 0.1875 = 0.4625
    assert expected_calibration_error(HAND_LOGITS, HAND_LABELS) == pytest.approx(0.4625, abs=1e-12)


def test_ece_one_bin_is_confidence_minus_accuracy():
    # With 1 bin ECE = |mean acc - mean conf| = |0.5 - (0.9 + 0.9 + 0.7 + 0.75)/4| = |0.5 - 0.8125|.
    assert expected_calibration_error(HAND_LOGITS, HAND_LABELS, n_bins=1) == pytest.approx(0.3125, abs=1e-12)


def test_nll_hand_case():
    # mean(-log 0.9, -log 0.1, -log 0.7, -log 0.25)
    #   = (0.105361 + 2.302585 + 0.356675 + 1.386294) / 4 = 1.037729
    expected = (-LN(0.9) - LN(0.1) - LN(0.7) - LN(0.25)) / 4
    assert negative_log_likelihood(HAND_LOGITS, HAND_LABELS) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.037729, abs=1e-6)


def test_nll_of_uniform_logits_is_log_c():
    # softmax of a constant row is 1/C for every class -> NLL = log C whatever the labels.
    for c in (2, 7, 1000):
        logits = torch.full((5, c), 3.0)
        labels = torch.arange(5) % c
        assert negative_log_likelihood(logits, labels) == pytest.approx(LN(c), rel=1e-9)


def test_temperature_divides_logits():
    # T = 2 on logits 2z is the same distribution as z.
    z = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(50) % 6
    assert negative_log_likelihood(2 * z, y, temperature=2.0) == pytest.approx(negative_log_likelihood(z, y))
    assert expected_calibration_error(2 * z, y, temperature=2.0) == pytest.approx(expected_calibration_error(z, y))


def test_ece_bin_boundary_is_right_closed():
    # 2 bins: (0, 0.5] and (0.5, 1].
    # s0: logits [0, 0] -> conf exactly 0.5 (argmax tie -> class 0), label 0: correct.
    #     Right-closed: bin 0.  (A left-closed convention would put it in bin 1.)
    # s1: logits [0.4, 0] -> conf sigmoid(0.4) = 0.598688, label 1: wrong. Bin 1.
    # Right-closed: 1/2*|1 - 0.5| + 1/2*|0 - 0.598688| = 0.25 + 0.299344 = 0.549344
    # Left-closed would give both in bin 1: |0.5 - (0.5 + 0.598688)/2| = 0.049344.
    logits = torch.tensor([[0.0, 0.0], [0.4, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    conf1 = 1 / (1 + math.exp(-0.4))
    expected = 0.5 * abs(1 - 0.5) + 0.5 * abs(0 - conf1)
    assert expected_calibration_error(logits, labels, n_bins=2) == pytest.approx(expected, abs=1e-12)
    # 4 classes, constant logits: conf exactly 0.25 = edge 1 of 4 bins -> bin 0 = (0, 0.25].
    # Correct (label 0, tie -> 0): ECE = |1 - 0.25| = 0.75 either way, but the point here is that
    # a confidence on the lowest non-zero edge is not dropped.
    assert expected_calibration_error(torch.zeros(1, 4), torch.tensor([0]), n_bins=4) == pytest.approx(0.75)


def test_accuracy_ties_go_to_lowest_index():
    # Row 0 ties classes 1 and 2 -> predicted 1; row 1 ties all -> predicted 0.
    logits = torch.tensor([[0.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    assert accuracy(logits, torch.tensor([1, 0])) == 1.0
    assert accuracy(logits, torch.tensor([2, 2])) == 0.0


def test_perfectly_calibrated_hand_case_has_zero_ece():
    # 10 samples, all with conf 0.8 (same bin), 8 correct -> acc 0.8 == conf 0.8 -> ECE 0.
    logits = torch.tensor([_two_class(0.8)] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)


def _calibrated_sample(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and labels DRAWN from softmax(z): a perfectly calibrated model by construction."""
    g = torch.Generator().manual_seed(seed)
    z = 2.5 * torch.randn(n, c, generator=g)
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    return z, labels


def test_fit_temperature_recovers_two():
    z, y = _calibrated_sample(10_000, 10, seed=0)
    # Feeding 2z makes the model over-confident by exactly a factor 2 in logit scale.
    assert fit_temperature(2 * z, y) == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.05)
    assert fit_temperature(z / 3, y) == pytest.approx(1 / 3, rel=0.05)


def test_fit_temperature_is_a_minimum_and_deterministic():
    z, y = _calibrated_sample(5_000, 5, seed=3)
    t = fit_temperature(1.7 * z, y)
    assert t == fit_temperature(1.7 * z, y)
    best = negative_log_likelihood(1.7 * z, y, temperature=t)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert negative_log_likelihood(1.7 * z, y, temperature=t * factor) >= best


def test_fit_temperature_edge_cases():
    # Constant rows: the NLL does not depend on T -> 1.0.
    assert fit_temperature(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0
    # Separable data: NLL keeps falling as T -> 0 -> the lower bound 0.05.
    assert fit_temperature(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1])) == 0.05
    # Always wrong: the NLL keeps falling as T -> inf -> the upper bound 20.
    assert fit_temperature(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([1, 0])) == 20.0


def test_set_metrics_keys_and_consistency():
    z, y = _calibrated_sample(2_000, 4, seed=5)
    logits = 3 * z
    out = set_metrics(logits, y, temperature=3.0)
    assert set(out) == {"acc", "ece", "nll", "ece_ts", "nll_ts"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["acc"] == accuracy(logits, y)
    assert out["ece"] == pytest.approx(expected_calibration_error(logits, y))
    assert out["nll_ts"] == pytest.approx(negative_log_likelihood(logits, y, temperature=3.0))
    # Over-confident by 3x: temperature scaling must help both NLL and ECE.
    assert out["nll_ts"] < out["nll"] and out["ece_ts"] < out["ece"]


def test_chunking_does_not_change_results(monkeypatch):
    import trainers.metrics as m

    z, y = _calibrated_sample(200, 7, seed=9)
    whole = set_metrics(2 * z, y, 1.5), fit_temperature(2 * z, y)
    monkeypatch.setattr(m, "_CHUNK_ELEMENTS", 7 * 30)  # 30 rows per chunk, last one partial
    chunked = set_metrics(2 * z, y, 1.5), fit_temperature(2 * z, y)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12)
    assert chunked[1] == pytest.approx(whole[1], rel=1e-9)


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), torch.tensor([0, 1]), "NaN in 1 of 2 rows"),
        (torch.tensor([[0.0, -float("inf")]]), torch.tensor([0]), "EvalSet.project"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"labels must lie in \[0, 3\)"),
        (torch.zeros(2, 3), torch.tensor([0]), "one entry per row"),
        (torch.zeros(3), torch.tensor([0, 1, 2]), "2-D"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_bad_inputs_raise_value_error(logits, labels, match):
    for fn in (accuracy, expected_calibration_error, negative_log_likelihood, fit_temperature):
        with pytest.raises(ValueError, match=match):
            fn(logits, labels)


def test_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        set_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), temperature=0.0)


# ---------------------------------------------------------------------------------------
# Class subsets and many-to-one maps (EvalSet.project)
# ---------------------------------------------------------------------------------------

ID_CLASSES = ("ant", "bee", "cat", "dog", "eel")


def _eval_set(classnames, groups) -> EvalSet:
    return EvalSet("s", dataset=[], classnames=classnames, class_groups=groups)


def test_project_identity_returns_same_tensor():
    logits = torch.randn(3, 5)
    assert _eval_set(ID_CLASSES, identity_groups(5)).project(logits) is logits


def test_project_subset_picks_columns_in_order():
    groups = subset_groups(ID_CLASSES, ("bee", "eel"))
    assert groups == ((1,), (4,))
    logits = torch.arange(10.0).reshape(2, 5)  # row 0: 0..4, row 1: 5..9
    out = _eval_set(("bee", "eel"), groups).project(logits)
    assert torch.equal(out, torch.tensor([[1.0, 4.0], [6.0, 9.0]]))


def test_restriction_makes_out_of_subset_argmax_correct():
    # ID argmax is "cat" (index 2, outside the subset {bee, eel}); among the subset, "eel" wins.
    # The label (in the subset's space) is 1 = eel: wrong over all classes, right after restriction.
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 2.0]])
    subset = _eval_set(("bee", "eel"), subset_groups(ID_CLASSES, ("bee", "eel")))
    assert accuracy(logits, torch.tensor([4])) == 0.0  # ID space: label eel = 4, argmax cat
    assert accuracy(subset.project(logits), torch.tensor([1])) == 1.0


def test_softmax_after_restriction_sums_to_one_over_subset():
    # Restricting BEFORE softmax renormalises over the subset: p(bee), p(eel) = softmax([1, 2]).
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 2.0]], dtype=torch.float64)
    subset = _eval_set(("bee", "eel"), subset_groups(ID_CLASSES, ("bee", "eel")))
    p = torch.softmax(subset.project(logits), dim=1)
    assert float(p.sum()) == pytest.approx(1.0)
    assert float(p[0, 1]) == pytest.approx(math.exp(2) / (math.exp(1) + math.exp(2)))
    # NLL uses the restricted distribution: -log p(eel) = log(1 + e^-1) = 0.313262.
    assert negative_log_likelihood(subset.project(logits), torch.tensor([1])) == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-12
    )


def test_project_mapped_takes_max_over_group():
    names, groups = mapped_groups(ID_CLASSES, {"insect": ["ant", "bee"], "pet": ["dog", "cat"], "fish": ["eel"]})
    assert names == ("insect", "pet", "fish")
    assert groups == ((0, 1), (2, 3), (4,))
    logits = torch.tensor([[3.0, 1.0, 0.0, 5.0, 2.0], [0.0, 4.0, 7.0, 1.0, 9.0]])
    out = _eval_set(names, groups).project(logits)
    # row 0: max(3,1)=3, max(0,5)=5, 2;  row 1: max(0,4)=4, max(7,1)=7, 9
    assert torch.equal(out, torch.tensor([[3.0, 5.0, 2.0], [4.0, 7.0, 9.0]]))


def test_project_rejects_too_few_columns():
    subset = _eval_set(("eel",), ((4,),))
    with pytest.raises(ValueError, match="only 3 columns"):
        subset.project(torch.zeros(2, 3))


def test_evaluation_is_fp32_unless_bf16_is_asked_for_on_a_gpu():
    """fp32 is the papers' protocol (bf16 autocast moves ~0.7 % of ImageNet top-1
    predictions): autocast is on only for precision bf16 on a CUDA device."""
    from trainers.evaluate import autocast
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    import warnings
    with warnings.catch_warnings():      # no GPU here: torch warns that it disables it
        warnings.simplefilter("ignore")
        assert not autocast(cuda, "fp32")._enabled
        assert not autocast(cpu, "bf16")._enabled
        bf16 = autocast(cuda, "bf16")
    assert bf16.fast_dtype == torch.bfloat16
    assert bf16._enabled == torch.cuda.is_available()
    with pytest.raises(ValueError, match="precision"):
        autocast(cpu, "fp16")
