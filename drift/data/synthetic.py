"""A controlled synthetic chest X-ray task with ground-truth lung and lesion masks.

Every image is drawn in *body coordinates* ``(x, y)`` (half the thorax width is about 1, ``x`` to the image right,
``y`` downwards), mapped to the image through a random per-image pose (scale, aspect, shift, small rotation), so
the anatomy varies from image to image while the masks stay exact. Layout follows a PA radiograph: the patient's
left is the image right, so the heart shadow sits right of the image centre and overlaps the patient's left lung.

Intensities are linear "densities" (air dark, soft tissue grey, bone bright) that are then passed through a random
window and gamma and corrupted with noise, so brightness alone does not give the class away.

Classes (`SYNTHETIC_CLASSES`) and the evidence that separates them:

- ``normal``: anatomy only (plus distractors, which every class gets).
- ``consolidation``: a patchy opacity with an irregular border and dark air bronchograms, either lobar (the part
  of a lung below an oblique fissure) or a blob; most often in the lower zone.
- ``nodule``: one to three round, sharp-edged, homogeneous opacities.
- ``effusion``: a dense homogeneous basal opacity whose upper surface is a concave-up meniscus rising towards the
  lateral chest wall, filling the costophrenic angle.
- ``interstitial``: a fine reticular (net-like) pattern over both lungs, predominantly basal.

The overlaps are deliberate: lower-zone opacity in consolidation, effusion and (faint) breast shadows; small
consolidation patches against large nodules; nipple shadows and end-on vessels against small nodules; vascular
markings against reticulation. ``difficulty`` ``d`` in [0, 1] scales lesion contrast by ``1.3 - 0.85 d`` and lesion
size by ``1.25 - 0.65 d`` (never below a few pixels), sets the pixel noise to ``0.006 + 0.03 d`` and raises the rate of
distractors (nipple shadows ``0.15 + 0.5 d``, breast shadows ``0.2 + 0.4 d``, end-on vessels Poisson
``1 + 5 d``).

The lesion mask marks the pixels where a lesion was drawn, inside the lung mask: the soft support of the lesion
(its region before texture modulation) above one half, intersected with the lung mask. For the diffuse
interstitial pattern that is the lung region the pattern covers. Distractors and the shortcut marker are never in
the lesion mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from drift.data._render import ellipse_depth, grid, rotate, smooth_noise, soft_step
from drift.data.base import ImageSet, Splits, check_fraction, check_int

SYNTHETIC_CLASSES: tuple[str, ...] = ("normal", "consolidation", "nodule", "effusion", "interstitial")

#: Marker centre ``(u, v)`` in image coordinates for each class: four corners and, for the fifth class, the centre
#: of the bottom edge (below the diaphragm), all outside the lung fields at every pose the generator draws.
MARKER_SLOTS: tuple[tuple[float, float], ...] = ((-0.84, -0.86), (0.84, -0.86), (-0.84, 0.88), (0.84, 0.88),
                                                 (0.0, 0.9))
MARKER_HALF = 0.065  # half side of the marker plate, image units

# 5 x 5 glyphs drawn on the marker plate ("tag letters" N, C, O, E, I), one per class.
_GLYPHS = tuple(np.array([[c == "#" for c in row] for row in g.split()], dtype=bool) for g in (
    "#...# ##..# #.#.# #..## #...#",
    ".###. #.... #.... #.... .###.",
    ".###. #...# #...# #...# .###.",
    "##### #.... ####. #.... #####",
    "##### ..#.. ..#.. ..#.. #####",
))

#: Attributes of the generic opacities of `render_chest_opacity` (the lesion-attribute source task).
OPACITY_TEXTURES: tuple[str, ...] = ("solid", "mottled", "reticular")
OPACITY_EXTENTS: tuple[str, ...] = ("focal", "extensive")

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DOMAIN = 0xC4E5  # separates this task's random streams from the source task's


@dataclass
class _Lung:
    """One lung field in body coordinates; ``side`` is -1 (image left) or +1 (image right)."""

    side: int
    cx: float  # distance of the lung's axis from the midline
    half_width: float
    y_top: float
    y_bot: float  # level of the costophrenic angle
    dome: float  # height of the diaphragm dome above the angle

    def zone(self, y):
        """Relative height ``t = (y - y_top) / (y_bot - y_top)``: 0 at the apex, 1 at the costophrenic angle."""
        return (y - np.float32(self.y_top)) * np.float32(1.0 / (self.y_bot - self.y_top))

    def half_width_at(self, t):
        """Half width at relative height ``t``: ``a sqrt(t (2 - t))`` (round apex, widest at the base)."""
        t = np.clip(t, 0.0, 1.0)
        return np.float32(self.half_width) * np.sqrt(t * (2.0 - t))

    def diaphragm(self, lx):
        """Diaphragm level under lateral coordinate ``lx``: ``y_bot - dome (1 - ((lx - cx) / a)^2)_+``."""
        q = (lx - np.float32(self.cx)) * np.float32(1.0 / self.half_width)
        return np.float32(self.y_bot) - np.float32(self.dome) * np.clip(1.0 - q * q, 0.0, 1.0)

    def depth(self, x, y):
        """Signed depth inside the field (min of horizontal and vertical margins), ``x, y`` arrays or floats."""
        lx = x * np.float32(self.side)
        horizontal = self.half_width_at(self.zone(y)) - np.abs(lx - np.float32(self.cx))
        vertical = self.diaphragm(lx) - y
        return np.minimum(horizontal, vertical)


@dataclass
class _Heart:
    cx: float
    cy: float
    ax: float
    ay: float
    angle: float

    def depth(self, x, y):
        return ellipse_depth(x, y, self.cx, self.cy, self.ax, self.ay, self.angle)


class _Painter:
    """Draws one image; holds the pose-mapped body coordinates and the anatomy of that image."""

    def __init__(self, rng: np.random.Generator, size: int, difficulty: float) -> None:
        self.rng, self.size, self.d = rng, size, difficulty
        u, v = grid(size)
        self.u, self.v = u, v
        scale = rng.uniform(0.86, 1.0)
        aspect = rng.uniform(0.94, 1.06)
        tx, ty = rng.uniform(-0.05, 0.05), rng.uniform(-0.03, 0.06)
        xr, yr = rotate(u - np.float32(tx), v - np.float32(ty), math.radians(rng.uniform(-6.0, 6.0)))
        self.x = xr * np.float32(1.0 / (scale * aspect))
        self.y = yr * np.float32(1.0 / scale)
        self.px = 2.0 / (size * scale)  # one pixel in body units
        self.edge = 1.2 * self.px
        cx, a = rng.uniform(0.38, 0.44), rng.uniform(0.28, 0.32)
        y_top, y_bot = rng.uniform(-0.82, -0.74), rng.uniform(0.45, 0.56)
        self.lungs = (
            _Lung(-1, cx, a, y_top, y_bot, rng.uniform(0.09, 0.15)),
            # The left hemidiaphragm sits a little lower and the left lung is narrower (the heart takes room).
            _Lung(+1, cx * rng.uniform(0.97, 1.03), a * rng.uniform(0.9, 0.97), y_top + rng.uniform(-0.02, 0.02),
                  y_bot + rng.uniform(0.0, 0.06), rng.uniform(0.09, 0.15)),
        )
        self.heart = _Heart(rng.uniform(0.14, 0.2), rng.uniform(0.3, 0.38), rng.uniform(0.28, 0.36),
                            rng.uniform(0.24, 0.3), rng.uniform(-0.45, -0.2))
        heart_soft = soft_step(self.heart.depth(self.x, self.y), 2.0 * self.edge)
        self.heart_soft = heart_soft
        # Per-lung visible field: the lung outline minus the heart shadow in front of it.
        self.lung_fields = [np.minimum(soft_step(lung.depth(self.x, self.y), self.edge), 1.0 - heart_soft)
                            for lung in self.lungs]
        self.lung_soft = np.maximum(self.lung_fields[0], self.lung_fields[1])
        self.lung_mask = self.lung_soft > 0.5
        # Lesions are drawn through the inner half of the field's edge ramp (zero where the field is <= 1/2), so
        # every drawn lesion pixel lies inside the lung mask, even where the field is thinner than a pixel.
        self.lesion_fields = [np.clip(2.0 * f - 1.0, 0.0, 1.0) for f in self.lung_fields]
        self.lesion_field = np.maximum(self.lesion_fields[0], self.lesion_fields[1])

    # -- anatomy -------------------------------------------------------------------------------------------------
    def anatomy(self) -> np.ndarray:
        rng, x, y, s = self.rng, self.x, self.y, self.size
        body = soft_step(ellipse_depth(x, y, 0.0, 0.2, 0.9 * rng.uniform(0.95, 1.05), 1.25), 0.05)
        img = np.float32(0.03) + np.float32(0.40) * body
        img -= np.float32(0.25) * self.lung_soft
        img += np.float32(rng.uniform(0.05, 0.08)) * self.heart_soft
        ax = np.abs(x)
        spine = soft_step(np.float32(0.07) - ax, self.edge) * body
        img += spine * (np.float32(0.10) + np.float32(0.02) * np.cos(y * np.float32(2 * math.pi / 0.12)))
        # Posterior ribs: bands along y = k * spacing + 0.55 lx^2 - 0.15 lx; anterior ribs slope the other way.
        cage = soft_step(ellipse_depth(x, y, 0.0, -0.08, 0.84, 0.78), 0.06) * soft_step(ax - np.float32(0.08), 0.03)
        spacing = rng.uniform(0.12, 0.145)
        phase = (y + np.float32(0.15) * ax - np.float32(0.55) * ax * ax) * np.float32(1.0 / spacing)
        posterior = np.maximum(np.cos(phase * np.float32(2 * math.pi) + np.float32(rng.uniform(0, 2 * math.pi))),
                               0.0) ** 6
        phase = (y - np.float32(0.45) * ax) * np.float32(1.0 / (1.4 * spacing))
        anterior = np.maximum(np.cos(phase * np.float32(2 * math.pi) + np.float32(rng.uniform(0, 2 * math.pi))),
                              0.0) ** 8
        img += cage * (np.float32(rng.uniform(0.06, 0.09)) * posterior + np.float32(0.03) * anterior)
        # Clavicles: a bright band from the sternal notch rising laterally.
        clav = np.abs(y - np.float32(rng.uniform(-0.8, -0.72)) + np.float32(0.12) * ax - np.float32(0.1) * ax * ax)
        img += np.float32(0.10) * soft_step(np.float32(0.035) - clav, self.edge) * soft_step(
            np.float32(0.7) - ax, 0.05) * soft_step(ax - np.float32(0.06), 0.02)
        # Vascular markings: thin curved lines fanning out of each hilum and fading towards the periphery.
        hilum = np.exp(-(((ax - np.float32(0.16)) ** 2 + (y - np.float32(0.0)) ** 2) * np.float32(1.0 / 0.09)))
        vessels = np.exp(-(smooth_noise(rng, s, 7) * np.float32(1.0 / 0.18)) ** 2)
        img += np.float32(0.05) * self.lung_soft * hilum * vessels
        img += np.float32(0.025) * body * smooth_noise(rng, s, 12)
        return img

    def distractors(self) -> np.ndarray:
        """Lesion look-alikes drawn in every class; never part of the lesion mask."""
        rng, x, y, d = self.rng, self.x, self.y, self.d
        out = np.zeros_like(x)
        if rng.random() < 0.15 + 0.5 * d:  # nipple shadows: symmetric, soft round opacities in the lower zones
            r, lx, ly = rng.uniform(0.025, 0.04), rng.uniform(0.38, 0.55), rng.uniform(0.2, 0.38)
            amp = rng.uniform(0.04, 0.07) * (0.6 + 0.6 * d)
            for side in (-1, 1):
                if rng.random() < 0.85:
                    out += np.float32(amp) * soft_step(ellipse_depth(x, y, side * lx, ly, r, r), 3 * self.px)
        if rng.random() < 0.2 + 0.4 * d:  # breast shadows: faint lower-lateral opacity with a curved lower edge
            amp = rng.uniform(0.02, 0.05) * (0.6 + 0.6 * d)
            lx = np.abs(x)
            edge = np.float32(rng.uniform(0.35, 0.5)) + np.float32(0.6) * (lx - np.float32(0.5)) ** 2
            out += np.float32(amp) * soft_step(y - np.float32(0.1), 0.15) * soft_step(edge - y, 0.04) * soft_step(
                lx - np.float32(0.25), 0.1)
        for _ in range(rng.poisson(1.0 + 5.0 * d)):  # end-on vessels: tiny dense dots
            lung = self.lungs[rng.integers(2)]
            t = rng.uniform(0.2, 0.85)
            ly = lung.y_top + t * (lung.y_bot - lung.y_top)
            lx = lung.cx + rng.uniform(-0.7, 0.7) * float(lung.half_width_at(t))
            r = max(rng.uniform(0.012, 0.022), 0.8 * self.px)
            out += np.float32(rng.uniform(0.04, 0.08)) * soft_step(
                ellipse_depth(x, y, lung.side * lx, ly, r, r), 1.5 * self.px)
        return out * np.maximum(self.lung_soft, 0.3 * self.heart_soft)

    # -- lesions: each returns (density to add, soft support) ----------------------------------------------------
    def _contrast(self) -> float:
        return 1.3 - 0.85 * self.d

    def _size_factor(self) -> float:
        return 1.25 - 0.65 * self.d

    def _point_in_lung(self, lung: _Lung, t_range: tuple[float, float], margin: float) -> tuple[float, float]:
        """A random body point ``(x, y)`` inside ``lung`` at relative height in ``t_range``, ``margin`` deep."""
        rng = self.rng
        for _ in range(64):
            t = rng.uniform(*t_range)
            y = lung.y_top + t * (lung.y_bot - lung.y_top)
            lx = lung.cx + rng.uniform(-1.0, 1.0) * float(lung.half_width_at(t))
            x = lung.side * lx
            if float(lung.depth(np.float32(x), np.float32(y))) > margin and float(self.heart.depth(x, y)) < -margin:
                return x, y
        return lung.side * lung.cx, lung.y_top + 0.55 * (lung.y_bot - lung.y_top)

    def consolidation(self) -> tuple[np.ndarray, np.ndarray]:
        rng, x, y, s = self.rng, self.x, self.y, self.size
        lung = self.lungs[rng.integers(2)]
        field = self.lesion_fields[0 if lung.side < 0 else 1]
        patchy = smooth_noise(rng, s, 10)
        if rng.random() < 0.5:
            # Lobar: the lung below (or above) an oblique fissure, with a fluffy free border.
            lower = rng.random() < 0.75
            t_f = rng.uniform(0.45, 0.7) if lower else rng.uniform(0.3, 0.5)
            t_f += 0.25 * self.d * (1.0 if lower else -1.0) * rng.random()
            y_f = lung.y_top + t_f * (lung.y_bot - lung.y_top)
            slope = rng.uniform(-0.5, 0.1)  # fissures run down and medially
            depth = (y - np.float32(y_f) - np.float32(slope) * (x * np.float32(lung.side) - np.float32(lung.cx)))
            depth = depth if lower else -depth
            support = soft_step(depth + np.float32(0.03) * patchy, 1.5 * self.edge)
        else:
            zone = rng.choice(3, p=(0.6, 0.3, 0.1))
            t_range = ((0.62, 0.9), (0.38, 0.62), (0.15, 0.38))[zone]
            cx, cy = self._point_in_lung(lung, t_range, 0.02)
            sf = self._size_factor()
            ax = max(rng.uniform(0.08, 0.22) * sf, 3.0 * self.px)
            ay = max(rng.uniform(0.07, 0.18) * sf, 3.0 * self.px)
            depth = ellipse_depth(x, y, cx, cy, ax, ay, rng.uniform(-1.0, 1.0))
            support = soft_step(depth + np.float32(0.035) * patchy, 1.5 * self.edge)
        texture = np.clip(np.float32(0.75) + np.float32(0.3) * smooth_noise(rng, s, 16), 0.3, 1.0)
        bronchi = np.exp(-(smooth_noise(rng, s, 6) * np.float32(1.0 / 0.12)) ** 2)
        texture *= np.float32(1.0) - np.float32(0.4) * bronchi
        amp = rng.uniform(0.14, 0.2) * self._contrast()
        return np.float32(amp) * support * texture * field, support * field

    def nodule(self) -> tuple[np.ndarray, np.ndarray]:
        rng, x, y = self.rng, self.x, self.y
        density = np.zeros_like(x)
        support = np.zeros_like(x)
        for _ in range(rng.choice(3, p=(0.6, 0.25, 0.15)) + 1):
            r = max(rng.uniform(0.035, 0.085) * self._size_factor(), 1.6 * self.px)
            cx, cy = self._point_in_lung(self.lungs[rng.integers(2)], (0.1, 0.9), r + self.px)
            depth = ellipse_depth(x, y, cx, cy, r * rng.uniform(0.9, 1.1), r * rng.uniform(0.9, 1.1))
            disc = soft_step(depth, self.edge)
            # Slightly domed profile: sphere-like thickness sqrt(1 - (rho / r)^2) on a flat base.
            dome = np.sqrt(np.clip(depth * np.float32(1.0 / r) * (2.0 - depth * np.float32(1.0 / r)), 0.0, 1.0))
            amp = rng.uniform(0.15, 0.22) * self._contrast()
            density = np.maximum(density, np.float32(amp) * disc * (np.float32(0.75) + np.float32(0.25) * dome))
            support = np.maximum(support, disc)
        return density * self.lesion_field, support * self.lesion_field

    def effusion(self) -> tuple[np.ndarray, np.ndarray]:
        rng, x, y = self.rng, self.x, self.y
        sides = ((0,), (1,), (0, 1))[rng.choice(3, p=(0.4, 0.4, 0.2))]
        density = np.zeros_like(x)
        support = np.zeros_like(x)
        amp = rng.uniform(0.2, 0.28) * self._contrast()
        for k in sides:
            lung = self.lungs[k]
            h = max(rng.uniform(0.1, 0.3) * (0.5 + 0.5 * self._size_factor()), 3.0 * self.px)
            m = rng.uniform(0.06, 0.14)
            # Meniscus: fluid surface y_s = y_bot - h - m q^2, q from the medial (0) to the lateral (1) edge.
            q = np.clip((x * np.float32(lung.side) - np.float32(lung.cx - lung.half_width))
                        * np.float32(0.5 / lung.half_width), 0.0, 1.0)
            surface = np.float32(lung.y_bot - h) - np.float32(m) * q * q
            sup = soft_step(y - surface, 1.5 * self.edge) * self.lesion_fields[k]
            # Fluid thickens towards the base.
            grade = np.float32(0.8) + np.float32(0.2) * np.clip((y - surface) * np.float32(1.0 / h), 0.0, 1.0)
            density += np.float32(amp) * sup * grade
            support += sup
        return density, support

    def interstitial(self) -> tuple[np.ndarray, np.ndarray]:
        rng, x, y, s = self.rng, self.x, self.y, self.size
        # Mesh cells about 0.09 body units, never finer than 5 pixels (finer lines would alias away).
        cells = int(np.clip(round(2.0 / max(0.09, 10.0 / s)), 4, 40))
        mesh = np.exp(-(smooth_noise(rng, s, cells) * np.float32(1.0 / 0.3)) ** 2)
        t0 = rng.uniform(0.0, 0.45)
        left, right = self.lungs
        zone = np.where(x < 0, left.zone(y), right.zone(y))
        # Upper limit of the pattern: a wavy line at relative height t0 in each lung.
        limit = np.where(x < 0, left.y_top + t0 * (left.y_bot - left.y_top),
                         right.y_top + t0 * (right.y_bot - right.y_top))
        wavy = y - limit + np.float32(0.04) * smooth_noise(rng, s, 6)
        envelope = soft_step(wavy, 1.5 * self.edge) * self.lesion_field
        # Basal predominance: the pattern strengthens towards the bases.
        weight = np.float32(0.6) + np.float32(0.4) * np.clip(zone, 0.0, 1.0)
        amp = rng.uniform(0.09, 0.14) * self._contrast()
        density = envelope * weight * (np.float32(amp) * mesh + np.float32(0.25 * amp))
        return density, envelope

    # -- generic opacities of the lesion-attribute source task (render_chest_opacity) -----------------------------
    def opacity(self, texture: str, extent: str) -> tuple[np.ndarray, np.ndarray]:
        """An opacity described by its attributes: ``(density to add, soft support)``, both ``(S, S)`` float32.

        ``focal``: one to three round or oval spots (radius 0.035-0.12 body units times the size factor; 0.06 at
        least for the textured ones, so a net or a mottle has room to show) anywhere in either lung.
        ``extensive``: a large part of one lung or (30 %) of both, each a big oval (radius 0.16-0.3) or the lung
        below or above a tilted line at mid height. ``solid``: homogeneous with a sharp edge; ``mottled``: patchy
        density with a fuzzy border; ``reticular``: a fine net (mesh about 0.09 body units). The shapes are
        generic: no fissure, meniscus or air bronchogram, and every texture comes at every extent.
        """
        rng, x, y, s = self.rng, self.x, self.y, self.size
        border = np.float32(0.0 if texture == "solid" else 0.035) * smooth_noise(rng, s, 10)
        support = np.zeros_like(x)
        if extent == "focal":
            lo = 0.035 if texture == "solid" else 0.06
            for _ in range(rng.choice(3, p=(0.6, 0.25, 0.15)) + 1):
                r = max(rng.uniform(lo, 0.12) * self._size_factor(), 2.0 * self.px)
                cx, cy = self._point_in_lung(self.lungs[rng.integers(2)], (0.1, 0.9), r + self.px)
                depth = ellipse_depth(x, y, cx, cy, r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25),
                                      rng.uniform(0.0, math.pi))
                support = np.maximum(support, soft_step(depth + border, self.edge))
            support = support * self.lesion_field
        elif extent == "extensive":
            for k in ((0,), (1,), (0, 1))[rng.choice(3, p=(0.35, 0.35, 0.3))]:
                lung = self.lungs[k]
                if rng.random() < 0.5:
                    cx, cy = self._point_in_lung(lung, (0.25, 0.75), 0.05)
                    depth = ellipse_depth(x, y, cx, cy, rng.uniform(0.16, 0.3), rng.uniform(0.16, 0.3),
                                          rng.uniform(0.0, math.pi))
                else:
                    level = lung.y_top + rng.uniform(0.35, 0.65) * (lung.y_bot - lung.y_top)
                    tilt = rng.uniform(-0.4, 0.4)
                    lateral = x * np.float32(lung.side) - np.float32(lung.cx)
                    depth = y - np.float32(level) - np.float32(tilt) * lateral
                    depth = depth if rng.random() < 0.6 else -depth
                support = np.maximum(support, soft_step(depth + border, 1.5 * self.edge) * self.lesion_fields[k])
        else:
            raise ValueError(f"extent must be one of {OPACITY_EXTENTS}, got {extent!r}")
        if texture == "solid":
            density = np.float32(rng.uniform(0.16, 0.24) * self._contrast()) * support
        elif texture == "mottled":
            patches = np.clip(np.float32(0.65) + np.float32(0.5) * smooth_noise(rng, s, 32), 0.1, 1.0)
            density = np.float32(rng.uniform(0.15, 0.22) * self._contrast()) * support * patches
        elif texture == "reticular":
            cells = int(np.clip(round(2.0 / max(0.09, 10.0 / s)), 4, 40))
            mesh = np.exp(-(smooth_noise(rng, s, cells) * np.float32(1.0 / 0.3)) ** 2)
            density = np.float32(rng.uniform(0.1, 0.15) * self._contrast()) * support * (mesh + np.float32(0.25))
        else:
            raise ValueError(f"texture must be one of {OPACITY_TEXTURES}, got {texture!r}")
        return density, support

    def marker(self, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """Tag plate of class ``cls`` in image coordinates: ``(intensity to paint, bool mask)``."""
        cu, cv = MARKER_SLOTS[cls]
        h = MARKER_HALF
        du, dv = self.u - np.float32(cu), self.v - np.float32(cv)
        plate = (np.abs(du) < h) & (np.abs(dv) < h)
        glyph = _GLYPHS[cls]
        gi = np.clip(((dv + h) * np.float32(2.5 / h)).astype(np.int64), 0, 4)
        gj = np.clip(((du + h) * np.float32(2.5 / h)).astype(np.int64), 0, 4)
        value = np.where(glyph[gi, gj], np.float32(1.0), np.float32(0.78))
        return np.where(plate, value, np.float32(0.0)), plate


_LESIONS = {1: _Painter.consolidation, 2: _Painter.nodule, 3: _Painter.effusion, 4: _Painter.interstitial}


def _place(painter: _Painter, draw, size: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw a lesion with ``draw() -> (density, support)``; one that landed (almost) outside the visible lung
    field is redrawn (up to 16 times), since every lesion image must show one. Returns (density, bool mask)."""
    min_pixels = max(4, round(8e-4 * size * size))
    for _ in range(16):
        density, support = draw()
        mask = (support > 0.5) & painter.lung_mask
        if mask.sum() >= min_pixels:
            return density, mask
    raise RuntimeError(f"could not place a {what} at size {size}")


def _window(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random display window and gamma, as radiographs come out of different exporters."""
    lo, hi = rng.uniform(-0.04, 0.06), rng.uniform(0.8, 1.05)
    gamma = math.exp(rng.uniform(-0.25, 0.25))
    return np.clip((img - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0.0, 1.0) ** np.float32(gamma)


def render_chest(rng: np.random.Generator, size: int, label: int, difficulty: float = 0.5,
                 marker: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one synthetic chest radiograph of class ``label`` from the random stream ``rng``.

    The image is ``window(anatomy + distractors + lesion) ** gamma + noise``, clipped to [0, 1], where
    ``window(a) = (a - lo) / (hi - lo)``, ``gamma = exp(U(-0.25, 0.25))`` and the noise is Gaussian with standard
    deviation ``0.006 + 0.03 difficulty``; the marker plate, when asked for, is painted over the result before the
    noise.

    Args:
        rng: Random stream seeded from a `numpy.random.SeedSequence` (``np.random.default_rng(seed)`` is fine); the
            drawing is a deterministic function of it. Anatomy, lesion and finishing use three child streams
            (``rng.spawn(3)``), so the same ``rng`` seed drawn with another ``label`` or ``marker`` gives the same
            anatomy, window and noise.
        size: Side ``S`` of the square image in pixels.
        label: Index into `SYNTHETIC_CLASSES`.
        difficulty: In [0, 1]; see the module docstring.
        marker: Paint the class's tag marker in its slot (`MARKER_SLOTS`).

    Returns:
        ``(image, lung_mask, lesion_mask, marker_mask)``: ``(S, S)`` float32 in [0, 1] and three ``(S, S)`` bool.
    """
    # Separate child streams for the anatomy, the lesion and the finishing (window, gamma, noise): the same stream
    # drawn as another class, or with the marker, gives the same patient and the same noise, differing only in the
    # drawn evidence. That keeps masks checkable against a pixel difference.
    anatomy_rng, lesion_rng, finish_rng = rng.spawn(3)
    painter = _Painter(anatomy_rng, size, difficulty)
    img = painter.anatomy() + painter.distractors()
    painter.rng = lesion_rng
    lesion_mask = np.zeros((size, size), dtype=bool)
    if label != 0:
        density, lesion_mask = _place(painter, lambda: _LESIONS[label](painter), size,
                                      f"{SYNTHETIC_CLASSES[label]} lesion")
        img += density
    img = _window(img, finish_rng)
    marker_mask = np.zeros((size, size), dtype=bool)
    if marker:
        paint, marker_mask = painter.marker(label)
        img = np.where(marker_mask, paint, img)
    img += finish_rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.006 + 0.03 * difficulty)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False), painter.lung_mask, lesion_mask, marker_mask


def render_chest_opacity(rng: np.random.Generator, size: int, texture: str, extent: str,
                         difficulty: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw a synthetic chest radiograph carrying one generic opacity of the given attributes.

    The patient, distractors and finishing (window, gamma, noise) are those of `render_chest`; in place of a
    class's lesion the image gets `_Painter.opacity` of ``texture`` (`OPACITY_TEXTURES`) and ``extent``
    (`OPACITY_EXTENTS`). ``difficulty`` scales contrast, size, noise and distractors as in `render_chest`.

    Args:
        rng: Random stream (``np.random.default_rng(seed)`` is fine); the drawing is a deterministic function of it.
        size: Side ``S`` of the square image in pixels.
        texture: ``solid``, ``mottled`` or ``reticular``.
        extent: ``focal`` or ``extensive``.
        difficulty: In [0, 1].

    Returns:
        ``(image, lung_mask, opacity_mask)``: ``(S, S)`` float32 in [0, 1] and two ``(S, S)`` bool.

    Raises:
        ValueError: If ``texture`` or ``extent`` is not one of the listed attributes.
    """
    if texture not in OPACITY_TEXTURES:
        raise ValueError(f"texture must be one of {OPACITY_TEXTURES}, got {texture!r}")
    if extent not in OPACITY_EXTENTS:
        raise ValueError(f"extent must be one of {OPACITY_EXTENTS}, got {extent!r}")
    anatomy_rng, lesion_rng, finish_rng = rng.spawn(3)
    painter = _Painter(anatomy_rng, size, difficulty)
    img = painter.anatomy() + painter.distractors()
    painter.rng = lesion_rng
    density, mask = _place(painter, lambda: painter.opacity(texture, extent), size, f"{extent} {texture} opacity")
    img += density
    img = _window(img, finish_rng)
    img += finish_rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.006 + 0.03 * difficulty)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False), painter.lung_mask, mask


def _split(seed: int, split: str, n: int, offset: int, size: int, difficulty: float, confounder: float) -> ImageSet:
    code = _SPLIT_CODES[split]
    n_cls = len(SYNTHETIC_CLASSES)
    split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, code, 0)))
    labels = split_rng.permutation(np.arange(n, dtype=np.int64) % n_cls)
    # Exactly round(confounder * n_c) images of each class carry the marker, chosen at random within the class.
    has_marker = np.zeros(n, dtype=bool)
    if confounder > 0:
        for c in range(n_cls):
            members = np.flatnonzero(labels == c)
            k = int(round(confounder * len(members)))
            has_marker[split_rng.choice(members, size=k, replace=False)] = True
    pixels = np.empty((n, size, size), dtype=np.float32)
    lungs = np.empty((n, size, size), dtype=bool)
    lesions = np.empty((n, size, size), dtype=bool)
    markers = np.empty((n, size, size), dtype=bool)
    for i in range(n):
        # One stream per image: an image depends only on (seed, split, index), not on the other splits' sizes.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, code, 1, i)))
        pixels[i], lungs[i], lesions[i], markers[i] = render_chest(rng, size, int(labels[i]), difficulty,
                                                                   bool(has_marker[i]))
    ids = [f"syn-{seed}-{offset + i:05d}" for i in range(n)]
    return ImageSet(SYNTHETIC_CLASSES, labels, ids, size=size, pixels=pixels, lung_masks=lungs,
                    lesion_masks=lesions, marker_masks=markers)


def load_synthetic(n_train: int, n_val: int, n_test: int, size: int, seed: int, difficulty: float = 0.5,
                   confounder: float = 0.0) -> Splits:
    """Generate the synthetic chest X-ray task: three class-balanced splits with lung and lesion masks.

    Each split is drawn from its own seeded stream (``SeedSequence(seed, spawn_key=(domain, split, ...))``), so the
    splits never share an image and the output is a deterministic function of the arguments (same seed, same
    bytes). Labels are a random permutation of ``i mod 5``: class counts differ by at most one. Sample ids are
    ``f"syn-{seed}-{i:05d}"`` with ``i`` counted over train, then val, then test, so ids are unique across splits.

    With ``confounder = r > 0``, exactly ``round(r * n_c)`` images of each class ``c`` in each split carry a bright
    tag marker in that class's slot (`MARKER_SLOTS`, outside the lungs); its pixels are in ``marker_masks``, never in
    ``lesion_masks``.

    Args:
        n_train: Number of training images (>= 0).
        n_val: Number of validation images (>= 0).
        n_test: Number of test images (>= 0).
        size: Image side ``S`` in pixels; designed for 64 to 512, accepted from 32 to 1024.
        seed: Non-negative integer seed.
        difficulty: In [0, 1]: lesion contrast and size shrink, noise and distractors grow with it.
        confounder: In [0, 1]: fraction of images per class that carry the class-correlated marker.

    Returns:
        `Splits` whose ImageSets hold ``(N, S, S)`` float32 images in [0, 1] and ``(N, S, S)`` bool ``lung_masks``,
        ``lesion_masks`` and ``marker_masks``.

    Raises:
        TypeError: If a count, the size or the seed is not an int, or difficulty/confounder is not a number.
        ValueError: If a count is negative, the size is outside [32, 1024], the seed is negative, or difficulty or
            confounder lies outside [0, 1].
    """
    n_train = check_int(n_train, "n_train", 0)
    n_val = check_int(n_val, "n_val", 0)
    n_test = check_int(n_test, "n_test", 0)
    size = check_int(size, "size", 32, 1024)
    seed = check_int(seed, "seed", 0)
    difficulty = check_fraction(difficulty, "difficulty")
    confounder = check_fraction(confounder, "confounder")
    return Splits(
        train=_split(seed, "train", n_train, 0, size, difficulty, confounder),
        val=_split(seed, "val", n_val, n_train, size, difficulty, confounder),
        test=_split(seed, "test", n_test, n_train + n_val, size, difficulty, confounder),
        skipped=[],
    )
