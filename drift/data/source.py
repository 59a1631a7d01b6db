"""Synthetic source tasks for pretraining a backbone when no ImageNet weights are at hand (`SOURCE_TASKS`).

``lesion-attributes`` (the default): radiographs of the chest task's generator (`drift.data.synthetic`), each with
one generic opacity, labelled by two of its attributes: texture (solid, mottled, reticular) and extent (focal,
extensive); six classes (`LESION_SOURCE_CLASSES`), none of them a class of the chest task. Telling them apart
takes what the chest task needs (finding an opacity in the lung fields among ribs, vessels and distractors, and
describing its border, texture and size) without its labels: the opacities are generic shapes, every texture
comes at every extent, and no image is lesion-free.

``textures``: ten classes of natural-image-like grayscale textures and shapes (`SOURCE_CLASSES`) at random
scale, position, orientation, contrast and polarity, on a noisy, unevenly lit background. Telling them apart takes
oriented edge filters (stripes, plaid, checkerboard), curvature (rings, blobs, dots), corners and junctions
(triangles, rectangles, crosses) and texture statistics (noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drift.data._render import ellipse_depth, grid, rotate, smooth_noise, soft_step
from drift.data.base import ImageSet, check_int
from drift.data.synthetic import OPACITY_EXTENTS, OPACITY_TEXTURES, render_chest_opacity

SOURCE_CLASSES: tuple[str, ...] = ("stripes", "checkerboard", "plaid", "rings", "dots", "blobs", "crosses",
                                   "triangles", "rectangles", "noise")

_DOMAIN = 0x5A3C  # separates this task's random streams from the chest task's
_LESION_DOMAIN = 0x5A3D  # the lesion-attribute task's streams

LESION_SOURCE_CLASSES: tuple[str, ...] = tuple(f"{e}-{t}" for e in OPACITY_EXTENTS for t in OPACITY_TEXTURES)
_FRAMED = frozenset({"blobs", "crosses", "triangles", "rectangles"})


def _period(rng: np.random.Generator, size: int) -> float:
    """A spatial period in image units: 4 pixels to a third of the image, log-uniform."""
    lo, hi = 8.0 / size, 0.66
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(hi, 2 * lo)))))


def _stripes(rng, u, v, size):
    xr, _ = rotate(u, v, rng.uniform(0, math.pi))
    wave = np.sin(xr * np.float32(2 * math.pi / _period(rng, size)) + np.float32(rng.uniform(0, 2 * math.pi)))
    return np.tanh(wave * np.float32(rng.uniform(1.0, 6.0)))  # from sinusoid to square wave


def _checkerboard(rng, u, v, size):
    xr, yr = rotate(u, v, rng.uniform(0, math.pi / 2))
    k = np.float32(2 * math.pi / _period(rng, size))
    return np.tanh(np.float32(4.0) * np.sin(xr * k + np.float32(rng.uniform(0, 6.3))) * np.sin(yr * k))


def _plaid(rng, u, v, size):
    a = rng.uniform(0, math.pi)
    out = np.zeros_like(u)
    for angle in (a, a + rng.uniform(math.pi / 6, math.pi / 2)):
        xr, _ = rotate(u, v, angle)
        out += np.sin(xr * np.float32(2 * math.pi / _period(rng, size)) + np.float32(rng.uniform(0, 6.3)))
    return out * np.float32(0.5)


def _rings(rng, u, v, size):
    cx, cy = rng.uniform(-0.6, 0.6, size=2)
    r = np.sqrt((u - np.float32(cx)) ** 2 + (v - np.float32(cy)) ** 2)
    wave = np.sin(r * np.float32(2 * math.pi / _period(rng, size)) + np.float32(rng.uniform(0, 6.3)))
    return np.tanh(wave * np.float32(rng.uniform(1.0, 5.0)))


def _dots(rng, u, v, size):
    xr, yr = rotate(u, v, rng.uniform(0, math.pi / 2))
    p = max(_period(rng, size), 10.0 / size)
    fx = xr * np.float32(1.0 / p) - np.float32(rng.uniform(0, 1))
    fy = yr * np.float32(1.0 / p) - np.float32(rng.uniform(0, 1))
    d = np.sqrt((fx - np.round(fx)) ** 2 + (fy - np.round(fy)) ** 2) * np.float32(p)
    return np.float32(2.0) * soft_step(np.float32(p * rng.uniform(0.2, 0.35)) - d, 2.0 / size) - np.float32(1.0)


def _blobs(rng, u, v, size):
    out = np.zeros_like(u)
    for _ in range(rng.integers(2, 8)):
        cx, cy = rng.uniform(-0.8, 0.8, size=2)
        s = rng.uniform(0.06, 0.3)
        out += np.float32(rng.choice((-1.0, 1.0))) * np.exp(
            -((u - np.float32(cx)) ** 2 + (v - np.float32(cy)) ** 2) * np.float32(0.5 / (s * s)))
    return np.clip(out, -1.0, 1.0)


def _shape_layer(rng, u, v, size, draw, count: tuple[int, int]):
    """Sum of ``draw(x, y, scale)`` shapes, each in its own random frame (position, rotation, scale)."""
    out = np.zeros_like(u)
    for _ in range(rng.integers(*count)):
        scale = rng.uniform(0.15, 0.5)
        xr, yr = rotate(u - np.float32(rng.uniform(-0.6, 0.6)), v - np.float32(rng.uniform(-0.6, 0.6)),
                        rng.uniform(0, 2 * math.pi))
        out = np.maximum(out, draw(xr, yr, scale))
    return np.float32(2.0) * out - np.float32(1.0)


def _crosses(rng, u, v, size):
    def draw(x, y, s):
        w = s * rng.uniform(0.12, 0.3)
        bar_a = np.minimum(np.float32(w) - np.abs(y), np.float32(s) - np.abs(x))
        bar_b = np.minimum(np.float32(w) - np.abs(x), np.float32(s) - np.abs(y))
        return soft_step(np.maximum(bar_a, bar_b), 2.0 / size)

    return _shape_layer(rng, u, v, size, draw, (1, 4))


def _triangles(rng, u, v, size):
    def draw(x, y, s):
        # Three half-planes whose normals point outwards at irregular angles: a random triangle around the origin.
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=3))
        gaps = np.diff(np.r_[angles, angles[0] + 2 * math.pi])
        if gaps.max() >= math.pi * 0.95:  # an unbounded shape; fall back to an equilateral triangle
            angles = angles[0] + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        depth = None
        for a in angles:
            d = np.float32(s * 0.5) - (np.float32(math.cos(a)) * x + np.float32(math.sin(a)) * y)
            depth = d if depth is None else np.minimum(depth, d)
        return soft_step(depth, 2.0 / size)

    return _shape_layer(rng, u, v, size, draw, (1, 4))


def _rectangles(rng, u, v, size):
    def draw(x, y, s):
        w, h = s, s * rng.uniform(0.3, 1.0)
        inside = np.minimum(np.float32(w) - np.abs(x), np.float32(h) - np.abs(y))
        if rng.random() < 0.5:  # outline only
            inside = np.minimum(inside, np.float32(s * rng.uniform(0.08, 0.2)) - inside)
        return soft_step(inside, 2.0 / size)

    return _shape_layer(rng, u, v, size, draw, (1, 4))


def _noise(rng, u, v, size):
    # A sum of smooth fields at several scales with a random spectral slope: 1/f^beta-like texture.
    beta = rng.uniform(0.0, 2.0)
    out = np.zeros_like(u)
    for cells in (4, 8, 16, 32):
        if cells <= size // 2:
            out += np.float32(cells ** (-beta / 2)) * smooth_noise(rng, size, cells)
    return out * np.float32(1.0 / (out.std() + 1e-6)) * np.float32(0.5)


_DRAW = (_stripes, _checkerboard, _plaid, _rings, _dots, _blobs, _crosses, _triangles, _rectangles, _noise)


def render_source(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """Draw one source-task image of class ``SOURCE_CLASSES[label]``.

    The image is ``clip(b + c * w * pattern + n, 0, 1)`` with ``pattern`` in about ``[-1, 1]``, a random
    polarity-and-contrast ``c``, an optional soft window ``w`` (an ellipse, so patterns need not fill the frame),
    background ``b`` = level + smooth illumination field, and pixel noise ``n``.

    Args:
        rng: Random stream; the drawing is a deterministic function of its state.
        size: Side ``S`` in pixels.
        label: Class index.

    Returns:
        ``(S, S)`` float32 in [0, 1].
    """
    u, v = grid(size)
    pattern = _DRAW[label](rng, u, v, size)
    # Textures may be cut out by a soft elliptical window; shapes and blobs already sit on a plain background.
    if SOURCE_CLASSES[label] not in _FRAMED and rng.random() < 0.4:
        window = soft_step(ellipse_depth(u, v, *rng.uniform(-0.3, 0.3, size=2), *rng.uniform(0.4, 0.9, size=2),
                                         rng.uniform(0, math.pi)), 0.1)
        pattern = pattern * window
    level = rng.uniform(0.3, 0.7)
    contrast = rng.uniform(0.1, 0.4) * rng.choice((-1.0, 1.0))
    img = np.float32(level) + np.float32(contrast) * pattern
    img += np.float32(rng.uniform(0.0, 0.1)) * smooth_noise(rng, size, 3)
    img += rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(0.0, 0.05))
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)


def make_source(n: int, size: int, seed: int, offset: int = 0, crop: int = 0) -> ImageSet:
    """Generate ``n`` class-balanced images of the texture source task (`SOURCE_CLASSES`), deterministic from
    ``seed``.

    Labels are a seeded permutation of ``i mod 10`` (class counts differ by at most one); image ``i`` is drawn
    from its own stream ``SeedSequence(seed, spawn_key=(domain, 1, offset + i))``. Ids are
    ``f"src-{seed}-{offset + i:05d}"``. No masks or patient ids.

    Args:
        n: Number of images (>= 0).
        size: Image side ``S`` in pixels, 16 to 1024.
        seed: Non-negative integer seed.
        offset: Index of the first image in the seed's sequence (>= 0): ``make_source(m, S, seed, offset=n)``
            continues ``make_source(n, S, seed)`` with other images (a held-out set).
        crop: Side of a window, 0 or 16 to ``S``. Textures have no scale of their own: the images are drawn at
            that side in place of ``S``.

    Returns:
        An in-memory `ImageSet` of ``(n, S, S)`` float32 images in [0, 1].

    Raises:
        TypeError: If ``n``, ``size`` or ``seed`` is not an int.
        ValueError: If ``n`` or ``seed`` is negative or ``size`` lies outside [16, 1024].
    """
    n = check_int(n, "n", 0)
    size = check_int(size, "size", 16, 1024)
    seed = check_int(seed, "seed", 0)
    offset = check_int(offset, "offset", 0)
    size = check_int(crop, "crop", 16, size) if crop else size
    label_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, 0) + ((offset,) if offset
                                                                                            else ())))
    labels = label_rng.permutation(np.arange(n, dtype=np.int64) % len(SOURCE_CLASSES))
    pixels = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, 1, offset + i)))
        pixels[i] = render_source(rng, size, int(labels[i]))
    return ImageSet(SOURCE_CLASSES, labels, [f"src-{seed}-{offset + i:05d}" for i in range(n)], size=size,
                    pixels=pixels)


#: Per-image difficulty of the lesion-attribute task is uniform on [0, this]: contrast, size, noise and
#: distractors vary from image to image (the chest task's difficulty knob, `drift.data.synthetic`).
LESION_SOURCE_MAX_DIFFICULTY = 0.25


def make_lesion_source(n: int, size: int, seed: int, offset: int = 0, crop: int = 0) -> ImageSet:
    """Generate ``n`` class-balanced images of the lesion-attribute source task (`LESION_SOURCE_CLASSES`).

    Class ``k`` is the opacity of extent ``OPACITY_EXTENTS[k // 3]`` and texture ``OPACITY_TEXTURES[k % 3]``
    (`drift.data.synthetic.render_chest_opacity`). Labels are a seeded permutation of ``i mod 6``; image ``i`` is
    drawn from its own stream ``SeedSequence(seed, spawn_key=(domain, 1, offset + i))``, its difficulty uniform on
    ``[0, LESION_SOURCE_MAX_DIFFICULTY]``. Ids are ``f"lsrc-{seed}-{offset + i:05d}"``.

    With ``crop = C > 0`` each image is a ``C x C`` window of the ``S x S`` radiograph, placed (from the image's
    stream) so that the opacity's centroid lies in the window's middle half: the opacity at the radiograph's
    scale, at ``(C / S)^2`` of the cost of training on the whole image.

    Args:
        n: Number of images (>= 0).
        size: Image side ``S`` in pixels, 32 to 1024.
        seed: Non-negative integer seed.
        offset: Index of the first image in the seed's sequence (>= 0): ``make_lesion_source(m, S, seed,
            offset=n)`` continues ``make_lesion_source(n, S, seed)`` with other images (a held-out set).
        crop: Side ``C`` of a window around the opacity, 16 to ``S``; 0 keeps the whole image.

    Returns:
        An in-memory `ImageSet` of ``(n, C, C)`` (``(n, S, S)`` without ``crop``) float32 images in [0, 1] with
        bool lung masks and opacity masks (``lesion_masks``) of the same shape.

    Raises:
        TypeError: If ``n``, ``size``, ``seed``, ``offset`` or ``crop`` is not an int.
        ValueError: If ``n``, ``seed`` or ``offset`` is negative, ``size`` lies outside [32, 1024] or ``crop``
            is neither 0 nor in [16, size].
    """
    n = check_int(n, "n", 0)
    size = check_int(size, "size", 32, 1024)
    seed = check_int(seed, "seed", 0)
    offset = check_int(offset, "offset", 0)
    crop = check_int(crop, "crop", 0, size)
    if 0 < crop < 16:
        raise ValueError(f"crop must be 0 or in [16, {size}], got {crop}")
    side = crop or size
    n_cls = len(LESION_SOURCE_CLASSES)
    label_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LESION_DOMAIN, 0, offset)))
    labels = label_rng.permutation(np.arange(n, dtype=np.int64) % n_cls)
    pixels = np.empty((n, side, side), dtype=np.float32)
    lungs = np.empty((n, side, side), dtype=bool)
    masks = np.empty((n, side, side), dtype=bool)
    n_tex = len(OPACITY_TEXTURES)
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LESION_DOMAIN, 1, offset + i)))
        difficulty = rng.uniform(0.0, LESION_SOURCE_MAX_DIFFICULTY)
        k = int(labels[i])
        img, lung, mask = render_chest_opacity(rng, size, OPACITY_TEXTURES[k % n_tex], OPACITY_EXTENTS[k // n_tex],
                                               difficulty)
        if crop:
            rows, cols = np.nonzero(mask)
            top, left = (int(np.clip(round(c.mean() - crop / 2 + rng.uniform(-crop / 4, crop / 4)), 0, size - crop))
                         for c in (rows, cols))
            window = np.s_[top:top + crop, left:left + crop]
            img, lung, mask = img[window], lung[window], mask[window]
        pixels[i], lungs[i], masks[i] = img, lung, mask
    return ImageSet(LESION_SOURCE_CLASSES, labels, [f"lsrc-{seed}-{offset + i:05d}" for i in range(n)], size=side,
                    pixels=pixels, lung_masks=lungs, lesion_masks=masks)


@dataclass(frozen=True)
class SourceTask:
    """A synthetic source task: its name (``source.task``), class names, one-line description and generator.

    ``make(n, size, seed, offset, crop)`` returns an `ImageSet` of ``n`` class-balanced images (see
    `make_lesion_source`).
    """

    name: str
    classes: tuple[str, ...]
    description: str
    make: Callable[..., ImageSet]


SOURCE_TASKS: dict[str, SourceTask] = {
    "lesion-attributes": SourceTask(
        "lesion-attributes", LESION_SOURCE_CLASSES,
        "synthetic radiographs, each with one generic opacity, classified by texture (solid, mottled, reticular) "
        "x extent (focal, extensive)", make_lesion_source),
    "textures": SourceTask(
        "textures", SOURCE_CLASSES, "natural-image-like grayscale textures and shapes (10 classes)", make_source),
}
