"""Real open_clip towers end to end, with no download: ViT-B-32 and RN50 at random init
(`pretrained: none`) run one method per way of touching the tower and every ensemble in one
`orch sweep` each on a tiny image-folder tree written here; `orch export` then writes every trial alone and
WiSE-FT interior points, and a fresh Python that imports torch, open_clip and PIL only
must predict what the sweep predicted, image by image.

"What the sweep predicted" is orch's own logits for the same images: the feature cache
for a trial alone (what the sweep's metrics were computed from), orch's evaluation
(`trainers.evaluate.predict`, as the sweep's WiSE-FT jobs run it) for an interior WiSE-FT
point, itself checked against the sweep's recorded ID accuracy.

The tolerance follows from float32 arithmetic, not from one machine's rounding: the two
sides run the same weights on the same pixels, and differ only in the order of float32
sums (batch size, threads, memory format, SIMD width of the CPU). A dot product of length
n recomputed in another order moves by about sqrt(n) * u relative (u = 2^-24, Higham and
Mary's probabilistic bound); along the ~50 matrix products and convolutions between pixels
and features (n <= 3,072 for ViT-B-32, <= 18,432 for RN50's 3x3 convolutions) that adds up
to 1.7e-4 and 4.3e-4: EPS = 2^-11 (4.9e-4) bounds the change of the unit-norm feature
(checked), so a logit z_c = w_c . f + b_c moves by at most |w_c| * EPS (checked). A
preprocessing difference moves these features by 2 to 500 EPS (bilinear for bicubic,
squash or longest for shortest, measured on this tree). Predicted classes must agree
wherever orch's top-2 margin exceeds twice that (both logits may move towards each other);
a random-init model has near-ties below it, which are excused and counted.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from orchestrator.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

EPS = 2.0 ** -11
CLASSES = ["cat", "dog"]
SIZE = (232, 200)        # W x H, not the model's 224: resize, interpolation and crop all act
TRAIN = {"epochs": 1, "batch_size": 2, "warmup_steps": 0}
ALPHA = 0.5
# One method per way of touching the tower: none (zero-shot), the image tower alone (FT),
# both towers (FLYP), a model made elsewhere (checkpoint), and on ViT-B-32 a head trained
# on cached features (LP). LP-FT and CaRot reach the tower through the same code as LP,
# FT and FLYP (their own maths is tested on the toy CLIP, CaRot's projection on both
# tower kinds); each method on a real tower costs ~20 s of suite.
METHODS = {"ViT-B-32": ("zeroshot", "lp", "ft", "flyp", "checkpoint"),
           "RN50": ("zeroshot", "ft", "flyp", "checkpoint")}
# WiSE-FT's interior points are a forward pass each: only these two trials get them (the
# reported case, and a second model made elsewhere); its endpoints, OSE and VRF are every
# trial's, from the cached outputs
WISE_TRIALS = {"ViT-B-32": ("flyp-00", "checkpoint-00"), "RN50": ("flyp-00", "checkpoint-00")}

# A Python without orch: loads each checkpoint as the README says, predicts every image.
FRESH = r"""
import json, sys
import open_clip, torch, torch.nn.functional as F
from PIL import Image
jobs = json.loads(open(sys.argv[1]).read())
out = {}
for name, (path, images) in jobs.items():
    ckpt = torch.load(path, weights_only=True)
    model = getattr(open_clip, ckpt["model_class"])(**ckpt["model_cfg"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    preprocess = open_clip.image_transform(**ckpt["preprocess"], is_train=False)
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        features = F.normalize(model.encode_image(x), dim=-1)
        logits = features @ ckpt["head_weight"].T + ckpt["head_bias"]
    out[name] = {"features": features, "logits": logits, "classnames": ckpt["classnames"],
                 "head_weight": ckpt["head_weight"], "point": json.dumps(ckpt["point"])}
    del model, ckpt
assert not [m for m in sys.modules if m.split(".")[0] in ("orchestrator", "trainers", "ray",
                                                          "mlflow")]
torch.save(out, sys.argv[2])
"""


def write_tree(root: Path) -> None:
    """task/{train,val,test}/<class>/ and a shift, class-coloured noise at SIZE."""
    from PIL import Image
    rng = np.random.default_rng(0)
    colours = {"cat": (200, 60, 40), "dog": (40, 90, 200)}
    for folder, n in (("task/train", 1), ("task/val", 1), ("task/test", 1), ("sketch", 1)):
        for name in CLASSES:
            (root / folder / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.normal(0, 60, (SIZE[1], SIZE[0], 3))
                pixels = np.clip(np.array(colours[name]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / folder / name / f"{i}.png")


def sweep_spec(root: Path, arch: str, other_weights: Path) -> dict:
    return {
        "name": f"real-{arch}",
        "benchmark": {"source": "imagefolder", "root": str(root / "task"), "classnames": CLASSES,
                      "templates": ["a photo of a {}."],
                      "shifts": {"sketch": {"path": str(root / "sketch")}}},
        "model": {"arch": arch, "pretrained": "none"},
        "methods": [m for m in [{"name": "zeroshot"},
                                {"name": "lp", "lr": 1e-2, **TRAIN},
                                {"name": "ft", "lr": 1e-4, **TRAIN},
                                {"name": "flyp", "lr": 1e-4, **TRAIN},
                                {"name": "checkpoint", "path": str(other_weights)}]
                    if m["name"] in METHODS[arch]],
        "ensembles": [{"name": "wise_ft", "alpha": [0.0, ALPHA, 1.0],
                       "methods": [t.split("-")[0] for t in WISE_TRIALS[arch]]},
                      {"name": "ose", "alpha": [ALPHA]},
                      {"name": "vrf", "a": [1.5], "b": [0.6]}],
        # one trial at a time on both cores: two ViT-B-32 trials at once would double memory
        "resources": {"cpus_per_trial": 2, "max_concurrent_trials": 1},
        "eval": {"batch_size": 4},
        "features": {"batch_size": 4, "cpus_per_actor": 2, "cache_dir": str(root / "features")},
        "storage_path": str(root / "runs"),
    }


def cached_outputs(cache: Path, assets) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(model name, set): (features, logits)} of every feature-cache entry of the sweep,
    logits from each model's head as the sweep's jobs compute them."""
    from orchestrator.run.features import MANIFEST, model_head, read_entry
    out = {}
    for manifest in cache.glob(f"*/{MANIFEST}"):
        meta = json.loads(manifest.read_text())
        head = model_head(assets, meta["checkpoint"], torch.device("cpu"))
        entry = read_entry(manifest.parent, head)
        out[(meta["model_name"], meta["set"])] = entry.features, entry.logits
    return out


def compare(ours: tuple[torch.Tensor, torch.Tensor], theirs: dict, what: str
            ) -> tuple[int, int, float]:
    """Unit-norm features within EPS of each other, logits within |w_c| * EPS, and the
    same class wherever orch's margin decides it; returns (images whose class was
    compared, near-ties excused, the largest feature change in units of EPS)."""
    (features, logits), tol = ours, EPS * theirs["head_weight"].norm(dim=1)      # tol: (C,)
    assert features.shape == theirs["features"].shape and logits.shape == theirs["logits"].shape
    moved = (features - theirs["features"]).norm(dim=1).max().item()
    assert moved <= EPS, f"{what}: features differ by {moved:.3g} > EPS"
    excess = ((logits - theirs["logits"]).abs() - tol).max().item()
    assert excess <= 0, f"{what}: logits differ by more than |w_c|*EPS (by {excess:.3g} more)"
    top2 = logits.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * tol.max()
    mismatch = (logits.argmax(1) != theirs["logits"].argmax(1)) & decided
    assert not mismatch.any(), f"{what}: other classes for images {mismatch.nonzero().tolist()}"
    return int(decided.sum()), int((~decided).sum()), moved / EPS


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_every_method_and_ensemble_exports_what_the_sweep_predicted(arch, tmp_path, ray_local):
    try:
        sweep_export_and_reload(arch, tmp_path)
    finally:    # exports, checkpoints and Tune's copies are GBs: leave none for pytest to keep
        for big in ("exports", "runs", "features", "other.pt", "fresh.pt", "mlartifacts"):
            target = tmp_path / big
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else \
                target.unlink(missing_ok=True)


def sweep_export_and_reload(arch: str, tmp_path: Path) -> None:
    import open_clip

    from orchestrator.assets.benchmarks import check_benchmark, feature_datasets
    from orchestrator.assets.loaded import load_assets, load_fitted
    from orchestrator.commands.sweeps import find_journal, journal_spec
    from orchestrator.plan import Plan
    from orchestrator.records.row import ALONE
    from orchestrator.run.features import ZERO_SHOT
    from trainers.data.benchmark import ID_TRAIN
    from trainers.ensembles import get_ensemble
    from trainers.evaluate import encode, predict
    started = time.monotonic()
    write_tree(tmp_path)
    # `checkpoint` ensembles a model made elsewhere: another random init, as a plain state dict
    other = tmp_path / "other.pt"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.save(open_clip.create_model(arch).state_dict(), other)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_spec(tmp_path, arch, other)))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(main, ["sweep", str(path)], env=env)
    assert result.exit_code == 0, result.output
    swept = time.monotonic()
    (sweep_dir,) = [p.parent for p in (tmp_path / "runs").glob("*/sweep.json")]
    journal = find_journal(str(sweep_dir), str(tmp_path / "runs"))
    spec = journal_spec(journal)
    rows = [r for job in journal.points().values() for r in job]

    # every method and every ensemble gave its points, with finite metrics
    trials = [t.name for t in Plan(spec).trials]
    assert trials == [f"{m}-00" for m in METHODS[arch]]
    expected = {("zeroshot-00", ALONE, "{}")} | {
        (t, e, json.dumps(c)) for t in trials[1:] for e, c in
        [(ALONE, {}), ("ose", {"alpha": ALPHA}), ("vrf", {"a": 1.5, "b": 0.6})]} | {
        (t, "wise_ft", json.dumps({"alpha": a}))
        for t in WISE_TRIALS[arch] for a in (0.0, ALPHA, 1.0)}
    assert {(r.trial, r.ensemble, json.dumps(r.coefficients)) for r in rows} == expected
    assert all(math.isfinite(r[k]) for r in rows for k in ("id_acc", "ood_acc", "id_nll"))

    # export every trial alone and the WiSE-FT interior points
    bench = check_benchmark(spec.benchmark)
    sets = {name: ds for name, ds in feature_datasets(bench).items() if name != ID_TRAIN}
    images = [str(p) for ds in sets.values() for p in ds.paths]
    exports = {t: ("--trial", t) for t in trials}
    exports.update({f"{t} alpha={ALPHA}": ("--trial", t, "--alpha", str(ALPHA))
                    for t in WISE_TRIALS[arch]})
    jobs = {}
    for name, args in exports.items():
        out = tmp_path / "exports" / f"{len(jobs)}.pt"
        done = CliRunner().invoke(main, ["export", str(sweep_dir), str(out), *args])
        assert done.exit_code == 0, done.output
        jobs[name] = (str(out), images)
    exported = time.monotonic()
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-I", "-c", FRESH, str(tmp_path / "jobs.json"),
                           str(tmp_path / "fresh.pt")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    loaded = time.monotonic()

    # orch's logits: the feature cache for a trial alone ...
    assets = load_assets(spec, torch.device("cpu"))
    cache = cached_outputs(tmp_path / "features", assets)
    ours = {t: tuple(torch.cat([cache[(ZERO_SHOT if t == "zeroshot-00" else t, s)][i]
                                for s in sets]) for i in (0, 1)) for t in trials}
    # ... orch's evaluation for an interior WiSE-FT point, as the sweep's job runs it
    wise = get_ensemble("wise_ft")
    test_images = len(sets["id_test"])
    for trial in WISE_TRIALS[arch]:
        fitted = load_fitted(assets, journal.trials()[trial]["model"], torch.device("cpu"))
        model = wise.mix(assets.start.fitted(), fitted, wise.options(),
                         {"alpha": ALPHA}).classifier
        logits = {s: predict(model, assets.bench.eval_sets()[s].dataset, torch.device("cpu"),
                             batch_size=spec.eval.batch_size)[0] for s in sets}
        features = [encode(model, assets.bench.eval_sets()[s].dataset, torch.device("cpu"),
                           batch_size=spec.eval.batch_size)[0] for s in sets]
        ours[f"{trial} alpha={ALPHA}"] = torch.cat(features), torch.cat(list(logits.values()))
        # orch here is the sweep: its recorded ID accuracy, unless a near-tie decides it
        (row,) = [r for r in rows if r.trial == trial and r.ensemble == "wise_ft"
                  and r.coefficients == {"alpha": ALPHA}]
        labels = torch.as_tensor(assets.bench.test.dataset.labels)
        top2 = logits["id_test"].topk(2, dim=1).values
        ties = int(((top2[:, 0] - top2[:, 1]) <= 2 * EPS * model.head.weight.norm(
            dim=1).max()).sum())
        right = int((logits["id_test"].argmax(1) == labels).sum())
        assert abs(right - round(row["id_acc"] * test_images)) <= ties, (trial, right, row["id_acc"])

    compared = excused = 0
    worst = 0.0
    for name in exports:
        got = fresh[name]
        point = json.loads(got["point"])
        assert got["classnames"] == CLASSES and point["trial"] == name.split()[0]
        assert point["coefficients"] == ({"alpha": ALPHA} if " " in name else {}), name
        decided, ties, moved = compare(ours[name], got, f"{arch} {name}")
        compared, excused, worst = compared + decided, excused + ties, max(worst, moved)
    # the WiSE-FT points are interior: not either endpoint (each differs beyond the tolerance)
    for trial in WISE_TRIALS[arch]:
        mixed = ours[f"{trial} alpha={ALPHA}"][0]
        for end in (ours["zeroshot-00"][0], ours[trial][0]):
            assert (mixed - end).norm(dim=1).max() > EPS
    assert compared >= excused, (compared, excused)   # classes were compared, not all excused
    print(f"{arch}: sweep {swept - started:.0f}s, {len(exports)} exports "
          f"{exported - swept:.0f}s, fresh load {loaded - exported:.0f}s, checks "
          f"{time.monotonic() - loaded:.0f}s; classes compared on {compared} image(s), "
          f"{excused} near-tie(s) excused; largest feature change {worst:.1e} EPS")
