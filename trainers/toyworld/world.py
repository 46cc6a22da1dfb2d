"""The toy world's data sets: splits, nuisance samplers, captions, seeds, caching, parallelism.

This is the world described in docs/toyworld.md (the prototype's "W2"): 10 shapes x 10
colours, 32x32 RGB images, an ID task whose colour is correlated with the class (the
shortcut), five OOD sets that keep, break or reverse that shortcut, and a 48,000-pair
captioned pretraining set in which three pairs of similar shapes are sometimes named by the
partner's word (the "confusion" that zero-shot learns and fine-tuning can fix).

Determinism. A split is generated in chunks of :data:`CHUNK` images. Chunk ``c`` of a
split with seed ``s`` draws its image specs (class, colour, nuisances, caption words) from
``default_rng(SeedSequence([s, c]))`` and its pixels from ``default_rng(SeedSequence([s, c,
1]))``, one image after the other. Hence:

- the result does not depend on the number of worker processes;
- the first ``n`` images of a split are the same whatever ``n`` was asked for (prefix);
- specs and captions can be sampled without drawing pixels (:func:`split_metadata`,
  :func:`pretraining_captions`), which is fast.

Changing anything that alters pixels or captions must bump :data:`GENERATOR_VERSION`, which
is part of :meth:`WorldConfig.fingerprint` and therefore of every cache path.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainers.toyworld.render import (
    COLOUR_NAMES,
    SHAPE_NAMES,
    Distractor,
    ImageSpec,
    render_image,
)

__all__ = [
    "CLASSNAMES",
    "COLOUR_NAMES",
    "OBJECTNET_CLASSES",
    "EVAL_SPLITS",
    "SHIFT_SPLITS",
    "PRETRAIN",
    "CAPTION_WORDS",
    "CONFUSED_PAIRS",
    "GENERATOR_VERSION",
    "CHUNK",
    "WorldConfig",
    "split_size",
    "render_split",
    "render_pretraining",
    "split_metadata",
    "pretraining_captions",
    "load_or_build_split",
    "load_or_build_pretraining",
]

GENERATOR_VERSION = 1
CHUNK = 250  # images per RNG chunk; part of the data definition (changing it changes data)

CLASSNAMES: tuple[str, ...] = SHAPE_NAMES
OBJECTNET_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "ring")
EVAL_SPLITS: tuple[str, ...] = (
    "id_train", "id_val", "id_test", "v2", "sketch", "cartoon", "hard", "objectnet", "id_rand",
)  # fmt: skip
SHIFT_SPLITS: tuple[str, ...] = ("v2", "sketch", "cartoon", "hard", "objectnet")
PRETRAIN = "pretrain"  # the name of the pretraining set in cache paths and split_size

# Pairs whose shape word is swapped in pretraining captions with probability q
# (docs/toyworld.md, 'Pre-training captions').
CONFUSED_PAIRS: tuple[tuple[str, str], ...] = (("pentagon", "hexagon"), ("circle", "ring"), ("square", "cross"))
_SWAP_SEED = 12345  # the swap pass has its own generator, as in the prototype

# ---------------------------------------------------------------------------------------
# Captions: words and phrase lists (docs/toyworld.md, 'Pre-training captions')
# ---------------------------------------------------------------------------------------

_PREFIXES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a", "a picture of a", "an image of a", "a"),
    "clutter": ("a photo of a", "a picture of a", "an image of a", "a"),  # clutter is a photo
    "hard": ("a blurry photo of a", "a dark photo of a", "a photo of a faded", "a photo of a"),
    "sketch": ("a sketch of a", "a drawing of a", "a pencil drawing of a"),
    "cartoon": ("a cartoon of a", "a cartoon drawing of a", "a cartoon"),
}
_CLUTTER_SUFFIXES = ("with other shapes", "among other shapes")
_OCCLUDED_SUFFIX = "partly hidden"
_POSITION_MIN = 5.0  # |dx| or |dy| above this (canvas px) allows a position suffix

# The 47 caption words (the tokenizer adds pad/SOT/EOT). Fixed order: word ids may rely on it.
CAPTION_WORDS: tuple[str, ...] = (
    ("a", "an", "photo", "picture", "image", "of", "sketch", "drawing", "pencil", "cartoon",
     "blurry", "dark", "faded", "small", "big")
    + COLOUR_NAMES
    + SHAPE_NAMES
    + ("with", "among", "other", "shapes", "partly", "hidden", "on", "the", "top", "bottom", "left", "right")
)  # fmt: skip

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. The defaults are the world of docs/toyworld.md."""

    id_colour_corr: float = 0.85  # P(colour == class's own colour) in id_train/val/test
    v2_colour_corr: float = 0.5  # same for the V2-like set
    caption_colour_p: float = 0.7  # P(colour word) in non-sketch pretraining captions
    caption_swap_q: float = 0.35  # P(shape word -> partner's word) for confused-pair classes
    n_pretrain: int = 48_000
    n_id_train: int = 8_000
    n_id_val: int = 2_000
    n_id_test: int = 3_000
    n_shift: int = 3_000  # each OOD set
    n_id_rand: int = 2_000

    def __post_init__(self) -> None:
        for name in ("id_colour_corr", "v2_colour_corr", "caption_colour_p", "caption_swap_q"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be a probability in [0, 1], got {v!r}")
        for name in ("n_pretrain", "n_id_train", "n_id_val", "n_id_test", "n_shift", "n_id_rand"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"WorldConfig.{name} must be a positive integer, got {v!r}")

    def fingerprint(self) -> str:
        """Short stable hex hash of every field and :data:`GENERATOR_VERSION` (cache key)."""
        payload = json.dumps(
            {"generator_version": GENERATOR_VERSION, "chunk": CHUNK, **asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Split definitions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SplitDef:
    seed: int
    style: str  # renderer style ("photo", "sketch2", "cartoon")
    sampler: str  # key of _SAMPLERS
    colour: str  # "id_corr" | "v2_corr" | "uniform" | "adversarial" | "none"
    classes: tuple[int, ...] = tuple(range(len(CLASSNAMES)))


_OBJECTNET_IDS = tuple(CLASSNAMES.index(c) for c in OBJECTNET_CLASSES)

# Seeds (docs/toyworld.md, 'Splits, sizes and seeds'): ID 101-103, OOD 104-108 (sketch2
# uses 110; 105 belonged to an older sketch set), id_rand 199, pretraining 0.
_SPLITS: dict[str, _SplitDef] = {
    "id_train": _SplitDef(101, "photo", "id", "id_corr"),
    "id_val": _SplitDef(102, "photo", "id", "id_corr"),
    "id_test": _SplitDef(103, "photo", "id", "id_corr"),
    "v2": _SplitDef(104, "photo", "v2", "v2_corr"),
    "sketch": _SplitDef(110, "sketch2", "eval_generic", "none"),
    "cartoon": _SplitDef(106, "cartoon", "eval_generic", "uniform"),
    "hard": _SplitDef(107, "photo", "eval_hard", "adversarial"),
    "objectnet": _SplitDef(108, "photo", "eval_clutter", "uniform", _OBJECTNET_IDS),
    "id_rand": _SplitDef(199, "photo", "id", "uniform"),
}
_PRETRAIN_SEED = 0

# Pretraining mix (kind, probability): photo kinds use the photo renderer, "sketch" is the
# two-stroke sketch (only the EVAL sketch set uses "sketch2"; docs/toyworld.md, 'Styles').
_PRETRAIN_MIX: tuple[tuple[str, float], ...] = (
    ("photo", 0.40), ("clutter", 0.10), ("hard", 0.08), ("sketch", 0.21), ("cartoon", 0.21),
)  # fmt: skip
_PRETRAIN_KIND = {  # kind -> (renderer style, nuisance sampler)
    "photo": ("photo", "generic"),
    "clutter": ("photo", "clutter"),
    "hard": ("photo", "hard"),
    "sketch": ("sketch", "generic"),
    "cartoon": ("cartoon", "generic"),
}


def split_size(cfg: WorldConfig, split: str) -> int:
    """Full size of ``split`` (one of :data:`EVAL_SPLITS`, or ``"pretrain"``) under ``cfg``."""
    sizes = {
        "id_train": cfg.n_id_train,
        "id_val": cfg.n_id_val,
        "id_test": cfg.n_id_test,
        "id_rand": cfg.n_id_rand,
        PRETRAIN: cfg.n_pretrain,
        **{s: cfg.n_shift for s in SHIFT_SPLITS},
    }
    if split not in sizes:
        raise ValueError(f"unknown split {split!r}; expected one of {EVAL_SPLITS + (PRETRAIN,)}")
    return int(sizes[split])


# ---------------------------------------------------------------------------------------
# Nuisance samplers (docs/toyworld.md, 'Nuisance samplers'; canvas px, radians)
# ---------------------------------------------------------------------------------------

_PI = math.pi
# name -> parameters. "rot": ("u", lo, hi) uniform or ("n", sigma) normal around 0.
_SAMPLERS: dict[str, dict] = {
    "generic": dict(r=(9, 25), d=10, rot=("u", -_PI, _PI), noise=(2, 14), bright=(0.75, 1.2), contrast=(0.7, 1.1)),
    "eval_generic": dict(r=(8, 14), d=10, rot=("u", -_PI, _PI), noise=(2, 14), bright=(0.75, 1.2), contrast=(0.7, 1.1)),
    "clutter": dict(
        r=(13, 20), d=8, rot=("u", -_PI, _PI), noise=(4, 12), bright=(0.8, 1.1), contrast=(0.8, 1.1),
        bgtex=(10, 30), squash=(0.55, 1.0), n_distractors=(1, 3), distractor_r=(4, 7),
    ),
    "eval_clutter": dict(
        r=(9, 15), d=8, rot=("u", -_PI, _PI), noise=(4, 12), bright=(0.8, 1.1), contrast=(0.8, 1.1),
        bgtex=(10, 30), squash=(0.55, 1.0), n_distractors=(2, 4), distractor_r=(3, 5.5),
    ),
    "hard": dict(
        r=(10, 17), d=10, rot=("u", -_PI, _PI), noise=(10, 20), bright=(0.7, 1.2), contrast=(0.6, 1.0),
        p_occluder=0.6, opacity=(0.6, 0.9), bgtex=(0, 25),
    ),
    "eval_hard": dict(
        r=(8, 14), d=10, rot=("u", -_PI, _PI), noise=(10, 20), bright=(0.7, 1.2), contrast=(0.6, 1.0),
        p_occluder=0.6, opacity=(0.65, 0.95), bgtex=(0, 25),
    ),
    "id": dict(r=(8, 14), d=7, rot=("n", 0.25), noise=(2, 8), bright=(0.9, 1.1), contrast=(0.9, 1.1)),
    "v2": dict(r=(7, 13), d=9, rot=("n", 0.35), noise=(4, 11), bright=(0.8, 1.05), contrast=(0.8, 1.05)),
}
_DISTRACTOR_MIN_GAP = 6.0  # distractor centre >= r + 6 px from the object centre
_DISTRACTOR_TRIES = 20
_DISTRACTOR_MARGIN = 2.0  # distractors lie fully on the canvas, 2 px from the border


def _sample_distractors(
    rng: np.random.Generator, p: dict, shape: int, cx: float, cy: float, r: float
) -> tuple[Distractor, ...]:
    """1-3 (or 2-4) small shapes of OTHER classes, uniform colour, placed away from the object.

    Their centres are uniform on the canvas (keeping them fully visible); positions closer
    than r + 6 px to the object centre are rejected, and after 20 failed tries a distractor
    is dropped.
    """
    lo, hi = p["n_distractors"]
    out = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        other = int(rng.integers(len(CLASSNAMES) - 1))
        other += other >= shape  # any class but the object's
        colour = int(rng.integers(len(COLOUR_NAMES)))
        dr = rng.uniform(*p["distractor_r"])
        rot = rng.uniform(-_PI, _PI)
        for _ in range(_DISTRACTOR_TRIES):
            x, y = rng.uniform(dr + _DISTRACTOR_MARGIN, 64 - dr - _DISTRACTOR_MARGIN, 2)
            if math.hypot(x - cx, y - cy) >= r + _DISTRACTOR_MIN_GAP:
                out.append(Distractor(other, colour, float(dr), float(x), float(y), float(rot)))
                break
    return tuple(out)


def _sample_spec(rng: np.random.Generator, sampler: str, style: str, shape: int, colour: int) -> ImageSpec:
    """Draw one image's nuisances from ``sampler`` and return the full spec."""
    p = _SAMPLERS[sampler]
    r = rng.uniform(*p["r"])
    dx, dy = rng.uniform(-p["d"], p["d"], 2)
    rot = rng.uniform(p["rot"][1], p["rot"][2]) if p["rot"][0] == "u" else rng.normal(0.0, p["rot"][1])
    kw = dict(
        noise=rng.uniform(*p["noise"]),
        bright=rng.uniform(*p["bright"]),
        contrast=rng.uniform(*p["contrast"]),
    )
    if "bgtex" in p:
        kw["bgtex"] = rng.uniform(*p["bgtex"])
    if "squash" in p:  # viewpoint: squash x or y (50/50)
        squash = rng.uniform(*p["squash"])
        kw["sx" if rng.random() < 0.5 else "sy"] = squash
    if "opacity" in p:
        kw["opacity"] = rng.uniform(*p["opacity"])
    if "p_occluder" in p:
        kw["occluded"] = bool(rng.random() < p["p_occluder"])
    if "n_distractors" in p:
        kw["distractors"] = _sample_distractors(rng, p, shape, 32 + dx, 32 + dy, r)
    return ImageSpec(
        style=style, shape=shape, colour=colour, r=float(r), dx=float(dx), dy=float(dy), rot=float(rot),
        **{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in kw.items()},
    )  # fmt: skip


def _sample_colour(rng: np.random.Generator, rule: str, shape: int, cfg: WorldConfig) -> int:
    """Colour index under ``rule``; -1 for greyscale styles."""
    n = len(COLOUR_NAMES)
    if rule == "none":
        return -1
    if rule == "uniform":
        return int(rng.integers(n))
    if rule in ("id_corr", "v2_corr"):
        corr = cfg.id_colour_corr if rule == "id_corr" else cfg.v2_colour_corr
        if rng.random() < corr:
            return shape  # the class's own colour: the shortcut
    elif rule != "adversarial":
        raise ValueError(f"unknown colour rule {rule!r}")
    other = int(rng.integers(n - 1))  # uniform over the other 9 colours
    return other + (other >= shape)


# ---------------------------------------------------------------------------------------
# Pretraining captions
# ---------------------------------------------------------------------------------------


def _base_caption(rng: np.random.Generator, kind: str, spec: ImageSpec, colour_p: float) -> str:
    """Caption before the pair swap: prefix, [size], [colour], shape, [suffixes]."""
    prefixes = _PREFIXES[kind]
    words = [prefixes[int(rng.integers(len(prefixes)))]]
    if rng.random() < 0.5:  # size word, only when the object is clearly small or big
        if spec.r < 13:
            words.append("small")
        elif spec.r > 20:
            words.append("big")
    # Always draw, so the stream does not depend on the style (sketches never name colour).
    if rng.random() < colour_p and kind != "sketch":
        words.append(COLOUR_NAMES[spec.colour])
    words.append(CLASSNAMES[spec.shape])
    if kind == "clutter" and rng.random() < 0.8:
        words.append(_CLUTTER_SUFFIXES[int(rng.integers(2))])
    if spec.occluded and rng.random() < 0.7:
        words.append(_OCCLUDED_SUFFIX)
    if rng.random() < 0.3:
        # "on the top left" etc.; only the axes whose offset exceeds 5 px are named (one axis
        # alone gives "on the left", "on the bottom", ...).
        where = []
        if abs(spec.dy) > _POSITION_MIN:
            where.append("bottom" if spec.dy > 0 else "top")  # y grows downwards
        if abs(spec.dx) > _POSITION_MIN:
            where.append("right" if spec.dx > 0 else "left")
        if where:
            words.append("on the " + " ".join(where))
    return " ".join(words)


def _swap_mask(cfg: WorldConfig, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: which captions get the partner's shape word.

    As in the prototype, one pass in image order with ``default_rng(12345)``, one U(0,1)
    draw per image of a paired class. The draws for the first n images do not depend on N,
    so the prefix property holds for captions too.
    """
    paired = np.isin(labels, [CLASSNAMES.index(a) for pair in CONFUSED_PAIRS for a in pair])
    u = np.random.default_rng(_SWAP_SEED).random(int(paired.sum()))
    swapped = np.zeros(len(labels), dtype=bool)
    swapped[paired] = u < cfg.caption_swap_q
    return swapped


def _partner(shape: int) -> int:
    name = CLASSNAMES[shape]
    for a, b in CONFUSED_PAIRS:
        if name in (a, b):
            return CLASSNAMES.index(b if name == a else a)
    raise ValueError(f"{name!r} is not in a confused pair")


def _apply_swaps(captions: list[str], labels: np.ndarray, swapped: np.ndarray) -> list[str]:
    """Replace the (single) shape word of each swapped caption by the partner's word."""
    out = list(captions)
    for i in np.flatnonzero(swapped):
        words = out[i].split(" ")
        k = words.index(CLASSNAMES[labels[i]])  # the only word that is a shape name
        words[k] = CLASSNAMES[_partner(int(labels[i]))]
        out[i] = " ".join(words)
    return out


# ---------------------------------------------------------------------------------------
# Chunked generation
# ---------------------------------------------------------------------------------------


def _split_seed(split: str) -> int:
    if split == PRETRAIN:
        return _PRETRAIN_SEED
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {EVAL_SPLITS}")
    return _SPLITS[split].seed


def _chunk_specs(cfg: WorldConfig, split: str, chunk: int, count: int) -> tuple[list[ImageSpec], list[str]]:
    """Specs (and, for pretraining, pre-swap captions) of images ``chunk*CHUNK ...+count``."""
    rng = np.random.default_rng(np.random.SeedSequence([_split_seed(split), chunk]))
    specs: list[ImageSpec] = []
    captions: list[str] = []
    if split == PRETRAIN:
        kinds = [k for k, _ in _PRETRAIN_MIX]
        cum = np.cumsum([p for _, p in _PRETRAIN_MIX])
        for _ in range(count):
            kind = kinds[min(int(np.searchsorted(cum, rng.random(), side="right")), len(kinds) - 1)]
            style, sampler = _PRETRAIN_KIND[kind]
            shape = int(rng.integers(len(CLASSNAMES)))
            # Pretraining colour is uniform and independent of shape; sketches have none.
            colour = -1 if kind == "sketch" else int(rng.integers(len(COLOUR_NAMES)))
            spec = _sample_spec(rng, sampler, style, shape, colour)
            specs.append(spec)
            captions.append(_base_caption(rng, kind, spec, cfg.caption_colour_p))
        return specs, captions
    d = _SPLITS[split]
    for _ in range(count):
        shape = d.classes[int(rng.integers(len(d.classes)))]
        colour = _sample_colour(rng, d.colour, shape, cfg)
        specs.append(_sample_spec(rng, d.sampler, d.style, shape, colour))
    return specs, captions


def _render_chunk(job: tuple[WorldConfig, str, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Worker: images (count, 32, 32, 3) uint8, labels (count,) int64, pre-swap captions."""
    cfg, split, chunk, count = job
    specs, captions = _chunk_specs(cfg, split, chunk, count)
    pixel_rng = np.random.default_rng(np.random.SeedSequence([_split_seed(split), chunk, 1]))
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        images[i] = render_image(spec, pixel_rng)
    labels = np.array([s.shape for s in specs], dtype=np.int64)
    return images, labels, captions


def _jobs(cfg: WorldConfig, split: str, n: int) -> list[tuple[WorldConfig, str, int, int]]:
    return [(cfg, split, c, min(CHUNK, n - c * CHUNK)) for c in range(math.ceil(n / CHUNK))]


def _resolve_n(cfg: WorldConfig, split: str, n: int | None) -> int:
    full = split_size(cfg, split)
    if n is None:
        return full
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    # n > full is allowed: chunks simply continue, and the first `full` images are the split.
    return int(n)


def _run_jobs(
    jobs: list, workers: int, progress: Callable[[int, int], None] | None
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Yield chunk results in order, computed here or in a ``spawn`` process pool.

    ``spawn`` (not ``fork``) because the caller may already run torch/OpenMP threads, which
    ``fork`` does not copy safely. Like any spawn pool, calling this from a script needs
    the usual ``if __name__ == "__main__":`` guard.
    """
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    total = sum(job[3] for job in jobs)
    done = 0
    if workers == 1 or len(jobs) <= 1:
        results: Iterator = map(_render_chunk, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(int(workers), len(jobs)))
        results = pool.imap(_render_chunk, jobs)  # ordered
    try:
        for res in results:
            done += len(res[1])
            if progress is not None:
                progress(done, total)
            yield res
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _render(cfg: WorldConfig, split: str, n: int | None, workers: int, progress=None):
    n = _resolve_n(cfg, split, n)
    parts = list(_run_jobs(_jobs(cfg, split, n), workers, progress))
    images = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 32, 32, 3), np.uint8)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.empty((0,), np.int64)
    captions = [c for p in parts for c in p[2]]
    return images, labels, captions


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def render_split(
    cfg: WorldConfig, split: str, n: int | None = None, workers: int = 1, progress=None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 32, 32, 3)`` and labels int64 ``(N,)`` of an eval split.

    Labels index :data:`CLASSNAMES` (the ObjectNet-like set only uses its 6 classes' ID
    indices). ``n=None`` gives the full split; a smaller ``n`` gives exactly its first ``n``
    images. The result is the same for every ``workers``.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown eval split {split!r}; expected one of {EVAL_SPLITS}")
    images, labels, _ = _render(cfg, split, n, workers, progress)
    return images, labels


def render_pretraining(
    cfg: WorldConfig, n: int | None = None, workers: int = 1, progress=None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Pretraining pairs: images uint8 ``(N, 32, 32, 3)``, captions, true-shape labels int64 ``(N,)``.

    Captions are plain words (see :data:`CAPTION_WORDS`); for the confused pairs the shape
    word may name the partner class (``labels`` is always the shape actually drawn).
    """
    images, labels, captions = _render(cfg, PRETRAIN, n, workers, progress)
    return images, _apply_swaps(captions, labels, _swap_mask(cfg, labels)), labels


def split_metadata(cfg: WorldConfig, split: str, n: int | None = None) -> dict[str, np.ndarray]:
    """Per-image metadata of a split without drawing pixels (fast; same prefix rules).

    Keys: ``label`` (int64, shape index), ``colour`` (int64 palette index, -1 for sketches),
    ``r``, ``dx``, ``dy`` (float64, 64 px canvas units), ``occluded`` (bool),
    ``n_distractors`` (int64), ``style`` (str array). For example, the "ID conflict" subset
    of id_test is ``colour != label``. ``split`` may also be ``"pretrain"``.
    """
    n = _resolve_n(cfg, split, n)
    specs = [s for _, _, c, k in _jobs(cfg, split, n) for s in _chunk_specs(cfg, split, c, k)[0]]
    return {
        "label": np.array([s.shape for s in specs], dtype=np.int64),
        "colour": np.array([s.colour for s in specs], dtype=np.int64),
        "r": np.array([s.r for s in specs], dtype=np.float64),
        "dx": np.array([s.dx for s in specs], dtype=np.float64),
        "dy": np.array([s.dy for s in specs], dtype=np.float64),
        "occluded": np.array([s.occluded for s in specs], dtype=bool),
        "n_distractors": np.array([len(s.distractors) for s in specs], dtype=np.int64),
        "style": np.array([s.style for s in specs], dtype=str),
    }


def pretraining_captions(cfg: WorldConfig, n: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pretraining captions without pixels: ``(captions, labels int64, swapped bool)``.

    Identical to the captions of :func:`render_pretraining` for the same ``n``.
    """
    n = _resolve_n(cfg, PRETRAIN, n)
    captions: list[str] = []
    labels: list[int] = []
    for _, _, c, k in _jobs(cfg, PRETRAIN, n):
        specs, caps = _chunk_specs(cfg, PRETRAIN, c, k)
        captions += caps
        labels += [s.shape for s in specs]
    label_arr = np.array(labels, dtype=np.int64)
    swapped = _swap_mask(cfg, label_arr)
    return _apply_swaps(captions, label_arr, swapped), label_arr, swapped


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


_FILE_MODE = 0o644


def _cache_path(cfg: WorldConfig, split: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "world" / cfg.fingerprint() / f"{split}.npz"


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz so that ``path`` is either absent or complete (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; caches may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_config(cfg: WorldConfig, folder: Path) -> None:
    """A human-readable record of what the fingerprint folder holds (written once)."""
    path = folder / "config.json"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump({"generator_version": GENERATOR_VERSION, "chunk": CHUNK, **asdict(cfg)}, f, indent=2)
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


def _try_load(path: Path, n: int, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Cached arrays if ``path`` holds ``keys`` with ``n`` rows, else None (then rebuild)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from another layout: rebuild and overwrite
    if any(len(v) != n for v in data.values()) or data["images"].shape[1:] != (32, 32, 3):
        return None
    return data


def load_or_build_split(
    cfg: WorldConfig, split: str, cache_dir: Path, workers: int = 1, progress=None
) -> tuple[np.ndarray, np.ndarray]:
    """Full eval split from ``cache_dir/world/<fingerprint>/<split>.npz``, building it if absent."""
    if split not in _SPLITS:
        raise ValueError(f"unknown eval split {split!r}; expected one of {EVAL_SPLITS}")
    path = _cache_path(cfg, split, cache_dir)
    n = split_size(cfg, split)
    data = _try_load(path, n, ("images", "labels"))
    if data is not None:
        if progress is not None:
            progress(n, n)
        return data["images"], data["labels"].astype(np.int64)
    images, labels = render_split(cfg, split, workers=workers, progress=progress)
    _write_config(cfg, path.parent)
    _atomic_savez(path, images=images, labels=labels)
    return images, labels


def load_or_build_pretraining(
    cfg: WorldConfig, cache_dir: Path, workers: int = 1, progress=None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Pretraining pairs from ``cache_dir/world/<fingerprint>/pretrain.npz``, building if absent.

    Captions are stored inside the npz as a unicode array.
    """
    path = _cache_path(cfg, PRETRAIN, cache_dir)
    n = split_size(cfg, PRETRAIN)
    data = _try_load(path, n, ("images", "captions", "labels"))
    if data is not None:
        if progress is not None:
            progress(n, n)
        return data["images"], [str(c) for c in data["captions"]], data["labels"].astype(np.int64)
    images, captions, labels = render_pretraining(cfg, workers=workers, progress=progress)
    _write_config(cfg, path.parent)
    _atomic_savez(path, images=images, captions=np.array(captions, dtype=str), labels=labels)
    return images, captions, labels
