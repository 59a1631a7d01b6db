"""Drawing one synthetic chest radiograph: the pose, the anatomy, the distractors, the lesions and the marker plate.

Every image is drawn in *body coordinates* ``(x, y)`` (half the thorax width is about 1, ``x`` to the image right,
``y`` downwards), mapped to the image through a random per-image pose (scale, aspect, shift, small rotation), so
the anatomy varies from image to image while the masks stay exact. Layout follows a PA radiograph: the patient's
left is the image right, so the heart shadow sits right of the image centre and overlaps the patient's left lung.

Intensities are linear "densities" (air dark, soft tissue grey, bone bright); the window, gamma and noise that
finish an image, and the task the drawings make up (classes, difficulty, masks), are in `drift.data.synthetic`.
Every drawing is a deterministic function of the painter's random stream, drawn in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from drift.data._render import ellipse_depth, grid, rotate, smooth_noise, soft_step

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

#: Attributes of the generic opacities of `Painter.opacity` (drawn by `drift.data.synthetic.render_chest_opacity` for
#: the lesion-attribute source task).
OPACITY_TEXTURES: tuple[str, ...] = ("solid", "mottled", "reticular")
OPACITY_EXTENTS: tuple[str, ...] = ("focal", "extensive")


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


class Painter:
    """Draws one image; holds the pose-mapped body coordinates and the anatomy of that image.

    Construction draws the pose and the geometry of the lungs and the heart from ``rng``; every drawing method then
    draws from ``self.rng``, which the caller may replace by another stream (`drift.data.synthetic.render_chest`
    draws the lesion from its own stream). The image is a deterministic function of the streams and of the order
    of the calls. Every drawing is ``(S, S)`` float32 (or bool for masks).

    Args:
        rng: Random stream of the pose and the anatomy.
        size: Side ``S`` of the square image in pixels.
        difficulty: In [0, 1]: lesion contrast (``1.3 - 0.85 d``) and size (``1.25 - 0.65 d``) shrink and
            distractors grow with it.
    """

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
        """The patient's densities: body, lungs, heart, spine, ribs, clavicles and vascular markings."""
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
        """A lobar or patchy consolidation with air bronchograms in one lung."""
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
        """One to three round, sharp-edged, slightly domed nodules."""
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
        """A basal effusion with a meniscus, on one side or both."""
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
        """A fine reticular pattern over both lungs, stronger towards the bases."""
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


#: The lesion drawer of each lesion class (index into `drift.data.synthetic.SYNTHETIC_CLASSES`; 0, normal, has none).
LESIONS = {1: Painter.consolidation, 2: Painter.nodule, 3: Painter.effusion, 4: Painter.interstitial}
