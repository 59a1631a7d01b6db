"""A synthetic source task for pretraining a backbone when no ImageNet weights are at hand.

Ten classes of natural-image-like grayscale textures and shapes (`SOURCE_CLASSES`) at random scale, position,
orientation, contrast and polarity, on a noisy, unevenly lit background. Telling them apart takes oriented edge
filters (stripes, plaid, checkerboard), curvature (rings, blobs, dots), corners and junctions (triangles, rectangles,
crosses) and texture statistics (noise), which is what a backbone should bring to the transfer-learning stage.
"""

from __future__ import annotations

import math

import numpy as np

from drift.data._render import ellipse_depth, grid, rotate, smooth_noise, soft_step
from drift.data.base import ImageSet, check_int

SOURCE_CLASSES: tuple[str, ...] = ("stripes", "checkerboard", "plaid", "rings", "dots", "blobs", "crosses",
                                   "triangles", "rectangles", "noise")

_DOMAIN = 0x5A3C  # separates this task's random streams from the chest task's
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


def make_source(n: int, size: int, seed: int) -> ImageSet:
    """Generate ``n`` class-balanced source-task images (`SOURCE_CLASSES`), deterministic from ``seed``.

    Labels are a seeded permutation of ``i mod 10`` (class counts differ by at most one); image ``i`` is drawn
    from its own stream ``SeedSequence(seed, spawn_key=(domain, 1, i))``. Ids are ``f"src-{seed}-{i:05d}"``. No
    masks or patient ids.

    Args:
        n: Number of images (>= 0).
        size: Image side ``S`` in pixels, 16 to 1024.
        seed: Non-negative integer seed.

    Returns:
        An in-memory `ImageSet` of ``(n, S, S)`` float32 images in [0, 1].

    Raises:
        TypeError: If ``n``, ``size`` or ``seed`` is not an int.
        ValueError: If ``n`` or ``seed`` is negative or ``size`` lies outside [16, 1024].
    """
    n = check_int(n, "n", 0)
    size = check_int(size, "size", 16, 1024)
    seed = check_int(seed, "seed", 0)
    label_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, 0)))
    labels = label_rng.permutation(np.arange(n, dtype=np.int64) % len(SOURCE_CLASSES))
    pixels = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, 1, i)))
        pixels[i] = render_source(rng, size, int(labels[i]))
    return ImageSet(SOURCE_CLASSES, labels, [f"src-{seed}-{i:05d}" for i in range(n)], size=size, pixels=pixels)
