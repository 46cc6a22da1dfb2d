"""Named benchmark suites (`suite: imagenet`, `suite: domainnet`) on tiny trees written in
exactly the layouts the real datasets unpack to: a handful of real wnids, ImageNetV2's
index folders, ObjectNet's images/ and its four mappings/ files in their release formats,
DomainNet's domain folders and txt lists. Every test writes only into tmp_path."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli import main
from trainers.data import DataError, FileImageDataset
from trainers.data.suites import SuiteOptions, domainnet, imagenet

W = imagenet.wnids()
NAMES = imagenet.classnames()
R, A = set(imagenet.shift_wnids("imagenet_r")), set(imagenet.shift_wnids("imagenet_a"))
TENCH, GOLDFISH = "n01440764", "n01443537"          # neither R nor A; R only
IN_R_AND_A, A_ONLY = "n01498041", "n01558993"
ANALOG, DIGITAL = "n02708093", "n03196217"          # ObjectNet's "Alarm clock" -> both
BANANA = "n07753592"
SUBSET = [DIGITAL, TENCH, IN_R_AND_A, ANALOG, GOLDFISH, A_ONLY]   # not in index order
FRAME, INSIDE = (255, 0, 0), (0, 200, 0)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The image check remembers passed checks in the orch cache: keep it in tmp_path."""
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))


def img(path: Path, size: int = 8, colour=(10, 20, 30), frame=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), colour, np.uint8)
    if frame is not None:                              # ObjectNet's 2-px frame
        pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:] = frame, frame, frame, frame
    Image.fromarray(pixels).save(path)


def lemmas() -> dict[str, str]:
    """wnid -> ImageNet's label text ("analog clock"), from timm's lemma list."""
    import importlib.util
    info = Path(importlib.util.find_spec("timm").submodule_search_locations[0]) / "data" / "_info"
    rows = (line.split("\t", 1) for line in
            (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    return {w: text for w, text in rows}


def write_mappings(mappings: Path, classes: dict[str, tuple[str, list[str]]],
                   others: dict[str, str]) -> None:
    """ObjectNet's four mappings/ files in their release formats. `classes`: folder ->
    (class name, wnids it overlaps); `others`: folder -> name of a class with no ImageNet
    counterpart. The 2012 ids are a seeded shuffle of the class indices, as in the real
    files, so a loader that confuses the two fails."""
    mappings.mkdir(parents=True, exist_ok=True)
    order = list(range(1000))
    random.Random(0).shuffle(order)                    # order[id_2012] = class index
    text = lemmas()
    (mappings / "imagenet_to_label_2012_v2").write_text(
        "".join(text[W[index]] + "\n" for index in order))
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(
        {str(index): id_2012 for id_2012, index in enumerate(order)}, indent=2))
    folders = {**{f: name for f, (name, _) in classes.items()}, **others}
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(folders, indent=2))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {name: "; ".join(text[w] for w in ws) for name, ws in classes.values()}, indent=2))


OBJECTNET = {"alarm_clock": ("Alarm clock", [ANALOG, DIGITAL]), "banana": ("Banana", [BANANA]),
             "fish": ("Fish", [GOLDFISH])}


def imagenet_tree(root: Path, chosen: list[str], per_train: int = 5) -> dict[str, Path]:
    """ImageNet and its five shifts for `chosen` wnids (and a few more folders)."""
    index = {w: k for k, w in enumerate(W)}
    for w in chosen:
        for i in range(per_train):
            img(root / "imagenet" / "train" / w / f"{w}_{i}.JPEG")
        for i in range(2):
            img(root / "imagenet" / "val" / w / f"ILSVRC2012_val_{index[w]:05d}{i}.JPEG")
        img(root / "v2" / str(index[w]) / "a.jpeg")
        img(root / "sketch" / w / "sketch_0.JPEG")
    img(root / "v2" / "999" / "a.jpeg")                # a class outside the subset
    for folder, members in (("r", R), ("a", A)):
        for w in sorted(members)[:3] + [w for w in chosen if w in members]:
            img(root / folder / w / f"{folder}_0.png")
    write_mappings(root / "objectnet" / "mappings", OBJECTNET, {"squeegee": "Squeegee"})
    for folder in list(OBJECTNET) + ["squeegee"]:      # squeegee: not an ImageNet class
        for i in range(2):
            img(root / "objectnet" / "images" / folder / f"{i}.png", 12, INSIDE, FRAME)
    return {"imagenet_v2": root / "v2", "imagenet_sketch": root / "sketch",
            "imagenet_r": root / "r", "imagenet_a": root / "a",
            "objectnet": root / "objectnet"}


@pytest.fixture
def subset_bench(tmp_path):
    shifts = imagenet_tree(tmp_path, SUBSET)
    options = SuiteOptions(root=tmp_path / "imagenet", shifts=shifts, val_fraction=0.4,
                           classes=tuple(SUBSET))
    return imagenet.load(options), options


def chosen_in_order() -> list[str]:
    return [w for w in W if w in SUBSET]


def test_classes_follow_imagenet_order_with_clip_names_and_templates(subset_bench):
    bench, _ = subset_bench
    chosen = chosen_in_order()
    assert chosen[:2] == [TENCH, GOLDFISH]                    # sorted wnids, not file order
    assert bench.classnames == tuple(NAMES[W.index(w)] for w in chosen)
    assert bench.classnames[:2] == ("tench", "goldfish")
    assert len(bench.templates) == 80 and bench.templates[0] == "a bad photo of a {}."
    # the test set is val/, each file under its own wnid's label
    for path, label in zip(bench.test.dataset.paths, bench.test.dataset.labels):
        assert path.parent.name == chosen[label]
    assert len(bench.test.dataset) == 2 * len(chosen)


def test_id_validation_is_a_seeded_class_balanced_part_of_train(subset_bench):
    bench, options = subset_bench
    train, val = bench.train, bench.val.dataset
    assert not set(train.paths) & set(val.paths)
    assert sorted(val.labels) == sorted(list(range(len(SUBSET))) * 2)   # round(0.4 * 5) each
    assert len(train) == 3 * len(SUBSET)
    assert all(p.parent.name == chosen_in_order()[y] for p, y in zip(val.paths, val.labels))
    again = imagenet.load(options)
    assert again.val.dataset.paths == val.paths
    other = imagenet.load(SuiteOptions(**{**options.__dict__, "seed": 1}))
    assert other.val.dataset.paths != val.paths


def test_an_imagenet_v2_folder_k_is_the_kth_sorted_wnid(subset_bench):
    bench, _ = subset_bench
    v2 = bench.shifts["imagenet_v2"]
    chosen = chosen_in_order()
    assert len(v2.dataset) == len(chosen)                     # folder 999 is not read
    for path, label in zip(v2.dataset.paths, v2.dataset.labels):
        assert W[int(path.parent.name)] == chosen[label]
    sketch = bench.shifts["imagenet_sketch"]
    assert [chosen[y] for y in sketch.dataset.labels] == [p.parent.name for p in sketch.dataset.paths]


@pytest.mark.parametrize("shift, members", [("imagenet_r", R), ("imagenet_a", A)])
def test_r_and_a_restrict_the_logits_to_their_classes(subset_bench, shift, members):
    bench, _ = subset_bench
    chosen = chosen_in_order()
    s = bench.shifts[shift]
    kept = [w for w in chosen if w in members]
    assert s.class_groups == tuple((chosen.index(w),) for w in kept)
    assert len(s.dataset) == len(kept)         # the folders of unchosen classes are skipped
    logits = torch.randn(50, len(chosen))
    outside = [k for k, w in enumerate(chosen) if w not in members]
    logits[:, outside] = 100.0                # the biggest logits are of classes it lacks
    projected = s.project(logits)
    assert projected.shape == (50, len(kept))
    assert torch.equal(projected, logits[:, [chosen.index(w) for w in kept]])
    assert torch.softmax(projected, -1).sum(-1).allclose(torch.ones(50))


def test_objectnet_scores_a_class_by_the_max_of_its_imagenet_logits(subset_bench):
    bench, _ = subset_bench
    chosen = chosen_in_order()
    s = bench.shifts["objectnet"]
    assert s.classnames == ("Alarm clock", "Fish")           # banana: not chosen; squeegee: no overlap
    assert s.class_groups == ((chosen.index(ANALOG), chosen.index(DIGITAL)),
                              (chosen.index(GOLDFISH),))
    assert {p.parent.name for p in s.dataset.paths} == {"alarm_clock", "fish"}
    logits = torch.zeros(3, len(chosen))
    logits[0, chosen.index(DIGITAL)] = 5.0
    logits[1, chosen.index(ANALOG)] = 3.0
    logits[2, chosen.index(GOLDFISH)] = 7.0
    logits[:, chosen.index(TENCH)] = 50.0                    # not an ObjectNet class: never wins
    assert s.project(logits).tolist() == [[5.0, 0.0], [3.0, 0.0], [0.0, 7.0]]


def test_objectnet_images_lose_their_2px_frame_and_the_cache_knows(subset_bench):
    from orchestrator.run.features import dataset_fingerprint
    dataset = subset_bench[0].shifts["objectnet"].dataset
    image, _ = dataset[0]
    pixels = np.asarray(image)
    assert pixels.shape == (8, 8, 3) and (pixels == INSIDE).all()
    uncropped = FileImageDataset(dataset.paths, dataset.labels)
    assert (np.asarray(uncropped[0][0])[0, 0] == FRAME).all()
    assert dataset.with_transform(None).border == 2
    assert dataset_fingerprint(dataset) != dataset_fingerprint(uncropped)


def test_objectnet_mappings_use_class_indices_not_2012_ids(tmp_path):
    write_mappings(tmp_path / "mappings", OBJECTNET, {"squeegee": "Squeegee"})
    classes, folders = imagenet.objectnet_classes(tmp_path / "mappings")
    assert [(c.folder, c.imagenet) for c in classes] == [
        ("alarm_clock", (W.index(ANALOG), W.index(DIGITAL))), ("banana", (W.index(BANANA),)),
        ("fish", (W.index(GOLDFISH),))]
    assert folders == {"alarm_clock", "banana", "fish", "squeegee"}


# ---------------------------------------------------------------------------------------
# Through `orch sweep --dry-run`
# ---------------------------------------------------------------------------------------


def sweep_file(tmp_path: Path, benchmark: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "suite", "benchmark": benchmark, "model": {"arch": "toy"},
        "method": {"name": "ft", "lr": 3e-4, "epochs": 1, "batch_size": 16},
        "storage_path": str(tmp_path / "runs")}))
    return path


def dry_run(path: Path):
    return CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in line
    return line


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory):
    """Every set with all its classes and one tiny image per class (two in train): what
    the class counts and published-count checks need, in a few seconds."""
    root = tmp_path_factory.mktemp("full")
    for k, w in enumerate(W):
        for split, n in (("imagenet/train", 2), ("imagenet/val", 1), ("sketch", 1)):
            for i in range(n):
                img(root / split / w / f"{i}.JPEG", 4)
        img(root / "v2" / str(k) / "0.jpeg", 4)
    for folder, members in (("r", R), ("a", A)):
        for w in members:
            img(root / folder / w / "0.png", 4)
    # 113 overlapping ObjectNet classes (one or two ImageNet classes each) and 3 others
    text = lemmas()
    unique = [w for w in W if list(text.values()).count(text[w]) == 1]
    overlapping = {f"class_{j:03d}": (f"Class {j}", unique[2 * j:2 * j + 1 + j % 2])
                   for j in range(113)}
    others = {f"other_{j}": f"Other {j}" for j in range(3)}
    write_mappings(root / "objectnet" / "mappings", overlapping, others)
    for folder in list(overlapping) + list(others):
        img(root / "objectnet" / "images" / folder / "0.png", 8, INSIDE, FRAME)
    return root


def full_benchmark(root: Path, **extra) -> dict:
    return {"suite": "imagenet", "root": str(root / "imagenet"), "val_fraction": 0.5,
            "shifts": {"imagenet_v2": str(root / "v2"), "imagenet_sketch": str(root / "sketch"),
                       "imagenet_r": str(root / "r"), "imagenet_a": str(root / "a"),
                       "objectnet": str(root / "objectnet")}, **extra}


def test_dry_run_prints_each_sets_classes_and_warns_of_unpublished_counts(tmp_path, full_tree):
    result = dry_run(sweep_file(tmp_path, full_benchmark(full_tree)))
    assert result.exit_code == 0, result.output
    out = result.output
    for name, classes in (("train", 1000), ("id_val", 1000), ("id_test", 1000),
                          ("imagenet_v2", 1000), ("imagenet_sketch", 1000),
                          ("imagenet_r", 200), ("imagenet_a", 200), ("objectnet", 113)):
        assert f"  {name}: {classes} classes," in out, out
    assert "  objectnet: 113 classes, 113 images (shift, its 113 classes mapped onto the 1000" in out
    assert "benchmark suite imagenet" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 7, warnings
    assert "warning: benchmark: objectnet has 113 images, the published set 18,574" in warnings
    assert "warning: benchmark: id_test has 1,000 images, the published set 50,000" in warnings
    assert ("warning: benchmark: train (with id_val) has 2,000 images, the published set "
            "1,281,167") in warnings


def test_strict_counts_makes_a_count_difference_an_error(tmp_path, full_tree):
    line = one_error_line(dry_run(sweep_file(tmp_path, full_benchmark(full_tree,
                                                                      strict_counts=True))))
    assert "strict_counts: train (with id_val) has 2,000 images, the published set 1,281,167" in line
    assert "and 6 more set(s) differ" in line


def test_a_class_subset_is_not_compared_with_published_counts(tmp_path):
    shifts = imagenet_tree(tmp_path, SUBSET)
    result = dry_run(sweep_file(tmp_path, {
        "suite": "imagenet", "root": str(tmp_path / "imagenet"), "val_fraction": 0.4,
        "classes": SUBSET, "strict_counts": True,
        "shifts": {k: str(v) for k, v in shifts.items()}}))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    assert result.output.count("image counts are not compared") == 1
    assert "  imagenet_r: 2 classes, 2 images (shift, 2 of 6 classes)" in result.output


def test_the_objectnet_subset_of_a_subset_maps_onto_the_subset(tmp_path):
    shifts = imagenet_tree(tmp_path, SUBSET)
    result = dry_run(sweep_file(tmp_path, {
        "suite": "imagenet", "root": str(tmp_path / "imagenet"), "val_fraction": 0.4,
        "classes": [ANALOG, TENCH], "shifts": {"objectnet": str(shifts["objectnet"])}}))
    assert result.exit_code == 0, result.output
    assert "  objectnet: 1 classes, 2 images (shift, 1 of 2 classes)" in result.output


def _drop(path: Path) -> None:
    import shutil
    shutil.rmtree(path)


@pytest.mark.parametrize("change, field, words", [
    (lambda root: _drop(root / "imagenet" / "train" / GOLDFISH), "benchmark:",
     f"missing folder {{root}}/imagenet/train/{GOLDFISH} (class 'goldfish')"),
    (lambda root: img(root / "imagenet" / "train" / "cats" / "0.jpg"), "benchmark:",
     "{root}/imagenet/train/cats is not an ImageNet-1k class folder"),
    (lambda root: img(root / "r" / TENCH / "0.png"), "benchmark: shift 'imagenet_r':",
     f"{{root}}/r/{TENCH} is not one of its 200 class folders"),
    (lambda root: _drop(root / "objectnet" / "images" / "fish"), "benchmark: shift 'objectnet':",
     "missing folder {root}/objectnet/images/fish (class 'Fish')"),
    (lambda root: (root / "objectnet" / "mappings" / "pytorch_to_imagenet_2012_id.json").unlink(),
     "benchmark: shift 'objectnet':", "cannot read {root}/objectnet/mappings/pytorch_to_imagenet"),
])
def test_a_bad_tree_is_one_line_naming_the_folder(tmp_path, change, field, words):
    shifts = imagenet_tree(tmp_path, SUBSET)
    change(tmp_path)
    line = one_error_line(dry_run(sweep_file(tmp_path, {
        "suite": "imagenet", "root": str(tmp_path / "imagenet"), "val_fraction": 0.4,
        "classes": SUBSET, "shifts": {k: str(v) for k, v in shifts.items()}})))
    assert field in line and words.format(root=tmp_path) in line, line


@pytest.mark.parametrize("benchmark, field, words", [
    ({"shifts": {"imagenet_c": "{root}"}}, "benchmark.shifts.imagenet_c",
     "not a shift of suite imagenet (known: imagenet_v2, imagenet_sketch, imagenet_r, "
     "imagenet_a, objectnet)"),
    ({"shifts": {"objectnet": "{root}/nowhere"}}, "benchmark.shifts.objectnet",
     "folder {root}/nowhere does not exist"),
    ({"root": None}, "benchmark.root", "required for suite imagenet"),
    ({"classes": [TENCH, "n0000000"]}, "benchmark.classes[1]", "'n0000000' is not a class"),
    ({"classes": [TENCH, TENCH]}, "benchmark.classes[1]", "listed twice"),
    ({"source": "imagefolder"}, "benchmark.source", "not both"),
    ({"classnames": ["a"]}, "benchmark.classnames", "restrict them with `classes:`"),
    ({"val_fraction": 0.0}, "benchmark.val_fraction", "must be in (0, 1)"),
    ({"domain": "real"}, "benchmark.domain", "not a key of suite imagenet"),
    ({"suite": "imagenet21k"}, "benchmark.suite", "must be one of imagenet, domainnet"),
    ({"shifts": {"objectnet": {"path": "{root}", "class_map": {"a": ["b"]}}}},
     "benchmark.shifts.objectnet.class_map", "give the folder only"),
    ({"shifts": ["objectnet"]}, "benchmark.shifts", "suite: domainnet"),
])
def test_bad_suite_keys_name_the_field(tmp_path, benchmark, field, words):
    (tmp_path / "imagenet").mkdir()
    block = {"suite": "imagenet", "root": str(tmp_path / "imagenet")}
    block.update(yaml.safe_load(yaml.safe_dump(benchmark).replace("{root}", str(tmp_path))))
    line = one_error_line(dry_run(sweep_file(tmp_path, {k: v for k, v in block.items()
                                                        if v is not None})))
    assert f"{field}: " in line and words.format(root=tmp_path) in line, line


def test_a_source_that_is_a_suite_name_points_to_suite(tmp_path):
    line = one_error_line(dry_run(sweep_file(tmp_path, {"source": "imagenet"})))
    assert "benchmark.source" in line and "`suite: imagenet`" in line


def test_the_json_schema_knows_the_suite_keys():
    from orchestrator.spec.jsonschema import sweep_schema
    bench = sweep_schema()["properties"]["benchmark"]["properties"]
    assert bench["suite"]["anyOf"][0]["enum"] == ["domainnet", "imagenet"]
    assert bench["strict_counts"] == {"type": "boolean", "default": False}
    assert {"type": "string", "description": "the shift's folder"} in \
        bench["shifts"]["anyOf"][0]["additionalProperties"]["anyOf"]
    assert "real" in bench["domain"]["anyOf"][0]["enum"]
    jsonschema = pytest.importorskip("jsonschema")   # comes with ray
    schema = sweep_schema()
    for block in (full_benchmark(Path("/data")),
                  {"suite": "domainnet", "root": "/d", "domain": "real", "shifts": ["sketch"]}):
        jsonschema.validate({"name": "x", "benchmark": block}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "benchmark": {"suite": "imagenet21k"}}, schema)


# ---------------------------------------------------------------------------------------
# DomainNet
# ---------------------------------------------------------------------------------------

DN_CLASSES = ["aircraft_carrier", "bat", "zebra"]       # labels 0, 1, 2: the lists' order


def domainnet_tree(root: Path, domain: str, split: str, per_class: dict[int, int]) -> None:
    lines = []
    for label, n in per_class.items():
        folder = DN_CLASSES[label]
        for i in range(n):
            rel = f"{domain}/{folder}/{domain}_{label:03d}_{split}{i:03d}.jpg"
            img(root / rel)
            lines.append(f"{rel} {label}\n")
    (root / f"{domain}_{split}.txt").write_text("".join(lines))


@pytest.fixture
def dn_root(tmp_path):
    root = tmp_path / "domainnet"
    domainnet_tree(root, "real", "train", {0: 5, 1: 5, 2: 5})
    domainnet_tree(root, "real", "test", {0: 2, 1: 2, 2: 2})
    domainnet_tree(root, "sketch", "test", {0: 2, 2: 3})       # no bat in sketch
    domainnet_tree(tmp_path / "elsewhere", "painting", "test", {0: 1, 1: 1, 2: 1})
    return root


def test_domainnet_id_domain_shifts_and_class_names(dn_root, tmp_path):
    bench = domainnet.load(SuiteOptions(root=dn_root, domain="real", val_fraction=0.4,
                                        shifts={"sketch": dn_root,
                                                "painting": tmp_path / "elsewhere"}))
    assert bench.classnames == ("aircraft carrier", "bat", "zebra")
    assert len(bench.train) == 9 and sorted(bench.val.dataset.labels) == [0, 0, 1, 1, 2, 2]
    assert not set(bench.train.paths) & set(bench.val.dataset.paths)
    for dataset in (bench.train, bench.val.dataset, bench.test.dataset):
        assert all(p.parent.name == DN_CLASSES[y] for p, y in zip(dataset.paths, dataset.labels))
    assert len(bench.test.dataset) == 6 and "_test" in bench.test.dataset.paths[0].name
    sketch = bench.shifts["sketch"]
    assert sketch.classnames == ("aircraft carrier", "zebra") and sketch.class_groups == ((0,), (2,))
    assert [DN_CLASSES[sketch.class_groups[y][0]] for y in sketch.dataset.labels] == \
        [p.parent.name for p in sketch.dataset.paths]
    assert bench.shifts["painting"].dataset.paths[0].is_relative_to(tmp_path / "elsewhere")
    subset = domainnet.load(SuiteOptions(root=dn_root, domain="real", val_fraction=0.4,
                                         classes=("zebra", "bat")))
    assert subset.classnames == ("bat", "zebra") and len(subset.test.dataset) == 4


def test_domainnet_through_the_sweep_file(dn_root, tmp_path):
    result = dry_run(sweep_file(tmp_path, {"suite": "domainnet", "root": str(dn_root),
                                           "domain": "real", "val_fraction": 0.4,
                                           "shifts": ["sketch"]}))
    assert result.exit_code == 0, result.output
    assert "  sketch: 2 classes, 5 images (shift, 2 of 3 classes)" in result.output
    assert "warning: benchmark: sketch has 5 images, the published set 20,916" in result.output
    assert "warning: benchmark: train (with id_val) has 15 images, the published set 120,906" \
        in result.output
    mapped = dry_run(sweep_file(tmp_path, {"suite": "domainnet", "root": str(dn_root),
                                           "domain": "real", "val_fraction": 0.4,
                                           "shifts": {"painting": str(tmp_path / "elsewhere")}}))
    assert mapped.exit_code == 0 and "  painting: 3 classes, 3 images (shift)" in mapped.output


@pytest.mark.parametrize("benchmark, words", [
    ({"domain": None}, "benchmark.domain: required for suite domainnet"),
    ({"shifts": ["real"]}, "benchmark.shifts.real: not a shift of suite domainnet (known: "
                           "clipart, infograph, painting, quickdraw, sketch)"),
    ({"domain": "photos"}, "benchmark.domain: 'photos' is not one of clipart"),
    ({"shifts": ["sketch", "sketch"]}, "benchmark.shifts[1]: 'sketch' is listed twice"),
    ({"classes": ["zebra", "unicorn"]}, "benchmark: classes[1]: 'unicorn' is not a DomainNet "
                                        "class folder"),
])
def test_bad_domainnet_blocks_name_the_field(dn_root, tmp_path, benchmark, words):
    block = {"suite": "domainnet", "root": str(dn_root), "domain": "real", "val_fraction": 0.4,
             **benchmark}
    line = one_error_line(dry_run(sweep_file(tmp_path, {k: v for k, v in block.items()
                                                        if v is not None})))
    assert words in line, line


def test_domainnet_lists_that_disagree_on_a_label_name_both_lines(dn_root):
    lines = (dn_root / "real_test.txt").read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 1"               # aircraft_carrier labelled 1
    (dn_root / "real_test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"real_test.txt:1: label 1 is class 'aircraft_carrier' "
                                        r"here but 'bat' at .*real_train.txt:6"):
        domainnet.load(SuiteOptions(root=dn_root, domain="real", val_fraction=0.4))


def test_a_missing_listed_file_names_its_line(dn_root):
    first = (dn_root / "real_train.txt").read_text().splitlines()[0].split()[0]
    (dn_root / first).unlink()
    with pytest.raises(DataError, match=r"real_train.txt:1: image file not found"):
        domainnet.load(SuiteOptions(root=dn_root, domain="real", val_fraction=0.4))


def test_clip_names_two_pairs_of_classes_alike_and_user_lists_may_not(tmp_path, full_tree):
    """CLIP's ImageNet names repeat "missile" and "sunglasses" (its zero-shot head is built
    from them as they are); a class list the user writes must name each class once."""
    bench = imagenet.load(SuiteOptions(root=full_tree / "imagenet", val_fraction=0.5))
    assert bench.classnames.count("missile") == 2 and bench.classnames.count("sunglasses") == 2
    assert len(bench.classnames) == 1000
    (tmp_path / "t.csv").write_text("path,label\n")
    line = one_error_line(dry_run(sweep_file(tmp_path, {
        "source": "csv", "train": str(tmp_path / "t.csv"), "val": str(tmp_path / "t.csv"),
        "test": str(tmp_path / "t.csv"), "classnames": ["cat", "dog", "cat"]})))
    assert "benchmark.classnames: 'cat' is listed twice" in line, line


def test_a_shift_given_as_its_folder_alone_is_its_path(tmp_path):
    for split in ("train", "val", "test"):
        for name in ("cat", "dog"):
            img(tmp_path / "task" / split / name / "0.png")
    img(tmp_path / "sketch" / "cat" / "0.png")
    result = dry_run(sweep_file(tmp_path, {"source": "imagefolder", "root": str(tmp_path / "task"),
                                           "shifts": {"sketch": str(tmp_path / "sketch")}}))
    assert result.exit_code == 0, result.output
    assert "  sketch: 1 classes, 1 images (shift, 1 of 2 classes)" in result.output
