"""Bad inputs fail `orch sweep FILE --dry-run` (and `orch report`) with exit code 2 and
ONE line naming the field, or the class and the folder: never a traceback, never a
silently wrong sweep. Each test writes the bad file it is about."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli import main

# A sweep file as YAML text, one top-level key per line, so a test swaps in a bad line
# exactly as a user would write it (`.nan`, `-.inf`, a key twice, ...).
BASE = {
    "name": "t",
    "benchmark": "{source: toyworld, train_size: 64, eval_size: 32}",
    "model": "{arch: toy}",
    "method": "{name: ft, lr: 3.0e-4, epochs: 1, batch_size: 16}",
    "grid": "{seed: [0]}",
    "ensemble": "{name: wise_ft, alphas: [0.0, 1.0]}",
}


def sweep_text(**blocks: str | None) -> str:
    """BASE with some top-level lines replaced (None drops one), as YAML text."""
    lines = {**BASE, **blocks}
    return "".join(f"{key}: {value}\n" for key, value in lines.items() if value is not None)


def write(tmp_path: Path, text: str | bytes, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def dry_run(path: Path) -> str:
    """The one error line of `orch sweep PATH --dry-run` (asserting exit 2, one line)."""
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def dry_run_ok(path: Path) -> str:
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def image_tree(root: Path, per_split: dict[str, dict[str, int]]) -> None:
    """root/<split>/<class>/<i>.png; a count of 0 makes an empty class folder."""
    for split, classes in per_split.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                png(root / split / name / f"{i}.png", (40 * i) % 256)


FULL = {"cat": 2, "dog": 2}
ID_SPLITS = {"train": FULL, "val": FULL, "test": FULL}


def imagefolder_sweep(tmp_path: Path, shifts: dict | None = None, **benchmark) -> Path:
    spec = {"source": "imagefolder", "root": str(tmp_path / "data"),
            "classnames": ["cat", "dog"], **benchmark}
    if shifts:
        spec["shifts"] = shifts
    return write(tmp_path, sweep_text(benchmark=yaml.safe_dump(spec, default_flow_style=True,
                                                              width=10_000).strip()))


# ---------------------------------------------------------------------------------------
# 1. Classes without images
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_class_without_a_folder_in_an_id_split(tmp_path, split):
    tree = {s: dict(FULL) for s in ("train", "val", "test")}
    del tree[split]["dog"]
    image_tree(tmp_path / "data", tree)
    line = dry_run(imagefolder_sweep(tmp_path))
    assert "benchmark:" in line and "class 'dog' has no folder" in line
    assert str(tmp_path / "data" / split / "dog") in line


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_class_with_an_empty_folder_in_an_id_split(tmp_path, split):
    tree = {s: dict(FULL) for s in ("train", "val", "test")}
    tree[split]["dog"] = 0
    image_tree(tmp_path / "data", tree)
    line = dry_run(imagefolder_sweep(tmp_path))
    assert "class 'dog': no images in class folder" in line
    assert str(tmp_path / "data" / split / "dog") in line


def test_a_classname_with_no_folder_anywhere(tmp_path):
    image_tree(tmp_path / "data", ID_SPLITS)
    line = dry_run(imagefolder_sweep(tmp_path, classnames=["cat", "dog", "cow"]))
    assert "class 'cow' has no folder" in line and str(tmp_path / "data" / "train" / "cow") in line


def test_val_fraction_that_leaves_a_class_without_validation_images(tmp_path):
    image_tree(tmp_path / "data", {"train": {"cat": 10, "dog": 1}, "test": FULL})
    line = dry_run(imagefolder_sweep(tmp_path, val_fraction=0.2))
    assert "class 'dog' has no validation images" in line
    assert str(tmp_path / "data" / "train" / "dog") in line


def test_a_file_benchmark_without_shifts_is_refused_before_training(tmp_path):
    """OOD accuracy is the mean over the shifts: without one, the sweep would train and then
    have no second axis. A tree that is otherwise fine passes with one shift added."""
    image_tree(tmp_path / "data", ID_SPLITS)
    line = dry_run(imagefolder_sweep(tmp_path))
    assert "benchmark.shifts: required" in line
    image_tree(tmp_path, {"sketch": FULL})
    dry_run_ok(imagefolder_sweep(tmp_path, {"sketch": {"path": str(tmp_path / "sketch")}}))


def test_a_shift_class_folder_that_is_empty(tmp_path):
    image_tree(tmp_path / "data", ID_SPLITS)
    image_tree(tmp_path, {"sketch": {"cat": 2, "dog": 0}})
    line = dry_run(imagefolder_sweep(tmp_path, {"sketch": {"path": str(tmp_path / "sketch")}}))
    assert "shift 'sketch': class 'dog': no images in class folder" in line
    assert str(tmp_path / "sketch" / "dog") in line


def test_an_empty_shift(tmp_path):
    image_tree(tmp_path / "data", ID_SPLITS)
    (tmp_path / "sketch").mkdir()
    line = dry_run(imagefolder_sweep(tmp_path, {"sketch": {"path": str(tmp_path / "sketch")}}))
    assert "shift 'sketch': no class folders in" in line and str(tmp_path / "sketch") in line


def test_a_shift_may_cover_a_subset_of_the_classes(tmp_path):
    image_tree(tmp_path / "data", ID_SPLITS)
    image_tree(tmp_path, {"sketch": {"dog": 1}})        # no folder for cat: fine
    dry_run_ok(imagefolder_sweep(tmp_path, {"sketch": {"path": str(tmp_path / "sketch")}}))


def test_a_class_map_class_without_a_folder(tmp_path):
    image_tree(tmp_path / "data", ID_SPLITS)
    image_tree(tmp_path, {"objectnet": {"animal": 1}})
    shift = {"path": str(tmp_path / "objectnet"),
             "class_map": {"animal": ["cat"], "pet": ["dog"]}}
    line = dry_run(imagefolder_sweep(tmp_path, {"objectnet": shift}))
    assert "shift 'objectnet': class 'pet' has no folder" in line
    assert str(tmp_path / "objectnet" / "pet") in line


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_csv_class_with_no_rows(tmp_path, split):
    png(tmp_path / "img" / "a.png")
    rows = {"train": "img/a.png,cat\nimg/a.png,dog\n", "val": "img/a.png,cat\nimg/a.png,1\n",
            "test": "img/a.png,0\nimg/a.png,dog\n"}
    rows[split] = "img/a.png,cat\n"
    for name, text in rows.items():
        (tmp_path / f"{name}.csv").write_text("path,label\n" + text)
    benchmark = {"source": "csv", "classnames": ["cat", "dog"],
                 **{name: str(tmp_path / f"{name}.csv") for name in rows}}
    line = dry_run(write(tmp_path, sweep_text(benchmark=yaml.safe_dump(
        benchmark, default_flow_style=True, width=10_000).strip())))
    assert f"benchmark.{split}:" in line and "class 'dog' has no rows in" in line
    assert str(tmp_path / f"{split}.csv") in line


# ---------------------------------------------------------------------------------------
# 2. NaN, infinities and out-of-range numbers name the field
# ---------------------------------------------------------------------------------------

FINITE = "expected a finite number"
FRACTION = "must be in [0, 1)"


@pytest.mark.parametrize("blocks, field, words", [
    ({"method": "{name: ft, lr: .nan}"}, "method.lr", FINITE),
    ({"method": "{name: ft, lr: .inf}"}, "method.lr", FINITE),
    ({"method": "{name: ft, lr: -.inf}"}, "method.lr", FINITE),
    ({"method": "{name: ft, lr: 'nan'}"}, "method.lr", FINITE),
    ({"method": "{name: ft, lr: -1.0e-4}"}, "method.lr", "must be > 0"),
    ({"method": "{name: ft, lr: 0}"}, "method.lr", "must be > 0"),
    ({"method": "{name: ft, weight_decay: .nan}"}, "method.weight_decay", FINITE),
    ({"method": "{name: ft, weight_decay: -0.1}"}, "method.weight_decay", "must be >= 0"),
    ({"method": "{name: ft, grad_clip: .inf}"}, "method.grad_clip", FINITE),
    ({"method": "{name: ft, label_smoothing: .nan}"}, "method.label_smoothing", FINITE),
    ({"method": "{name: ft, label_smoothing: -0.1}"}, "method.label_smoothing", FRACTION),
    ({"method": "{name: ft, label_smoothing: 1.0}"}, "method.label_smoothing", FRACTION),
    ({"method": "{name: ft, epochs: 0}"}, "method.epochs", "must be >= 1"),
    ({"method": "{name: ft, epochs: -3}"}, "method.epochs", "must be >= 1"),
    ({"method": "{name: ft, epochs: .inf}"}, "method.epochs", "expected an integer"),
    ({"method": "{name: ft, batch_size: 0}"}, "method.batch_size", "must be >= 1"),
    ({"method": "{name: ft, batch_size: -16}"}, "method.batch_size", "must be >= 1"),
    ({"method": "{name: ft, warmup_steps: -1}"}, "method.warmup_steps", "must be >= 0"),
    ({"method": "{name: lp_ft, lp_lr: -1.0}"}, "method.lp_lr", "must be > 0"),
    ({"method": "{name: lp_ft, lp_batch_size: 0}"}, "method.lp_batch_size", "must be >= 1"),
    ({"method": "{name: lp_ft, lp_weight_decay: .nan}"}, "method.lp_weight_decay", FINITE),
    ({"method": "{name: carot, lambda_oc: -0.2}"}, "method.lambda_oc", "must be >= 0"),
    ({"method": "{name: carot, ema_momentum_start: .nan}"}, "method.ema_momentum_start", FINITE),
    ({"method": "{name: carot, ema_every: 0}"}, "method.ema_every", "must be >= 1"),
    ({"grid": "{lr: [1.0e-4, .nan]}"}, "grid.lr[1]", FINITE),
    ({"grid": "{label_smoothing: [0.1, -.inf]}"}, "grid.label_smoothing[1]", FINITE),
    ({"resources": "{cpus_per_trial: .nan}"}, "resources.cpus_per_trial", FINITE),
    ({"resources": "{cpus_per_trial: 0}"}, "resources.cpus_per_trial", "must be > 0"),
    ({"resources": "{cpus_per_trial: -2}"}, "resources.cpus_per_trial", "must be > 0"),
    ({"resources": "{gpus_per_trial: .inf}"}, "resources.gpus_per_trial", FINITE),
    ({"resources": "{gpus_per_trial: -1}"}, "resources.gpus_per_trial", "must be >= 0"),
    ({"resources": "{max_concurrent_trials: 0}"}, "resources.max_concurrent_trials",
     "must be >= 1"),
    ({"resources": "{max_failures: -1}"}, "resources.max_failures", "must be >= 0"),
    ({"resources": "{workers_per_trial: 0}"}, "resources.workers_per_trial", "must be >= 1"),
    ({"eval": "{batch_size: 0}"}, "eval.batch_size", "must be >= 1"),
    ({"eval": "{num_workers: -1}"}, "eval.num_workers", "must be >= 0"),
    ({"eval": "{precision: fp16}"}, "eval.precision", "must be one of fp32, bf16"),
    ({"features": "{batch_size: -1}"}, "features.batch_size", "must be >= 1"),
    ({"features": "{cpus_per_actor: .nan}"}, "features.cpus_per_actor", FINITE),
    ({"features": "{gpus_per_actor: -0.5}"}, "features.gpus_per_actor", "must be >= 0"),
    ({"features": "{actors: 0}"}, "features.actors", "must be >= 1"),
    ({"benchmark": "{source: toyworld, val_fraction: .nan}"}, "benchmark.val_fraction", FINITE),
    ({"benchmark": "{source: toyworld, train_size: 0}"}, "benchmark.train_size", "must be >= 1"),
    ({"ensemble": "{name: wise_ft, alphas: [0.0, .nan]}"}, "ensemble.alphas[1]", FINITE),
    ({"ensemble": "{name: wise_ft, alphas: [0.0, 1.5]}"}, "ensemble.alphas", "1.5 is outside"),
    ({"ensemble": "{name: wise_ft, alpha: [-.inf]}"}, "ensemble.alpha[0]", FINITE),
    ({"ensemble": "{name: vrf, a: [.inf]}"}, "ensemble.a[0]", FINITE),
    ({"ensemble": "{name: vrf, b: [-0.5]}"}, "ensemble.b", "must be > 0"),
])
def test_bad_numbers_name_the_field(tmp_path, blocks, field, words):
    line = dry_run(write(tmp_path, sweep_text(**blocks)))
    assert f" {field}: " in line and words in line, line


def test_a_range_error_names_the_field_not_the_block(tmp_path):
    line = dry_run(write(tmp_path, sweep_text(method="{name: ft, lr: -1.0}")))
    assert line.endswith("method.lr: must be > 0, got -1.0"), line


# ---------------------------------------------------------------------------------------
# 3. Duplicate keys
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, field, lines", [
    (sweep_text() + "name: u\n", "name", "on lines 1 and 7"),
    (sweep_text(method="\n  name: ft\n  lr: 1.0e-4\n  epochs: 1\n  lr: 1.0e-3"),
     "method.lr", "on lines 6 and 8"),
    (sweep_text(method=None, grid=None,
                methods="\n  - {name: ft}\n  - {name: lp, label: probe, label: other}"),
     "methods[1].label", "twice on line 7"),
    (sweep_text(grid="{seed: [0], seed: [1]}"), "grid.seed", "twice on line 5"),
    (sweep_text(benchmark="{source: toyworld, train_size: 64, train_size: 32}"),
     "benchmark.train_size", "twice on line 2"),
])
def test_duplicate_keys_are_errors(tmp_path, text, field, lines):
    line = dry_run(write(tmp_path, text))
    assert f" {field}: duplicate key, {lines}" in line, line


def test_a_merge_key_may_be_overridden(tmp_path):
    text = sweep_text(method="\n  <<: &ft {name: ft, lr: 1.0e-4}\n  lr: 3.0e-4")
    assert "lr=0.0003" in dry_run_ok(write(tmp_path, text))


# ---------------------------------------------------------------------------------------
# 4. Files that are not UTF-8 text
# ---------------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8(tmp_path):
    data = sweep_text().encode() + b"# caf\xe9\n"            # Latin-1 e-acute
    line = dry_run(write(tmp_path, data))
    assert f"is not UTF-8 text (byte 0xe9 at position {len(data) - 2})" in line, line


def test_a_binary_file(tmp_path):
    line = dry_run(write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00"))
    assert "is not UTF-8 text (byte 0x89 at position 0)" in line, line


def test_control_characters_are_one_line(tmp_path):
    line = dry_run(write(tmp_path, "name: t\x00\n"))
    assert "not valid YAML" in line


def test_a_utf8_bom_is_fine(tmp_path):
    dry_run_ok(write(tmp_path, b"\xef\xbb\xbf" + sweep_text().encode()))


# ---------------------------------------------------------------------------------------
# 5. open_clip models: pretrained tags and hf-hub names
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during --dry-run")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_a_misspelt_pretrained_tag_suggests_the_right_one(tmp_path, no_network):
    line = dry_run(write(tmp_path, sweep_text(model="{arch: ViT-B-32, pretrained: openia}")))
    assert "model.pretrained: 'openia' is neither a file nor a pretrained tag of ViT-B-32" in line
    assert "did you mean 'openai'" in line


def test_an_unknown_pretrained_tag_lists_some_tags(tmp_path, no_network):
    line = dry_run(write(tmp_path, sweep_text(model="{arch: RN50, pretrained: zzzzzz}")))
    assert "model.pretrained:" in line and "openai" in line


def test_a_misspelt_architecture_suggests_the_right_one(tmp_path, no_network):
    line = dry_run(write(tmp_path, sweep_text(model="{arch: ViT-B-23}")))
    assert "model.arch: unknown open_clip architecture 'ViT-B-23'" in line
    assert "'ViT-B-32'" in line


def test_a_pretrained_tag_reads_like_open_clip_reads_it(tmp_path, no_network):
    dry_run_ok(write(tmp_path, sweep_text(model="{arch: ViT-B-32, pretrained: laion2b-s34b-b79k}")))


def test_an_hf_hub_model_is_accepted_without_network(tmp_path, no_network):
    arch = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    out = dry_run_ok(write(tmp_path, sweep_text(model=f"{{arch: '{arch}'}}")))
    assert f"model {arch}" in out


@pytest.mark.parametrize("model, field, words", [
    ("{arch: 'hf-hub:laion/CLIP-ViT-B-32', pretrained: openai}", "model.pretrained",
     "leave pretrained unset"),
    ("{arch: 'hf-hub:laion'}", "model.arch", "expected hf-hub:<org>/<name>"),
    ("{arch: 'hf-hub:'}", "model.arch", "expected hf-hub:<org>/<name>"),
])
def test_bad_hf_hub_models(tmp_path, no_network, model, field, words):
    line = dry_run(write(tmp_path, sweep_text(model=model)))
    assert f" {field}: " in line and words in line, line


def test_load_clip_takes_an_hf_hub_name(monkeypatch):
    import open_clip

    from trainers.models import ModelError, load_clip
    calls = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda arch, **kw: calls.append((arch, kw)) or ("model", "train", "eval"))
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda arch: "tokenizer")
    clip = load_clip("hf-hub:org/name", None)
    assert clip.arch == "hf-hub:org/name" and calls[0][0] == "hf-hub:org/name"
    with pytest.raises(ModelError, match="model.pretrained"):
        load_clip("hf-hub:org/name", "openai")
    with pytest.raises(ModelError, match="model.pretrained: 'openia'"):
        load_clip("ViT-B-32", "openia")


def test_a_real_architecture_without_pretrained_lists_its_tags(tmp_path, no_network):
    """No silent random init: `pretrained` left out (or YAML null) is one line naming
    every pretrained tag open_clip has for the architecture."""
    import open_clip
    for model in ("{arch: ViT-B-32}", "{arch: ViT-B-32, pretrained: null}"):
        line = dry_run(write(tmp_path, sweep_text(model=model)))
        assert "model.pretrained: required for ViT-B-32: one of its pretrained tags (" in line
        assert "or `none` for random weights" in line
        for tag in open_clip.list_pretrained_tags_by_model("ViT-B-32"):
            assert tag in line, tag


@pytest.mark.parametrize("spelling", ["none", "None", "NONE"])
def test_random_weights_are_asked_for_with_none(tmp_path, no_network, monkeypatch, spelling):
    from orchestrator.spec import load_spec
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").write_text("not a checkpoint")    # "none" never names a file
    path = write(tmp_path, sweep_text(model=f"{{arch: RN50, pretrained: {spelling}}}"))
    assert "model RN50 (none)" in dry_run_ok(path)
    assert load_spec(path).model.pretrained == "none"


def test_the_toy_model_takes_no_pretrained_not_even_none(tmp_path):
    line = dry_run(write(tmp_path, sweep_text(model="{arch: toy, pretrained: none}")))
    assert "model.pretrained: the toy CLIP is pre-trained by orch; leave it unset" in line


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """open_clip's download cache (~/.cache/clip) and the Hugging Face cache, both empty."""
    from huggingface_hub import constants
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("model, field, who", [
    ("{arch: ViT-B-32, pretrained: openai}", "model.pretrained", "ViT-B-32 'openai'"),
    ("{arch: RN50, pretrained: yfcc15m}", "model.pretrained", "RN50 'yfcc15m'"),
    ("{arch: 'hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K'}", "model.arch",
     "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
])
def test_weights_to_download_on_an_offline_machine_are_one_line(tmp_path, no_network,
                                                                 empty_caches, model, field,
                                                                 who):
    """HF_HUB_OFFLINE=1 and weights in no cache: `orch sweep` stops at its start in one
    line naming the model, that it needs a download, and what to do, before anything
    starts (no MLflow store, no storage folder); a dry run plans it and says so."""
    path = write(tmp_path, sweep_text(model=model, storage_path=str(tmp_path / "runs")))
    env = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    result = CliRunner().invoke(main, ["sweep", str(path)], env=env)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and f" {field}: {who} needs a download from " in line
    assert "offline (HF_HUB_OFFLINE)" in line and "run once with internet" in line
    assert "local checkpoint file" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()
    planned = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"], env=env)
    assert planned.exit_code == 0, planned.output
    (note,) = [n for n in planned.output.splitlines() if n.startswith("note: ")]
    assert f"note: {field}: {who} needs a download from " in note
    assert note.endswith("(without --dry-run, `orch sweep` stops here)")


def test_load_clip_offline_is_a_model_error(no_network, empty_caches, monkeypatch):
    """Where a trial or `orch export` loads the model itself (another node, say)."""
    from trainers.models import ModelError, load_clip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"^model.pretrained: RN50 'openai' needs a download "
                                         r"from the Hugging Face hub \(timm/resnet50_clip"):
        load_clip("RN50", "openai")


def test_a_failed_download_is_one_line_saying_what_to_do(no_network, empty_caches,
                                                         monkeypatch):
    """Online as far as the flags know, but no host answers (every connection refused)."""
    from huggingface_hub import constants

    from trainers.models import ModelError, load_clip
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError) as caught:
        load_clip("RN50", "openai")
    message = str(caught.value)
    assert message.startswith("model.pretrained: RN50 'openai' needs a download from ")
    assert "the download failed (" in message and "run once with internet" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------
# 6. `orch report`: no store is created, sweep ids are checked
# ---------------------------------------------------------------------------------------


def report(*args: str, uri: str) -> str:
    result = CliRunner().invoke(main, ["report", *args], env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_report_never_creates_a_sqlite_store(tmp_path):
    db = tmp_path / "x" / "none.db"
    line = report(uri=f"sqlite:///{db}")
    assert f"no sweeps recorded in sqlite:///{db}: {db} does not exist" in line
    assert not db.exists() and not db.parent.exists()


def test_report_never_creates_a_file_store(tmp_path):
    store = tmp_path / "mlruns"
    line = report(uri=f"file://{store}")
    assert f"{store} does not exist" in line and not store.exists()


@pytest.mark.parametrize("sweep_id", ["a'b", 'a"b', "x' or '1'='1", "a b", "../x", ""])
def test_report_refuses_a_sweep_id_with_odd_characters(tmp_path, sweep_id):
    db = tmp_path / "mlflow.db"
    line = report(sweep_id, uri=f"sqlite:///{db}")
    assert f"{sweep_id!r} is not a sweep id" in line
    assert not db.exists()


def test_version_and_verbose_before_or_after_the_sub_command(tmp_path):
    from importlib.metadata import version
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and version("orch") in result.output
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"}
    quiet = CliRunner().invoke(main, ["report"], env=env)
    assert quiet.exit_code == 2 and quiet.exception is not None and "error:" in quiet.output
    for args in (["-v", "report"], ["report", "-v"]):       # -v: the exception itself
        loud = CliRunner().invoke(main, args, env=env)
        assert type(loud.exception).__name__ == "ReportError", args
    assert not (tmp_path / "none.db").exists()
