"""Toy-CLIP pretraining: the data-parallel path produces a checkpoint open_clip loads,
and contrastive training actually lowers the loss."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainers.models import TOY_ARCH, load_clip
from trainers.toyworld import world
from trainers.toyworld.pretrain import PretrainRecipe, pretrain

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("world_size", [1, 2])
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
