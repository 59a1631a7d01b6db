"""Architecture contrasts of stability, their interaction with the attribution method, and the reversal test.

For two architectures a, b and a method m, the *contrast* is D_m = mean_i (x_{a,m,i} - x_{b,m,i}) over the images
scored for both, x an instability (lower = more stable; :func:`drift.baselines.instability`), as a macro mean over
classes when labels are given. A *reversal* between methods m1 and m2 says that a is more stable than b under one
method and less stable under the other: D_m1 < 0 < D_m2 (or the mirror). It is tested as an intersection-union test
(Berger 1982): each of the two one-sided tests at level alpha, the reversal's p-value the larger of the two; no
multiplicity correction is needed within the pair, and the family of all reversals a verdict quotes is controlled
with Holm's step-down procedure (Holm 1979). The interaction I = D_m1 - D_m2 (the per-image difference of the
architecture contrast between the two methods) is reported with its interval as the effect size; an interaction
alone does not make a reversal (both contrasts may have one sign).

Each instability may come from several fine-tuned models of an architecture (the run's and its seed replicas,
rows of a (M, N) array): the contrast then uses their mean, and its variance adds the variance of the mean over
models (models resampled) to the image part. With one model per architecture the test is conditional on these
checkpoints: the images are resampled, the training seeds are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .systematic import _stratified_var, _t_interval, _weights, _welch


@dataclass(frozen=True)
class Contrast:
    """A paired mean difference with its standard error, t degrees of freedom and one-sided p-values.

    Attributes: ``estimate``, ``low``, ``high`` (``ci``), ``se``, ``df``, ``p_below`` (p of H0: estimate >= 0),
    ``p_above`` (p of H0: estimate <= 0), ``n_images``, ``models_resampled``.
    """

    estimate: float
    low: float
    high: float
    se: float
    df: float
    p_below: float
    p_above: float
    n_images: int
    models_resampled: bool

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[None] if x.ndim == 1 else x


def contrast(terms: list[tuple], labels: np.ndarray | None = None, ci: float = 0.95,
             min_per_class: int = 1) -> Contrast:
    """The contrast sum_k c_k mean_r x_k[r] over images finite in every term, with images and models resampled.

    Args:
        terms: ``(coefficient, values, group)`` triples (``group`` optional), e.g. [(1, x_a, "a"), (-1, x_b, "b")]
            for D = a - b; ``values`` (M, N) or (N,) instabilities on the terms' shared N images, rows = fine-tuned
            models. Terms of one ``group`` come from the same M models (an architecture's values under two methods),
            so their per-model means are combined before the model variance is taken; groups are independent.
        labels: (N,) classes for a macro mean and class-stratified image variance, or None.
        ci, min_per_class: interval level; fewest images for a class to count.

    Variance: the (stratified) variance over images of the per-image contrast, plus, when every group has at least
    two models, sum over groups of the variance over its models of sum_k c_k (model r's mean of x_k), divided by M;
    t degrees of freedom by Welch-Satterthwaite.
    """
    xs = [(float(t[0]), _rows(t[1]), t[2] if len(t) > 2 else i) for i, t in enumerate(terms)]
    n = xs[0][1].shape[1]
    if any(x.shape[1] != n for _, x, _ in xs):
        raise ValueError(f"every term must be scored on the same N = {n} images, got {[x.shape for _, x, _ in xs]}")
    ok = np.ones(n, dtype=bool)
    for _, x, _ in xs:
        ok &= np.isfinite(x).all(0)
    lab = None if labels is None else np.asarray(labels).reshape(-1)[ok]
    nn = int(ok.sum())
    nan = math.nan
    if nn < 2:
        return Contrast(nan, nan, nan, nan, nan, nan, nan, nn, False)
    w, strata = _weights(lab, nn, min_per_class)
    per_image = sum(c * x[:, ok].mean(0) for c, x, _ in xs)
    est = float(w @ per_image)
    var_img = _stratified_var(per_image, w, strata)
    df_img = max(nn - len(np.unique(strata[w > 0])), 1)
    parts = [(var_img, df_img)]
    resampled = all(x.shape[0] >= 2 for _, x, _ in xs)
    if resampled:
        groups: dict = {}
        for c, x, g in xs:
            groups[g] = groups.get(g, 0.0) + c * (x[:, ok] @ w)  # (M,) per-model contrast part
        for u in groups.values():
            u = np.asarray(u, dtype=np.float64).reshape(-1)
            if u.size < 2:
                continue
            parts.append((float(np.var(u, ddof=1)) / u.size, u.size - 1))
    var, df = _welch(parts, df_img)
    se = math.sqrt(var)
    lo, hi, p_lower, p_higher = _t_interval(est, se, df, ci)
    return Contrast(est, lo, hi, se, df, p_lower, p_higher, nn, resampled)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control; NaN entries stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if idx.size == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    k = idx.size
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (k - j) * p[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Reversal:
    """The reversal test of one architecture pair (a, b) between two methods (m1, m2).

    Attributes:
        d1, d2: the contrasts a - b under m1 and m2 (:class:`Contrast`).
        interaction: D_m1 - D_m2 (:class:`Contrast`).
        p_value: intersection-union p-value of the reversal in its observed direction (the larger one-sided p);
            1 when the two contrasts' point estimates share a sign (no reversal to test).
        direction: ``"a under m1, b under m2"`` style text naming which architecture is more stable under which
            method, or ``""``.
    """

    a: str
    b: str
    m1: str
    m2: str
    d1: Contrast
    d2: Contrast
    interaction: Contrast
    p_value: float
    direction: str

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "m1": self.m1, "m2": self.m2, "d1": self.d1.as_dict(),
                "d2": self.d2.as_dict(), "interaction": self.interaction.as_dict(), "p_value": self.p_value,
                "direction": self.direction}


def reversal(a: str, b: str, m1: str, m2: str, x: dict, labels: np.ndarray | None = None, ci: float = 0.95,
             min_per_class: int = 1) -> Reversal:
    """Test whether the stability order of architectures a, b reverses between methods m1, m2.

    Args:
        x: ``{arch: {method: (M, N) or (N,) instabilities}}`` (lower = more stable) on shared images.
        labels, ci, min_per_class: as for :func:`contrast`.

    The p-value is the intersection-union p of the direction the point estimates point to (both directions' p are
    bounded by it, so choosing the observed one keeps the level: the other direction's p is at least 1/2).
    """
    xa1, xb1, xa2, xb2 = x[a][m1], x[b][m1], x[a][m2], x[b][m2]
    common = np.ones(_rows(xa1).shape[1], dtype=bool)
    for v in (xa1, xb1, xa2, xb2):
        common &= np.isfinite(_rows(v)).all(0)

    def masked(v):
        r = _rows(v).copy()
        r[:, ~common] = np.nan
        return r

    xa1, xb1, xa2, xb2 = (masked(v) for v in (xa1, xb1, xa2, xb2))
    d1 = contrast([(1, xa1, a), (-1, xb1, b)], labels, ci, min_per_class)
    d2 = contrast([(1, xa2, a), (-1, xb2, b)], labels, ci, min_per_class)
    inter = contrast([(1, xa1, a), (-1, xb1, b), (-1, xa2, a), (1, xb2, b)], labels, ci, min_per_class)
    if not (math.isfinite(d1.estimate) and math.isfinite(d2.estimate)):
        return Reversal(a, b, m1, m2, d1, d2, inter, math.nan, "")
    if d1.estimate < 0 < d2.estimate:
        p, direction = max(d1.p_below, d2.p_above), f"{a} more stable under {m1}, {b} under {m2}"
    elif d1.estimate > 0 > d2.estimate:
        p, direction = max(d1.p_above, d2.p_below), f"{b} more stable under {m1}, {a} under {m2}"
    else:
        p, direction = 1.0, ""
    return Reversal(a, b, m1, m2, d1, d2, inter, float(p), direction)
