"""Vectorised drawing primitives shared by the synthetic chest X-ray task and the synthetic source task.

Everything works on ``(S, S)`` float32 grids in normalised image coordinates ``u, v`` in ``[-1, 1]`` (``u`` to the
right, ``v`` downwards, pixel centres at ``(2 j + 1) / S - 1``), so a drawing looks the same at every resolution.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(u, v)``, each ``(S, S)`` float32 in ``(-1, 1)``; read-only, cached per size."""
    c = ((2.0 * np.arange(size) + 1.0) / size - 1.0).astype(np.float32)
    u, v = np.meshgrid(c, c, indexing="xy")
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def soft_step(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased indicator of ``d > 0``: ``clip(d / width + 1/2, 0, 1)`` (a linear ramp ``width`` wide)."""
    return np.clip(d * np.float32(1.0 / width) + np.float32(0.5), 0.0, 1.0)


@lru_cache(maxsize=64)
def _basis(size: int, cells: int) -> np.ndarray:
    """``(S, cells + 2)`` Gaussian radial-basis weights, rows of unit L2 norm (so the field has unit variance)."""
    spacing = 2.0 / cells
    centres = -1.0 - spacing / 2 + spacing * np.arange(cells + 2)
    pix = (2.0 * np.arange(size) + 1.0) / size - 1.0
    w = np.exp(-0.5 * ((pix[:, None] - centres[None, :]) / (0.75 * spacing)) ** 2)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth Gaussian random field ``(S, S)`` float32, zero mean and unit variance at every pixel.

    ``n = A Z A^T`` with ``Z`` a ``(cells + 2, cells + 2)`` standard normal matrix and ``A`` the ``(S, cells + 2)``
    row-normalised Gaussian basis; its correlation length is about ``2 / cells`` in image units.
    """
    a = _basis(size, max(1, int(cells)))
    z = rng.standard_normal((a.shape[1], a.shape[1]), dtype=np.float32)
    return a @ z @ a.T


def ellipse_depth(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                  angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance inside an ellipse, ``(1 - r) / |grad r|``, ``r`` the normalised elliptic radius.

    ``r = sqrt((dx / ax)^2 + (dy / ay)^2)`` in the ellipse's frame; dividing by the gradient norm makes the value
    close to the Euclidean distance to the boundary near it (so soft edges have the same width all round, however
    elongated the ellipse). Positive inside, zero on the boundary, negative outside.
    """
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    px, py = dx * np.float32(1.0 / ax), dy * np.float32(1.0 / ay)
    r = np.sqrt(px * px + py * py)
    # |grad r| = sqrt((px / ax)^2 + (py / ay)^2) / r; r / |grad r| is bounded by [min(ax, ay), max(ax, ay)].
    g = np.sqrt((px * np.float32(1.0 / ax)) ** 2 + (py * np.float32(1.0 / ay)) ** 2)
    scale = np.where(g > 1e-12, r / np.maximum(g, np.float32(1e-12)), np.float32(min(ax, ay)))
    return (np.float32(1.0) - r) * scale


def rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame rotated by ``angle`` radians: ``(x cos + y sin, -x sin + y cos)``."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return c * x + s * y, -s * x + c * y
