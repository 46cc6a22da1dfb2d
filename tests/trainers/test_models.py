"""The real-weights path (open_clip architecture + a checkpoint file), tested with
`pretrained=None` models and files the tests write, and the zero-shot head."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from trainers.models import ModelError, load_clip, zero_shot_classifier, zero_shot_head

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_vit_arch(tmp_path_factory):
    """Register a tiny ViT CLIP config, as a user would register their own."""
    path = tmp_path_factory.mktemp("cfg") / "orch-test-tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(path)
    return "orch-test-tiny-vit"


def test_checkpoint_file_loads_exactly(tmp_path, tiny_vit_arch):
    torch.manual_seed(0)
    first = load_clip(tiny_vit_arch, None)
    ckpt = tmp_path / "weights.pt"
    torch.save(first.model.state_dict(), ckpt)
    torch.manual_seed(1)   # a different random init, overwritten by the file
    second = load_clip(tiny_vit_arch, str(ckpt))
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert second.eval_transform is not None and second.tokenizer(["a b"]).shape == (1, 16)


def test_mismatched_or_corrupt_checkpoint_is_a_model_error(tmp_path, tiny_vit_arch):
    bad = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3)}, bad)
    with pytest.raises(ModelError, match="cannot load"):
        load_clip(tiny_vit_arch, str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_clip(tiny_vit_arch, str(junk))


def test_unknown_arch_and_unknown_tag(tiny_vit_arch):
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(ModelError, match="neither a file nor a pretrained tag"):
        load_clip(tiny_vit_arch, "no-such-tag")


def test_zero_shot_head_is_scaled_mean_of_normalised_template_embeddings(tiny_vit_arch):
    torch.manual_seed(0)
    clip = load_clip(tiny_vit_arch, None)
    classes, templates = ["cat", "dog", "car"], ["a photo of a {}", "a drawing of a {}"]
    head = zero_shot_head(clip, classes, templates)
    scale = clip.model.logit_scale.exp()
    with torch.no_grad():
        expected = []
        for name in classes:
            emb = F.normalize(clip.model.encode_text(clip.tokenizer([t.format(name) for t in templates])), dim=-1)
            expected.append(F.normalize(emb.mean(0), dim=-1))
        expected = scale * torch.stack(expected)                  # (C, d)
    assert torch.allclose(head.weight, expected, atol=1e-5)
    assert torch.equal(head.bias, torch.zeros(3))


def test_classifier_logits_equal_clip_similarities(tiny_vit_arch):
    torch.manual_seed(0)
    clip = load_clip(tiny_vit_arch, None)
    classifier = zero_shot_classifier(clip, ["cat", "dog"], ["a {}"]).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image_f = F.normalize(clip.model.encode_image(images), dim=-1)
        text_f = F.normalize(clip.model.encode_text(clip.tokenizer(["a cat", "a dog"])), dim=-1)
        expected = clip.model.logit_scale.exp() * image_f @ text_f.T
        assert torch.allclose(classifier(images), expected, atol=1e-4)
    # the classifier owns a copy: training it never touches the CLIP model
    assert classifier.image_encoder is not clip.model.visual


def test_native_size_transform_equals_the_eval_transform(tiny_vit_arch, tiny_images):
    from PIL import Image

    from trainers.models import native_size_transform
    clip = load_clip(tiny_vit_arch, None)
    fast = native_size_transform(clip, 32, 32)
    images, _ = tiny_images
    for image in images[:4]:
        assert torch.allclose(fast(image), clip.eval_transform(Image.fromarray(image)), atol=1e-5)
    assert native_size_transform(clip, 64, 64) is None     # resizing needed: no shortcut
