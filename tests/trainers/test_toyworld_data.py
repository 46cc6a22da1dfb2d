"""Tests of the procedural toy-world data generator (trainers/toyworld).

Rendering tests use at most a few hundred images; statistics use the pixel-free metadata
and caption samplers, which are fast.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainers.toyworld import render as R
from trainers.toyworld import world as W

CFG = W.WorldConfig()


@pytest.fixture(scope="module")
def id_test_300() -> tuple[np.ndarray, np.ndarray]:
    """300 id_test images (two chunks, the second one partial), rendered once."""
    return W.render_split(CFG, "id_test", n=300)


# ---------------------------------------------------------------------------------------
# Interface, shapes, dtypes
# ---------------------------------------------------------------------------------------


def test_constants_match_interface():
    assert W.CLASSNAMES == (
        "circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "heart", "crescent", "ring",
    )  # fmt: skip
    assert set(W.OBJECTNET_CLASSES) <= set(W.CLASSNAMES) and len(W.OBJECTNET_CLASSES) == 6
    assert set(W.SHIFT_SPLITS) <= set(W.EVAL_SPLITS)
    assert "id_rand" not in W.SHIFT_SPLITS
    assert len(W.CAPTION_WORDS) == 47 and len(set(W.CAPTION_WORDS)) == 47


@pytest.mark.parametrize("split", W.EVAL_SPLITS)
def test_split_shapes_and_dtypes(split):
    images, labels = W.render_split(CFG, split, n=12)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(W.CLASSNAMES)
    assert images.std() > 5  # not blank


def test_split_sizes_follow_config():
    cfg = W.WorldConfig(n_id_train=7, n_shift=5, n_id_rand=3)
    assert W.split_size(cfg, "id_train") == 7
    assert all(W.split_size(cfg, s) == 5 for s in W.SHIFT_SPLITS)
    assert W.split_size(cfg, "id_rand") == 3
    assert W.render_split(cfg, "hard")[0].shape == (5, 32, 32, 3)  # n=None -> full split


def test_unknown_split_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown"):
        W.split_size(CFG, "imagenet")
    with pytest.raises(ValueError, match="unknown"):
        W.render_split(CFG, "pretrain", n=2)  # pretraining has its own function
    with pytest.raises(ValueError):
        W.render_split(CFG, "id_test", n=-1)
    with pytest.raises(ValueError):
        W.render_split(CFG, "id_test", n=2, workers=0)
    with pytest.raises(ValueError):
        W.WorldConfig(id_colour_corr=1.5)


def test_fingerprint_is_stable_and_sensitive():
    assert W.WorldConfig().fingerprint() == CFG.fingerprint()
    assert W.WorldConfig(id_colour_corr=0.9).fingerprint() != CFG.fingerprint()
    assert W.WorldConfig(n_shift=10).fingerprint() != CFG.fingerprint()


# ---------------------------------------------------------------------------------------
# Determinism and the prefix property
# ---------------------------------------------------------------------------------------


def test_same_call_twice_is_identical(id_test_300):
    images, labels = W.render_split(CFG, "id_test", n=300)
    np.testing.assert_array_equal(images, id_test_300[0])
    np.testing.assert_array_equal(labels, id_test_300[1])


@pytest.mark.e2e                    # a pool of two spawned worker processes
def test_workers_do_not_change_the_data(id_test_300):
    images, labels = W.render_split(CFG, "id_test", n=300, workers=2)
    np.testing.assert_array_equal(images, id_test_300[0])
    np.testing.assert_array_equal(labels, id_test_300[1])


@pytest.mark.parametrize("n", [1, 37, W.CHUNK, W.CHUNK + 10])
def test_prefix_property(id_test_300, n):
    images, labels = W.render_split(CFG, "id_test", n=n)
    np.testing.assert_array_equal(images, id_test_300[0][:n])
    np.testing.assert_array_equal(labels, id_test_300[1][:n])


def test_prefix_property_of_pretraining():
    images, captions, labels = W.render_pretraining(CFG, n=40)
    images5, captions5, labels5 = W.render_pretraining(CFG, n=5)
    np.testing.assert_array_equal(images5, images[:5])
    assert captions5 == captions[:5]
    np.testing.assert_array_equal(labels5, labels[:5])


def test_different_splits_differ(id_test_300):
    first = id_test_300[0][:20]
    for split in ("id_train", "id_val", "id_rand", "v2"):
        other, _ = W.render_split(CFG, split, n=20)
        assert not np.array_equal(other, first), split
        # Not merely shifted: no image of one is an image of the other.
        assert not any(np.array_equal(a, b) for a in other for b in first), split


def test_progress_callback_reports_chunks():
    calls = []
    W.render_split(CFG, "sketch", n=W.CHUNK + 3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(W.CHUNK, W.CHUNK + 3), (W.CHUNK + 3, W.CHUNK + 3)]


# ---------------------------------------------------------------------------------------
# Colour statistics (metadata sampler, no pixels)
# ---------------------------------------------------------------------------------------


def _own_colour_rate(split: str, n: int = 3000) -> float:
    meta = W.split_metadata(CFG, split, n=n)
    return float((meta["colour"] == meta["label"]).mean())


def test_id_colour_correlation():
    # 3000 draws: sd of the rate is ~0.007, so +-0.025 is > 3 sd.
    assert abs(_own_colour_rate("id_train") - 0.85) < 0.025
    assert abs(_own_colour_rate("id_test") - 0.85) < 0.025
    assert abs(_own_colour_rate("v2") - 0.5) < 0.03
    for split in ("cartoon", "objectnet", "id_rand"):  # uniform colour
        assert abs(_own_colour_rate(split) - 0.1) < 0.025, split


def test_correlation_follows_config():
    meta = W.split_metadata(W.WorldConfig(id_colour_corr=0.5), "id_train", n=2000)
    assert abs((meta["colour"] == meta["label"]).mean() - 0.5) < 0.04


def test_non_own_colours_are_spread_over_the_other_nine():
    meta = W.split_metadata(CFG, "id_train", n=3000)
    off = meta["colour"] != meta["label"]
    assert len(np.unique(meta["colour"][off])) == 10
    # Offset from the class's own colour is uniform over 1..9.
    offsets = (meta["colour"][off] - meta["label"][off]) % 10
    counts = np.bincount(offsets, minlength=10)[1:]
    assert counts.min() > 0.5 * counts.mean()


def test_hard_colour_is_never_the_class_colour():
    meta = W.split_metadata(CFG, "hard", n=3000)
    assert not np.any(meta["colour"] == meta["label"])
    assert len(np.unique(meta["colour"])) == 10
    assert abs(meta["occluded"].mean() - 0.6) < 0.03


def test_objectnet_uses_only_its_six_classes_and_has_clutter():
    meta = W.split_metadata(CFG, "objectnet", n=1000)
    allowed = {W.CLASSNAMES.index(c) for c in W.OBJECTNET_CLASSES}
    assert set(np.unique(meta["label"]).tolist()) == allowed
    assert meta["n_distractors"].min() >= 1 and meta["n_distractors"].max() <= 4
    _, labels = W.render_split(CFG, "objectnet", n=30)
    assert set(labels.tolist()) <= allowed


def test_eval_objects_are_small():
    for split in ("id_test", "sketch", "cartoon", "hard"):
        r = W.split_metadata(CFG, split, n=500)["r"]
        assert r.min() >= 8 and r.max() <= 14, split  # 4-7 px radius at 32 px
    assert W.split_metadata(CFG, "pretrain", n=500)["r"].max() > 20  # pretraining covers big ones


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------


def test_sketch_images_are_greyscale_and_others_are_not():
    sketch, _ = W.render_split(CFG, "sketch", n=40)
    assert np.array_equal(sketch[..., 0], sketch[..., 1]) and np.array_equal(sketch[..., 1], sketch[..., 2])
    for split in ("id_test", "cartoon"):
        images, _ = W.render_split(CFG, split, n=10)
        assert not np.array_equal(images[..., 0], images[..., 1]), split


def test_pretraining_sketches_use_the_part1_renderer():
    meta = W.split_metadata(CFG, "pretrain", n=400)
    styles = set(meta["style"].tolist())
    assert "sketch" in styles and "sketch2" not in styles
    assert set(W.split_metadata(CFG, "sketch", n=20)["style"].tolist()) == {"sketch2"}


def test_photo_object_has_its_palette_colour():
    """With no noise and full opacity, the object's centre pixel is close to its palette colour."""
    rng = np.random.default_rng(0)
    for colour in range(10):
        spec = R.ImageSpec(style="photo", shape=0, colour=colour, r=14, dx=0, dy=0, rot=0)
        img = R.render_image(spec, rng)
        centre = img[15:17, 15:17].reshape(-1, 3).mean(axis=0)
        # Tolerance: fill jitter N(0, 12) + low-frequency texture; the palette is far apart.
        assert np.abs(centre - R.PALETTE[colour]).max() < 45, (colour, centre)


def test_classes_are_visually_distinct():
    """Masks at the same pose differ between every pair of classes; ring is a circle with a hole."""
    masks = [R.render_mask(s, 32, 32, 12, rot=0.1) for s in range(len(R.SHAPE_NAMES))]
    area = [m.sum() for m in masks]
    circle, ring = W.CLASSNAMES.index("circle"), W.CLASSNAMES.index("ring")
    assert abs(area[ring] / area[circle] - (1 - 0.55**2)) < 0.03
    assert masks[ring][32, 32] == 0 and masks[circle][32, 32] == 1
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            inter = np.minimum(masks[i], masks[j]).sum()
            union = np.maximum(masks[i], masks[j]).sum()
            assert inter / union < 0.9, (W.CLASSNAMES[i], W.CLASSNAMES[j])


def test_ring_and_circle_images_differ_in_object_area():
    """Cartoon images (flat background, exact fill): circles cover more fill-coloured pixels than rings."""
    images, labels = W.render_split(CFG, "cartoon", n=250)
    meta = W.split_metadata(CFG, "cartoon", n=250)
    palette = R.PALETTE.astype(np.int16)
    fill_area = np.array([
        (np.abs(img.astype(np.int16) - palette[c]).max(axis=-1) < 20).sum() / r**2
        for img, c, r in zip(images, meta["colour"], meta["r"])
    ])  # fmt: skip
    circle, ring = W.CLASSNAMES.index("circle"), W.CLASSNAMES.index("ring")
    assert fill_area[labels == circle].mean() > 1.3 * fill_area[labels == ring].mean()


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captions_6000():
    return W.pretraining_captions(CFG, n=6000)


def test_caption_swap_rate(captions_6000):
    captions, labels, swapped = captions_6000
    paired = {W.CLASSNAMES.index(n) for pair in W.CONFUSED_PAIRS for n in pair}
    in_pair = np.isin(labels, list(paired))
    assert abs(swapped[in_pair].mean() - 0.35) < 0.025
    assert not swapped[~in_pair].any()
    partner = {a: b for x, y in W.CONFUSED_PAIRS for a, b in ((x, y), (y, x))}
    for cap, lab, sw in zip(captions, labels, swapped):
        words = cap.split()
        shape_words = [w for w in words if w in W.CLASSNAMES]
        assert len(shape_words) == 1, cap
        true = W.CLASSNAMES[lab]
        assert shape_words[0] == (partner[true] if sw else true), cap


def test_caption_words_and_colour_rate(captions_6000):
    captions, _, _ = captions_6000
    meta = W.split_metadata(CFG, "pretrain", n=6000)
    vocab = set(W.CAPTION_WORDS)
    has_colour = np.array([any(w in W.COLOUR_NAMES for w in c.split()) for c in captions])
    for cap in captions:
        assert set(cap.split()) <= vocab, cap
    sketch = meta["style"] == "sketch"
    assert not has_colour[sketch].any()
    assert abs(has_colour[~sketch].mean() - 0.7) < 0.025
    # A named colour is the object's actual colour.
    for cap, colour in zip(np.array(captions)[has_colour][:300], meta["colour"][has_colour][:300]):
        assert W.COLOUR_NAMES[colour] in cap.split(), cap


def test_pretraining_mix(captions_6000):
    meta = W.split_metadata(CFG, "pretrain", n=6000)
    style = meta["style"]
    assert abs((style == "sketch").mean() - 0.21) < 0.02
    assert abs((style == "cartoon").mean() - 0.21) < 0.02
    assert abs((meta["n_distractors"] > 0).mean() - 0.10) < 0.015  # clutter
    assert abs(np.bincount(meta["label"], minlength=10) / 6000 - 0.1).max() < 0.02


def test_render_pretraining_matches_caption_sampler(captions_6000):
    images, captions, labels = W.render_pretraining(CFG, n=30)
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert captions == captions_6000[0][:30]
    np.testing.assert_array_equal(labels, captions_6000[1][:30])


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path, monkeypatch):
    cfg = W.WorldConfig(n_id_test=30, n_pretrain=20)
    images, labels = W.load_or_build_split(cfg, "id_test", tmp_path)
    path = tmp_path / "world" / cfg.fingerprint() / "id_test.npz"
    assert path.exists()
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    np.testing.assert_array_equal(images, W.render_split(cfg, "id_test")[0])

    images_p, captions_p, labels_p = W.load_or_build_pretraining(cfg, tmp_path)
    assert (tmp_path / "world" / cfg.fingerprint() / "pretrain.npz").exists()

    # Second calls must not render anything.
    def boom(*args, **kwargs):
        raise AssertionError("re-rendered although cached")

    monkeypatch.setattr(W, "render_split", boom)
    monkeypatch.setattr(W, "render_pretraining", boom)
    seen = []
    images2, labels2 = W.load_or_build_split(cfg, "id_test", tmp_path, progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2, labels)
    assert labels2.dtype == np.int64 and seen == [(30, 30)]
    images_p2, captions_p2, labels_p2 = W.load_or_build_pretraining(cfg, tmp_path)
    np.testing.assert_array_equal(images_p2, images_p)
    assert captions_p2 == captions_p and all(isinstance(c, str) for c in captions_p2)
    np.testing.assert_array_equal(labels_p2, labels_p)


def test_cache_rebuilds_a_corrupt_file(tmp_path):
    cfg = W.WorldConfig(n_id_val=10)
    path = tmp_path / "world" / cfg.fingerprint() / "id_val.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    images, _ = W.load_or_build_split(cfg, "id_val", tmp_path)
    assert images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(W.load_or_build_split(cfg, "id_val", tmp_path)[0], images)
