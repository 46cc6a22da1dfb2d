"""The paper-recipe sweep files (`sweeps/papers/*.yaml`, docs/reproduce.md): each one
parses with `$DATA` pointing at a tiny ImageNet-layout tree, carries the authors' settings
(checked value by value against the sources its comments cite), and `orch sweep FILE
--dry-run` plans it on that tree with the protocol's class counts per set (1,000 ID
classes, 200 for ImageNet-R and -A, 113 for ObjectNet)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from orchestrator.cli import main
from orchestrator.plan import Plan
from orchestrator.spec import load_spec
from trainers.methods import get_method

PAPERS = REPO / "sweeps" / "papers"
FILES = {p.stem: p for p in sorted(PAPERS.glob("*.yaml"))}

ELEVEN = tuple(round(0.1 * i, 1) for i in range(11))   # WiSE-FT's alpha grid 0, 0.1, ..., 1
# WiSE-FT's end-to-end fine-tuning (mlfoundations/wise-ft README and src/args.py)
WISE_FT_RECIPE = dict(lr=3e-5, epochs=10, batch_size=512, weight_decay=0.1, warmup_steps=500,
                      grad_clip=1.0, label_smoothing=0.0)
# What each file must train: method label -> the options that matter (ensembles: below).
RECIPES = {
    "wise_ft": {"ft": WISE_FT_RECIPE},
    "lp_ft": {"lp_ft": dict(lr=1e-5, epochs=10, batch_size=512, weight_decay=0.1,
                            warmup_steps=500, grad_clip=1.0, label_smoothing=0.0, lp_lr=1e-3,
                            lp_epochs=10, lp_batch_size=128, lp_weight_decay=0.1,
                            lp_warmup_steps=500)},
    # locuslab/FLYP README: lr 1e-5, wd 0.1, batch 512, 10 epochs; no clipping in its loop
    "flyp": {"flyp": dict(lr=1e-5, epochs=10, batch_size=512, weight_decay=0.1,
                          warmup_steps=500, grad_clip=None)},
    # MLAI-Yonsei/CaRot example_scripts/carot.sh + src/args.py: the RELEASED command
    "carot": {"carot": dict(lr=1e-5, epochs=10, batch_size=512, weight_decay=0.1,
                            warmup_steps=500, grad_clip=None, label_smoothing=0.0,
                            lambda_oc=0.2, lambda_sd=1.5, lambda_cross=0.05, ema_every=500,
                            ema_momentum_start=0.05, ema_momentum_end=0.9,
                            ema_warmup_fraction=0.2)},
    "vrf": {"ft": WISE_FT_RECIPE},
}
CODE = {"wise_ft": "github.com/mlfoundations/wise-ft",
        "lp_ft": "github.com/AnanyaKumar/transfer_learning",
        "flyp": "github.com/locuslab/FLYP", "carot": "github.com/MLAI-Yonsei/CaRot",
        "vrf": "github.com/BeierZhu/VRF"}
SHIFTS = ("imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet")
OBJECTNET_CLASSES = 113


def test_one_file_per_paper():
    assert set(FILES) == set(RECIPES)


# ---------------------------------------------------------------------------------------
# A tiny tree in the layout of the real data: every class folder of every set, one image
# each (hard links to one JPEG), and ObjectNet's four mapping files with 113 classes that
# overlap ImageNet (two of them mapped to several ImageNet classes) plus two that do not.
# ---------------------------------------------------------------------------------------


def _jpeg() -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(out, format="JPEG")
    return out.getvalue()


def _place(source: Path, folder: Path, count: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        target = folder / f"img{i}.JPEG"
        try:
            os.link(source, target)
        except OSError:          # a file system without hard links
            shutil.copyfile(source, target)


def write_objectnet_mappings(mappings: Path, overlapping: int, others: int) -> None:
    """The release's four mapping files for a synthetic ObjectNet: `overlapping` classes
    that map into ImageNet-1k and `others` that do not. ImageNet 2012 id i is named
    `imagenet class i`, and class index i is 2012 id i."""
    mappings.mkdir(parents=True)
    (mappings / "imagenet_to_label_2012_v2").write_text(
        "".join(f"imagenet class {i}\n" for i in range(1000)))
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(i): i for i in range(1000)}))
    folders = {f"folder_{j:03d}": f"Object {j}" for j in range(overlapping + others)}
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    to_imagenet = {f"Object {j}": f"imagenet class {3 * j}" for j in range(overlapping)}
    to_imagenet["Object 0"] = "imagenet class 0; imagenet class 1"          # many-to-one
    to_imagenet["Object 1"] = "imagenet class 3; imagenet class 4; imagenet class 5"
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from trainers.data.suites.imagenet import shift_wnids, wnids
    root = tmp_path_factory.mktemp("data")
    jpeg = root / "one.JPEG"
    jpeg.write_bytes(_jpeg())
    for wnid in wnids():
        _place(jpeg, root / "imagenet" / "train" / wnid, count=2)
        _place(jpeg, root / "imagenet" / "val" / wnid)
        _place(jpeg, root / "imagenet-sketch" / wnid)
    for k in range(1000):
        _place(jpeg, root / "imagenetv2-matched-frequency" / str(k))
    for shift, folder in (("imagenet_r", "imagenet-r"), ("imagenet_a", "imagenet-a")):
        for wnid in shift_wnids(shift):
            _place(jpeg, root / folder / wnid)
    objectnet = root / "objectnet-1.0"
    write_objectnet_mappings(objectnet / "mappings", OBJECTNET_CLASSES, others=2)
    for j in range(OBJECTNET_CLASSES + 2):
        _place(jpeg, objectnet / "images" / f"folder_{j:03d}")
    jpeg.unlink()
    return root


@pytest.fixture
def data_env(data_root, monkeypatch):
    monkeypatch.setenv("DATA", str(data_root))
    return data_root


# ---------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("paper", sorted(RECIPES))
def test_recipe_values(paper, data_env):
    spec = load_spec(FILES[paper])          # the file as shipped, paths checked on the tree
    assert (spec.model.arch, spec.model.pretrained) == ("ViT-B-16", "openai")
    assert spec.model.augment                     # RandomResizedCrop(scale 0.9-1), as their code
    b = spec.benchmark
    assert b.suite == "imagenet" and b.val_fraction == 0.02 and b.classes is None
    assert Path(b.root) == data_env / "imagenet"  # $DATA expanded
    assert tuple(b.shifts) == SHIFTS
    assert spec.eval.precision == "fp32"
    labels = [e.label for e in spec.methods]
    assert labels[0] == "zeroshot" and labels[1:] == list(RECIPES[paper])
    for label, expected in RECIPES[paper].items():
        (point,) = [p for p in Plan(spec).trials if p.label == label]   # one trial: no lr grid
        got = {k: getattr(point.options, k) for k in expected}
        assert got == expected, (paper, label)


@pytest.mark.parametrize("paper", sorted(RECIPES))
def test_every_option_is_written_out(paper):
    """A recipe must not ride on orch's defaults, which may change: every option of each
    trained method is in the file (`freeze_bn_stats` aside: ViTs have no BatchNorm)."""
    raw = yaml.safe_load(FILES[paper].read_text())
    for entry in raw["methods"]:
        if entry["name"] == "zeroshot":
            continue
        fields = {f.name for f in dataclasses.fields(get_method(entry["name"]).options)}
        missing = fields - set(entry) - {"freeze_bn_stats"}
        assert not missing, (paper, entry["name"], sorted(missing))


@pytest.mark.parametrize("paper", sorted(RECIPES))
def test_files_match_the_editor_schema(paper):
    """`orch schema` is what editors check these files against as they are edited."""
    jsonschema = pytest.importorskip("jsonschema")
    from orchestrator.spec.jsonschema import sweep_schema
    raw = yaml.safe_load(FILES[paper].read_text())
    schema = sweep_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [e.message for e in validator.iter_errors(raw)]
    assert not errors, (paper, errors)


@pytest.mark.parametrize("paper", sorted(RECIPES))
def test_cites_the_authors_code(paper):
    text = FILES[paper].read_text()
    assert CODE[paper] in text and "arxiv.org/abs/" in text


def test_carot_ships_the_released_command_not_the_paper_text(data_env):
    (point,) = [p for p in Plan(load_spec(FILES["carot"])).trials if p.label == "carot"]
    assert point.options.label_smoothing == 0.0     # carot.sh sets no --ls
    assert point.options.lambda_cross == 0.05       # carot.sh --cross_fnorm=0.05
    assert (point.options.lambda_oc, point.options.lambda_sd) == (0.2, 1.5)
    # the paper's text is one override away, as the file and docs/reproduce.md say
    paper_text = load_spec(FILES["carot"], ["methods.1.label_smoothing=0.1",
                                            "methods.1.lambda_cross=0"])
    (point,) = [p for p in Plan(paper_text).trials if p.label == "carot"]
    assert (point.options.label_smoothing, point.options.lambda_cross) == (0.1, 0.0)


def test_flyp_and_carot_do_not_clip_and_ft_does(data_env):
    clip = {paper: [p.options.grad_clip for p in Plan(load_spec(FILES[paper])).trials
                    if p.trained] for paper in RECIPES}
    assert clip["flyp"] == [None] and clip["carot"] == [None]
    assert clip["wise_ft"] == [1.0] and clip["vrf"] == [1.0] and clip["lp_ft"] == [1.0]


def test_ensemble_grids(data_env):
    grids = {paper: {e.name: e.options for e in load_spec(FILES[paper]).ensembles}
             for paper in RECIPES}
    for paper in ("wise_ft", "flyp", "lp_ft", "vrf"):
        assert grids[paper]["wise_ft"].alpha == ELEVEN, paper
    assert grids["carot"]["wise_ft"].alpha == (0.0, 0.5, 1.0)   # CaRot's wise_ft.py default 0.5
    vrf = grids["vrf"]["vrf"]
    assert 1.5 in vrf.a and 0.6 in vrf.b                         # src/main.py weight(a=1.5, b=0.6)
    assert (vrf.variant, vrf.k) == ("code", None)
    assert min(vrf.a) == 1.2 and max(vrf.a) == 1.8               # the paper's App. C.2 range
    assert min(vrf.b) == 0.5 and max(vrf.b) == 1.0
    assert grids["vrf"]["ose"].alpha == ELEVEN
    assert grids["vrf"]["ose"].calibrate is False


# ---------------------------------------------------------------------------------------
# The plan on the tree
# ---------------------------------------------------------------------------------------

# Two training images per class: half of them is the ID validation split here (the files'
# 2 % of two images would leave a class without one).
SMALL_VAL = "benchmark.val_fraction=0.5"
# set -> (classes, what its role says): ImageNet-R and -A keep their 200 classes' columns,
# ObjectNet's 113 classes each take the max over the ImageNet classes mapped to them.
CLASS_COUNTS = {"train": (1000, "ID training"), "id_val": (1000, "ID validation"),
                "id_test": (1000, "ID test"), "imagenet_v2": (1000, "shift"),
                "imagenet_sketch": (1000, "shift"),
                "imagenet_r": (200, "200 of 1000 classes"),
                "imagenet_a": (200, "200 of 1000 classes"),
                "objectnet": (OBJECTNET_CLASSES, "113 classes mapped onto the 1000")}


@pytest.mark.parametrize("paper", sorted(RECIPES))
def test_dry_run_plans_the_protocol(paper, data_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")       # a dry run downloads nothing
    result = CliRunner().invoke(main, ["sweep", str(FILES[paper]), SMALL_VAL, "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "model ViT-B-16 (openai), benchmark suite imagenet" in out
    sets = dict(re.findall(r"^  (\w+): (\d+ classes, [\d,]+ images \(.*\))$", out, re.M))
    assert set(sets) == set(CLASS_COUNTS), out
    for name, (classes, role) in CLASS_COUNTS.items():
        assert sets[name].startswith(f"{classes} classes,"), (name, sets[name])
        assert role in sets[name], (name, sets[name])
    assert "1,000 images (ID validation)" in sets["id_val"]
    # a tree this small is not the published data, and the plan says so
    assert "the published set 1,281,167" in out
    for label in RECIPES[paper]:
        assert f"method {label} (" in out
