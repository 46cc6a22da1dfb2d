"""Toy-CLIP pretraining and its shipped weights: the data-parallel path produces a
checkpoint open_clip loads, contrastive training actually lowers the loss, and the
compact weights file in the repository expands, byte for byte, into the model it was
made from (every tensor but the frozen token embedding's unused rows)."""
from __future__ import annotations

import dataclasses
import hashlib

import open_clip
import pytest
import torch

from trainers.models import TOY_ARCH, load_clip, zero_shot_head
from trainers.toyworld import pretrain as P
from trainers.toyworld import world
from trainers.toyworld.benchmark import TEMPLATES
from trainers.toyworld.pretrain import PretrainRecipe, pretrain

pytestmark = pytest.mark.timeout(300)

EMBEDDING = "token_embedding.weight"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shipped():
    """The compact file as stored; loading it must not need pickled code."""
    return torch.load(P.SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.e2e)])  # 2: spawned
def test_tiny_pretraining_saves_a_loadable_checkpoint(tmp_path, world_size):
    images, captions, _ = world.render_pretraining(world.WorldConfig(), n=256)
    recipe = dataclasses.replace(PretrainRecipe(), epochs=2, batch_size=64, warmup_steps=2)
    out = tmp_path / "toy.pt"
    stats = pretrain(images, captions, recipe, out, world_size=world_size, progress=False)
    assert stats["steps"] == 8 and stats["world_size"] == world_size
    assert torch.isfinite(torch.tensor(stats["final_loss"]))
    assert stats["final_loss"] < stats["first_loss"] - 0.1   # it learns from the captions
    clip = load_clip(TOY_ARCH, str(out))
    # the token table stays at its random init; everything else trained
    fresh = torch.load(out)
    assert torch.equal(clip.model.token_embedding.weight, fresh["token_embedding.weight"])


def test_shipped_weights_are_compact_current_and_cover_every_token_in_use(shipped):
    assert P.SHIPPED_WEIGHTS.stat().st_size < 8e6           # vs ~18 MB for the full table
    assert shipped["format"] == P.SHIPPED_FORMAT and shipped["arch"] == TOY_ARCH
    # made for today's model config, recipe and world: else the demo pre-trains again
    # (run `make toy-clip` after changing any of them)
    assert shipped["key"] == P.checkpoint_key(PretrainRecipe(), world.WorldConfig())
    assert len(shipped["source_sha256"]) == 64 and len(shipped["expanded_sha256"]) == 64
    assert EMBEDDING in shipped["names"] and EMBEDDING not in shipped["tensors"]
    assert set(shipped["tensors"]) == set(shipped["names"]) - {EMBEDDING}
    assert all(t.dtype == torch.float32 for t in shipped["tensors"].values()
               if t.is_floating_point())
    # Every token the toy world feeds the text tower has its trained row. BPE works word
    # by word, so the caption words alone give the tokens of every caption.
    tokenizer = open_clip.get_tokenizer(TOY_ARCH)
    prompts = [t.format(c) for c in world.CLASSNAMES for t in TEMPLATES]
    in_use = set(tokenizer(list(world.CAPTION_WORDS) + prompts).unique().tolist())
    assert {0, 49406, 49407} <= in_use                         # pad, start, end
    assert in_use <= set(shipped["token_ids"].tolist())
    assert shipped["token_rows"].shape == (len(shipped["token_ids"]), 64)


def test_expansion_is_byte_stable_and_gives_back_the_shipped_tensors(tmp_path, shipped):
    first = P.toy_clip_checkpoint(root=tmp_path / "a", progress=False)
    assert P.toy_clip_checkpoint(root=tmp_path / "a", progress=False) == first   # cached
    second = tmp_path / "b" / "full.pt"
    second.parent.mkdir()
    P.expand_shipped_weights(P.SHIPPED_WEIGHTS, second)
    # the same bytes every time and on every machine: the digest recorded when it was made
    assert sha256(first) == sha256(second) == shipped["expanded_sha256"]
    full = torch.load(first, map_location="cpu", weights_only=True)
    assert list(full) == shipped["names"]                      # the source's key order
    for name, tensor in shipped["tensors"].items():
        assert full[name].dtype == tensor.dtype and torch.equal(full[name], tensor), name
    table = full[EMBEDDING]
    assert table.shape == (shipped["vocab_size"], 64) and table.dtype == torch.float32
    assert torch.equal(table[shipped["token_ids"]], shipped["token_rows"])
    # the other rows stand in for open_clip's init N(0, 0.02^2)
    assert abs(table.std().item() - 0.02) < 2e-4 and abs(table.mean().item()) < 2e-4
    assert torch.equal(P._filler_rows(10, 64, seed=0, std=0.02),
                       P._filler_rows(10, 64, seed=0, std=0.02))
    load_clip(TOY_ARCH, str(first))                            # open_clip takes it as is


def test_rows_that_are_not_shipped_never_reach_the_zero_shot_model(tmp_path, shipped):
    """Replacing every unshipped row changes neither the zero-shot head nor the text
    features of pre-training captions: so the expanded model computes what the source
    checkpoint did (they differ only in those rows), bit for bit."""
    path = P.toy_clip_checkpoint(root=tmp_path, progress=False)
    a = load_clip(TOY_ARCH, str(path), augment=False)
    b = load_clip(TOY_ARCH, str(path), augment=False)
    keep = torch.zeros(shipped["vocab_size"], dtype=torch.bool)
    keep[shipped["token_ids"]] = True
    with torch.no_grad():
        b.model.token_embedding.weight[~keep] = 7.0
    head_a = zero_shot_head(a, world.CLASSNAMES, TEMPLATES)
    head_b = zero_shot_head(b, world.CLASSNAMES, TEMPLATES)
    assert torch.equal(head_a.weight, head_b.weight)
    captions, _, _ = world.pretraining_captions(world.WorldConfig(), n=500)
    tokens = a.tokenizer(captions)
    with torch.no_grad():
        assert torch.equal(a.model.eval().encode_text(tokens), b.model.eval().encode_text(tokens))


def test_toy_clip_checkpoint_pretrains_without_matching_weights_and_expands_with_them(
        tmp_path, monkeypatch):
    """A tiny world and recipe, end to end: no shipped file for its key -> pre-trained here;
    then compacted as `make toy-clip` does; then expanded instead of trained;
    `rebuild=True` trains again."""
    recipe = dataclasses.replace(PretrainRecipe(), epochs=1, batch_size=64, warmup_steps=2)
    tiny = dataclasses.replace(world.WorldConfig(), n_pretrain=256)
    key = P.checkpoint_key(recipe, tiny)
    trained = P.toy_clip_checkpoint(recipe, tiny, root=tmp_path, world_size=1, progress=False)
    assert trained.name == f"{TOY_ARCH}-{key}.pt"
    assert P.toy_clip_checkpoint(recipe, tiny, root=tmp_path, world_size=1,
                                 progress=False) == trained              # cached

    compact = tmp_path / "compact.pt"
    meta = P.write_shipped_weights(trained, key, out=compact, token_ids=P.known_token_ids(tiny))
    assert meta["source_sha256"] == sha256(trained)
    monkeypatch.setattr(P, "SHIPPED_WEIGHTS", compact)
    expanded = P.toy_clip_checkpoint(recipe, tiny, root=tmp_path, world_size=1, progress=False)
    assert expanded != trained and sha256(expanded) == meta["expanded_sha256"]
    source = torch.load(trained, weights_only=True)
    full = torch.load(expanded, weights_only=True)
    assert list(full) == list(source)
    ids = meta["token_ids"]
    assert all(torch.equal(full[k], v) for k, v in source.items() if k != EMBEDDING)
    assert torch.equal(full[EMBEDDING][ids], source[EMBEDDING][ids])
    assert not torch.equal(full[EMBEDDING], source[EMBEDDING])   # the filler is not shipped

    # shipped weights for another key: the default toy CLIP is pre-trained here, with a
    # warning (a stand-in file plays the cached local build, so nothing trains)
    default_key = P.checkpoint_key(PretrainRecipe(), world.WorldConfig())
    stand_in = tmp_path / "toy_clip" / f"{TOY_ARCH}-{default_key}.pt"
    stand_in.write_bytes(b"")
    with pytest.warns(UserWarning, match="make toy-clip"):
        assert P.toy_clip_checkpoint(root=tmp_path, progress=False) == stand_in

    before = trained.stat().st_mtime_ns
    assert P.toy_clip_checkpoint(recipe, tiny, root=tmp_path, world_size=1, progress=False,
                                 rebuild=True) == trained
    assert trained.stat().st_mtime_ns != before                   # trained again
