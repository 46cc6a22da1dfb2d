"""The Ray Data feature cache: what it stores equals a plain encode of the same model,
and the logits its reader computes with the model's head equal the encoder's; pandas
reads it; a second sweep reuses it (and says so); a truncated, foreign or
half-written cache is never trusted."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from conftest import image_task_spec
from orchestrator.assets.benchmarks import feature_datasets, load_benchmark
from orchestrator.assets.loaded import load_assets
from orchestrator.assets.models import load_model
from orchestrator.run.features import (FeatureCache, FeatureCacheError, model_head, read_entry,
                                       zero_shot_ref)
from orchestrator.spec import parse_spec
from trainers.data.benchmark import ID_TRAIN
from trainers.evaluate import encode

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]     # Ray Data on a local Ray
CPU = torch.device("cpu")


@pytest.fixture
def setup(image_task, ray_local, tmp_path, request):
    decoders = getattr(request, "param", None)       # features.decode_actors
    spec = parse_spec(image_task_spec(image_task, features={
        "batch_size": 5, "cache_dir": str(tmp_path / "fc"),
        **({} if decoders is None else {"decode_actors": decoders})}))
    bench = load_benchmark(spec.benchmark, load_model(spec.model))
    lines: list[str] = []
    return spec, bench, FeatureCache(spec, bench, lines.append), lines


# None: the model actors decode (the default on CPUs); 1: an ImageDecoder actor decodes
# and the model actor takes its pixels (the default beside GPU actors)
@pytest.mark.parametrize("setup", [None, 1], indirect=True, ids=["decode-in-model", "decoder"])
def test_cache_holds_what_a_plain_encode_gives_and_pandas_reads_it(setup):
    spec, bench, cache, lines = setup
    model = zero_shot_ref(spec, bench)
    sets = ["id_val", "sketch", "objectnet", ID_TRAIN]
    paths = cache.ensure([(model, sets)], "zero-shot")
    assert "encoding 4 set(s)" in lines[0]
    assert ("1 decoder(s)" in lines[0]) == (spec.features.decode_actors == 1), lines[0]
    assets = load_assets(spec, CPU)
    zero_shot, head = assets.start.zero_shot, model_head(assets, None, CPU)
    datasets = feature_datasets(bench)
    for name in sets:
        cached = read_entry(paths[(model.name, name)], head)
        features, logits, labels = encode(zero_shot, datasets[name], CPU, batch_size=7)
        # Other batch sizes sum in other orders: unit-norm features move by < 1e-5, so a
        # logit w_c . f + b_c moves by < |w_c| * 1e-5, plus its own float32 rounding.
        assert torch.allclose(cached.features, features, atol=1e-5)
        tol = head.weight.norm(dim=1) * 1e-5 + 1e-6 * logits.abs()            # (N, C)
        assert ((cached.logits - logits).abs() <= tol).all()       # ID-class logits
        assert torch.equal(cached.labels, labels)                   # the set's own classes
    assert "logits" not in pd.read_parquet(paths[(model.name, "sketch")]).columns
    frame = pd.read_parquet(paths[(model.name, "sketch")])
    assert len(frame) == len(datasets["sketch"]) and len(frame["features"].iloc[0]) == 32
    manifest = json.loads((cache.path(model, "sketch") / "_manifest.json").read_text())
    assert manifest["rows"] == len(datasets["sketch"]) and manifest["set"] == "sketch"


def test_a_second_sweep_reuses_the_cache_and_says_so(setup, monkeypatch):
    spec, bench, cache, lines = setup
    model = zero_shot_ref(spec, bench)
    cache.ensure([(model, ["id_val", "id_test"])], "zero-shot")
    again = FeatureCache(spec, load_benchmark(spec.benchmark, load_model(spec.model)), lines.append)
    monkeypatch.setattr(FeatureCache, "_encode", lambda *a: pytest.fail("re-encoded a cached set"))
    again.ensure([(model, ["id_val", "id_test"])], "zero-shot")
    assert lines[-1].startswith("[features] zero-shot: all 2 cached set(s) reused from")


def test_truncated_and_foreign_entries_are_rebuilt(setup):
    spec, bench, cache, lines = setup
    model = zero_shot_ref(spec, bench)
    paths = cache.ensure([(model, ["id_val", "id_test"])], "zero-shot")
    val, test = cache.path(model, "id_val"), cache.path(model, "id_test")
    shutil.rmtree(test)
    shutil.copytree(val, test)                      # foreign: another entry's files and manifest
    part = next(val.glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:-20])       # truncated
    assert not cache.is_complete(model, "id_val") and not cache.is_complete(model, "id_test")
    with pytest.raises(FeatureCacheError):
        read_entry(paths[(model.name, "id_val")])
    cache.ensure([(model, ["id_val", "id_test"])], "zero-shot")
    assert "encoding 2 set(s)" in lines[-2]
    assert cache.is_complete(model, "id_val") and cache.is_complete(model, "id_test")
    assert len(read_entry(paths[(model.name, "id_test")]).labels) == len(bench.test.dataset)


def test_a_failed_build_leaves_nothing_that_reads_as_complete(image_task, ray_local, tmp_path):
    """A corrupt image stops the encoding job: one error naming the file, no entry."""
    shutil.copytree(image_task / "task", tmp_path / "task")
    bad = next((tmp_path / "task" / "val" / "dog").iterdir())
    bad.write_bytes(b"not an image")
    data = image_task_spec(image_task, features={"cache_dir": str(tmp_path / "fc")})
    data["benchmark"]["root"] = str(tmp_path / "task")
    spec = parse_spec(data)
    bench = load_benchmark(spec.benchmark, load_model(spec.model))
    cache = FeatureCache(spec, bench, lambda line: None)
    model = zero_shot_ref(spec, bench)
    with pytest.raises(FeatureCacheError, match=f"cannot read image {bad}"):
        cache.ensure([(model, ["id_test", "id_val"])], "zero-shot")
    assert not cache.is_complete(model, "id_val") and not cache.is_complete(model, "id_test")
    assert [p.name for p in cache.root.iterdir()] == []      # no entry, no staging folder
