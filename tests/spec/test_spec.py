"""Sweep-file validation: every mistake is one line naming the field, exit code 2,
nothing started; --dry-run prints the plan."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import MULTI_SWEEP, REPO, TOY_SWEEP, write_sweep
from orchestrator.cli import main
from orchestrator.plan import Plan
from orchestrator.spec import load_spec

GOOD = TOY_SWEEP
MULTI = MULTI_SWEEP


def write(tmp_path, data, name="sweep.yaml"):
    return write_sweep(tmp_path, data, name)


def with_(change: dict, drop: tuple = ()) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    for dotted in drop:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[leaf]
    return data


def test_good_file_expands_grid_in_order(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    trials = Plan(spec).trials
    assert [(t.options.lr, t.seed) for t in trials] == [(1e-4, 0), (1e-4, 1), (3e-4, 0), (3e-4, 1)]
    assert all(t.options.epochs == 1 and t.options.batch_size == 16 for t in trials)
    # v0's single `ensemble:` with `alphas:` still reads, as WiSE-FT's `alpha` grid
    (ensemble,) = spec.ensembles
    assert ensemble.name == "wise_ft" and ensemble.points() == [{"alpha": a} for a in (0.0, 0.5, 1.0)]
    assert Path(spec.storage_path).is_absolute()


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = write(tmp_path, "name: t\nmethod: {name: ft, lr: 3e-4}\n")
    assert load_spec(path).methods[0].options.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("data, field, words", [
    (with_({"bogus": 1}), "bogus", "unknown key"),
    (with_({"method.lrr": 0.1}), "method.lrr", "unknown key"),
    (with_({"method.lr": "fast"}), "method.lr", "expected a number"),
    (with_({"method.epochs": 1.5}), "method.epochs", "expected an integer"),
    (with_({"method.lr": -1.0}), "method.lr", "must be > 0"),
    (with_({"method.name": "sgd"}), "method.name", "unknown method"),
    (with_({"grid.momentum": [0.9]}), "grid.momentum", "not an option"),
    (with_({"grid.lr": [1e-4, "x"]}), "grid.lr[1]", "expected a number"),
    (with_({"grid.lr": [1e-4, -2.0]}), "grid.lr[1]", "lr must be > 0"),
    (with_({"grid.seed": []}), "grid.seed", "non-empty list"),
    (with_({"ensemble.alphas": [0.0, 1.5]}), "ensemble.alphas", "1.5 is outside [0, 1]"),
    (with_({"ensemble.alphas": [0.0, 0.5, 0.5]}), "ensemble.alphas", "duplicate value 0.5"),
    (with_({"grid.seed": [0, 0]}), "grid.seed[1]", "duplicate value 0"),
    (with_({"ensemble.name": "ft"}), "ensemble.name", "unknown ensemble"),
    (with_({"benchmark.source": "hdf5"}), "benchmark.source", "must be one of"),
    (with_({"resources.gpus_per_trial": -1}), "resources.gpus_per_trial", "must be >= 0"),
    (with_({}, drop=("name",)), "name", "required"),
    (with_({"benchmark": {"source": "imagefolder", "root": "/nonexistent/orch-data"}}),
     "benchmark.root", "does not exist"),
    (with_({"benchmark": {"source": "csv", "train": "/nonexistent/t.csv"}}),
     "benchmark.train", "does not exist"),
    (with_({"model.arch": "ViT-Q-99"}), "model.arch", "unknown open_clip architecture"),
    (with_({"model": {"arch": "ViT-B-32", "pretrained": "/nonexistent/w.pt"}}),
     "model.pretrained", "does not exist"),
])
def test_cli_rejects_bad_files_with_one_line(tmp_path, data, field, words):
    path = write(tmp_path, data)
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert f"{field}:" in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_shift_folder_missing_names_the_shift(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    data = with_({"benchmark": {"source": "imagefolder", "root": str(tmp_path / "data"),
                                "shifts": {"sketch": {"path": str(tmp_path / "nope")}}}})
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, data)), "--dry-run"])
    assert result.exit_code == 2
    assert "benchmark.shifts.sketch.path:" in result.output


def test_broken_yaml_names_the_line(tmp_path):
    path = write(tmp_path, textwrap.dedent("""\
        name: t
        method: {name: ft
        grid: [
    """))
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "not valid YAML" in result.output and "line" in result.output


def test_missing_sweep_file(tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.e2e
def test_dry_run_prints_plan_and_starts_nothing(tmp_path):
    """In a fresh process (this one may hold the suite's Ray): no Ray, no store, no folder."""
    import subprocess
    import sys
    path = write(tmp_path, GOOD)
    script = ("import sys, ray; from click.testing import CliRunner; "
              "from orchestrator.cli import main; "
              "r = CliRunner().invoke(main, ['sweep', sys.argv[1], '--dry-run']); "
              "print(r.output); print('ray started:', ray.is_initialized()); sys.exit(r.exit_code)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 trial(s), 4 of them trained; 16 point(s) to evaluate" in done.stdout
    assert "ensemble wise_ft (weights): alpha in [0, 0.5, 1]; 3 point(s) per trial" in done.stdout
    assert "ft-03_lr=0.0003_seed=1" in done.stdout
    assert "ray started: False" in done.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_shipped_sweep_files_are_valid():
    paths = sorted(REPO.glob("sweeps/*.yaml"))
    assert paths
    for path in paths:
        assert Plan(load_spec(path)).trials, path


@pytest.mark.parametrize("templates, words", [("imagenet", "templates: must be openai, simple"),
                                               (["a photo"], "must contain '{}'")])
def test_bad_templates_fail_up_front(tmp_path, templates, words):
    path = write(tmp_path, with_({"benchmark.templates": templates}))
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and words in result.output


def test_csv_benchmark_from_a_sweep_file(tmp_path):
    """source: csv builds ID splits from path,label files and a CSV shift with a subset."""
    import numpy as np
    from PIL import Image

    from orchestrator.assets.benchmarks import load_benchmark, templates_for
    from trainers.models import TOY_ARCH, load_clip
    classes = ["cat", "dog", "car"]
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(9):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{classes[i % 3]}")
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "shift.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png,1\n")
    data = with_({"benchmark": {
        "source": "csv", "classnames": classes, "train": str(tmp_path / "train.csv"),
        "val": str(tmp_path / "val.csv"), "test": str(tmp_path / "test.csv"),
        "shifts": {"few": {"path": str(tmp_path / "shift.csv"), "format": "csv"}}}})
    spec = load_spec(write(tmp_path, data))
    bench = load_benchmark(spec.benchmark, load_clip(TOY_ARCH, None, augment=False))
    assert bench.classnames == tuple(classes) and len(bench.train) == 9
    assert bench.shifts["few"].classnames == ("cat", "dog")       # subset, in ID order
    assert bench.shifts["few"].class_groups == ((0,), (1,))
    image, label = bench.test.dataset[4]
    assert image.shape == (3, 32, 32) and label == 1
    assert len(templates_for(spec.benchmark)) == 80                 # OpenAI's ImageNet set


def test_bad_image_folder_tree_fails_before_anything_starts(tmp_path):
    import numpy as np
    from PIL import Image
    for split in ("train", "val", "test"):
        (tmp_path / "task" / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "task" / split / "cat" / "a.png")
    (tmp_path / "task" / "train" / "zebra").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "task" / "train" / "zebra" / "z.png")
    data = with_({"benchmark": {"source": "imagefolder", "root": str(tmp_path / "task"),
                                "classnames": ["cat", "dog"]}})
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, data)), "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "benchmark:" in line and "zebra" in line


def _multi(**changes):
    data = {k: (list(v) if isinstance(v, list) else v) for k, v in MULTI.items()}
    data.update(changes)
    return data


def _searched(grid: dict, search: dict | None = {"searcher": "optuna"}) -> dict:    # noqa: B006
    """A two-entry file whose second entry (ft) has `grid`, with `search` (None: none)."""
    data = {k: v for k, v in MULTI.items() if k != "ensembles"}
    data["methods"] = [{"name": "zeroshot"}, {"name": "ft", "lr": 3e-4, "grid": grid}]
    if search is not None:
        data["search"] = search
    return data


@pytest.mark.parametrize("data, field, words", [
    (_multi(methods=[{"name": "ft"}, {"name": "ft"}]), "methods[1].label", "give each a distinct"),
    (_multi(method={"name": "ft"}), "method", "either `methods:`"),
    (_multi(methods=[{"name": "ft", "grid": {"lr": [1.0, -1.0]}}]), "methods[0].grid.lr[1]",
     "lr must be > 0"),
    (_multi(methods=[{"name": "carot", "lambda_oc": -0.2}]), "methods[0].lambda_oc",
     "must be >= 0"),
    (_multi(methods=[{"name": "ft", "bogus": 1}]), "methods[0].bogus", "unknown key"),
    (_multi(ensembles=[{"name": "vrf", "methods": ["zeroshot"]}]), "ensembles[0].methods[0]",
     "not a method of this sweep that trains"),
    (_multi(ensembles=[{"name": "vrf", "b": [0.0]}]), "ensembles[0].b", "must be > 0"),
    (_multi(ensembles=[{"name": "vrf", "variant": "faiss"}]), "ensembles[0].variant",
     "must be code or paper"),
    (_multi(ensembles=[{"name": "ose"}, {"name": "ose"}]), "ensembles[1].name", "listed twice"),
    (_multi(ensembles=[{"name": "soup"}]), "ensembles[0].name", "unknown ensemble"),
    (_multi(search={"scheduler": "hyperband"}), "search.scheduler", "must be one of asha"),
    (_multi(search={"scheduler": "asha", "grace_period": 0}), "search.grace_period",
     "must be >= 1"),
    (_multi(search={"scheduler": "asha", "reduction_factor": 1}), "search.reduction_factor",
     "must be > 1"),
    (_multi(search={"scheduler": "asha", "methods": ["zeroshot"]}), "search.methods[0]",
     "not a trained method entry"),
    (_multi(search={"scheduler": "asha", "metric": "val_acc"}), "search.metric", "unknown key"),
    # ranges and the searcher
    (_searched({"lr": {"loguniform": [0, 1e-3]}}), "methods[1].grid.lr", "low > 0"),
    (_searched({"lr": {"uniform": [1e-3, 1e-4]}}), "methods[1].grid.lr", "low < high"),
    (_searched({"lr": {"normal": [1e-4, 1e-3]}}), "methods[1].grid.lr", "a range is one of"),
    (_searched({"lr": {"uniform": [1e-4]}}), "methods[1].grid.lr.uniform", "[low, high]"),
    (_searched({"epochs": {"uniform": [1, 3]}}), "methods[1].grid.epochs", "{int: [low, high]}"),
    (_searched({"lr": {"uniform": [-1.0, 1e-3]}}), "methods[1].grid.lr", "lr"),
    (_searched({"lr": {"loguniform": [1e-5, 1e-3]}}, search=None), "methods[1].grid.lr",
     "add `search: {searcher: optuna}`"),
    (_searched({"lr": [1e-4]}), "search.searcher", "no method entry has a range"),
    (_searched({"lr": {"loguniform": [1e-5, 1e-3]}}, search={"searcher": "optuna",
                                                              "scheduler": "asha"}),
     "search.scheduler", "not combined yet"),
    (_searched({"lr": {"loguniform": [1e-5, 1e-3]}}, search={"searcher": "optuna",
                                                              "objectives": ["id_acc"]}),
     "search.objectives", "never reads a test set"),
    (_searched({"lr": {"loguniform": [1e-5, 1e-3]}}, search={"searcher": "optuna",
                                                              "n_trials": 0}),
     "search.n_trials", "must be >= 1"),
])
def test_bad_multi_method_files_name_the_field(tmp_path, data, field, words):
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, data)), "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert f"{field}:" in line and words in line, line


@pytest.mark.parametrize("storage, words", [
    ("/proc/orch-runs", "storage_path"),            # cannot be created
    ("ftp://host/runs", "unsupported storage scheme"),
    ("s3:///runs", "names no bucket"),
    ("s3:/bucket/runs", "lacks '//'"),               # would be a local folder ./s3:/bucket
])
def test_storage_that_cannot_be_used_fails_the_dry_run(tmp_path, storage, words):
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, with_({"storage_path": storage}))),
                                       "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert words in line and line.startswith("error: ")


def test_a_bucket_storage_path_reaches_tune_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_STORAGE", "s3://my-bucket/orch")
    spec = load_spec(write(tmp_path, with_({"storage_path": "$ORCH_STORAGE/sweeps"})))
    assert spec.storage_path == "s3://my-bucket/orch/sweeps"
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, with_(
        {"storage_path": "s3://my-bucket/orch"}))), "--dry-run"])
    assert result.exit_code == 0 and "storage: s3://my-bucket/orch" in result.output
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("shift", ["ood", "val", "id_test", "vrf", "9lives"])
def test_shift_names_that_would_overwrite_metrics_are_refused(tmp_path, shift):
    (tmp_path / "data" / "train").mkdir(parents=True)
    data = with_({"benchmark": {"source": "imagefolder", "root": str(tmp_path / "data"),
                                "shifts": {shift: {"path": str(tmp_path / "data")}}}})
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, data)), "--dry-run"])
    assert result.exit_code == 2
    assert f"shifts.{shift}:" in result.output


def test_every_unreadable_image_is_named_before_anything_starts(tmp_path, image_task):
    """Two corrupt images in a shift set: --dry-run fails, naming both (not only the first)."""
    import shutil

    from conftest import image_task_spec
    shutil.copytree(image_task / "sketch", tmp_path / "sketch")
    bad = sorted((tmp_path / "sketch" / "cat").iterdir())[:2]
    for path in bad:
        path.write_bytes(path.read_bytes()[:40])          # truncated files
    data = image_task_spec(image_task)
    data["benchmark"]["shifts"]["sketch"]["path"] = str(tmp_path / "sketch")
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, data)), "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "2 of" in line and all(str(p) in line for p in bad)


def test_overrides_on_the_command_line_equal_the_same_values_in_the_file(tmp_path):
    import dataclasses
    edited = with_({"method.lr": 1e-4, "grid.seed": [0, 1, 2]})
    del edited["grid"]["lr"]
    from_file = load_spec(write(tmp_path, edited, "edited.yaml"))
    overridden = load_spec(write(tmp_path, with_({}, drop=("grid.lr",)), "base.yaml"),
                           ["method.lr=1e-4", "grid.seed=[0,1,2]"])
    strip = {"source_file": None, "text": ""}
    assert dataclasses.replace(overridden, **strip) == dataclasses.replace(from_file, **strip)
    assert yaml.safe_load(overridden.text)["method"]["lr"] == "1e-4"   # what MLflow stores
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "base.yaml"), "method.lr=1e-4",
                                       "grid.seed=[0,1,2]", "--dry-run"])
    assert result.exit_code == 0 and "3 trial(s)" in result.output, result.output


@pytest.mark.parametrize("override, field, words", [
    ("method.lr=fast", "method.lr", "expected a number"),
    ("method.lrr=0.1", "method.lrr", "unknown key"),
    ("method.lr", "", "expected key=value"),
    ("methods.3.lr=1", "methods", "either `methods:`"),
    ("grid.seed=[0, 0]", "grid.seed[1]", "duplicate value"),
])
def test_bad_overrides_are_one_line_naming_the_field(tmp_path, override, field, words):
    result = CliRunner().invoke(main, ["sweep", str(write(tmp_path, GOOD)), override, "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert words in line and (not field or f"{field}:" in line), line


def test_search_stops_only_the_entries_it_names(tmp_path):
    spec = load_spec(write(tmp_path, _multi(search={"scheduler": "asha", "methods": ["ft_ls"]})))
    assert [e.label for e in spec.methods if spec.search.searches(e.label)] == ["ft_ls"]
    every = load_spec(write(tmp_path, _multi(search={"scheduler": "asha"})))
    assert all(every.search.searches(e.label) for e in every.methods)
    assert not any(load_spec(write(tmp_path, _multi())).search.searches(e.label)
                   for e in spec.methods)


def test_a_searched_entry_has_the_trials_proposed_so_far(tmp_path):
    """A range makes an entry searched: the plan holds no trial of it until the searcher
    proposes some (the journal keeps them), then one per proposal, named like grid trials."""
    spec = load_spec(write(tmp_path, _searched({"lr": {"loguniform": [1e-5, 1e-3]},
                                                "seed": [0, 1]})))
    entry = spec.methods[1]
    assert entry.searched and not spec.methods[0].searched
    assert [t.label for t in Plan(spec).trials] == ["zeroshot"]
    proposed = spec.with_proposals({"ft": [{"lr": 1.25e-4, "seed": 1}, {"lr": 3e-5, "seed": 0}]})
    trials = [t for t in Plan(proposed).trials if t.label == "ft"]
    assert [t.name for t in trials] == ["ft-00_lr=0.000125_seed=1", "ft-01_lr=3e-05_seed=0"]
    assert trials[0].options.lr == 1.25e-4 and trials[0].seed == 1
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"])
    assert "8 trial(s) proposed by optuna over lr: loguniform [1e-05, 0.001], seed: [0, 1]" \
        in result.output, result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_file_passes_its_dry_run(name, tmp_path):
    """The sweep files the README names (wise_alpha, all_methods, beyond, search) stay
    valid as the code changes: each plans without starting anything."""
    result = CliRunner().invoke(main, ["sweep", str(REPO / "sweeps" / name), "--dry-run",
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 0, result.output
    assert "point(s) to evaluate" in result.output
