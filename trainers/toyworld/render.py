"""Drawing one toy-world image: pure numpy + PIL, no torch, no scipy, no global RNG.

Every image is drawn on a 64x64 float canvas (values 0..255) and then box-downsampled x2 to
a 32x32 RGB uint8 array. What to draw is described by an :class:`ImageSpec` (sampled in
``world.py``); the remaining per-pixel randomness (background colours, noise fields, jitter
of the fill colour, occluder placement, stroke jitter) comes from the ``rng`` passed in, so a
spec plus a seeded generator always gives the same pixels.

Geometry convention: canvas x grows to the right, y grows DOWN; pixel ``(row=i, col=j)`` has
its centre at ``(x=j, y=i)``; the canvas centre is ``(32, 32)``. Shapes are defined in unit
coordinates, squashed by ``(sx, sy)``, rotated by ``rot`` radians, scaled by the radius ``r``
(canvas px) and moved to ``(cx, cy)``.

The styles are described in docs/toyworld.md, 'Styles'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CANVAS",
    "OUT_SIZE",
    "SHAPE_NAMES",
    "COLOUR_NAMES",
    "PALETTE",
    "STYLES",
    "Distractor",
    "ImageSpec",
    "render_mask",
    "render_image",
]

CANVAS = 64  # drawing resolution (px)
OUT_SIZE = 32  # stored resolution after x2 box-downsampling
_SUPERSAMPLE = 4  # masks are rasterised at 4x and averaged: soft, anti-aliased edges

SHAPE_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "pentagon", "hexagon",
    "star", "cross", "heart", "crescent", "ring",
)  # fmt: skip
COLOUR_NAMES: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "cyan",
    "magenta", "orange", "purple", "brown", "pink",
)  # fmt: skip
# Class i's "own" colour is colour i (the ID shortcut).
PALETTE = np.array(
    [
        (220, 30, 30), (40, 170, 40), (40, 60, 220), (230, 220, 40), (40, 210, 220),
        (210, 40, 200), (245, 140, 20), (120, 40, 170), (130, 80, 40), (250, 150, 190),
    ],
    dtype=np.float32,
)  # fmt: skip  # (10, 3)

# "sketch" is the two-stroke sketch with hatching (used for PRETRAINING sketches);
# "sketch2" is the faint broken single stroke (the eval sketch set).
STYLES = ("photo", "sketch", "sketch2", "cartoon")

# Pixel-centre coordinate grids of the canvas, (64, 64) each.
_YY, _XX = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)


# ---------------------------------------------------------------------------------------
# What to draw
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distractor:
    """A small extra shape (clutter styles), in canvas px."""

    shape: int
    colour: int
    r: float
    cx: float
    cy: float
    rot: float


@dataclass(frozen=True)
class ImageSpec:
    """Everything about one image that captions or statistics may need.

    ``colour`` is a palette index, or -1 for sketches (no colour cue). ``r``, ``dx``, ``dy``
    are canvas px; the object centre is ``(32 + dx, 32 + dy)``. ``noise``, ``bright`` and
    ``contrast`` are the photo style's global pixel transform (ignored by the other styles).
    """

    style: str
    shape: int
    colour: int
    r: float
    dx: float
    dy: float
    rot: float
    sx: float = 1.0
    sy: float = 1.0
    noise: float = 0.0
    bright: float = 1.0
    contrast: float = 1.0
    bgtex: float = 0.0
    opacity: float = 1.0
    occluded: bool = False
    distractors: tuple[Distractor, ...] = ()

    @property
    def cx(self) -> float:
        return CANVAS / 2 + self.dx

    @property
    def cy(self) -> float:
        return CANVAS / 2 + self.dy


# ---------------------------------------------------------------------------------------
# Shape geometry (unit coordinates, y down)
# ---------------------------------------------------------------------------------------


def _regular(k: int, radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Regular k-gon, first vertex at the top (y = -radius), (k, 2)."""
    a = -math.pi / 2 + 2 * math.pi * np.arange(k) / k
    return np.stack([centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)], axis=1)


def _star() -> np.ndarray:
    a = -math.pi / 2 + 2 * math.pi * np.arange(10) / 10
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], axis=1)


def _cross(w: float = 0.33) -> np.ndarray:
    """Plus sign with arm half-width ``w`` and arm length 1, (12, 2)."""
    return np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
         (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        dtype=np.float64,
    )  # fmt: skip


def _heart(n: int = 64) -> np.ndarray:
    """Classic parametric heart, point down, centred and normalised by its max |coordinate|.

    With y = -(13cos t - ...) in y-down coordinates the curve spans y in [-11.7, 17]; shifting
    it by -2.5 in y centres the heart (a +2.5 shift of the usual y-up form).
    """
    t = 2 * math.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
    pts = np.stack([x, y], axis=1)
    return pts / np.abs(pts).max()


# Per shape: list of (polygon (k, 2), fill) drawn in order; fill 0 cuts a hole.
_SHAPE_POLYGONS: tuple[tuple[tuple[np.ndarray, int], ...], ...] = (
    ((_regular(48), 1),),  # circle
    ((_regular(4), 1),),  # square (first vertex at the top: drawn as a diamond)
    ((_regular(3), 1),),  # triangle
    ((_regular(5), 1),),  # pentagon
    ((_regular(6), 1),),  # hexagon
    ((_star(), 1),),  # star
    ((_cross(), 1),),  # cross
    ((_heart(), 1),),  # heart
    ((_regular(48), 1), (_regular(48, 0.85, (0.45, 0.0)), 0)),  # crescent (rotates with the shape)
    ((_regular(48), 1), (_regular(48, 0.55), 0)),  # ring
)


def render_mask(
    shape: int, cx: float, cy: float, r: float, rot: float = 0.0, sx: float = 1.0, sy: float = 1.0
) -> np.ndarray:
    """Anti-aliased coverage mask of one shape on the 64 px canvas, float32 (64, 64) in [0, 1]."""
    if not 0 <= shape < len(_SHAPE_POLYGONS):
        raise ValueError(f"unknown shape index {shape}; expected 0..{len(_SHAPE_POLYGONS) - 1}")
    s = _SUPERSAMPLE
    cos, sin = math.cos(rot), math.sin(rot)
    img = Image.new("L", (CANVAS * s, CANVAS * s), 0)
    draw = ImageDraw.Draw(img)
    for poly, fill in _SHAPE_POLYGONS[shape]:
        x = poly[:, 0] * sx
        y = poly[:, 1] * sy
        px = (x * cos - y * sin) * r + cx  # canvas coordinates
        py = (x * sin + y * cos) * r + cy
        # Sub-pixel k of canvas pixel j has its centre at j + (k - 1.5) / 4, i.e. index 4u + 1.5.
        pts = np.stack([px * s + (s - 1) / 2, py * s + (s - 1) / 2], axis=1)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
    hi = np.asarray(img, dtype=np.float32)  # (256, 256)
    return hi.reshape(CANVAS, s, CANVAS, s).mean(axis=(1, 3)) / 255.0


def _spec_mask(spec: ImageSpec, jitter: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Mask of the spec's object; ``jitter`` = (ddx, ddy, r factor, drot) for sketch strokes."""
    ddx, ddy, rf, drot = jitter if jitter is not None else (0.0, 0.0, 1.0, 0.0)
    return render_mask(spec.shape, spec.cx + ddx, spec.cy + ddy, spec.r * rf, spec.rot + drot, spec.sx, spec.sy)


# ---------------------------------------------------------------------------------------
# Small image-processing helpers (numpy only)
# ---------------------------------------------------------------------------------------


def _window_extreme(a: np.ndarray, k: int, op) -> np.ndarray:
    """k x k max (op=np.maximum) or min (op=np.minimum) filter, edge-padded, separable."""
    p = k // 2
    padded = np.pad(a, p, mode="edge")
    rows = padded[:, 0 : a.shape[1]]
    for d in range(1, k):  # along x
        rows = op(rows, padded[:, d : d + a.shape[1]])
    out = rows[0 : a.shape[0]]
    for d in range(1, k):  # along y
        out = op(out, rows[d : d + a.shape[0]])
    return out


def _max_filter(a: np.ndarray, k: int) -> np.ndarray:
    return _window_extreme(a, k, np.maximum)


def _min_filter(a: np.ndarray, k: int) -> np.ndarray:
    return _window_extreme(a, k, np.minimum)


def _smooth_noise(rng: np.random.Generator, grid: int, sigma: float) -> np.ndarray:
    """A grid x grid N(0, sigma) field bicubic-upsampled to the canvas, float32 (64, 64)."""
    g = rng.normal(0.0, sigma, (grid, grid)).astype(np.float32)
    up = Image.fromarray(g).resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)  # mode "F"
    return np.asarray(up, dtype=np.float32)


def _composite(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    """Alpha-blend ``colour`` (scalar, (3,) or (64, 64, 3)) over ``img`` with ``alpha`` (64, 64)."""
    if img.ndim == 3:
        alpha = alpha[..., None]
    return img * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def _band(px: float, py: float, angle: float, half_width: float) -> np.ndarray:
    """Soft (1 px ramp) infinite band through (px, py) along ``angle``, float32 (64, 64)."""
    dist = np.abs((_XX - px) * -math.sin(angle) + (_YY - py) * math.cos(angle))
    return np.clip(half_width + 0.5 - dist, 0.0, 1.0)


def _disc(cx: float, cy: float, radius: float) -> np.ndarray:
    dist = np.sqrt((_XX - cx) ** 2 + (_YY - cy) ** 2)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _downsample(img: np.ndarray) -> np.ndarray:
    """(64, 64, 3) float -> (32, 32, 3) uint8 by 2x2 box averaging."""
    small = img.reshape(OUT_SIZE, 2, OUT_SIZE, 2, 3).mean(axis=(1, 3))
    return np.rint(np.clip(small, 0.0, 255.0)).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Styles: each returns the float canvas, (64, 64, 3) or (64, 64) for greyscale
# ---------------------------------------------------------------------------------------


def _photo_background(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Two-colour linear gradient + 4x4 bicubic noise (sigma 15) + optional stripes."""
    c0, c1 = rng.uniform(30, 220, (2, 3)).astype(np.float32)
    a = rng.uniform(-math.pi, math.pi)
    t = _XX * math.cos(a) + _YY * math.sin(a)
    t = (t - t.min()) / (t.max() - t.min())  # 0..1 across the canvas
    bg = c0 + t[..., None] * (c1 - c0)  # (64, 64, 3)
    bg = bg + np.stack([_smooth_noise(rng, 4, 15.0) for _ in range(3)], axis=-1)
    if spec.bgtex > 0:
        period = rng.uniform(5, 12)
        b = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * (_XX * math.cos(b) + _YY * math.sin(b)) / period + phase)
        bg = bg + (spec.bgtex * stripes)[..., None]
    return bg


def _render_photo(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    img = _photo_background(spec, rng)
    for d in spec.distractors:
        m = render_mask(d.shape, d.cx, d.cy, d.r, d.rot)
        img = _composite(img, m, PALETTE[d.colour] + rng.normal(0, 12, 3))

    # The object: jittered palette colour, linear shading along a light direction, and a
    # low-frequency texture (one field shared by the channels, i.e. a luminance texture).
    mask = _spec_mask(spec)
    fill = PALETTE[spec.colour] + rng.normal(0, 12, 3).astype(np.float32)  # (3,)
    la = rng.uniform(-math.pi, math.pi)
    shade = 1.0 + 0.25 * ((_XX - spec.cx) * math.cos(la) + (_YY - spec.cy) * math.sin(la)) / spec.r
    texture = _smooth_noise(rng, 8, 6.0)
    obj = fill * shade[..., None] + texture[..., None]  # (64, 64, 3)
    img = _composite(img, mask * spec.opacity, obj)

    if spec.occluded:
        # The occluder "bar" is a band across the whole canvas (its half-width
        # U(0.25, 0.45) r is what decides how much of the object it hides).
        hw = rng.uniform(0.25, 0.45) * spec.r
        b = rng.uniform(0, math.pi)
        px, py = spec.cx + rng.normal(0, 0.3 * spec.r), spec.cy + rng.normal(0, 0.3 * spec.r)
        img = _composite(img, _band(px, py, b, hw), rng.uniform(0, 255, 3))

    mean = img.mean()
    img = (img - mean) * spec.contrast + mean * spec.bright
    return img + rng.normal(0, spec.noise, img.shape).astype(np.float32)


def _stroke_jitter(rng: np.random.Generator, shift: float, scale: float, drot: float):
    return (rng.normal(0, shift), rng.normal(0, shift), rng.uniform(1 - scale, 1 + scale), rng.normal(0, drot))


def _edge(mask: np.ndarray) -> np.ndarray:
    """Outline of a soft mask: 3x3 max-filter minus 3x3 min-filter, (64, 64) in [0, 1]."""
    return _max_filter(mask, 3) - _min_filter(mask, 3)


def _render_sketch(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Two-stroke sketch (pretraining): two jittered outline strokes, optional diagonal hatching."""
    img = rng.uniform(225, 255) + rng.normal(0, 4, (CANVAS, CANVAS)).astype(np.float32)
    inks = (rng.uniform(10, 90), rng.uniform(90, 160))
    if rng.random() < 0.5:
        # Hatching first so the outlines stay on top of it.
        period = rng.uniform(4, 6)
        strength = rng.uniform(0.3, 0.6)
        direction = 1.0 if rng.random() < 0.5 else -1.0  # "/" or "\"
        lines = (np.mod(_XX + direction * _YY, period) < 1.0).astype(np.float32)
        img = _composite(img, _spec_mask(spec) * lines * strength, inks[0])
    for ink in inks:
        edge = _edge(_spec_mask(spec, _stroke_jitter(rng, 0.8, 0.04, 0.04)))
        img = _composite(img, edge, ink)
    return img


def _render_sketch2(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Broken-stroke sketch (eval): one faint stroke, broken where a smooth random field is low."""
    img = rng.uniform(215, 255) + rng.normal(0, 6, (CANVAS, CANVAS)).astype(np.float32)
    edge = _edge(_spec_mask(spec, _stroke_jitter(rng, 1.0, 0.06, 0.06)))
    field = _smooth_noise(rng, 12, 1.0)
    edge = edge * (field > rng.uniform(-1.0, -0.4))  # drops ~11-31 % of the outline (~20 % on average)
    edge = edge * rng.uniform(0.6, 1.0)
    return _composite(img, edge, rng.uniform(40, 130))


def _render_cartoon(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Flat pastel background (+ optional pattern), exact palette fill, highlight, black outline."""
    bg = rng.uniform(150, 255, 3).astype(np.float32)
    img = np.broadcast_to(bg, (CANVAS, CANVAS, 3)).astype(np.float32)
    if rng.random() < 0.5:
        if rng.random() < 0.5:  # polka dots
            period = rng.uniform(6, 10)
            rad = period * rng.uniform(0.2, 0.3)
            ox, oy = rng.uniform(0, period, 2)
            u = np.mod(_XX - ox, period) - period / 2
            v = np.mod(_YY - oy, period) - period / 2
            pattern = (u * u + v * v < rad * rad).astype(np.float32)
        else:  # diagonal stripes
            period = rng.uniform(5, 9)
            direction = 1.0 if rng.random() < 0.5 else -1.0
            pattern = (np.mod(_XX + direction * _YY + rng.uniform(0, period), period) < period / 2).astype(np.float32)
        img = img * (1.0 - 0.15 * pattern)[..., None]  # darkened by 15 %
    mask = _spec_mask(spec)
    img = _composite(img, mask, PALETTE[spec.colour])
    # Highlight: a white disc of radius 0.15 r up-left of the centre (fixed in canvas
    # coordinates, like a light from the upper left), 70 % opaque, only on the shape.
    hl = _disc(spec.cx - 0.4 * spec.r, spec.cy - 0.4 * spec.r, 0.15 * spec.r) * mask * 0.7
    img = _composite(img, hl, 255.0)
    outline = np.clip(_max_filter(mask, 5) - _min_filter(mask, 3), 0.0, 1.0)
    return _composite(img, outline, 0.0)


_RENDERERS = {
    "photo": _render_photo,
    "sketch": _render_sketch,
    "sketch2": _render_sketch2,
    "cartoon": _render_cartoon,
}


def render_image(spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Draw ``spec`` on the 64 px canvas and downsample: uint8 (32, 32, 3).

    Sketch styles are greyscale, so the three channels are identical.
    """
    try:
        renderer = _RENDERERS[spec.style]
    except KeyError:
        raise ValueError(f"unknown style {spec.style!r}; expected one of {STYLES}") from None
    img = renderer(spec, rng)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return _downsample(img)
