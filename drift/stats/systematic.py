"""Systematic drift against seed noise, from replicated fine-tuning runs, and the whole-chain energy test.

**Model.** Read a map (of one image) as a point x in a Euclidean representation and an instability d as a squared
distance, d(a, b) = |x_a - x_b|^2. A phase rerun with another training seed lands at FT_r = mu + eps_r with
independent noise of variance sigma^2 (E |eps_r|^2 = sigma^2). Then

    E d(TL, FT_r) = |TL - mu|^2 + sigma^2,        E d(FT_r, FT_s) = 2 sigma^2   (r != s),

so the drift between one TL and one FT is inflated by the seed noise, and the drift between two fine-tuned replicas
is *twice* the noise. With M = R + 1 fine-tuned models (the run's and R replicas, all fine-tuned from the same TL)

    S = mean_r d(TL, FT_r) - 1/2 mean_{r<s} d(FT_r, FT_s)

is unbiased for the systematic change |TL - mu|^2, and sigma^2 = 1/2 mean_{r<s} d(FT_r, FT_s) for the seed noise.
``noise_share`` = sigma^2 / (S + sigma^2) is the share of the observed drift (mean_r d(TL, FT_r)) that retraining
alone produces: 1 when the maps move no more than a rerun moves them, 0 when retraining reproduces them exactly.

The instabilities that *are* squared Euclidean distances (:func:`euclidean_instability`): 1 - Pearson r (of maps
standardised to mean 0 and unit variance over P pixels, |z_a - z_b|^2 = 2 P (1 - r)), the squared centroid shift,
and 1 - Dice of top-k sets (for two sets of k pixels with indicator vectors u, |u_a - u_b|^2 = 2 (k - |A n B|), so
1 - |A n B| / k = |u_a - u_b|^2 / 2k; Dice = 2 IoU / (1 + IoU) is a monotone transform of the IoU). 1 - IoU itself is
not, and neither is the unsquared displacement: the factor 1/2 above would not hold for them.

**Uncertainty.** Images and fine-tuned models are crossed random factors. The interval adds two variance parts:
over images, the (class-stratified) variance of the per-image estimates S_i; over models, the delete-one-model
jackknife of S (Efron & Stein 1981; conservative for U-statistics such as the pairwise mean). The two overlap in
the model x image interaction, so the sum errs on the wide side. The interval is S +- t_{nu} sqrt(V) with the
Welch-Satterthwaite degrees of freedom nu. The model part needs M >= 3 (with M = 2 the jackknife leaves a single
model and no pair): with two fine-tuned models the interval covers image resampling only and says so
(``models_resampled = False``); :mod:`drift.verdicts` then prints no verdict.

**Whole chains.** With chains (TL_r, FT_r), FT_r fine-tuned from TL_r, r < R, the energy statistic (Szekely &
Rizzo 2004) E = 2 mean_{r,s} d(TL_r, FT_s) - mean_{r!=s} d(TL_r, TL_s) - mean_{r!=s} d(FT_r, FT_s) is zero in
expectation when TL and FT maps have the same distribution over seeds. Its permutation test swaps the phase labels
within chains (all 2^R swaps when R <= 12, else a seeded sample); since swapping every chain leaves E unchanged,
the smallest attainable p-value is 2 / 2^R, and a test at 0.05 needs R >= 6 chains.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import scipy.stats

from .sample import ArrayLike

EUCLIDEAN = {"pearson": "1 - r", "spearman": "1 - rho", "centroid_shift": "shift^2", "peak_shift": "shift^2",
             "iou": "1 - Dice (excess over replicas)"}
"""How each ranking metric enters as a squared Euclidean distance (``iou`` stands for every ``iou@XX`` key)."""


def euclidean_instability(metric: str, values: ArrayLike) -> np.ndarray:
    """Per-image values of a drift metric as a squared Euclidean distance between the two maps' representations.

    ``pearson`` / ``spearman``: 1 - r (standardised maps, resp. their ranks); ``centroid_shift`` / ``peak_shift``:
    the squared displacement; ``iou@XX``: 1 - Dice with Dice = 2 IoU / (1 + IoU) (the indicator vectors of two top-k
    sets; with fractional tie memberships the same formula is an L1 rather than squared L2 distance, equal to it
    when no cut passes through a tie). Non-finite values stay non-finite.

    Raises:
        ValueError: a metric with no squared-Euclidean reading (e.g. ``ssim`` or a ``*_change``).
    """
    v = np.asarray(values, dtype=np.float64)
    if metric in ("pearson", "spearman"):
        return 1.0 - v
    if metric in ("centroid_shift", "peak_shift"):
        return v * v
    if metric.startswith("iou@"):
        return 1.0 - 2.0 * v / (1.0 + v)
    raise ValueError(f"metric {metric!r} has no squared-Euclidean instability; those with one: "
                     "pearson, spearman, centroid_shift, peak_shift, iou@XX")


def euclidean_label(metric: str) -> str:
    """What :func:`euclidean_instability` makes of ``metric`` (``"1 - Dice"`` for ``iou@20``)."""
    return EUCLIDEAN["iou" if metric.startswith("iou@") else metric]


@dataclass(frozen=True)
class SystematicDrift:
    """The systematic drift estimate S with its interval and the seed noise (see the module docstring).

    Attributes:
        estimate: S, the (weighted) mean over images of the per-image estimates.
        low, high: the interval (``ci``); NaN when fewer than two images.
        noise_share: sigma^2 / (S + sigma^2), the share of the observed mean drift that retraining alone gives (above
            1 when S < 0, i.e. the run's drift is smaller than the seed noise predicts).
        sigma2: the seed noise 1/2 mean_{r<s} d(FT_r, FT_s).
        drift: the observed drift mean_r d(TL, FT_r) (= S + sigma2).
        p_value: one-sided p of H0: S <= 0 (t with ``df`` degrees of freedom).
        se, se_images, se_models: standard error and its two parts (``se_models`` NaN when M < 3).
        df: Welch-Satterthwaite degrees of freedom of the interval.
        n_images, n_models: images used (finite for every model and pair) and fine-tuned models M.
        models_resampled: whether the interval includes the model part (M >= 3).
        ci: interval level.
    """

    estimate: float
    low: float
    high: float
    noise_share: float
    sigma2: float
    drift: float
    p_value: float
    se: float
    se_images: float
    se_models: float
    df: float
    n_images: int
    n_models: int
    models_resampled: bool
    ci: float = 0.95

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _weights(labels: np.ndarray | None, n: int, min_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) weights summing to 1 (macro over classes with at least ``min_per_class`` images, else uniform) and
    (N,) int strata (class, or 0)."""
    if labels is None:
        return np.full(n, 1.0 / n), np.zeros(n, dtype=np.int64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    keep = classes[counts >= min_per_class]
    if keep.size == 0:
        return np.zeros(n), labels
    w = np.zeros(n)
    for c in keep:
        m = labels == c
        w[m] = 1.0 / (m.sum() * keep.size)
    return w, labels


def _stratified_var(values: np.ndarray, w: np.ndarray, strata: np.ndarray) -> float:
    """Variance of sum_i w_i v_i over resampling images within strata: sum_c W_c^2 s_c^2 / n_c."""
    total = 0.0
    for c in np.unique(strata[w > 0]):
        m = (strata == c) & (w > 0)
        n_c = int(m.sum())
        if n_c < 2:
            continue
        W_c = float(w[m].sum())
        total += W_c * W_c * float(np.var(values[m], ddof=1)) / n_c
    return total


def _check_shapes(d_tl: np.ndarray, d_ft: np.ndarray, name: str = "d_ft") -> tuple[int, int]:
    if d_tl.ndim != 2:
        raise ValueError(f"d_tl must have shape (M, N) (M fine-tuned models, N images), got {d_tl.shape}")
    m, n = d_tl.shape
    if m < 2:
        raise ValueError("systematic drift needs at least two fine-tuned models (the run's and a replica), "
                         f"got M = {m}")
    if d_ft.shape != (m, m, n):
        raise ValueError(f"{name} must have shape (M, M, N) = ({m}, {m}, {n}) to match d_tl {d_tl.shape}, "
                         f"got {d_ft.shape}")
    return m, n


def _pair_mean(d_ft: np.ndarray, models: np.ndarray) -> np.ndarray:
    """(N,) mean over pairs r < s of ``models`` of d_ft[r, s] (symmetrised: mean of [r, s] and [s, r])."""
    iu = [(r, s) for i, r in enumerate(models) for s in models[i + 1:]]
    return np.mean([0.5 * (d_ft[r, s] + d_ft[s, r]) for r, s in iu], axis=0)


FORMS = ("euclidean", "cosine", "exchange")
"""How the systematic drift is formed from the mean instabilities a = mean_r d(TL, FT_r) and b = mean_{r<s}
d(FT_r, FT_s): ``euclidean`` S = a - b / 2 (a linear representation, e.g. centroids); ``cosine``
S = 1 - (1 - a) / sqrt(1 - b) (a representation of fixed norm, d = 1 - cosine, e.g. 1 - r of standardised maps);
``exchange`` S = a - b, the excess of the TL -> FT drift over the drift between two fine-tuned models (zero when
TL is exchangeable with the replicas, -sigma^2 when it lies at their centre): a conservative contrast for
dissimilarities with no representation in which the first two are unbiased (the top-k overlap, a threshold)."""

RANKABLE_FORMS = ("cosine",)
"""Forms whose S does not grow with the seed noise, so that architectures with different noise can be ranked. Not
``exchange`` (S = |change|^2 - sigma^2 favours the noisiest architecture) and not the centroid's ``euclidean``
(a centroid is a ratio of mass moments: under heavy noise the replicas' mean centroid moves, so S grows with the
noise; docs/calibration.md measured 8% false rankings of architectures with equal change and 0.5x / 1x / 2x noise)."""


def systematic_form(metric: str) -> str:
    """The form of S for a metric (:data:`FORMS`): ``cosine`` for Pearson / Spearman (standardised maps and
    their ranks have a fixed norm), ``exchange`` for the top-k IoU (a threshold: the mean of noisy top-k sets is
    a blurred set, so a - b/2 grows with the noise even without any change; measured in docs/calibration.md),
    ``euclidean`` for centroid and peak shifts."""
    if metric in ("pearson", "spearman"):
        return "cosine"
    return "exchange" if metric.startswith("iou@") else "euclidean"


def _statistic(a: float, b: float, form: str) -> tuple[float, float, float]:
    """(S, dS/da, dS/db) of the mean instabilities a (TL vs FT) and b (FT vs FT)."""
    if form == "euclidean":
        return a - 0.5 * b, 1.0, -0.5
    if form == "exchange":
        return a - b, 1.0, -1.0
    if 1 - b <= 0:
        return math.nan, math.nan, math.nan
    root = math.sqrt(1 - b)
    return 1 - (1 - a) / root, 1 / root, -(1 - a) / (2 * root ** 3)


def _parts(d_tl: np.ndarray, d_ft: np.ndarray, w: np.ndarray, form: str) -> tuple[float, float, np.ndarray, float]:
    """(S, noise, per-image influence (N,), delete-one-model jackknife variance or NaN) of finite arrays."""
    m = d_tl.shape[0]
    every = np.arange(m)
    a_i, b_i = d_tl.mean(0), _pair_mean(d_ft, every)
    a, b = float(w @ a_i), float(w @ b_i)
    est, da, db = _statistic(a, b, form)
    phi = da * (a_i - a) + db * (b_i - b)  # linearisation: the image part of the variance
    # the part of the observed drift a retraining gives: sigma^2 = b/2 (euclidean), the attenuation a - S (cosine),
    # the drift between two fine-tuned models b (exchange)
    noise = {"euclidean": 0.5 * b, "cosine": a - est, "exchange": b}[form]
    var_mod = math.nan
    if m >= 3:
        per_model = d_tl @ w
        loo = np.array([_statistic(float(np.mean(np.delete(per_model, k))),
                                   float(_pair_mean(d_ft, np.delete(every, k)) @ w), form)[0] for k in range(m)])
        var_mod = (m - 1) / m * float(((loo - loo.mean()) ** 2).sum())
    return est, noise, phi, var_mod


def systematic_drift(d_tl: ArrayLike, d_ft: ArrayLike, labels: ArrayLike | None = None, ci: float = 0.95,
                     min_per_class: int = 1, form: str = "euclidean") -> SystematicDrift:
    """The systematic TL -> FT drift beyond seed noise, from M = R + 1 fine-tuned models (module docstring).

    Args:
        d_tl: (M, N) instability of the TL maps against each fine-tuned model's maps, per image (squared-Euclidean
            instabilities, :func:`euclidean_instability`; row 0 is usually the run's own FT).
        d_ft: (M, M, N) pairwise instabilities between the fine-tuned models, symmetric; the diagonal is ignored.
        labels: optional (N,) classes: a macro mean over classes (each class with at least ``min_per_class`` used
            images weighs the same) and class-stratified image variance; None: a plain mean over images.
        ci: interval level in (0, 1).
        min_per_class: fewest images for a class to enter the macro mean.
        form: ``euclidean`` (S = a - b/2), ``cosine`` (S = 1 - (1 - a) / sqrt(1 - b), for instabilities
            1 - cosine of a fixed-norm representation) or ``exchange`` (S = a - b) (:data:`FORMS`,
            :func:`systematic_form`); a, b: the mean instabilities of TL vs FT and of FT vs FT. The cosine
            form compares TL with the direction of the replicas' mean: on a sphere the mean of noisy points falls
            inside it, so a - b/2 there grows with the seed noise even when TL lies on the mean's direction
            (measured in docs/calibration.md); the ratio is the classical correction of a correlation for
            attenuation.

    Images with any non-finite entry (a degenerate map under some model) are left out of every term.

    Returns:
        A :class:`SystematicDrift`.

    Raises:
        ValueError: fewer than two fine-tuned models, mismatched shapes, ``ci`` outside (0, 1), an unknown form.
    """
    d_tl = np.asarray(d_tl, dtype=np.float64)
    d_ft = np.asarray(d_ft, dtype=np.float64)
    m, n = _check_shapes(d_tl, d_ft)
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    off = ~np.eye(m, dtype=bool)
    ok = np.isfinite(d_tl).all(0) & np.isfinite(d_ft[off]).all(0)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.size != n:
            raise ValueError(f"labels must have shape (N,) = ({n},), got {labels.shape}")
        labels = labels[ok]
    d_tl, d_ft = d_tl[:, ok], d_ft[:, :, ok]
    n = int(ok.sum())
    nan = math.nan
    if n == 0:
        return SystematicDrift(nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, 0, m, m >= 3, ci)
    w, strata = _weights(labels, n, min_per_class)
    est, sigma2, phi, var_mod = _parts(d_tl, d_ft, w, form)
    drift = float(w @ d_tl.mean(0))
    var_img = _stratified_var(phi, w, strata)
    df_img = max(n - len(np.unique(strata[w > 0])), 1)
    var = var_img + (var_mod if m >= 3 else 0.0)
    se = math.sqrt(var) if math.isfinite(var) else nan
    if m >= 3 and var > 0:
        den = (var_img ** 2 / df_img if var_img > 0 else 0.0) + var_mod ** 2 / (m - 1)
        df = var * var / den if den > 0 else float(df_img)
    else:
        df = float(df_img)
    if n < 2 or not math.isfinite(se) or not math.isfinite(est):
        lo = hi = p = nan
    elif se == 0:
        lo = hi = est
        p = 0.0 if est > 0 else 1.0
    else:
        q = float(scipy.stats.t.ppf(0.5 + ci / 2, df))
        lo, hi = est - q * se, est + q * se
        p = float(scipy.stats.t.sf(est / se, df))
    share = sigma2 / drift if drift > 0 else nan
    return SystematicDrift(est, lo, hi, share, sigma2, drift, p, se, math.sqrt(var_img),
                           math.sqrt(var_mod) if m >= 3 else nan, df, n, m, m >= 3, ci)


@dataclass(frozen=True)
class MacroMean:
    """A macro mean over classes of per-image values with its t interval and one-sided p-values.

    Attributes: ``estimate``, ``low``, ``high`` (level ``ci``), ``p_lower`` / ``p_higher`` (one-sided p of
    H0: mean >= 0 resp. mean <= 0), ``se``, ``df``, ``n_images``, ``ci``.
    """

    estimate: float
    low: float
    high: float
    p_lower: float
    p_higher: float
    se: float
    df: float
    n_images: int
    ci: float = 0.95

    @property
    def p_two_sided(self) -> float:
        return min(1.0, 2 * min(self.p_lower, self.p_higher))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _welch(parts: list[tuple[float, float]], df_img: float) -> tuple[float, float]:
    """(variance, df) of a sum of independent variance parts ``[(variance, df), ...]``: Welch-Satterthwaite degrees
    of freedom, which for one positive part are that part's own (returned exactly); ``df_img`` when none is
    positive."""
    var = sum(v for v, _ in parts)
    positive = [(v, d) for v, d in parts if v > 0]
    if len(positive) == 1:
        return var, float(positive[0][1])
    den = sum(v * v / d for v, d in positive)
    return var, (var * var / den if den > 0 else float(df_img))


def _t_interval(est: float, se: float, df: float, ci: float) -> tuple[float, float, float, float]:
    """(low, high, p_lower, p_higher) of est +- t_{df} se: the interval at level ``ci`` and the one-sided p-values of
    H0: mean >= 0 (``p_lower``) and H0: mean <= 0 (``p_higher``); with se = 0 the interval is the point."""
    if se == 0:
        return est, est, float(est >= 0), float(est <= 0)
    q = float(scipy.stats.t.ppf(0.5 + ci / 2, df))
    t_stat = est / se
    return est - q * se, est + q * se, float(scipy.stats.t.cdf(t_stat, df)), float(scipy.stats.t.sf(t_stat, df))


def macro_mean_test(values: ArrayLike, labels: ArrayLike | None = None, ci: float = 0.95,
                    min_per_class: int = 1) -> MacroMean:
    """Macro mean over classes (each class with at least ``min_per_class`` finite values weighs the same; a plain
    mean without labels) of per-image values, with the class-stratified variance sum_c W_c^2 s_c^2 / n_c and a t
    interval on n - (classes) degrees of freedom: the image part of :func:`systematic_drift`'s interval, for a
    paired change (FT - TL per image) whose null is 0. Non-finite values are left out. (:func:`model_mean_contrast`
    of one study with one model.)"""
    return model_mean_contrast(np.asarray(values, dtype=np.float64).reshape(1, -1), None, labels, ci,
                               min_per_class)[0]


def model_mean_contrast(a: ArrayLike, b: ArrayLike | None = None, labels: ArrayLike | None = None,
                        ci: float = 0.95, min_per_class: int = 1) -> tuple[MacroMean, bool]:
    """Difference of two studies' per-image values averaged over each study's fine-tuned models, on shared images:
    mean_r a[r, i] - mean_s b[s, i], macro-averaged over classes (``b`` None: the one study's mean against 0).

    Images and models are crossed random factors, as in :func:`systematic_drift`: the variance adds the image part
    (class-stratified variance of the per-image differences) and each study's model part (the variance over its
    models of their macro means, / M; models of one study are exchangeable seeds, the two studies' independent).
    The two overlap in the model x image interaction, so the sum errs on the wide side; the t interval takes
    Welch-Satterthwaite degrees of freedom. With one model in a study its model part cannot be estimated: the
    interval then covers image resampling only and the second return value (``models_resampled``) is False.

    Args:
        a, b: (M_a, N), (M_b, N) per-image values per fine-tuned model (a 1-D array is one model). Images with a
            non-finite value under any model are left out.
        labels, ci, min_per_class: as for :func:`macro_mean_test`.

    Returns:
        (:class:`MacroMean` of the difference, models_resampled).

    Raises:
        ValueError: ``a`` and ``b`` on different numbers of images, labels of another length, ``ci`` outside (0, 1).
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = None if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    n = a.shape[1]
    if b is not None and b.shape[1] != n:
        raise ValueError(f"a and b must hold the same images: N = {n} vs {b.shape[1]}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    lab = None if labels is None else np.asarray(labels).reshape(-1)
    if lab is not None and lab.size != n:
        raise ValueError(f"labels must have shape (N,) = ({n},), got {lab.shape}")
    studies = [a] if b is None else [a, b]
    ok = np.logical_and.reduce([np.isfinite(x).all(0) for x in studies])
    lab = None if lab is None else lab[ok]
    studies = [x[:, ok] for x in studies]
    m = int(ok.sum())
    nan = math.nan
    resampled = all(x.shape[0] >= 2 for x in studies)
    per_image = studies[0].mean(0) - (studies[1].mean(0) if len(studies) > 1 else 0.0)
    if m < 2:
        est = float(per_image.mean()) if m else nan
        return MacroMean(est, nan, nan, nan, nan, nan, nan, m, ci), resampled
    w, strata = _weights(lab, m, min_per_class)
    if not w.any():
        return MacroMean(nan, nan, nan, nan, nan, nan, nan, m, ci), resampled
    est = float(w @ per_image)
    var_img = _stratified_var(per_image, w, strata)
    df_img = max(int((w > 0).sum()) - len(np.unique(strata[w > 0])), 1)
    parts = [(var_img, df_img)]
    for x in studies:
        if x.shape[0] >= 2:
            means = x @ w
            parts.append((float(np.var(means, ddof=1)) / x.shape[0], x.shape[0] - 1))
    var, df = _welch(parts, df_img)
    se = math.sqrt(var)
    return MacroMean(est, *_t_interval(est, se, df, ci), se, df, m, ci), resampled


@dataclass(frozen=True)
class SystematicContrast:
    """Difference of two architectures' systematic drift, S_a - S_b, on their common images.

    Attributes: ``estimate``, ``low``, ``high``, ``p_lower`` / ``p_higher`` (one-sided p of S_a >= S_b resp.
    S_a <= S_b), ``se``, ``df``, ``n_images``, ``models_resampled``.
    """

    estimate: float
    low: float
    high: float
    p_lower: float
    p_higher: float
    se: float
    df: float
    n_images: int
    models_resampled: bool

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def systematic_contrast(a: tuple[ArrayLike, ArrayLike], b: tuple[ArrayLike, ArrayLike],
                        labels: ArrayLike | None = None, ci: float = 0.95, min_per_class: int = 1,
                        form: str = "euclidean") -> SystematicContrast:
    """S_a - S_b for two architectures scored on the same N images, each with its own fine-tuned replicas.

    The image part of the variance is that of the paired per-image influences (the images are shared); the model
    parts are the two architectures' delete-one-model jackknives, added (their models are independent).

    Args:
        a, b: ``(d_tl, d_ft)`` of each architecture as for :func:`systematic_drift` (same N; M may differ).
        labels, ci, min_per_class, form: as for :func:`systematic_drift`.
    """
    (ta, fa), (tb, fb) = [(np.asarray(t, np.float64), np.asarray(f, np.float64)) for t, f in (a, b)]
    _check_shapes(ta, fa, "a's d_ft")
    _check_shapes(tb, fb, "b's d_ft")
    if ta.shape[1] != tb.shape[1]:
        raise ValueError(f"a and b must be scored on the same images: N = {ta.shape[1]} vs {tb.shape[1]}")
    ok = np.ones(ta.shape[1], dtype=bool)
    for t, f in ((ta, fa), (tb, fb)):
        off = ~np.eye(t.shape[0], dtype=bool)
        ok &= np.isfinite(t).all(0) & np.isfinite(f[off]).all(0)
    lab = None if labels is None else np.asarray(labels).reshape(-1)[ok]
    ta, fa, tb, fb = ta[:, ok], fa[:, :, ok], tb[:, ok], fb[:, :, ok]
    n = int(ok.sum())
    nan = math.nan
    if n < 2:
        return SystematicContrast(nan, nan, nan, nan, nan, nan, nan, n, False)
    w, strata = _weights(lab, n, min_per_class)
    sa, _, pa, va = _parts(ta, fa, w, form)
    sb, _, pb, vb = _parts(tb, fb, w, form)
    est = sa - sb
    var_img = _stratified_var(pa - pb, w, strata)
    df_img = max(n - len(np.unique(strata[w > 0])), 1)
    parts = [(var_img, df_img)] + [(v, t.shape[0] - 1) for v, t in ((va, ta), (vb, tb)) if math.isfinite(v)]
    resampled = math.isfinite(va) and math.isfinite(vb)
    var, df = _welch(parts, df_img)
    if not (math.isfinite(est) and math.isfinite(var)):
        return SystematicContrast(nan, nan, nan, nan, nan, nan, nan, n, resampled)
    se = math.sqrt(var)
    return SystematicContrast(est, *_t_interval(est, se, df, ci), se, df, n, resampled)


@dataclass(frozen=True)
class EnergyTest:
    """The whole-chain energy statistic and its within-chain permutation test.

    Attributes: ``statistic`` (E, mean over images), ``p_value`` (permutation, including the observed labelling),
    ``n_permutations``, ``min_p`` (smallest attainable p-value), ``n_chains``, ``n_images``.
    """

    statistic: float
    p_value: float
    n_permutations: int
    min_p: float
    n_chains: int
    n_images: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def energy_statistic(d: ArrayLike, phase: ArrayLike) -> float:
    """E = 2 mean d(TL_r, FT_s) - mean_{r!=s} d(TL_r, TL_s) - mean_{r!=s} d(FT_r, FT_s) (mean over images).

    Args:
        d: (2R, 2R, N) pairwise instabilities between the 2R models (any order), symmetric, diagonal ignored.
        phase: (2R,) bool, True for the models labelled FT.
    """
    d = np.asarray(d, dtype=np.float64).mean(-1)
    ft = np.asarray(phase, dtype=bool)
    tl = ~ft
    cross = d[np.ix_(tl, ft)].mean()

    def within(mask):
        sub = d[np.ix_(mask, mask)]
        k = sub.shape[0]
        return (sub.sum() - np.trace(sub)) / (k * (k - 1)) if k > 1 else 0.0

    return float(2 * cross - within(tl) - within(ft))


def _chain_matrix(tt: np.ndarray, ff: np.ndarray, tf: np.ndarray) -> np.ndarray:
    """(2R, 2R) image-mean instabilities between the 2R models of R chains (TL_0..TL_{R-1}, FT_0..FT_{R-1})."""
    if tt.ndim != 3 or tt.shape[0] != tt.shape[1]:
        raise ValueError(f"d_tl_tl must have shape (R, R, N), got {tt.shape}")
    r = tt.shape[0]
    for name, x in (("d_ft_ft", ff), ("d_tl_ft", tf)):
        if x.shape != tt.shape:
            raise ValueError(f"{name} must have shape {tt.shape} like d_tl_tl, got {x.shape}")
    full = np.zeros((2 * r, 2 * r, tt.shape[2]))
    full[:r, :r], full[r:, r:], full[:r, r:], full[r:, :r] = tt, ff, tf, tf.transpose(1, 0, 2)
    idx = np.arange(2 * r)
    full[idx, idx] = 0.0  # a model against itself: the diagonals of d_tl_tl and d_ft_ft are not read
    off = ~np.eye(2 * r, dtype=bool)
    ok = np.isfinite(full[off]).all(0)
    if not ok.any():
        raise ValueError("no image has a finite instability for every pair of chain models")
    return full[:, :, ok].mean(-1)


def energy_test(d_tl_tl: ArrayLike, d_ft_ft: ArrayLike, d_tl_ft: ArrayLike, n_perm: int = 4096,
                seed: int = 0) -> EnergyTest:
    """Permutation test of "TL and FT maps have the same distribution over training seeds" from R whole chains.

    Args:
        d_tl_tl: (R, R, N) instabilities between the chains' TL models (diagonal ignored), or a list of such arrays
            (one per method and metric: then the statistic is sum_k E_k / mean off-diagonal instability_k, a
            scale-free sum, and one permutation is applied to every entry at once, so the test stays exact).
        d_ft_ft: (R, R, N) between their FT models (or a list, matching).
        d_tl_ft: (R, R, N), entry [r, s] = d(TL_r, FT_s) (the diagonal: each chain's own drift) (or a list).
        n_perm: permutations drawn when R > 12 (else every swap pattern is enumerated).
        seed: seed of the drawn permutations.

    Images with a non-finite entry are left out (per entry). Raises ValueError for R < 2 or mismatched shapes.
    """
    triples = list(zip(d_tl_tl, d_ft_ft, d_tl_ft, strict=True)) if isinstance(d_tl_tl, (list, tuple)) else \
        [(d_tl_tl, d_ft_ft, d_tl_ft)]
    mats = [_chain_matrix(*(np.asarray(x, dtype=np.float64) for x in t)) for t in triples]
    r = mats[0].shape[0] // 2
    if r < 2:
        raise ValueError(f"the energy test needs at least two chains, got R = {r}")
    if any(mm.shape != mats[0].shape for mm in mats):
        raise ValueError(f"every entry needs the same number of chains, got {[mm.shape[0] // 2 for mm in mats]}")
    off = ~np.eye(2 * r, dtype=bool)
    # One entry: E as is; several: each divided by its mean off-diagonal instability, so metrics of other units
    # weigh alike.
    scales = [float(mm[off].mean()) or 1.0 for mm in mats] if len(mats) > 1 else [1.0]
    if r <= 12:
        swaps = np.array(list(itertools.product((False, True), repeat=r)), dtype=bool)
    else:
        swaps = np.random.default_rng(seed).random((n_perm, r)) < 0.5
    # Labelling of every permutation at once: model k < r (TL_k) is labelled FT where chain k is swapped, model
    # r + k (FT_k) where it is not; E = 2 cross - within(TL) - within(FT) from quadratic forms of the labels.
    ft = np.concatenate([swaps, ~swaps], axis=1).astype(np.float64)  # (P, 2R); the identity is swaps == 0
    tl = 1.0 - ft
    stats_ = np.zeros(len(swaps))
    for mm, sc in zip(mats, scales, strict=True):
        cross = np.einsum("pi,ij,pj->p", tl, mm, ft) / (r * r)
        within = (np.einsum("pi,ij,pj->p", tl, mm, tl) + np.einsum("pi,ij,pj->p", ft, mm, ft)) / (r * (r - 1))
        stats_ += (2 * cross - within) / sc
    observed = float(stats_[~swaps.any(1)][0]) if r <= 12 else float(sum(
        energy_statistic(mm[..., None], np.r_[np.zeros(r, bool), np.ones(r, bool)]) / sc
        for mm, sc in zip(mats, scales, strict=True)))
    drawn = r > 12  # a drawn sample of permutations counts the observed labelling once more
    hits = int(np.sum(stats_ >= observed - 1e-12 * max(1.0, abs(observed))))
    p = (hits + drawn) / (len(stats_) + drawn)
    n_img = min(int(np.isfinite(np.asarray(t[2], dtype=np.float64)).all((0, 1)).sum()) for t in triples)
    return EnergyTest(observed, float(p), len(stats_), 2.0 / 2 ** r if not drawn else 1.0 / (n_perm + 1), r, n_img)
