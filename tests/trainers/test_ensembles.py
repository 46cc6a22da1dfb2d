"""Ensembles: the registry, exact endpoints, the vectorised mixture metrics, VRF's parts.

Every reference here is computed independently of the code under test: full (N, K)
mixtures in float64, projections by hand, kNN by full pairwise distances in NumPy,
sigmoids written out.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from test_new_ensembles import check_dawin_endpoint, check_lines_endpoints
from trainers import knn
from trainers.data import EvalSet, identity_groups, mapped_groups, subset_groups
from trainers.data.benchmark import ID_VAL
from trainers.ensembles import (FINE_TUNED_MEMBER, OUTPUTS, REGISTRY, TRAIN_SPLIT, WEIGHTS,
                                ZERO_SHOT_MEMBER, MemberOutputs, Mixture, OutputEnsemble,
                                WeightEnsemble, check_grid, get_ensemble)
from trainers.ensembles import mixture as mixture_mod
from trainers.ensembles import vrf
from trainers.ensembles.mixture import CANDIDATES, mixture_metrics
from trainers.evaluate import evaluate_logits
from trainers.methods import Fitted
from trainers.metrics import (confidence_temperature, ece_from_bins,
                              expected_calibration_error, fit_temperature,
                              negative_log_likelihood, reliability_bins)

TRAIN = TRAIN_SPLIT     # "id_train": the training split, evaluation preprocessing
METRICS = ("acc", "ece", "nll", "ece_ts", "nll_ts", "temperature")


# ---------------------------------------------------------------------------------------
# Shared builders
# ---------------------------------------------------------------------------------------

def id_names(c: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(c))


def identity_set(name: str, c: int) -> EvalSet:
    return EvalSet(name, None, id_names(c), identity_groups(c))


def subset_set(name: str, c: int, order: list[int]) -> EvalSet:
    names = id_names(c)
    return EvalSet(name, None, tuple(names[i] for i in order),
                   subset_groups(names, [names[i] for i in order]))


def mapped_set(name: str, c: int, groups: list[list[int]]) -> EvalSet:
    names = id_names(c)
    classes, grouped = mapped_groups(names, {f"s{k}": [names[i] for i in g]
                                             for k, g in enumerate(groups)})
    return EvalSet(name, None, classes, grouped)


def project_by_hand(logits: torch.Tensor, groups) -> torch.Tensor:
    """Set logits: per own class, the max of its ID logits (a column for singletons)."""
    return torch.stack([logits[:, list(g)].max(dim=1).values for g in groups], dim=1)


def correlated_logits(labels: torch.Tensor, n_classes: int, scale: float, signal: float,
                      gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(labels.shape[0], n_classes, generator=gen) * scale
    z[torch.arange(labels.shape[0]), labels] += signal
    return z


def make_eval_sets(c: int = 12) -> dict[str, EvalSet]:
    """ID val/test over c classes, a reordered 7-class subset, a 4-class many-to-one map
    (groups of different sizes, so project pads)."""
    return {
        ID_VAL: identity_set(ID_VAL, c),
        "id_test": identity_set("id_test", c),
        "subset": subset_set("subset", c, [9, 2, 5, 11, 0, 7, 3]),
        "mapped": mapped_set("mapped", c, [[1, 4], [6], [8, 10, 11], [0, 2, 3, 5]]),
    }


def make_members(eval_sets: dict[str, EvalSet], c: int, seed: int, n: int = 120,
                 features: bool = False, dim: int = 6, n_train: int = 150,
                 scale: float = 1.5) -> tuple[MemberOutputs, MemberOutputs]:
    """Two members with labels in each set's own classes. ID logits are random with a
    label signal for the ID classes a set's label maps to (the first of its group)."""
    gen = torch.Generator().manual_seed(seed)
    zs_logits, ft_logits, labels, zs_feat, ft_feat = {}, {}, {}, {}, {}
    sets = dict(eval_sets)
    for name in [*sets, TRAIN] if features else sets:
        groups = sets[name].class_groups if name in sets else identity_groups(c)
        size = n_train if name == TRAIN else n
        y = torch.randint(0, len(groups), (size,), generator=gen)
        id_y = torch.tensor([groups[int(k)][0] for k in y])
        labels[name] = y
        zs_logits[name] = correlated_logits(id_y, c, scale, 1.0, gen)
        ft_logits[name] = correlated_logits(id_y, c, scale, 2.5, gen)
        if features:
            zs_feat[name] = nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1)
            ft_feat[name] = nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1)
    return (MemberOutputs(zs_logits, labels, zs_feat if features else None),
            MemberOutputs(ft_logits, labels, ft_feat if features else None))


def assert_matches_single_model(got: dict, ref: dict, eval_sets, ts_tol: float = 1e-6):
    """A mixture point's metrics against evaluate_logits of one model."""
    for name in eval_sets:
        g, r = got[name], ref[name]
        assert g["acc"] == r["acc"], (name, "acc", g["acc"], r["acc"])
        assert g["ece"] == pytest.approx(r["ece"], abs=1e-6), (name, "ece")
        assert g["nll"] == pytest.approx(r["nll"], rel=1e-6, abs=1e-7), (name, "nll")
        assert g["ece_ts"] == pytest.approx(r["ece_ts"], abs=ts_tol), (name, "ece_ts")
        assert g["nll_ts"] == pytest.approx(r["nll_ts"], rel=ts_tol, abs=ts_tol), (name, "nll_ts")
        assert g["temperature"] == pytest.approx(r["temperature"], rel=1e-5), (name, "T")
        assert g["bins"][0] == r["bins"][0], (name, "bin counts")
        for part in (1, 2):
            np.testing.assert_allclose(g["bins"][part], r["bins"][part], atol=1e-5)


def scaled(logits: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: v.double() / t for k, v in logits.items()}


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 5))
    nn.init.uniform_(net[1].weight)
    nn.init.uniform_(net[1].bias)
    net.train()
    net(torch.randn(8, 3, 8, 8))          # BN running stats away from their init
    net[1].num_batches_tracked.fill_(7 + seed)
    return net.eval()


# ---------------------------------------------------------------------------------------
# 1. Registry, options, coefficient grids
# ---------------------------------------------------------------------------------------

def test_registry_holds_the_three_ensembles():
    assert {"wise_ft", "ose", "vrf"} <= set(REGISTRY)
    assert REGISTRY["wise_ft"].mixes == WEIGHTS
    assert isinstance(REGISTRY["wise_ft"], WeightEnsemble)
    assert REGISTRY["ose"].mixes == OUTPUTS and REGISTRY["vrf"].mixes == OUTPUTS
    assert all(isinstance(REGISTRY[n], OutputEnsemble) for n in ("ose", "vrf"))
    assert REGISTRY["vrf"].needs_features and not REGISTRY["ose"].needs_features
    assert get_ensemble("ose") is REGISTRY["ose"]
    with pytest.raises(ValueError, match="unknown ensemble 'nope'.*ose"):
        get_ensemble("nope")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_defaults_are_valid_and_points_cover_the_grid(name):
    ens = REGISTRY[name]
    options = ens.options()                       # defaults pass __post_init__
    fields = {f.name for f in dataclasses.fields(options)}
    assert ens.coefficients and set(ens.coefficients) <= fields
    assert ens.mixes in (WEIGHTS, OUTPUTS)
    if ens.mixes == WEIGHTS:
        assert ens.endpoint is not None
    grids = [getattr(options, c) for c in ens.coefficients]
    for grid in grids:
        assert len(grid) >= 1 and len(set(grid)) == len(grid)
        assert all(math.isfinite(v) for v in grid)
    points = ens.points(options)
    assert len(points) == math.prod(len(g) for g in grids)
    assert all(set(p) == set(ens.coefficients) for p in points)
    assert len({tuple(p.values()) for p in points}) == len(points)


def test_default_grids():
    assert REGISTRY["wise_ft"].options().alpha == tuple(i / 10 for i in range(11))
    assert REGISTRY["ose"].options().alpha == tuple(i / 10 for i in range(11))
    v = REGISTRY["vrf"].options()
    assert (v.a, v.b, v.variant, v.k) == ((1.5,), (0.6,), "code", None)


def test_points_expand_in_order_last_coefficient_fastest():
    ens = REGISTRY["vrf"]
    options = ens.options(a=(2.0, 1.0), b=(0.1, 0.3, 0.2))
    assert ens.points(options) == [
        {"a": 2.0, "b": 0.1}, {"a": 2.0, "b": 0.3}, {"a": 2.0, "b": 0.2},
        {"a": 1.0, "b": 0.1}, {"a": 1.0, "b": 0.3}, {"a": 1.0, "b": 0.2}]
    ose = REGISTRY["ose"]
    assert ose.points(ose.options(alpha=(0.7, 0.0, 0.2))) == [
        {"alpha": 0.7}, {"alpha": 0.0}, {"alpha": 0.2}]


@pytest.mark.parametrize("name,coefficient", [(n, c) for n in sorted(REGISTRY)
                                              for c in REGISTRY[n].coefficients])
def test_bad_grids_raise_naming_the_option(name, coefficient):
    ens = REGISTRY[name]
    default = getattr(ens.options(), coefficient)
    v = default[0]
    for bad, why in (((v, v), "duplicate"), ((v, float("nan")), "not a finite"),
                     ((float("inf"),), "not a finite"), ((), "at least one")):
        with pytest.raises(ValueError, match=rf"^{coefficient}\b.*{why}"):
            ens.options(**{coefficient: bad})


@pytest.mark.parametrize("name,coefficient,bad", [
    ("wise_ft", "alpha", 1.5), ("wise_ft", "alpha", -0.1),
    ("ose", "alpha", 1.0001), ("ose", "alpha", -1e-9),
    ("vrf", "b", 0.0), ("vrf", "b", -0.5)])
def test_out_of_range_coefficients_raise_naming_the_option(name, coefficient, bad):
    with pytest.raises(ValueError, match=rf"^{coefficient}\b"):
        REGISTRY[name].options(**{coefficient: (0.5, bad)})


def test_vrf_other_options_are_checked():
    with pytest.raises(ValueError, match="variant"):
        vrf.VRFOptions(variant="blog")
    with pytest.raises(ValueError, match="k must be >= 1"):
        vrf.VRFOptions(k=0)
    vrf.VRFOptions(a=(-3.0, 0.0, 7.0), variant="paper", k=4)    # a has no range


def test_check_grid_with_one_sided_range_raises_value_error():
    """check_grid's signature allows low or high alone; an out-of-range value must give
    the same ValueError naming the option, not a formatting crash."""
    with pytest.raises(ValueError, match=r"^x\b"):
        check_grid("x", (0.5, 2.0), high=1.0)
    with pytest.raises(ValueError, match=r"^y\b"):
        check_grid("y", (-2.0,), low=0.0)


# ---------------------------------------------------------------------------------------
# 2. Endpoints: the coefficient point that reproduces a member gives that member's result
# ---------------------------------------------------------------------------------------

def _endpoint_wise_ft():
    ens = REGISTRY["wise_ft"]
    zs, ft = small_net(0), small_net(1)
    zs_text = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0))}
    ft_text = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(1))}
    options = ens.options(alpha=(0.0, 0.5, 1.0))
    x = torch.randn(4, 3, 8, 8)
    expected = {0.0: (ZERO_SHOT_MEMBER, zs), 1.0: (FINE_TUNED_MEMBER, ft), 0.5: (None, None)}
    for point in ens.points(options):
        member, ref = expected[point["alpha"]]
        assert ens.endpoint(point) == member, point
        mixed = ens.mix(Fitted(zs, zs_text), Fitted(ft, ft_text), options, point)
        assert isinstance(mixed, Fitted)
        assert mixed.classifier is not zs and mixed.classifier is not ft
        out = mixed.classifier(x)
        if ref is None:
            assert not torch.equal(out, zs(x)) and not torch.equal(out, ft(x))
            assert not torch.equal(mixed.text_tower["w"], zs_text["w"])
            assert not torch.equal(mixed.text_tower["w"], ft_text["w"])
            continue
        for key, value in mixed.classifier.state_dict().items():
            if key.endswith("num_batches_tracked"):       # integer: always zero-shot's
                assert torch.equal(value, zs.state_dict()[key])
            else:
                assert torch.equal(value, ref.state_dict()[key]), (point, key)
        assert torch.equal(out, ref(x))
        # the text towers (methods that train theirs) take the same alpha, exact ends too
        assert torch.equal(mixed.text_tower["w"], (zs_text, ft_text)[ref is ft]["w"])
    assert ens.endpoint({"alpha": 1}) == FINE_TUNED_MEMBER
    assert ens.endpoint({"alpha": 0.9999}) is None
    # a fine-tuned model with the pre-trained text tower (None) keeps it at every alpha
    assert ens.mix(Fitted(zs, zs_text), Fitted(ft), options, {"alpha": 0.5}).text_tower is None


def _endpoint_ose():
    ens = REGISTRY["ose"]
    eval_sets = make_eval_sets()
    zs, ft = make_members(eval_sets, 12, seed=1)
    for calibrate in (False, True):
        options = ens.options(alpha=(0.0, 0.5, 1.0), calibrate=calibrate)
        mixture = ens.mix(zs, ft, options, ens.points(options))
        results = mixture_metrics(zs, ft, mixture, eval_sets)
        assert len(results) == 3
        if calibrate:
            t_zs = confidence_temperature(zs.logits[ID_VAL], zs.labels[ID_VAL])
            t_ft = confidence_temperature(ft.logits[ID_VAL], ft.labels[ID_VAL])
            assert mixture.temperatures == pytest.approx((t_zs, t_ft), rel=1e-12)
            assert not (t_zs == pytest.approx(1.0) or t_ft == pytest.approx(1.0))
        else:
            t_zs = t_ft = 1.0
            assert mixture.temperatures == (1.0, 1.0)
        for name in eval_sets:
            assert mixture.weights[name].shape == (3, zs.logits[name].shape[0])
        assert_matches_single_model(results[0], evaluate_logits(
            scaled(zs.logits, t_zs), zs.labels, eval_sets), eval_sets)
        assert_matches_single_model(results[2], evaluate_logits(
            scaled(ft.logits, t_ft), ft.labels, eval_sets), eval_sets)
        # the midpoint is neither member (the check above can tell them apart)
        assert results[1][ID_VAL]["nll"] != pytest.approx(results[0][ID_VAL]["nll"], rel=1e-3)
        assert results[1][ID_VAL]["nll"] != pytest.approx(results[2][ID_VAL]["nll"], rel=1e-3)


def _endpoint_vrf():
    ens = REGISTRY["vrf"]
    eval_sets = make_eval_sets()
    zs, ft = make_members(eval_sets, 12, seed=2, features=True)
    t_zs = confidence_temperature(zs.logits[ID_VAL], zs.labels[ID_VAL])
    t_ft = confidence_temperature(ft.logits[ID_VAL], ft.labels[ID_VAL])
    for variant in ("code", "paper"):
        options = ens.options(a=(-100.0, 100.0), b=(1.0,), variant=variant)
        mixture = ens.mix(zs, ft, options, ens.points(options))
        assert mixture.temperatures == pytest.approx((t_zs, t_ft), rel=1e-12)
        for name in eval_sets:
            w = mixture.weights[name]
            assert w.shape == (2, zs.logits[name].shape[0])
            assert float(w[0].max()) < 1e-40 and float(w[1].min()) == 1.0
        results = mixture_metrics(zs, ft, mixture, eval_sets)
        assert_matches_single_model(results[0], evaluate_logits(
            scaled(zs.logits, t_zs), zs.labels, eval_sets), eval_sets)
        assert_matches_single_model(results[1], evaluate_logits(
            scaled(ft.logits, t_ft), ft.labels, eval_sets), eval_sets)


ENDPOINT_CHECKS = {"wise_ft": _endpoint_wise_ft, "ose": _endpoint_ose, "vrf": _endpoint_vrf,
                   "lines": check_lines_endpoints, "dawin": check_dawin_endpoint}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_endpoint_reproduces_the_member(name):
    assert name in ENDPOINT_CHECKS, f"ensemble {name!r} has no endpoint test yet"
    ENDPOINT_CHECKS[name]()


def _confident_members():
    """A zero-shot model that gives the label 0.6 and a fine-tuned one that is right on
    most samples but confidently wrong on a few (label 20 or 45 logits below its top)."""
    c, n = 6, 40
    eval_sets = {ID_VAL: identity_set(ID_VAL, c), "id_test": identity_set("id_test", c)}
    gen = torch.Generator().manual_seed(5)
    logits_zs, logits_ft, labels = {}, {}, {}
    for name in eval_sets:
        y = torch.randint(0, c, (n,), generator=gen)
        zs = torch.randn(n, c, generator=gen) * 0.1
        zs[torch.arange(n), y] += 2.0
        ft = torch.randn(n, c, generator=gen)
        ft[torch.arange(n), y] += 6.0
        for row, gap in ((0, 20.0), (1, 45.0), (2, 30.0)):   # confidently wrong
            wrong = (int(y[row]) + 1) % c
            ft[row] = 0.0
            ft[row, wrong] = gap
        logits_zs[name], logits_ft[name], labels[name] = zs, ft, y
    return eval_sets, MemberOutputs(logits_zs, labels), MemberOutputs(logits_ft, labels)


@pytest.mark.parametrize("name", ["ose", "vrf"])
def test_fine_tuned_endpoint_keeps_small_label_probabilities(name):
    """At w = 1 the mixture IS the fine-tuned member, so a confidently wrong sample's
    label probability (e^-20, e^-45) must survive. Computing p0 + w (p1 - p0) instead of
    (1 - w) p0 + w p1 cancels it to 0 (clamped to the smallest float64: NLL 708)."""
    eval_sets, zs, ft = _confident_members()
    if name == "ose":
        options = REGISTRY["ose"].options(alpha=(1.0,))
        t_ft = 1.0
        mix_zs, mix_ft = zs, ft
    else:
        options = REGISTRY["vrf"].options(a=(100.0,), b=(1.0,))
        t_ft = confidence_temperature(ft.logits[ID_VAL], ft.labels[ID_VAL])
        feats = {s: nn.functional.normalize(torch.randn(40, 4, generator=torch.Generator()
                                                        .manual_seed(1)), dim=1)
                 for s in [*eval_sets, TRAIN]}
        wrong_zs = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
        mix_zs = MemberOutputs({**zs.logits, TRAIN: wrong_zs},
                               {**zs.labels, TRAIN: zs.labels["id_test"]})
        mix_ft = MemberOutputs({**ft.logits, TRAIN: ft.logits["id_test"]},
                               {**ft.labels, TRAIN: ft.labels["id_test"]}, feats)
    ens = REGISTRY[name]
    mixture = ens.mix(mix_zs, mix_ft, options, ens.points(options))
    assert all(bool((w == 1.0).all()) for w in mixture.weights.values())
    got = mixture_metrics(mix_zs, mix_ft, mixture, eval_sets)[0]
    ref = evaluate_logits(scaled(ft.logits, t_ft), ft.labels, eval_sets)
    for s in eval_sets:
        assert got[s]["acc"] == ref[s]["acc"]
        assert got[s]["nll"] == pytest.approx(ref[s]["nll"], rel=1e-5), (s, "nll")
        assert got[s]["nll_ts"] == pytest.approx(ref[s]["nll_ts"], rel=1e-5), (s, "nll_ts")


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_endpoints_break_ties_like_argmax(alpha):
    """Logits that went through bfloat16 (autocast on a GPU) tie often. metrics predicts
    argmax, ties -> lowest class index; the mixture at alpha = 0 (1) must count the same
    samples as correct, or OSE(0) differs from the zero-shot (fine-tuned) model."""
    c, n = 50, 400
    gen = torch.Generator().manual_seed(9)
    eval_sets = {ID_VAL: identity_set(ID_VAL, c), "id_test": identity_set("id_test", c)}
    logits, labels = {}, {}
    for name in eval_sets:
        z = torch.randn(n, c, generator=gen)
        top = z.argmax(1)
        other = (top + 1 + torch.randint(0, c - 1, (n,), generator=gen)) % c
        z[torch.arange(n), other] = z[torch.arange(n), top]         # a two-way tie
        logits[name] = z
        labels[name] = torch.minimum(top, other)       # the lowest tied index: "correct"
    tied = MemberOutputs(logits, labels)
    other_member = MemberOutputs({k: torch.randn(n, c, generator=gen) for k in logits}, labels)
    zs, ft = (tied, other_member) if alpha == 0.0 else (other_member, tied)
    ref = evaluate_logits(logits, labels, eval_sets)
    assert ref["id_test"]["acc"] == 1.0
    options = REGISTRY["ose"].options(alpha=(alpha,))
    mixture = REGISTRY["ose"].mix(zs, ft, options, REGISTRY["ose"].points(options))
    got = mixture_metrics(zs, ft, mixture, eval_sets, with_ts=False)[0]
    for s in eval_sets:
        assert got[s]["acc"] == ref[s]["acc"], s
        assert got[s]["ece"] == pytest.approx(ref[s]["ece"], abs=1e-6), s


# ---------------------------------------------------------------------------------------
# 3. mixture_metrics against brute force, top-m candidates and their fallback
# ---------------------------------------------------------------------------------------

def _adversarial_rows(n: int, k: int, gen: torch.Generator):
    """Set-space logits where the mixture's top class X is 6th in BOTH members:
    p0 puts 0.15 on A1..A5, p1 on B1..B5, both 0.14 on X; the label is X."""
    z0 = torch.empty(n, k)
    z1 = torch.empty(n, k)
    labels = torch.empty(n, dtype=torch.long)
    for r in range(n):
        perm = torch.randperm(k, generator=gen)
        a, b, x = perm[:5], perm[5:10], perm[10]
        p0 = torch.full((k,), 0.11 / (k - 6))
        p1 = p0.clone()
        p0[a], p1[b] = 0.15, 0.15
        p0[x] = p1[x] = 0.14
        z0[r] = p0.log() + 1e-3 * torch.randn(k, generator=gen)
        z1[r] = p1.log() + 1e-3 * torch.randn(k, generator=gen)
        labels[r] = x
    return z0, z1, labels


def _brute_force(zs, ft, mixture, eval_sets, groups_by_set):
    """Per point and set, metrics of the full float64 mixture of the projected members."""
    t0, t1 = mixture.temperatures
    logp = {}
    for name in eval_sets:
        groups = groups_by_set[name]
        p0 = torch.softmax(project_by_hand(zs.logits[name].double(), groups) / t0, dim=1)
        p1 = torch.softmax(project_by_hand(ft.logits[name].double(), groups) / t1, dim=1)
        w = mixture.weights[name].double()[:, :, None]                   # (P, N, 1)
        logp[name] = ((1 - w) * p0[None] + w * p1[None]).log()          # (P, N, K)
    out = []
    for i in range(mixture.weights[ID_VAL].shape[0]):
        temperature = fit_temperature(logp[ID_VAL][i], zs.labels[ID_VAL])
        row = {}
        for name in eval_sets:
            lp, y = logp[name][i], zs.labels[name]
            row[name] = {
                "acc": float((lp.argmax(1) == y).double().mean()),
                "ece": expected_calibration_error(lp, y),
                "nll": float(-lp.gather(1, y[:, None]).mean()),
                "ece_ts": expected_calibration_error(lp, y, temperature=temperature),
                "nll_ts": negative_log_likelihood(lp, y, temperature=temperature),
                "temperature": temperature,
                "conf": lp.max(1).values.exp(), "pred": lp.argmax(1),
                "top2": lp.topk(2, dim=1).values.exp()}
        out.append(row)
    return out


def test_mixture_metrics_equal_brute_force_with_candidate_fallback():
    c = 60
    gen = torch.Generator().manual_seed(3)
    subset_order = torch.randperm(c, generator=gen)[:50].tolist()
    mapped = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    eval_sets = {ID_VAL: identity_set(ID_VAL, c), "id_test": identity_set("id_test", c),
                 "subset": subset_set("subset", c, subset_order),
                 "mapped": mapped_set("mapped", c, mapped)}
    groups_by_set = {ID_VAL: [(i,) for i in range(c)], "id_test": [(i,) for i in range(c)],
                     "subset": [(i,) for i in subset_order], "mapped": mapped}
    n, n_adv, n_points = 150, 30, 4
    zs_logits, ft_logits, labels, weights = {}, {}, {}, {}
    adversarial = {}
    for name, eval_set in eval_sets.items():
        k = eval_set.num_classes
        y = torch.randint(0, k, (n,), generator=gen)
        z0 = torch.randn(n, c, generator=gen) * 2
        z1 = torch.randn(n, c, generator=gen) * 2
        w = torch.rand(n_points, n, generator=gen)
        w[0, :10], w[1, 10:20] = 0.0, 1.0                       # exact endpoints too
        if name in ("id_test", "subset"):
            a0, a1, ay = _adversarial_rows(n_adv, k, gen)
            cols = [g[0] for g in groups_by_set[name]]
            z0[:n_adv] = 30.0            # columns outside the subset: huge, but projected away
            z1[:n_adv] = 30.0
            z0[:n_adv, cols], z1[:n_adv, cols] = a0, a1
            y[:n_adv] = ay
            w[:, :n_adv] = 0.2 + 0.6 * torch.rand(n_points, n_adv, generator=gen)
            adversarial[name] = (a0, a1)
        zs_logits[name], ft_logits[name], labels[name], weights[name] = z0, z1, y, w
    assert (zs_logits["subset"][:n_adv] == 30.0).any()
    zs, ft = MemberOutputs(zs_logits, labels), MemberOutputs(ft_logits, labels)
    mixture = Mixture((1.3, 0.8), weights)

    # The adversarial rows need the fallback: the mixture's top is in neither top-m list.
    for name, (a0, a1) in adversarial.items():
        p0, p1 = torch.softmax(a0 / 1.3, 1), torch.softmax(a1 / 0.8, 1)
        top0, top1 = p0.topk(CANDIDATES, 1).indices, p1.topk(CANDIDATES, 1).indices
        w = weights[name][:, :n_adv, None]
        best = ((1 - w) * p0 + w * p1).argmax(2)                              # (P, n_adv)
        assert not (best[..., None] == top0).any() and not (best[..., None] == top1).any()

    got = mixture_metrics(zs, ft, mixture, eval_sets)
    ref = _brute_force(zs, ft, mixture, eval_sets, groups_by_set)
    assert len(got) == n_points
    # Exact accuracies and bin counts below are fair on any CPU only because no row's top
    # two classes, and no confidence and bin edge, are within float32 rounding (~1e-7)
    # of each other: this data keeps them > 1e-5 apart.
    for i in range(n_points):
        for name in eval_sets:
            conf = ref[i][name]["conf"]
            assert float((conf * 15 - (conf * 15).round()).abs().min()) > 1e-5 * 15
            top2 = ref[i][name]["top2"]
            assert float(((top2[:, 0] - top2[:, 1]) / top2[:, 0]).min()) > 1e-5
    for i in range(n_points):
        for name in eval_sets:
            g, r = got[i][name], ref[i][name]
            assert g["acc"] == r["acc"], (i, name)
            assert g["ece"] == pytest.approx(r["ece"], abs=1e-6), (i, name)
            assert g["nll"] == pytest.approx(r["nll"], rel=1e-6), (i, name)
            assert g["temperature"] == pytest.approx(r["temperature"], rel=1e-5), (i, name)
            assert g["ece_ts"] == pytest.approx(r["ece_ts"], abs=1e-5), (i, name)
            assert g["nll_ts"] == pytest.approx(r["nll_ts"], rel=1e-5), (i, name)
            # bins: counts of the brute-force confidences, sums to float32 round-off
            count, sum_conf, sum_correct = reliability_bins(r["conf"], r["pred"] == labels[name])
            assert g["bins"][0] == count.tolist(), (i, name)
            np.testing.assert_allclose(g["bins"][1], sum_conf.tolist(), atol=1e-4)
            assert g["bins"][2] == sum_correct.tolist(), (i, name)
    # the adversarial rows are labelled with the fallback's class: all correct
    for name in adversarial:
        for i in range(n_points):
            assert bool((ref[i][name]["pred"][:n_adv] == labels[name][:n_adv]).all())


def test_top_class_stats_exact_on_random_and_adversarial_rows():
    """Same float32 formula as the full mixture -> identical top probability and class;
    some rows need the fallback, most do not."""
    gen = torch.Generator().manual_seed(4)
    k, n, n_points = 50, 300, 5
    z0, z1 = torch.randn(n, k, generator=gen) * 2, torch.randn(n, k, generator=gen) * 2
    a0, a1, ay = _adversarial_rows(40, k, gen)
    z0[:40], z1[:40] = a0, a1
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[:40] = ay
    p0, p1 = z0.softmax(1), z1.softmax(1)
    w = torch.rand(n_points, n, generator=gen)
    w[:, :40] = 0.3 + 0.4 * torch.rand(n_points, 40, generator=gen)
    conf, pred = mixture_mod._top_class_stats(p0.log(), p1.log(), w)
    p0, p1 = p0.log().exp(), p1.log().exp()       # the probabilities as the function sees them
    full = (1 - w[..., None]) * p0[None] + w[..., None] * p1[None]          # (P, N, K)
    # the function picks the top with lerp, this reference with (1-w) p0 + w p1: the same
    # class on any CPU only if no row's top two are within their rounding (~1e-7)
    top2 = full.topk(2, dim=2).values
    assert float(((top2[..., 0] - top2[..., 1]) / top2[..., 0]).min()) > 1e-5
    assert torch.equal(conf, full.max(2).values)
    assert torch.equal(pred, full.argmax(2))
    log_label = mixture_mod._log_label_probability(z0.log_softmax(1), z1.log_softmax(1), w, labels)
    ref_label = ((1 - w.double()) * p0.double()[torch.arange(n), labels]
                 + w.double() * p1.double()[torch.arange(n), labels])
    torch.testing.assert_close(log_label.exp(), ref_label, rtol=1e-5, atol=1e-9)
    assert bool((pred[:, :40] == labels[:40]).all())
    # how many (point, sample) pairs the candidate bound could not settle
    t0 = p0.topk(CANDIDATES + 1, 1).values[:, -1]
    t1 = p1.topk(CANDIDATES + 1, 1).values[:, -1]
    unsure = conf <= (1 - w) * t0[None] + w * t1[None]
    assert int(unsure[:, :40].sum()) == n_points * 40
    assert int(unsure[:, 40:].sum()) < n_points * (n - 40) // 2


def test_mixture_with_few_classes_uses_all_of_them():
    """K <= CANDIDATES: every class is a candidate (no top-k bound)."""
    gen = torch.Generator().manual_seed(6)
    for k in (2, CANDIDATES, CANDIDATES + 1):
        p0 = torch.randn(50, k, generator=gen).softmax(1)
        p1 = torch.randn(50, k, generator=gen).softmax(1)
        w = torch.rand(3, 50, generator=gen)
        labels = torch.randint(0, k, (50,), generator=gen)
        conf, pred = mixture_mod._top_class_stats(p0.log(), p1.log(), w)
        p0, p1 = p0.log().exp(), p1.log().exp()
        full = (1 - w[..., None]) * p0[None] + w[..., None] * p1[None]
        assert torch.equal(conf, full.max(2).values) and torch.equal(pred, full.argmax(2))


def test_mixture_chunking_does_not_change_results(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    p0 = torch.randn(64, 30, generator=gen).softmax(1)
    p1 = torch.randn(64, 30, generator=gen).softmax(1)
    w = torch.rand(3, 64, generator=gen)
    labels = torch.randint(0, 30, (64,), generator=gen)
    whole = mixture_mod._top_class_stats(p0.log(), p1.log(), w)
    monkeypatch.setattr(mixture_mod, "_CHUNK", 3 * 2 * CANDIDATES * 5)     # 5 rows a chunk
    chunked = mixture_mod._top_class_stats(p0.log(), p1.log(), w)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_temperature_scaled_calibration_by_blocks_of_rows_is_the_whole_sets(monkeypatch):
    """ECE and NLL after temperature scaling, computed a block of rows at a time (an
    ImageNet set's float64 mixture is never whole), equal the metrics of the whole mixture
    to the bit: every per-sample value is the same, and so is the one sum over them."""
    from trainers.metrics import expected_calibration_error, negative_log_likelihood
    gen = torch.Generator().manual_seed(8)
    lp0 = (torch.randn(64, 30, generator=gen) * 2).log_softmax(1)
    lp1 = (torch.randn(64, 30, generator=gen) * 3).log_softmax(1)
    w, labels = torch.rand(64, generator=gen), torch.randint(0, 30, (64,), generator=gen)
    whole = mixture_mod._log_mixture(lp0, lp1, w)
    expected = (expected_calibration_error(whole, labels, temperature=1.7),
                negative_log_likelihood(whole, labels, temperature=1.7))
    monkeypatch.setattr(mixture_mod, "_CHUNK", 30 * 7)                     # 7 rows a block
    assert mixture_mod._scaled_calibration(lp0, lp1, w, labels, 1.7) == expected


def test_mixture_projects_before_softmax():
    """A subset set: the members' probabilities are over the subset's classes only, so
    at w = 0 the metrics are those of the projected logits, not of renormalised or
    sliced ID probabilities."""
    c = 8
    eval_sets = {ID_VAL: identity_set(ID_VAL, c), "sub": subset_set("sub", c, [5, 1, 6])}
    gen = torch.Generator().manual_seed(8)
    logits = {ID_VAL: torch.randn(30, c, generator=gen), "sub": torch.randn(30, c, generator=gen)}
    logits["sub"][:, [0, 2, 3, 4, 7]] += 10.0          # mass outside the subset
    labels = {ID_VAL: torch.randint(0, c, (30,), generator=gen),
              "sub": torch.randint(0, 3, (30,), generator=gen)}
    zs = MemberOutputs(logits, labels)
    ft = MemberOutputs({k: torch.randn(30, c, generator=gen) for k in logits}, labels)
    mixture = Mixture((1.0, 1.0), {k: torch.zeros(1, 30) for k in logits})
    got = mixture_metrics(zs, ft, mixture, eval_sets)[0]["sub"]
    projected = logits["sub"][:, [5, 1, 6]].double()
    assert got["nll"] == pytest.approx(negative_log_likelihood(projected, labels["sub"]),
                                       rel=1e-6)
    assert got["ece"] == pytest.approx(expected_calibration_error(projected, labels["sub"]),
                                       abs=1e-6)


# ---------------------------------------------------------------------------------------
# 4. VRF
# ---------------------------------------------------------------------------------------

def test_zero_shot_failures_hand_example():
    labels = torch.tensor([0, 1, 2, 0, 1])
    zs = torch.tensor([[9., 0, 0],    # right
                       [9., 0, 0],    # wrong
                       [0., 9, 0],    # wrong
                       [0., 9, 0],    # wrong
                       [0., 9, 0]])   # right
    ft = torch.tensor([[9., 0, 0],    # right
                       [0., 9, 0],    # right
                       [9., 0, 0],    # wrong
                       [9., 0, 0],    # right
                       [9., 0, 0]])   # wrong
    assert vrf.zero_shot_failures(zs.argmax(1), ft.argmax(1), labels).tolist() == \
        [False, True, False, True, False]


def test_sample_weights_are_the_sigmoid():
    d = torch.tensor([0.0, 0.3, 1.0, 1.5, 2.2, 4.0])
    pairs = [(a, b) for a in (-1.0, 0.0, 1.5, 3.0) for b in (0.05, 0.6, 2.0)]
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    w = vrf.sample_weights(d, a, b)
    assert w.shape == (len(pairs), d.shape[0])
    ref = np.array([[1.0 / (1.0 + math.exp((float(di) - ai) / bi)) for di in d]
                    for ai, bi in pairs])
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-7)
    # w = 1/2 at d = a; decreasing in d
    assert vrf.sample_weights(torch.tensor([1.5]), torch.tensor([1.5]),
                              torch.tensor([0.6])).item() == 0.5
    assert bool((w[:, 1:] <= w[:, :-1]).all())


def _brute_kth(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    d = ((queries[:, None, :] - index[None, :, :]) ** 2).sum(-1)          # (Q, M)
    return np.sort(d, axis=1)[:, k - 1]


@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_kth_neighbour_distance_equals_brute_force(monkeypatch, chunk):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(53, 5))
    x = rng.normal(size=(17, 5))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if chunk is not None:              # 7 // 17 -> 1 query a chunk: 53 chunks
        monkeypatch.setattr(knn, "_CHUNK_ELEMENTS", chunk)
    for k in (1, 2, 9, 17):
        got = knn.kth_neighbour_sq_distance(torch.from_numpy(q).float(),
                                            torch.from_numpy(x).float(), k)
        assert got.shape == (53,) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), _brute_kth(q, x, k), atol=2e-6)
        assert float(got.min()) >= 0.0 and float(got.max()) <= 4.0
    # a query that is an index row: distance 0 to its own nearest neighbour
    self_d = knn.kth_neighbour_sq_distance(torch.from_numpy(x).float(),
                                           torch.from_numpy(x).float(), 1)
    np.testing.assert_allclose(self_d.numpy(), 0.0, atol=1e-6)


def test_kth_neighbour_distance_several_queries_per_chunk(monkeypatch):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(40, 3))
    x = rng.normal(size=(6, 3))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(knn, "_CHUNK_ELEMENTS", 6 * 7)          # 7 queries a chunk
    got = knn.kth_neighbour_sq_distance(torch.from_numpy(q).float(),
                                        torch.from_numpy(x).float(), 3)
    np.testing.assert_allclose(got.numpy(), _brute_kth(q, x, 3), atol=2e-6)


def test_kth_neighbour_distance_rejects_bad_input():
    q, x = torch.randn(4, 3), torch.randn(5, 3)
    for k in (0, 6, -1):
        with pytest.raises(ValueError, match="k="):
            knn.kth_neighbour_sq_distance(q, x, k)
    with pytest.raises(ValueError, match="must be"):
        knn.kth_neighbour_sq_distance(q, torch.randn(5, 4), 1)
    assert knn.kth_neighbour_sq_distance(torch.empty(0, 3), x, 2).shape == (0,)


@pytest.mark.parametrize("zsf,train,options,expected", [
    (30, 10_000, {}, 3),                     # code: round(1000 * 30 / 10000)
    (27, 10_000, {}, 3),                     # round(2.7)
    (21, 10_000, {}, 2),                     # round(2.1)
    (1, 100_000, {}, 1),                     # round(0.01) = 0 -> at least 1
    (50, 60, {}, 50),                        # 833 -> at most |ZSF|
    (4_999, 1_000_000, {"variant": "paper"}, 4),     # floor(4.999)
    (5_000, 1_000_000, {"variant": "paper"}, 5),
    (999, 1_000, {"variant": "paper"}, 1),   # floor(0.999) = 0 -> 1
    (30, 10_000, {"k": 7}, 7),               # k overrides the rule
    (30, 10_000, {"k": 7, "variant": "paper"}, 7),
    (5, 10_000, {"k": 7}, 5),                # but not beyond the index
])
def test_neighbour_rank(zsf, train, options, expected):
    assert vrf.neighbour_rank(zsf, train, vrf.VRFOptions(**options)) == expected


def _vrf_members(seed: int):
    eval_sets = make_eval_sets()
    # a training set large enough that the code rule's k = round(1000 |ZSF| / N) stays
    # below |ZSF| (with N < 1000 it is always clamped to |ZSF|)
    zs, ft = make_members(eval_sets, 12, seed=seed, features=True, n=60, n_train=N_TRAIN)
    return eval_sets, zs, ft


N_TRAIN = 4000


@pytest.mark.parametrize("variant,k", [("code", None), ("code", 3), ("paper", None),
                                       ("paper", 4)])
def test_vrf_mix_end_to_end(variant, k):
    eval_sets, zs, ft = _vrf_members(seed=11)
    ens = REGISTRY["vrf"]
    options = ens.options(a=(0.4, 1.5), b=(0.2, 0.6, 1.0), variant=variant, k=k)
    points = ens.points(options)
    mixture = ens.mix(zs, ft, options, points)

    # ZSF set and k, by hand
    ft_right = ft.logits[TRAIN].argmax(1) == ft.labels[TRAIN]
    zs_wrong = zs.logits[TRAIN].argmax(1) != zs.labels[TRAIN]
    mask = (ft_right & zs_wrong).numpy()
    m = int(mask.sum())
    assert 3 < m < N_TRAIN
    index = ft.features[TRAIN].numpy()[mask]         # the FINE-TUNED features
    if k is not None:
        rank = k
    elif variant == "code":
        rank = min(max(round(1000 * m / N_TRAIN), 1), m)
        assert 1 < rank < m                          # the formula, not a clamp
    else:
        rank = max(math.floor(0.001 * m), 1)
    assert mixture.diagnostics["zsf_size"] == m and mixture.diagnostics["k"] == rank

    t_zs = confidence_temperature(zs.logits[ID_VAL], zs.labels[ID_VAL])
    t_ft = confidence_temperature(ft.logits[ID_VAL], ft.labels[ID_VAL])
    assert mixture.temperatures == pytest.approx((t_zs, t_ft), rel=1e-12)
    assert t_zs != pytest.approx(t_ft)

    assert set(mixture.weights) == set(eval_sets)
    for name in eval_sets:
        d = _brute_kth(ft.features[name].numpy().astype(np.float64), index, rank)
        if variant == "paper":
            d = np.sqrt(d)
        w = mixture.weights[name]
        assert w.shape == (len(points), ft.features[name].shape[0])
        ref = np.array([[1.0 / (1.0 + math.exp((di - p["a"]) / p["b"])) for di in d]
                        for p in points])
        np.testing.assert_allclose(w.numpy(), ref, rtol=1e-4, atol=1e-5)
        assert mixture.diagnostics["median_distance"][name] == pytest.approx(
            float(np.sort(d)[(len(d) - 1) // 2]), abs=1e-5)
        assert w.std() > 0.01                          # per-sample, not constant

    # the zero-shot features play no part
    other = MemberOutputs(zs.logits, zs.labels,
                          {s: -f for s, f in ft.features.items()})
    again = ens.mix(other, ft, options, points)
    for name in eval_sets:
        assert torch.equal(again.weights[name], mixture.weights[name])

    # and the metrics come out for every point
    results = mixture_metrics(zs, ft, mixture, eval_sets, with_ts=False)
    assert len(results) == len(points) and set(results[0]) == set(eval_sets)


def test_vrf_reads_the_training_split_as_top_classes_alone():
    """The training split's logits are only ever reduced to top classes: a member that
    holds its top classes instead of its logits (as a sweep's jobs load it: 10 MB for
    ImageNet instead of 5 GB) mixes exactly as one that holds the logits."""
    eval_sets, zs, ft = _vrf_members(seed=12)
    ens = REGISTRY["vrf"]
    options = ens.options(a=(1.0, 2.0), b=(0.5,), k=2)

    def top_classes_only(member):
        return dataclasses.replace(
            member, logits={s: z for s, z in member.logits.items() if s != TRAIN},
            predictions={TRAIN: member.logits[TRAIN].argmax(1)})
    full = ens.mix(zs, ft, options, ens.points(options))
    light = ens.mix(top_classes_only(zs), top_classes_only(ft), options, ens.points(options))
    assert light.diagnostics == full.diagnostics
    assert full.weights.keys() == light.weights.keys()
    assert all(torch.equal(full.weights[s], light.weights[s]) for s in full.weights)

    # ... and holding the fine-tuned features of only the rows VRF asks for (`train_rows`:
    # those the zero-shot model gets wrong, as a sweep's jobs load them) mixes the same
    rows = ens.train_rows(zs.predicted(TRAIN), zs.labels[TRAIN])
    assert 0 < int(rows.sum()) < rows.numel()
    few = dataclasses.replace(top_classes_only(ft),
                              features={**ft.features, TRAIN: ft.features[TRAIN][rows]},
                              feature_rows={TRAIN: rows})
    fewer = ens.mix(top_classes_only(zs), few, options, ens.points(options))
    assert fewer.diagnostics == full.diagnostics
    assert all(torch.equal(full.weights[s], fewer.weights[s]) for s in full.weights)
    with pytest.raises(ValueError, match="not loaded"):    # a row it did not hold
        few.features_of(TRAIN, ~rows)


def test_vrf_uses_fine_tuned_features_of_the_failures_only():
    """Moving a non-failure training feature changes nothing; moving a failure does."""
    eval_sets, zs, ft = _vrf_members(seed=12)
    ens = REGISTRY["vrf"]
    options = ens.options(a=(1.0,), b=(0.5,), k=1)
    base = ens.mix(zs, ft, options, ens.points(options))
    failures = vrf.zero_shot_failures(zs.predicted(TRAIN), ft.predicted(TRAIN), ft.labels[TRAIN])
    query = ft.features["id_test"][0]
    for row, changes in ((int((~failures).nonzero()[0]), False),
                         (int(failures.nonzero()[0]), True)):
        feats = {s: f.clone() for s, f in ft.features.items()}
        feats[TRAIN][row] = query                          # exactly on the first test sample
        moved = MemberOutputs(ft.logits, ft.labels, feats)
        w = ens.mix(zs, moved, options, ens.points(options)).weights
        assert torch.equal(w["id_test"], base.weights["id_test"]) is not changes
        if changes:                                        # distance 0 -> sigmoid(a / b)
            assert float(w["id_test"][0, 0]) == pytest.approx(1 / (1 + math.exp(-2.0)),
                                                              rel=1e-5)


def test_vrf_refuses_missing_features():
    eval_sets, zs, ft = _vrf_members(seed=13)
    ens = REGISTRY["vrf"]
    options = ens.options()
    with pytest.raises(ValueError, match="features"):
        ens.mix(zs, MemberOutputs(ft.logits, ft.labels), options, ens.points(options))


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_vrf_empty_failure_set_is_the_calibrated_zero_shot_model(variant):
    """No training sample fixed by fine-tuning: every sample is infinitely far from the
    (empty) ZSF set, w = 0 everywhere, and VRF's metrics are the zero-shot model's at its
    confidence temperature."""
    eval_sets, zs, ft = _vrf_members(seed=13)
    # the fine-tuned model is wrong wherever the zero-shot one is: copy zs's train logits
    ft_train = MemberOutputs({**ft.logits, TRAIN: zs.logits[TRAIN]}, ft.labels, ft.features)
    ens = REGISTRY["vrf"]
    options = ens.options(a=(1.5, 100.0), b=(0.6,), variant=variant)
    mixture = ens.mix(zs, ft_train, options, ens.points(options))
    assert mixture.diagnostics["zsf_size"] == 0
    for name in eval_sets:
        assert mixture.weights[name].shape == (2, ft.features[name].shape[0])
        assert bool((mixture.weights[name] == 0).all()), name
    t_zs = confidence_temperature(zs.logits[ID_VAL], zs.labels[ID_VAL])
    got = mixture_metrics(zs, ft_train, mixture, eval_sets)
    ref = evaluate_logits(scaled(zs.logits, t_zs), zs.labels, eval_sets)
    for point in got:
        assert_matches_single_model(point, ref, eval_sets)


# ---------------------------------------------------------------------------------------
# 5. Metrics used by the ensembles
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,signal", [(0, 1.0), (1, 3.0), (2, 6.0)])
def test_confidence_temperature_matches_confidence_to_accuracy(seed, signal):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (300,), generator=gen)
    logits = correlated_logits(labels, 10, 2.0, signal, gen)
    t = confidence_temperature(logits, labels)
    assert 0.05 < t < 20.0
    acc = float((logits.argmax(1) == labels).double().mean())
    conf = torch.softmax(logits.double() / t, dim=1).max(1).values.mean()
    assert float(conf) == pytest.approx(acc, abs=1e-6)


def test_confidence_temperature_boundaries():
    labels = torch.zeros(20, dtype=torch.long)
    always_right = torch.zeros(20, 4)
    always_right[:, 0] = 0.5                 # right, but barely confident: T -> 0.05
    assert confidence_temperature(always_right, labels) == 0.05
    always_wrong = torch.zeros(20, 4)
    always_wrong[:, 1] = 50.0                # wrong and sure: T -> 20
    assert confidence_temperature(always_wrong, labels) == 20.0


def test_reliability_bins_with_leading_dimensions_equal_per_row():
    gen = torch.Generator().manual_seed(21)
    conf = torch.rand(3, 4, 90, generator=gen, dtype=torch.float64)
    conf[0, 0, :5] = torch.tensor([0.0, 1.0, 1 / 15, 2 / 15, 1.0 - 1e-12],
                                  dtype=torch.float64)             # edges
    correct = torch.rand(3, 4, 90, generator=gen) < 0.6
    count, sum_conf, sum_correct = reliability_bins(conf, correct)
    assert count.shape == sum_conf.shape == sum_correct.shape == (3, 4, 15)
    for i in range(3):
        for j in range(4):
            c, s, r = reliability_bins(conf[i, j], correct[i, j])
            assert torch.equal(count[i, j], c) and torch.equal(sum_correct[i, j], r)
            torch.testing.assert_close(sum_conf[i, j], s, rtol=0, atol=1e-12)
            # by hand: bin b holds edges[b] < c <= edges[b+1], c == 0 in bin 0
            b = np.clip(np.ceil(conf[i, j].numpy() * 15) - 1, 0, 14).astype(int)
            assert c.tolist() == np.bincount(b, minlength=15).tolist()
    ece = ece_from_bins(count, sum_conf, sum_correct)
    assert ece.shape == (3, 4)
    assert float(ece[1, 2]) == pytest.approx(
        float(ece_from_bins(*reliability_bins(conf[1, 2], correct[1, 2]))), abs=1e-15)


def test_ece_from_bins_equals_expected_calibration_error():
    gen = torch.Generator().manual_seed(22)
    for n_classes, signal in ((3, 0.5), (10, 2.0), (40, 4.0)):
        labels = torch.randint(0, n_classes, (250,), generator=gen)
        logits = correlated_logits(labels, n_classes, 1.5, signal, gen).double()
        p = torch.softmax(logits, 1)
        conf, correct = p.max(1).values, logits.argmax(1) == labels
        ece = float(ece_from_bins(*reliability_bins(conf, correct)))
        assert ece == pytest.approx(expected_calibration_error(logits, labels), abs=1e-12)
        # and the textbook formula
        bins = np.clip(np.ceil(conf.numpy() * 15) - 1, 0, 14)
        ref = sum(abs(correct.numpy()[bins == b].mean() - conf.numpy()[bins == b].mean())
                  * (bins == b).mean() for b in range(15) if (bins == b).any())
        assert ece == pytest.approx(ref, abs=1e-12)


def test_label_probabilities_far_below_float32_range_count_as_they_are():
    """A label logit 150 below the top: its probability underflows float32, but the
    mixture's NLL (and NLL after temperature scaling) must equal the single model's."""
    gen = torch.Generator().manual_seed(9)
    n, k = 200, 10
    z = torch.randn(n, k, generator=gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    z[:5] = z[:5].scatter(1, labels[:5, None], -150.0)
    sets = {"id_val": EvalSet("id_val", None, tuple(map(str, range(k))), identity_groups(k))}
    member = MemberOutputs({"id_val": z}, {"id_val": labels})
    mixture = Mixture((1.0, 1.0), {"id_val": torch.tensor([[0.0] * n, [1.0] * n])})
    single = evaluate_logits({"id_val": z}, {"id_val": labels}, sets)["id_val"]
    for point in mixture_metrics(member, member, mixture, sets):
        assert point["id_val"]["nll"] == pytest.approx(single["nll"], rel=1e-5)
        assert point["id_val"]["nll_ts"] == pytest.approx(single["nll_ts"], rel=1e-4)
