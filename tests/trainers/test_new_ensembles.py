"""LiNeS and DaWin: the properties that define them.

LiNeS: exact endpoints, lambda linear in block depth (stem at alpha, output side and head at
alpha + beta), shallow blocks nearer zero-shot, the toy RN, a ViT with 11 blocks (numeric,
not lexical, order) and a ModifiedResNet with several blocks per stage, text towers,
untouched inputs, unknown towers refused. DaWin: lambda = sigmoid(H_zs - H_ft) against a
NumPy reference, exactly 0.5 for equal entropies, the confident member trusted, weights
in [0, 1], one (P, N) row per scale. References are computed independently of the code
under test (block depths from the configs, entropies in NumPy)."""
from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from trainers.data import EvalSet, identity_groups
from trainers.data.benchmark import ID_VAL
from trainers.ensembles import (FINE_TUNED_MEMBER, REGISTRY, ZERO_SHOT_MEMBER, MemberOutputs)
from trainers.ensembles.mixture import mixture_metrics
from trainers.evaluate import evaluate_logits
from trainers.methods import Fitted, text_tower_state
from trainers.metrics import confidence_temperature
from trainers.models import TOY_ARCH, ImageClassifier, load_clip

LINES, DAWIN = REGISTRY["lines"], REGISTRY["dawin"]
EPS32 = torch.finfo(torch.float32).eps

# Small random-init towers: (config, the image blocks in depth order as key prefixes).
VIT_LAYERS = 11                  # > 10: block 10 must come after block 2 (numeric order)
RN_LAYERS = [2, 1, 3, 1]         # several blocks per stage: stage-then-block order
CONFIGS = {
    "orch-test-lines-vit": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": VIT_LAYERS, "width": 16, "patch_size": 8,
                       "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2,
                     "layers": 3}},
    "orch-test-lines-rn": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": RN_LAYERS, "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2,
                     "layers": 2}},
}


def image_blocks(arch: str) -> list[str]:
    """The image tower's residual blocks, shallow to deep, from the config alone."""
    if arch == "orch-test-lines-vit":
        return [f"transformer.resblocks.{i}." for i in range(VIT_LAYERS)]
    layers = RN_LAYERS if arch == "orch-test-lines-rn" else [1, 1, 1, 1]   # the toy RN
    return [f"layer{s + 1}.{b}." for s, n in enumerate(layers) for b in range(n)]


def text_blocks(n: int) -> list[str]:
    return [f"transformer.resblocks.{i}." for i in range(n)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg")
    for name, cfg in CONFIGS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: every floating tensor moved by noise, integers untouched."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
            else v.clone() for k, v in state.items()}


def members(arch: str, with_text: bool = True) -> tuple[Fitted, Fitted]:
    clip = load_clip(arch, None)
    embed = clip.model.text_projection.shape[-1]
    head = nn.Linear(embed, 5)
    zs = ImageClassifier(copy.deepcopy(clip.model.visual), head).eval()
    ft = copy.deepcopy(zs)
    ft.load_state_dict(perturbed(zs.state_dict(), seed=1))
    for module in ft.modules():              # an integer buffer the members disagree on
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(9)
    zs_text = text_tower_state(clip.model)
    ft_text = perturbed(zs_text, seed=2) if with_text else None
    return Fitted(zs, zs_text), Fitted(ft, ft_text)


ARCHS = [TOY_ARCH, "orch-test-lines-vit", "orch-test-lines-rn"]


# ---------------------------------------------------------------------------------------
# LiNeS
# ---------------------------------------------------------------------------------------

def check_lines_endpoints(arch: str = TOY_ARCH) -> None:
    """(1, 0) is the fine-tuned model and (0, 0) the zero-shot one, tensor for tensor
    (text towers too); the integer buffers are zero-shot's; endpoint() says so."""
    zs, ft = members(arch)
    size = 16 if arch == "orch-test-lines-vit" else 32
    x = torch.randn(2, 3, size, size)
    for point, member, ref in (({"alpha": 1.0, "beta": 0.0}, FINE_TUNED_MEMBER, ft),
                               ({"alpha": 0.0, "beta": 0.0}, ZERO_SHOT_MEMBER, zs)):
        assert LINES.endpoint(point) == member
        mixed = LINES.mix(zs, ft, LINES.options(), point)
        assert mixed.classifier is not zs.classifier and mixed.classifier is not ft.classifier
        zs_state, ref_state = zs.classifier.state_dict(), ref.classifier.state_dict()
        for key, value in mixed.classifier.state_dict().items():
            expected = zs_state[key] if not value.is_floating_point() else ref_state[key]
            assert torch.equal(value, expected), (point, key)
        for key, value in mixed.text_tower.items():
            assert torch.equal(value, ref.text_tower[key]), (point, key)
        with torch.no_grad():
            assert torch.equal(mixed.classifier(x), ref.classifier(x))
    for point in ({"alpha": 1.0, "beta": 0.5}, {"alpha": 0.5, "beta": 0.0},
                  {"alpha": 0.0, "beta": 1.0}):
        assert LINES.endpoint(point) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_lines_endpoints_are_the_members_exactly(arch, registered):
    check_lines_endpoints(arch)


def assert_scaled(mixed: torch.Tensor, zs: torch.Tensor, ft: torch.Tensor, lam: float, key):
    """mixed = zs + lam (ft - zs), up to float32 rounding of that one operation."""
    exact = zs.double() + lam * (ft.double() - zs.double())
    tol = 4 * EPS32 * float(zs.abs().max() + ft.abs().max()) + 1e-30
    err = float((mixed.double() - exact).abs().max())
    assert err <= tol, (key, lam, err, tol)


def expected_lambdas(blocks: list[str], alpha: float, beta: float) -> dict[str, float]:
    L = len(blocks)
    return {b: alpha + beta * ell / (L - 1) for ell, b in enumerate(blocks)}   # ell = l - 1


@pytest.mark.parametrize("arch", ARCHS)
def test_lines_scales_each_block_linearly_with_depth(arch, registered):
    alpha, beta = 0.2, 0.7
    zs, ft = members(arch)
    mixed = LINES.mix(zs, ft, LINES.options(), {"alpha": alpha, "beta": beta})
    zs_state, ft_state = zs.classifier.state_dict(), ft.classifier.state_dict()
    lam = expected_lambdas(image_blocks(arch), alpha, beta)
    stem = ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3.", "class_embedding",
            "positional_embedding", "ln_pre.")
    seen = set()
    for key, value in mixed.classifier.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, zs_state[key]), key
            continue
        tower_key = key.removeprefix("image_encoder.")
        block = [b for b in lam if tower_key.startswith(b)]
        if block:
            want = lam[block[0]]
            seen.add(block[0])
        elif key.startswith("image_encoder.") and tower_key.startswith(stem):
            want = alpha                                     # before the first block
        else:
            want = alpha + beta                              # output side and head
        assert not torch.equal(zs_state[key], ft_state[key]), key   # a real delta
        assert_scaled(value, zs_state[key], ft_state[key], want, key)
    assert seen == set(lam)                                  # every block was found
    # the text tower, over its own blocks (3 or 2): embeddings alpha, the rest alpha + beta
    n_text = {"orch-test-lines-vit": 3}.get(arch, 2)
    text_lam = expected_lambdas(text_blocks(n_text), alpha, beta)
    for key, value in mixed.text_tower.items():
        block = [b for b in text_lam if key.startswith(b)]
        want = (text_lam[block[0]] if block else
                alpha if key.startswith(("token_embedding", "positional_embedding"))
                else alpha + beta)
        assert_scaled(value, zs.text_tower[key], ft.text_tower[key], want, key)


@pytest.mark.parametrize("arch", ARCHS)
def test_lines_keeps_shallow_blocks_nearer_zero_shot(arch, registered):
    """For beta > 0 the share of the delta a block keeps, |theta - zs| / |ft - zs|,
    grows strictly with depth (from alpha at the first block to alpha + beta at the last)."""
    zs, ft = members(arch, with_text=False)
    mixed = LINES.mix(zs, ft, LINES.options(), {"alpha": 0.0, "beta": 1.0})
    assert mixed.text_tower is None             # the pre-trained text tower stays as it is
    m, z, f = (c.state_dict() for c in (mixed.classifier, zs.classifier, ft.classifier))
    shares = []
    for block in image_blocks(arch):
        keys = [k for k in m if k.startswith("image_encoder." + block) and m[k].is_floating_point()]
        moved = torch.sqrt(sum(((m[k] - z[k]).double() ** 2).sum() for k in keys))
        delta = torch.sqrt(sum(((f[k] - z[k]).double() ** 2).sum() for k in keys))
        shares.append(float(moved / delta))
    assert shares[0] == 0.0                      # alpha = 0: the first block IS zero-shot
    assert shares[-1] == pytest.approx(1.0, abs=1e-6)
    assert all(a < b for a, b in zip(shares, shares[1:])), shares


def test_lines_leaves_its_inputs_untouched(registered):
    zs, ft = members("orch-test-lines-rn")
    before = [copy.deepcopy(m.classifier.state_dict()) for m in (zs, ft)]
    texts = [copy.deepcopy(m.text_tower) for m in (zs, ft)]
    mixed = LINES.mix(zs, ft, LINES.options(), {"alpha": 0.5, "beta": 0.5})
    for m, state, text in zip((zs, ft), before, texts):
        assert all(torch.equal(state[k], v) for k, v in m.classifier.state_dict().items())
        assert all(torch.equal(text[k], v) for k, v in m.text_tower.items())
    # the result owns its tensors: changing it changes neither member
    with torch.no_grad():
        for p in mixed.classifier.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[0][k], v) for k, v in zs.classifier.state_dict().items())


def test_lines_refuses_a_tower_it_cannot_order():
    tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(8))
    tower(torch.randn(1, 3, 8, 8))
    zs = ImageClassifier(tower, nn.Linear(8, 3))
    ft = copy.deepcopy(zs)
    with pytest.raises(ValueError, match=r"^LiNeS cannot order the residual blocks of the "
                                         r"image tower Sequential") as err:
        LINES.mix(Fitted(zs), Fitted(ft), LINES.options(), {"alpha": 0.5, "beta": 0.5})
    assert "\n" not in str(err.value)
    # a text tower without open_clip blocks: refused the same way, naming the text tower
    clip_zs, clip_ft = members(TOY_ARCH)
    zs_bad, ft_bad = Fitted(clip_zs.classifier, {"w": torch.zeros(2)}), \
        Fitted(clip_ft.classifier, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="^LiNeS cannot order the residual blocks of the text"):
        LINES.mix(zs_bad, ft_bad, LINES.options(), {"alpha": 0.5, "beta": 0.5})


def test_lines_options():
    options = LINES.options()
    assert options.alpha == options.beta == (0.0, 0.25, 0.5, 0.75, 1.0)
    points = LINES.points(options)
    assert len(points) == 25 and {"alpha": 1.0, "beta": 0.0} in points
    for bad in ({"alpha": (1.5,)}, {"beta": (-0.25,)}):
        with pytest.raises(ValueError, match=rf"^{next(iter(bad))}\b"):
            LINES.options(**bad)


# ---------------------------------------------------------------------------------------
# DaWin
# ---------------------------------------------------------------------------------------

def identity_set(name: str, c: int) -> EvalSet:
    return EvalSet(name, None, tuple(f"c{i}" for i in range(c)), identity_groups(c))


def outputs(logits: dict[str, torch.Tensor], seed: int = 0) -> MemberOutputs:
    gen = torch.Generator().manual_seed(seed)
    labels = {s: torch.randint(0, z.shape[1], (z.shape[0],), generator=gen)
              for s, z in logits.items()}
    return MemberOutputs(dict(logits), labels)


def random_members(n: int = 60, c: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sets = (ID_VAL, "id_test", "shift")
    zs = outputs({s: torch.randn(n, c, generator=gen) * 1.5 for s in sets}, seed)
    ft = MemberOutputs({s: torch.randn(n, c, generator=gen) * 4.0 for s in sets}, zs.labels)
    return zs, ft


def numpy_weights(z_zs: np.ndarray, z_ft: np.ndarray, t_zs: float, t_ft: float) -> np.ndarray:
    def entropy(z, t):
        z = z / t
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    e_zs, e_ft = np.exp(-entropy(z_zs, t_zs)), np.exp(-entropy(z_ft, t_ft))
    return e_ft / (e_zs + e_ft)


@pytest.mark.parametrize("calibrate", [True, False])
def test_dawin_matches_a_direct_computation(calibrate):
    zs, ft = random_members(seed=3)
    options = DAWIN.options(scale=(1.0, 0.5, 0.0), calibrate=calibrate)
    mixture = DAWIN.mix(zs, ft, options, DAWIN.points(options))
    if calibrate:
        t = tuple(confidence_temperature(m.logits[ID_VAL], m.labels[ID_VAL]) for m in (zs, ft))
        assert mixture.temperatures == pytest.approx(t, rel=1e-12)
        assert mixture.temperatures[1] != pytest.approx(1.0, abs=1e-3)   # really scaled
    else:
        assert mixture.temperatures == (1.0, 1.0)
    t_zs, t_ft = mixture.temperatures
    for s in ("id_test", "shift", ID_VAL):
        ref = numpy_weights(zs.logits[s].double().numpy(), ft.logits[s].double().numpy(),
                            t_zs, t_ft)
        w = mixture.weights[s]
        assert w.shape == (3, 60)                                # (P, N) per set
        # float32 weights: half an ulp of a number in [0, 1]
        np.testing.assert_allclose(w[0].double().numpy(), ref, rtol=0, atol=EPS32)
        np.testing.assert_allclose(w[1].double().numpy(), 0.5 * ref, rtol=0, atol=EPS32)
        assert torch.equal(w[2], torch.zeros(60))
        assert mixture.diagnostics["mean_lambda"][s] == pytest.approx(ref.mean(), rel=1e-12)
    assert set(mixture.weights) == {ID_VAL, "id_test", "shift"}


@pytest.mark.parametrize("calibrate", [True, False])
def test_dawin_equal_entropies_give_exactly_one_half(calibrate):
    zs, _ = random_members(seed=4)
    same = MemberOutputs({s: z.clone() for s, z in zs.logits.items()}, zs.labels)
    mixture = DAWIN.mix(zs, same, DAWIN.options(calibrate=calibrate), [{"scale": 1.0}])
    for w in mixture.weights.values():
        assert bool((w == 0.5).all())
    # the same distribution over permuted classes: equal entropies up to summation order
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    permuted = MemberOutputs({s: z[:, perm] for s, z in zs.logits.items()}, zs.labels)
    mixture = DAWIN.mix(zs, permuted, DAWIN.options(calibrate=False), [{"scale": 1.0}])
    for w in mixture.weights.values():
        assert float((w - 0.5).abs().max()) <= 2 * EPS32


def test_dawin_trusts_the_confident_member():
    n, c = 40, 10
    gen = torch.Generator().manual_seed(6)
    confident = torch.randn(n, c, generator=gen)
    confident[:, 0] += 12.0                                       # entropy near 0
    unsure = 0.05 * torch.randn(n, c, generator=gen)              # entropy near log(10)
    sets = {ID_VAL: None, "id_test": None}
    a = outputs({s: confident for s in sets})
    b = MemberOutputs({s: unsure for s in sets}, a.labels)
    options = DAWIN.options(calibrate=False)
    w_ft_sure = DAWIN.mix(b, a, options, [{"scale": 1.0}]).weights["id_test"]
    w_zs_sure = DAWIN.mix(a, b, options, [{"scale": 1.0}]).weights["id_test"]
    assert bool((w_ft_sure > 0.5).all()) and bool((w_zs_sure < 0.5).all())
    # ~ 1 / (1 + e^-log 10) = 10/11 for a certain member against a uniform one
    assert float(w_ft_sure.min()) > 0.85
    # swapping the members mirrors the weight: lambda(zs, ft) = 1 - lambda(ft, zs)
    torch.testing.assert_close(w_ft_sure + w_zs_sure, torch.ones_like(w_ft_sure),
                               rtol=0, atol=2 * EPS32)


def test_dawin_weights_stay_in_the_unit_interval_for_extreme_logits():
    n, c = 30, 5
    gen = torch.Generator().manual_seed(7)
    huge = torch.randn(n, c, generator=gen) * 1e4                # one-hot softmaxes
    flat = torch.zeros(n, c)                                      # uniform: entropy log 5
    zs = outputs({ID_VAL: flat, "id_test": huge})
    ft = MemberOutputs({ID_VAL: huge, "id_test": flat}, zs.labels)
    options = DAWIN.options(scale=(1.0, 0.3), calibrate=False)
    mixture = DAWIN.mix(zs, ft, options, DAWIN.points(options))
    for w in mixture.weights.values():
        assert bool(torch.isfinite(w).all())
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    # certain vs uniform over 5 classes: e^0 / (e^-log5 + e^0) = 5/6
    assert float(mixture.weights[ID_VAL][0].min()) == pytest.approx(5 / 6, abs=1e-6)
    assert float(mixture.weights["id_test"][0].max()) == pytest.approx(1 / 6, abs=1e-6)


def test_dawin_options():
    assert DAWIN.options().scale == (1.0,) and DAWIN.options().calibrate is True
    assert DAWIN.points(DAWIN.options()) == [{"scale": 1.0}]
    for bad in ((1.5,), (-0.1,)):
        with pytest.raises(ValueError, match=r"^scale\b"):
            DAWIN.options(scale=bad)


def check_dawin_endpoint() -> None:
    """DaWin has no coefficient that IS a member; what it must reproduce exactly is a
    member mixed with itself (any weight), at that member's calibrated temperature."""
    eval_sets = {ID_VAL: identity_set(ID_VAL, 7), "id_test": identity_set("id_test", 7)}
    zs, _ = random_members(seed=8)
    zs = MemberOutputs({s: zs.logits[s] for s in eval_sets}, {s: zs.labels[s] for s in eval_sets})
    same = MemberOutputs({s: z.clone() for s, z in zs.logits.items()}, zs.labels)
    options = DAWIN.options(scale=(1.0, 0.5))
    mixture = DAWIN.mix(zs, same, options, DAWIN.points(options))
    t = confidence_temperature(zs.logits[ID_VAL], zs.labels[ID_VAL])
    ref = evaluate_logits({s: z.double() / t for s, z in zs.logits.items()}, zs.labels, eval_sets)
    for got in mixture_metrics(zs, same, mixture, eval_sets):
        for s in eval_sets:
            assert got[s]["acc"] == ref[s]["acc"]
            assert got[s]["nll"] == pytest.approx(ref[s]["nll"], rel=1e-6)
            assert got[s]["ece"] == pytest.approx(ref[s]["ece"], abs=1e-6)


def test_dawin_of_a_model_with_itself_is_that_model():
    check_dawin_endpoint()


# ---------------------------------------------------------------------------------------
# Sweep files
# ---------------------------------------------------------------------------------------

def test_sweep_files_name_both_ensembles(tmp_path):
    from orchestrator.spec import load_spec
    path = tmp_path / "new.yaml"
    path.write_text(
        "name: new_ensembles\nbenchmark: {source: toyworld}\nmodel: {arch: toy}\n"
        "methods:\n  - {name: ft, epochs: 1, batch_size: 32, warmup_steps: 1}\n"
        "ensembles:\n"
        "  - {name: lines, alpha: [0.0, 0.5, 1.0], beta: [0.0, 0.5]}\n"
        "  - {name: dawin}\n")
    spec = load_spec(path)
    by_name = {e.name: e for e in spec.ensembles}
    assert len(by_name["lines"].points()) == 6
    assert by_name["dawin"].points() == [{"scale": 1.0}]
    single = tmp_path / "single.yaml"
    single.write_text(path.read_text().split("ensembles:")[0]
                      + "ensemble: {name: lines, alpha: [0.3], beta: [0.7]}\n")
    assert load_spec(single).ensembles[0].points() == [{"alpha": 0.3, "beta": 0.7}]
