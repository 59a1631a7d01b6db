"""A controlled synthetic chest X-ray task with ground-truth lung and lesion masks.

Every image is drawn by `drift.data.painter.Painter` in body coordinates under a random per-image pose, so the
anatomy varies from image to image while the masks stay exact; the layout is that of a PA radiograph (the heart
shadow right of the image centre, over the patient's left lung).

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

import numpy as np

from drift.data.base import ImageSet, Splits, check_fraction, check_int
from drift.data.painter import LESIONS, MARKER_SLOTS, OPACITY_EXTENTS, OPACITY_TEXTURES, Painter

__all__ = ["MARKER_SLOTS", "OPACITY_EXTENTS", "OPACITY_TEXTURES", "SYNTHETIC_CLASSES", "load_synthetic", "render_chest",
           "render_chest_opacity"]

SYNTHETIC_CLASSES: tuple[str, ...] = ("normal", "consolidation", "nodule", "effusion", "interstitial")

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DOMAIN = 0xC4E5  # separates this task's random streams from the source task's


def _place(painter: Painter, draw, size: int, what: str) -> tuple[np.ndarray, np.ndarray]:
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
                 marker: bool = False, slot: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
        slot: Return the plate's mask even when it is not painted (the region a marker would occupy; the image is
            the same either way).

    Returns:
        ``(image, lung_mask, lesion_mask, marker_mask)``: ``(S, S)`` float32 in [0, 1] and three ``(S, S)`` bool.
        ``marker_mask`` is the painted plate, or with ``slot`` the class's plate region whether painted or not.
    """
    # Separate child streams for the anatomy, the lesion and the finishing (window, gamma, noise): the same stream
    # drawn as another class, or with the marker, gives the same patient and the same noise, differing only in the
    # drawn evidence. That keeps masks checkable against a pixel difference.
    anatomy_rng, lesion_rng, finish_rng = rng.spawn(3)
    painter = Painter(anatomy_rng, size, difficulty)
    img = painter.anatomy() + painter.distractors()
    painter.rng = lesion_rng
    lesion_mask = np.zeros((size, size), dtype=bool)
    if label != 0:
        density, lesion_mask = _place(painter, lambda: LESIONS[label](painter), size,
                                      f"{SYNTHETIC_CLASSES[label]} lesion")
        img += density
    img = _window(img, finish_rng)
    marker_mask = np.zeros((size, size), dtype=bool)
    if marker or slot:
        paint, marker_mask = painter.marker(label)
        if marker:
            img = np.where(marker_mask, paint, img)
    img += finish_rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.006 + 0.03 * difficulty)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False), painter.lung_mask, lesion_mask, marker_mask


def render_chest_opacity(rng: np.random.Generator, size: int, texture: str, extent: str,
                         difficulty: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw a synthetic chest radiograph carrying one generic opacity of the given attributes.

    The patient, distractors and finishing (window, gamma, noise) are those of `render_chest`; in place of a
    class's lesion the image gets `Painter.opacity` of ``texture`` (`OPACITY_TEXTURES`) and ``extent``
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
    painter = Painter(anatomy_rng, size, difficulty)
    img = painter.anatomy() + painter.distractors()
    painter.rng = lesion_rng
    density, mask = _place(painter, lambda: painter.opacity(texture, extent), size, f"{extent} {texture} opacity")
    img += density
    img = _window(img, finish_rng)
    img += finish_rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.006 + 0.03 * difficulty)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False), painter.lung_mask, mask


MARKER_REGIONS = ("drawn", "slot")
"""What ``marker_masks`` hold: the plates drawn (``drawn``), or every image's class plate region, drawn or not
(``slot``: a study with the marker and its twin without it then score the same pixels)."""


def _split(seed: int, split: str, n: int, offset: int, size: int, difficulty: float, confounder: float,
           marker_region: str = "drawn") -> ImageSet:
    code = _SPLIT_CODES[split]
    n_cls = len(SYNTHETIC_CLASSES)
    split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, code, 0)))
    labels = split_rng.permutation(np.arange(n, dtype=np.int64) % n_cls)
    # Exactly round(confounder * n_c) images of each class carry the marker, chosen at random within the class.
    has_marker = np.zeros(n, dtype=bool)
    for c in range(n_cls):  # one order per class at every strength: the tagged sets are nested in r
        members = split_rng.permutation(np.flatnonzero(labels == c))
        has_marker[members[: int(round(confounder * len(members)))]] = True
    pixels = np.empty((n, size, size), dtype=np.float32)
    lungs = np.empty((n, size, size), dtype=bool)
    lesions = np.empty((n, size, size), dtype=bool)
    markers = np.empty((n, size, size), dtype=bool)
    for i in range(n):
        # One stream per image: an image depends only on (seed, split, index), not on the other splits' sizes.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN, code, 1, i)))
        pixels[i], lungs[i], lesions[i], markers[i] = render_chest(rng, size, int(labels[i]), difficulty,
                                                                   bool(has_marker[i]), marker_region == "slot")
    ids = [f"syn-{seed}-{offset + i:05d}" for i in range(n)]
    return ImageSet(SYNTHETIC_CLASSES, labels, ids, size=size, pixels=pixels, lung_masks=lungs,
                    lesion_masks=lesions, marker_masks=markers)


def load_synthetic(n_train: int, n_val: int, n_test: int, size: int, seed: int, difficulty: float = 0.5,
                   confounder: float = 0.0, marker_region: str = "drawn") -> Splits:
    """Generate the synthetic chest X-ray task: three class-balanced splits with lung and lesion masks.

    Each split is drawn from its own seeded stream (``SeedSequence(seed, spawn_key=(domain, split, ...))``), so the
    splits never share an image and the output is a deterministic function of the arguments (same seed, same
    bytes). Labels are a random permutation of ``i mod 5``: class counts differ by at most one. Sample ids are
    ``f"syn-{seed}-{i:05d}"`` with ``i`` counted over train, then val, then test, so ids are unique across splits.

    With ``confounder = r > 0``, exactly ``round(r * n_c)`` images of each class ``c`` in each split carry a bright
    tag marker in that class's slot (`MARKER_SLOTS`, outside the lungs); its pixels are in ``marker_masks``, never in
    ``lesion_masks``. The images of a seed are the same at every ``confounder`` but for the plates (labels, patients,
    lesions and noise do not depend on it), and the tagged images are nested: those tagged at r are the first
    ``round(r n_c)`` of one random order of each class, so a higher r adds plates and never moves one.

    Args:
        n_train: Number of training images (>= 0).
        n_val: Number of validation images (>= 0).
        n_test: Number of test images (>= 0).
        size: Image side ``S`` in pixels; designed for 64 to 512, accepted from 32 to 1024.
        seed: Non-negative integer seed.
        difficulty: In [0, 1]: lesion contrast and size shrink, noise and distractors grow with it.
        confounder: In [0, 1]: fraction of images per class that carry the class-correlated marker.
        marker_region: ``drawn`` or ``slot`` (:data:`MARKER_REGIONS`): what ``marker_masks`` hold.

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
    if marker_region not in MARKER_REGIONS:
        raise ValueError(f"marker_region must be one of {MARKER_REGIONS}, got {marker_region!r}")
    return Splits(
        train=_split(seed, "train", n_train, 0, size, difficulty, confounder, marker_region),
        val=_split(seed, "val", n_val, n_train, size, difficulty, confounder, marker_region),
        test=_split(seed, "test", n_test, n_train + n_val, size, difficulty, confounder, marker_region),
        skipped=[],
    )
