"""The headline numbers of a run and its example images: computed once, by the statistics step, and stored.

:func:`compute` derives from an archive everything the study's answer quotes, and :func:`examples` picks the test
images the report shows; ``Pipeline.step_stats`` stores both under ``stats/headline`` and ``stats/examples`` (see
:mod:`drift.archive`). ``drift summary``, the report, ``drift compare`` and asv's ``track_*`` read them through
:func:`load` and only format them, so all four print the same numbers for the same archive. An archive whose
statistics step has not run (an interrupted or partial run) gets the same numbers computed on reading, by the same
function, and :func:`load` says so (``stored = False``).

The numbers:

* classification, per (architecture, phase): the stored test accuracy and macro one-vs-rest AUC, with percentile
  bootstrap intervals over test images from the stored logits (:func:`classification_intervals`);
* drift, per (architecture, method, headline metric of :func:`drift.metrics.headline_specs`) in the primary cell:
  the macro mean over classes with its within-class bootstrap interval, as the drift step stored it;
* iFIM, per (architecture, phase): the mean top-eigenvalue share and numerical rank, the areas over eps of the
  mean |confidence change| inside the high-sensitivity subspace, its complement and a random direction, and the
  confidence gap with its interval and paired Wilcoxon p-value (:func:`confidence_gap`).

The rankings and the verdict are stored results of the statistics step (``stats/ranking``, ``stats/reversal``,
``stats`` attributes; the verdict comes from :func:`drift.verdicts.judge_reversals`) and are read from there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import stats
from .archive import ArchiveReader, Cell
from .config import PHASES
from .metrics import DEFAULT_FRACTIONS, headline_specs


def _strs(a: Any) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1).tolist()]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def classification_intervals(logits: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0,
                             ci: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Test accuracy and macro one-vs-rest AUC with percentile bootstrap intervals over test images.

    Accuracy is the fraction of images whose argmax logit is the label; macro AUC is :func:`drift.stats.macro_auc`
    of the softmax probabilities. Both intervals come from one resampling, :func:`drift.stats.bootstrap` of the N
    images (seed ``seed``); resamples with fewer than two classes (no AUC) are left out of the AUC interval.

    Args:
        logits: (N, C) test logits.
        labels: (N,) int test labels.
        n_boot: Bootstrap resamples (0: no interval).
        seed: Bootstrap seed.
        ci: Interval level.

    Returns:
        {"accuracy": (value, lo, hi), "macro_auc": (value, lo, hi)} computed from the logits; NaN where undefined.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.size:
        raise ValueError(f"logits must have shape (N, C) with N = {labels.size} labels, got {logits.shape}")
    n = labels.size
    if n == 0:
        return {"accuracy": (math.nan,) * 3, "macro_auc": (math.nan,) * 3}
    probs = _softmax(logits)
    correct = (logits.argmax(1) == labels).astype(np.float64)
    rows = max(1, 4_000_000 // (n * probs.shape[1]))  # resamples scored at once: ~32 MB of probabilities

    def auc(idx: np.ndarray) -> np.ndarray:
        return np.concatenate([stats.macro_auc_rows(labels[idx[i:i + rows]], probs[idx[i:i + rows]])
                               for i in range(0, len(idx), rows)])

    out = {}
    for name, value, statistic in (("accuracy", float(correct.mean()), lambda idx: correct[idx].mean(1)),
                                   ("macro_auc", stats.macro_auc(labels, probs), auc)):
        out[name] = (value, *stats.bootstrap(statistic, n, n_boot, seed, ci))
    return out


def confidence_gap(perturbation: dict, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
                   ) -> tuple[float, float, float, int]:
    """The confidence gap: how much more the predicted-class confidence moves inside the high-sensitivity subspace.

    Per valid image i and kind (high, complement), a_i = area over eps (:func:`drift.stats.area`) of the mean over
    draws of |p_pred(x_i) - p_pred(x_i + d)|, d an equal-norm perturbation of relative size eps; the gap is
    mean_i [a_i(high) - a_i(complement)] (positive: the high-sensitivity subspace moves the prediction more), with
    the percentile bootstrap interval of that mean (:func:`drift.stats.aggregate` over one class). These are the
    pairs of the stored Wilcoxon test (``wilcoxon_pvalue``). With every image valid the gap equals the stored
    ``abs_confidence_gap_area`` (the area is linear).

    Args:
        perturbation: an archive's ``fisher/<arch>/<phase>/perturbation`` group: ``abs_conf_change`` (3, E, N, m),
            ``eps`` (E,), ``kinds`` (3,), optional ``valid`` (N,).
        n_boot, seed, ci: the bootstrap (0 resamples: no interval).

    Returns:
        (gap, lo, hi, n_valid); NaN where no valid image exists.
    """
    for key in ("abs_conf_change", "eps", "kinds"):
        if key not in perturbation:
            raise KeyError(f"perturbation group has no {key!r} (keys: {sorted(perturbation)})")
    kinds = _strs(perturbation["kinds"])
    if "high" not in kinds or "complement" not in kinds:
        raise ValueError(f"perturbation kinds must include 'high' and 'complement', got {kinds}")
    v = np.asarray(perturbation["abs_conf_change"], dtype=np.float64)
    eps = np.asarray(perturbation["eps"], dtype=np.float64).reshape(-1)
    if v.ndim != 4 or v.shape[0] != len(kinds) or v.shape[1] != eps.size:
        raise ValueError(f"abs_conf_change must have shape ({len(kinds)}, {eps.size}, N, m), got {v.shape}")
    valid = np.asarray(perturbation.get("valid", np.ones(v.shape[2], bool)), dtype=bool).reshape(-1)
    area = stats.area(v.mean(-1).transpose(0, 2, 1), eps)  # (3, N)
    d = area[kinds.index("high")] - area[kinds.index("complement")]
    d = d[valid & np.isfinite(d)]
    if d.size == 0:
        return math.nan, math.nan, math.nan, 0
    agg = stats.aggregate(d, np.zeros(d.size, dtype=np.int64), 1, n_boot, seed, ci)
    return agg.mean, agg.lo, agg.hi, int(d.size)


def _settings(reader: ArchiveReader) -> tuple[int, int, tuple[float, ...]]:
    """(n_boot, seed, fractions) of the archive's run (defaults when its config cannot be read)."""
    try:
        cfg = reader.config
        n_boot, fractions = int(cfg.metrics.n_boot), tuple(cfg.metrics.fractions)
    except Exception:  # a config from another version: the archive's numbers stay readable
        n_boot, fractions = 1000, DEFAULT_FRACTIONS
    try:
        seed = int(reader.attrs.get("seed", 0))
    except (TypeError, ValueError):
        seed = 0
    return n_boot, seed, fractions


def _average(reader: ArchiveReader) -> str:
    """``metrics.average`` of the archive's run: ``macro`` (mean of the class means) or ``micro`` (mean over
    images); ``macro`` when its config cannot be read or predates the setting."""
    try:
        return str(reader.config.metrics.average)
    except Exception:  # a config from another version
        return "macro"


def _headline_mean(summ: dict, average: str) -> dict:
    """The headline entry of one stored aggregate: mean, lo, hi of the ``average`` (the micro ones, ``micro``,
    ``micro_lo``, ``micro_hi``, under ``micro``), n_per_class and class_used."""
    keys = {"mean": "micro", "lo": "micro_lo", "hi": "micro_hi"} if average == "micro" else {}
    out = {k: summ[keys.get(k, k)] for k in ("mean", "lo", "hi") if keys.get(k, k) in summ}
    out.update({k: summ[k] for k in ("n_per_class", "class_used") if k in summ})
    return out


def _archs(reader: ArchiveReader) -> list[str]:
    out = list(reader.archs())
    for group in ("drift", "fisher"):
        out += [a for a in reader.keys(group) if a not in out]
    return out


def compute(reader: ArchiveReader, n_boot: int | None = None, seed: int | None = None) -> dict:
    """The headline numbers of an archive, as the tree stored under ``stats/headline`` (see module docstring).

    Args:
        reader: the archive.
        n_boot, seed: the bootstrap of the classification and gap intervals (default: the run's ``metrics.n_boot``
            and seed).

    Returns:
        ``{"classification": {arch: {phase: {...}}}, "drift": {arch: {method: {metric: {...}}}}, "fisher": {arch:
        {phase: {...}}}, "n_boot", "seed", "cell", "metrics"}``; groups of phases not run are absent.
    """
    cfg_boot, cfg_seed, fractions = _settings(reader)
    n_boot = cfg_boot if n_boot is None else int(n_boot)
    seed = cfg_seed if seed is None else int(seed)
    cell = reader.primary_cell()
    metrics = [s.key for s in headline_specs(fractions)]
    average = _average(reader)
    out: dict = {"classification": {}, "drift": {}, "fisher": {}, "n_boot": n_boot, "seed": seed,
                 "cell": cell.key, "metrics": json.dumps(metrics), "average": average}
    for arch in _archs(reader):
        for phase in PHASES:
            if reader.has(f"models/{arch}/{phase}/test"):
                out["classification"].setdefault(arch, {})[phase] = _classification(reader, arch, phase, n_boot,
                                                                                    seed)
            if reader.has(f"fisher/{arch}/{phase}"):
                out["fisher"].setdefault(arch, {})[phase] = _fisher(reader.fisher(arch, phase), n_boot, seed)
        if reader.has(cell.drift_path(arch)):
            for method in reader.methods(arch, cell):
                summ = reader.drift_summary(arch, method, cell) if reader.has(
                    f"{cell.drift_path(arch)}/{method}/summary") else {}
                got = {m: _headline_mean(summ[m], average) for m in metrics if isinstance(summ.get(m), dict)}
                if got:
                    out["drift"].setdefault(arch, {})[method] = got
    return out


def _classification(reader: ArchiveReader, arch: str, phase: str, n_boot: int, seed: int) -> dict:
    g = reader.read(f"models/{arch}/{phase}")
    ev = g["test"]
    entry = {"accuracy": float(ev.get("accuracy", math.nan)), "macro_auc": float(ev.get("macro_auc", math.nan)),
             "best_epoch": int(g.get("best_epoch", -1)) + 1, "seconds": float(g.get("seconds", math.nan))}
    try:
        cis = classification_intervals(ev["logits"], ev["labels"], n_boot, seed)
    except (KeyError, ValueError):  # no (usable) logits stored: no interval
        cis = {}
    for m in ("accuracy", "macro_auc"):
        entry[f"{m}_lo"], entry[f"{m}_hi"] = cis.get(m, (math.nan,) * 3)[1:]
    return entry


def _fisher(f: dict, n_boot: int, seed: int) -> dict:
    share = np.asarray(f.get("eigen_share", np.zeros((0, 1))), dtype=np.float64)
    rank = np.asarray(f.get("rank", []), dtype=np.float64)
    summ = f.get("summary", {})
    area = np.asarray(summ.get("area_abs_conf_change", [math.nan] * 3), dtype=np.float64).reshape(-1)
    area = np.pad(area, (0, max(0, 3 - area.size)), constant_values=np.nan)
    gap = (math.nan, math.nan, math.nan, 0)
    if f.get("perturbation"):
        try:
            gap = confidence_gap(f["perturbation"], n_boot, seed)
        except (KeyError, ValueError):
            pass
    finite = share[:, 0][np.isfinite(share[:, 0])] if share.size else np.zeros(0)
    return {"n_spectra": int(share.shape[0]), "top_share": float(finite.mean()) if finite.size else math.nan,
            "mean_rank": float(rank.mean()) if rank.size else math.nan, "area_high": float(area[0]),
            "area_complement": float(area[1]), "area_random": float(area[2]), "gap": gap[0], "gap_lo": gap[1],
            "gap_hi": gap[2], "n_perturbed": gap[3],
            "wilcoxon_p": float(summ.get("wilcoxon_pvalue", math.nan)),
            "kl_ratio": float(summ.get("kl_ratio_small_eps", math.nan))}


def load(reader: ArchiveReader) -> dict:
    """The archive's headline numbers: those stored by the statistics step, or (before it ran) the same computed
    now; ``"stored"`` tells which, ``"ranking"`` adds the primary cell's stored rankings and ``"stats"`` the
    statistics step's attributes (ranking sample, verdict)."""
    stored = reader.has("stats/headline")
    out = reader.read("stats/headline") if stored else compute(reader)
    for key in ("classification", "drift", "fisher"):
        out.setdefault(key, {})
    for key in ("classification", "fisher"):  # phases in training order (HDF5 lists groups by name)
        out[key] = {arch: {st: by_phase[st] for st in PHASES if st in by_phase} for arch, by_phase in out[key].items()}
    out["stored"] = stored
    out["ranking"] = reader.ranking(Cell.parse(out["cell"])) if "cell" in out else {}
    out["stats"] = reader.stats_attrs()
    return out


# ---------------------------------------------------------------------------------------------- examples
def pick_examples(labels: np.ndarray, usable: np.ndarray, n: int) -> list[int]:
    """Indices of up to ``n`` example images spread over classes.

    Round robin over the classes in label order: the first usable image of each class, then the second, ...

    Args:
        labels: (N,) int class indices.
        usable: (N,) bool, images that may be shown.
        n: Number wanted (>= 0).

    Returns:
        Up to ``n`` indices, ordered by round then class.
    """
    labels = np.asarray(labels).reshape(-1)
    usable = np.asarray(usable, dtype=bool).reshape(-1)
    if labels.shape != usable.shape:
        raise ValueError(f"labels {labels.shape} and usable {usable.shape} must have the same shape (N,)")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    queues = [list(np.flatnonzero(usable & (labels == c))) for c in np.unique(labels)]
    out: list[int] = []
    depth = 0
    while len(out) < n and any(len(q) > depth for q in queues):
        for q in queues:
            if len(q) > depth and len(out) < n:
                out.append(int(q[depth]))
        depth += 1
    return out


def examples(reader: ArchiveReader, images: Callable[[np.ndarray], np.ndarray], n: int) -> dict:
    """The example images of each architecture, as stored under ``stats/examples``.

    Examples are the selected images whose maps every method scored (primary cell), ``n`` per architecture spread
    over classes (:func:`pick_examples`); the first test images when there is none.

    Args:
        reader: the archive (data and drift steps committed).
        images: test image indices (k,) -> images (k, H, W) or (k, 1, H, W) in [0, 1].
        n: images per architecture.

    Returns:
        ``{arch: {"index" (k,), "ids" (k,), "images" (k, H, W) float16}}``.
    """
    if n <= 0 or not reader.has("data/test/labels"):
        return {}
    labels = np.asarray(reader.read("data/test/labels"))
    ids = np.asarray(_strs(reader.read("data/test/ids"))) if reader.has("data/test/ids") else np.arange(labels.size)
    out = {}
    for arch in reader.archs():
        usable = np.ones(labels.size, dtype=bool)
        cell = reader.primary_cell()
        for method in reader.methods(arch, cell) if reader.has(cell.drift_path(arch)) else []:
            ps = reader.drift(arch, method, cell)
            for flag in ("selected", "valid"):
                if flag in ps:
                    usable &= np.asarray(ps[flag], dtype=bool)
        if not usable.any():
            usable[:] = True
        idx = np.asarray(pick_examples(labels, usable, n), dtype=np.int64)
        img = np.asarray(images(idx), dtype=np.float32)
        img = img[:, 0] if img.ndim == 4 else img
        out[arch] = {"index": idx, "ids": ids[idx], "images": img.astype(np.float16)}
    return out
