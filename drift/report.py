"""The run report (``drift report``) and the comparison of two runs (``drift compare``).

:func:`write_report` reads an archive through :class:`drift.archive.ArchiveReader` and writes one document in two
renderings from the same content, so both carry the same numbers: ``report.html`` (self-contained, figures
embedded as base64 PNG) and ``report.md`` (figures as PNG files under ``figures/``). Sections follow the study:
configuration and provenance, classification, drift metrics with bootstrap intervals, degenerate maps, the
rank-reversal statistics, example maps, and the iFIM analysis. Metric names, methods and perturbation arrays are
discovered from the archive; a section whose stage has not run says so instead of failing.

:func:`compare` puts the headline numbers of two archives of the same test set side by side with their
differences, and flags the differences whose 95% intervals do not overlap.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .archive import ArchiveReader, Cell
from .summary import HEADLINE, fmt, table

__all__ = [
    "Figure",
    "Section",
    "Table",
    "Text",
    "build_report",
    "classification_intervals",
    "compare",
    "compare_tables",
    "fisher_gap",
    "fmt",
    "headline",
    "missing_stages",
    "pick_examples",
    "regenerate_images",
    "render_html",
    "render_markdown",
    "write_report",
]

STAGES = ("transfer", "finetune")
STAGE_SHORT = {"transfer": "TL", "finetune": "FT"}
DEGENERATE_CODES = {1: "non-finite", 2: "all zero", 3: "constant"}
HEADLINE_LABELS = dict(HEADLINE)
SHIFT_UNIT = "fraction of image diagonal"


# ============================================================================================ formatting
# fmt (imported above from drift.summary) is the formatting rule of both the summary and the report: nd decimals,
# or nd significant digits in scientific notation when 0 < |x| < 10^-nd; "yes"/"no", "-", "nan", "inf".


def _interval(mean: Any, lo: Any, hi: Any) -> str:
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def _yes_no(v: Any) -> str:
    if v is None or (isinstance(v, str) and v in ("", "-")):
        return "-"
    if isinstance(v, str):
        return "yes" if v.lower() in ("true", "1", "yes") else "no"
    return "yes" if bool(v) else "no"


def metric_label(metric: str) -> str:
    """Human name of a drift metric key (``iou@20`` -> ``IoU@20%``); unknown keys are returned unchanged."""
    if metric in HEADLINE_LABELS:
        return HEADLINE_LABELS[metric]
    m = re.fullmatch(r"iou@(\d+(?:\.\d+)?)", metric)
    if m:
        return f"IoU@{m.group(1)}%"
    return metric.replace("_", " ")


def metric_unit(metric: str) -> str:
    """Axis label with the unit of a per-sample drift metric."""
    if metric.startswith("iou@"):
        return "IoU of top-k% regions (fraction)"
    if metric in ("centroid_shift", "peak_shift"):
        return f"displacement ({SHIFT_UNIT})"
    if metric in ("pearson", "spearman"):
        return "correlation coefficient"
    if metric.endswith("_change"):
        return f"{metric[:-7].replace('_', ' ')}: FT - TL"
    return metric.replace("_", " ")


def _iou_k(metric: str) -> float | None:
    m = re.fullmatch(r"iou@(\d+(?:\.\d+)?)", metric)
    return float(m.group(1)) if m else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "x"


def _json_list(v: Any) -> list:
    if isinstance(v, str):
        try:
            out = json.loads(v)
        except json.JSONDecodeError:
            return [v]
        return out if isinstance(out, list) else [out]
    if isinstance(v, np.ndarray):
        return [str(x) for x in v.reshape(-1)]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _strs(a: Any) -> list[str]:
    arr = np.asarray(a).reshape(-1)
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.tolist()]


# ============================================================================================ document model
@dataclass
class Table:
    """A table of the report: ``header`` (M,) and ``rows`` (R, M) of text cells; ``id`` is the HTML anchor."""

    id: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    collapsed: bool = False


@dataclass
class Figure:
    """A figure of the report: PNG bytes, written to ``figures/<id>.png`` and embedded in the HTML."""

    id: str
    caption: str
    png: bytes


@dataclass
class Text:
    """A paragraph (``kind="p"``), a highlighted note on something missing (``"note"``), preformatted text
    (``"pre"``, folded in the HTML when ``collapsed``) or a sub-heading (``"h3"``)."""

    text: str
    kind: str = "p"
    collapsed: bool = False


@dataclass
class Section:
    """A titled section holding tables, figures, texts and sub-headings (``Text(kind="h3")``)."""

    id: str
    title: str
    blocks: list[Table | Figure | Text] = field(default_factory=list)


# ============================================================================================ archive helpers
@dataclass
class _Run:
    """What every section needs from one archive, read once."""

    reader: ArchiveReader
    cfg: Any
    cfg_error: str
    class_names: list[str]
    archs: list[str]
    methods: list[str]
    done: list[str]
    cell: Cell

    @classmethod
    def open(cls, path: str | os.PathLike) -> _Run:
        r = ArchiveReader(path)
        cfg, err = None, ""
        try:
            cfg = r.config
        except Exception as exc:  # a config from another version still leaves the archive's numbers readable
            err = f"{type(exc).__name__}: {exc}"
        classes = r.class_names if r.has("data") else []
        archs = list(cfg.run.archs) if cfg is not None else []
        for group in ("models", "attributions", "drift", "fisher"):
            for a in r.keys(group):
                if a not in archs:
                    archs.append(a)
        methods = list(cfg.attribution.methods) if cfg is not None else []
        cell = r.primary_cell()
        for a in archs:
            for m in r.keys(cell.drift_path(a)) + [k for s in STAGES
                                                   for k in r.keys(f"attributions/{a}/{cell.layer}/{cell.score}/{s}")]:
                if m not in methods:
                    methods.append(m)
        return cls(r, cfg, err, classes, archs, methods, [s["name"] for s in r.stages], cell)

    def has(self, path: str) -> bool:
        return self.reader.has(path)

    def class_name(self, k: int) -> str:
        return self.class_names[k] if 0 <= k < len(self.class_names) else str(k)


def missing_stages(archive: str | os.PathLike | ArchiveReader) -> list[str]:
    """Stages the archive's config asks for that have not been committed, in pipeline order.

    Expected: ``data``; per architecture ``models/<arch>/transfer``, ``models/<arch>/finetune``,
    ``attributions/<arch>``, ``drift/<arch>``, ``fisher/<arch>`` (when ``fisher.enabled``); then ``stats``.
    """
    r = archive if isinstance(archive, ArchiveReader) else ArchiveReader(_check_path(archive, "archive"))
    done = {s["name"] for s in r.stages}
    try:
        cfg = r.config
    except Exception:  # without a readable config only the committed stages are known
        return []
    expected = ["data"]
    for a in cfg.run.archs:
        expected += [f"models/{a}/transfer", f"models/{a}/finetune", f"attributions/{a}", f"drift/{a}"]
        if cfg.fisher.enabled:
            expected.append(f"fisher/{a}")
    expected.append("stats")
    return [s for s in expected if s not in done]


def _check_path(p: Any, name: str) -> Path:
    if not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(p).__name__}")
    return Path(p)


def pick_examples(labels: np.ndarray, usable: np.ndarray, n: int) -> list[int]:
    """Indices of up to ``n`` example samples spread over classes.

    Round robin over the classes in label order: the first usable sample of each class, then the second, ...

    Args:
        labels: (N,) int class indices.
        usable: (N,) bool, samples that may be shown.
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


def fisher_gap(perturbation: dict, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[float, float,
                                                                                                    float, int]:
    """iFIM gap: how much more the predicted-class confidence moves inside the high-sensitivity subspace.

    Per valid sample i, a_i(kind) = integral over eps of mean_draws |p_pred(x_i) - p_pred(x_i + d)| (trapezoid;
    the single value when there is one eps), and gap = mean_i [a_i(high) - a_i(complement)]. The interval is the
    seeded percentile bootstrap of that mean over samples (``n_boot`` resamples, ``numpy.random.default_rng(seed)``).
    With every sample valid this equals the archive's ``abs_confidence_gap_area`` (the trapezoid is linear).

    Args:
        perturbation: the archive's ``fisher/<arch>/<stage>/perturbation`` group: ``abs_conf_change`` (3, E, N, m),
            ``eps`` (E,), ``kinds`` (3,), optional ``valid`` (N,).
        n_boot: Bootstrap resamples (0: no interval).
        seed: Bootstrap seed.
        ci: Interval level.

    Returns:
        (gap, lo, hi, n_valid); NaN where no valid sample exists.
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
    per = v.mean(-1)  # (3, E, N)
    area = per[:, 0] if eps.size == 1 else np.trapezoid(per, eps, axis=1)  # (3, N)
    d = area[kinds.index("high")] - area[kinds.index("complement")]
    d = d[valid & np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(d.mean())
    if n_boot <= 0:
        return mean, float("nan"), float("nan"), int(d.size)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    q = (1 - ci) / 2
    lo, hi = np.quantile(boot, [q, 1 - q])
    return mean, float(lo), float(hi), int(d.size)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _macro_auc_rows(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest ROC AUC of every row of ``probs`` (B, N, C) against ``labels`` (B, N).

    Per row it equals :func:`drift.train.macro_auc`: the mean over the classes present in that row's labels of the
    Mann-Whitney AUC (ties count one half, as in ``sklearn.metrics.roc_auc_score``); NaN for a row with fewer
    than two classes present.
    """
    import scipy.stats

    B, N, C = probs.shape
    aucs = np.full((B, C), np.nan)
    for c in range(C):
        pos = labels == c
        n_pos = pos.sum(1)
        n_neg = N - n_pos
        ranks = scipy.stats.rankdata(probs[:, :, c], axis=1)  # average ranks of tied scores
        u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
        ok = (n_pos > 0) & (n_neg > 0)
        aucs[ok, c] = u[ok] / (n_pos[ok] * n_neg[ok])
    present = np.stack([(labels == c).any(1) for c in range(C)], 1)  # (B, C)
    n_present = present.sum(1)
    out = np.full(B, np.nan)
    ok = n_present >= 2
    out[ok] = np.nansum(np.where(present, aucs, 0.0), 1)[ok] / n_present[ok]
    return out


def classification_intervals(logits: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0,
                             ci: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Test accuracy and macro one-vs-rest AUC with seeded percentile bootstrap intervals over test samples.

    Accuracy is the fraction of samples whose argmax logit is the label; macro AUC is :func:`drift.train.macro_auc`
    of the softmax probabilities. Each of the ``n_boot`` resamples draws N sample indices with replacement
    (``numpy.random.default_rng(seed).integers(0, N, size=(n_boot, N))``, the same protocol as
    :func:`fisher_gap`); the interval is the (1 - ci)/2 and (1 + ci)/2 quantiles of the resampled statistic
    (resamples with fewer than two classes, whose AUC is undefined, are left out of the AUC quantiles).

    Args:
        logits: (N, C) test logits.
        labels: (N,) int test labels.
        n_boot: Bootstrap resamples (0: no interval).
        seed: Bootstrap seed.
        ci: Interval level.

    Returns:
        {"accuracy": (value, lo, hi), "macro_auc": (value, lo, hi)}; NaN where undefined (no samples, no interval).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.size:
        raise ValueError(f"logits must have shape (N, C) with N = {labels.size} labels, got {logits.shape}")
    nan3 = (float("nan"),) * 3
    n = labels.size
    if n == 0:
        return {"accuracy": nan3, "macro_auc": nan3}
    probs = _softmax(logits)
    correct = logits.argmax(1) == labels
    acc = float(correct.mean())
    auc = float(_macro_auc_rows(probs[None], labels[None])[0])
    if n_boot <= 0:
        return {"accuracy": (acc, *nan3[:2]), "macro_auc": (auc, *nan3[:2])}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot_acc = correct[idx].mean(1)
    chunk = max(1, 4_000_000 // (n * probs.shape[1]))  # resamples per step: about 32 MB of resampled probabilities
    boot_auc = np.concatenate([_macro_auc_rows(probs[idx[i:i + chunk]], labels[idx[i:i + chunk]])
                               for i in range(0, n_boot, chunk)])
    q = [(1 - ci) / 2, (1 + ci) / 2]
    a_lo, a_hi = np.quantile(boot_acc, q)
    finite = boot_auc[np.isfinite(boot_auc)]
    u_lo, u_hi = np.quantile(finite, q) if finite.size else (np.nan, np.nan)
    return {"accuracy": (acc, float(a_lo), float(a_hi)), "macro_auc": (auc, float(u_lo), float(u_hi))}


def _n_boot(run: _Run) -> int:
    return int(run.cfg.metrics.n_boot) if run.cfg is not None else 1000


def _seed(run: _Run) -> int:
    try:
        return int(run.reader.attrs.get("seed", 0))
    except (TypeError, ValueError):
        return 0


# ============================================================================================ sections
def _overview(run: _Run, path: Path) -> Section:
    s = Section("overview", "Overview")
    r = run.reader
    s.blocks.append(Text(f"Archive {path} (schema {r.attrs.get('schema_version', '?')}, created "
                         f"{r.attrs.get('created', '?')}). Architectures: {', '.join(run.archs) or 'none'}; "
                         f"attribution methods: {', '.join(run.methods) or 'none'}; classes: "
                         f"{', '.join(run.class_names) or 'unknown'}."))
    missing = missing_stages(r)
    if run.cfg is None:
        s.blocks.append(Text(f"The stored configuration could not be read ({run.cfg_error}); sections rely on the "
                             "archive alone and cannot tell which stages are missing.", "note"))
    if missing:
        s.blocks.append(Text(f"This run is incomplete: {len(run.done)} stage(s) finished, {len(missing)} missing: "
                             f"{', '.join(missing)}. Sections that depend on them say so below.", "note"))
    else:
        s.blocks.append(Text(f"All {len(run.done)} stages of the run are finished."))
    return s


def _configuration(run: _Run) -> Section:
    s = Section("configuration", "Configuration")
    text = run.reader.config_text.strip()
    s.blocks.append(Text("The full run configuration (TOML) as stored in the archive: saved to a file and passed to "
                         "drift run --config, it reproduces the run."))
    s.blocks.append(Text(text, "pre", collapsed=True) if text else Text("The archive stores no configuration.",
                                                                          "note"))
    return s


def _provenance(run: _Run) -> Section:
    s = Section("provenance", "Provenance")
    a = run.reader.attrs
    rows = [[k, str(a.get(k, "-"))] for k in ("seed", "data_seed", "git_commit", "device", "created", "science_hash",
                                              "schema_version")]
    versions = a.get("versions")
    if isinstance(versions, str):
        try:
            versions = json.loads(versions)
        except json.JSONDecodeError:
            versions = {"versions": versions}
    for k, v in (versions or {}).items():
        rows.append([f"version: {k}", str(v)])
    s.blocks.append(Table("tbl-provenance", "Provenance of the run", ["item", "value"], rows))
    stages = run.reader.stages
    if stages:
        rows = [[st.get("name", "?"), fmt(st.get("seconds")), str(st.get("finished", "-"))] for st in stages]
        rows.append(["total", fmt(sum(float(st.get("seconds", 0) or 0) for st in stages)), ""])
        s.blocks.append(Table("tbl-stages", "Committed stages, in order, with the seconds recorded for each and when "
                              "it finished (training time per stage is in the classification table)",
                              ["stage", "seconds", "finished"], rows))
    else:
        s.blocks.append(Text("No stage has been committed to this archive yet.", "note"))
    return s


def _data(run: _Run) -> Section:
    s = Section("data", "Data")
    if not run.has("data"):
        s.blocks.append(Text("No data stage in this archive: the test set is unknown.", "note"))
        return s
    d = run.reader.read("data")
    counts = d.get("counts", {})
    splits = [k for k in ("train", "val", "test") if k in counts]
    rows = []
    for c, name in enumerate(run.class_names):
        rows.append([name] + [str(int(np.asarray(counts[k])[c])) if c < len(np.asarray(counts[k])) else "-"
                              for k in splits])
    rows.append(["total"] + [str(int(np.asarray(counts[k]).sum())) for k in splits])
    if splits:
        s.blocks.append(Table("tbl-data", "Images per class and split", ["class", *splits], rows))
    else:
        n = len(np.asarray(d.get("test", {}).get("labels", [])))
        s.blocks.append(Text(f"The archive stores no class counts per split; the test set has {n} images.", "note"))
    if run.cfg is not None:
        dc = run.cfg.data
        src = f"synthetic task (seed {run.cfg.data_seed}, difficulty {dc.difficulty}, confounder {dc.confounder})" \
            if dc.source == "synthetic" else f"{dc.source} {dc.path}"
        s.blocks.append(Text(f"Source: {src}; images {dc.image_size} x {dc.image_size} px. Lung and lesion masks: "
                             f"{'yes' if 'lung_masks' in d.get('test', {}) else 'no'}."))
    skipped = d.get("skipped", {})
    files = _strs(skipped.get("files", [])) if "files" in skipped else []
    reasons = _strs(skipped.get("reasons", [])) if "reasons" in skipped else []
    if files:
        rows = [[f, r] for f, r in zip(files[:50], reasons[:50])]
        s.blocks.append(Table("tbl-skipped", f"Input files skipped as unreadable ({len(files)}; first 50 listed)",
                              ["file", "reason"], rows))
    return s


def _classification(run: _Run) -> tuple[Section, dict]:
    s = Section("classification", "Classification")
    rows, f1_rows, conf_tables, histories = [], [], [], {}
    for arch in run.archs:
        for stage in STAGES:
            if not run.has(f"models/{arch}/{stage}/test"):
                continue
            g = run.reader.read(f"models/{arch}/{stage}")
            ev = g["test"]
            rows.append([arch, stage, fmt(ev.get("accuracy")), fmt(ev.get("macro_auc")),
                         str(int(g.get("best_epoch", -1)) + 1) if "best_epoch" in g else "-",
                         fmt(g.get("best_val_auc")), _yes_no(g.get("bn_frozen")), str(g.get("weights", "-")),
                         fmt(g.get("seconds"), 1)])
            f1 = np.asarray(ev.get("f1", []), dtype=np.float64).reshape(-1)
            f1_rows.append([arch, stage, *[fmt(v) for v in f1]])
            if "confusion" in ev:
                cm = np.asarray(ev["confusion"])
                crows = [[run.class_name(i), *[str(int(v)) for v in cm[i]]] for i in range(cm.shape[0])]
                conf_tables.append(Table(f"tbl-confusion-{_slug(arch)}-{stage}",
                                         f"Confusion matrix, {arch} {stage} (rows: true class, columns: predicted)",
                                         ["true \\ predicted", *[run.class_name(j) for j in range(cm.shape[1])]],
                                         crows))
            if "history" in g:
                histories.setdefault(arch, {})[stage] = g["history"]
    if not rows:
        s.blocks.append(Text("No trained checkpoint in this archive (stages models/<arch>/transfer and "
                             "models/<arch>/finetune missing): no classification results.", "note"))
        return s, histories
    s.blocks.append(Table("tbl-classification", "Test-set accuracy and macro one-vs-rest AUC per architecture and "
                          "stage (transfer = stage 1, frozen backbone; finetune = stage 2, all layers)",
                          ["architecture", "stage", "accuracy", "macro AUC", "best epoch", "best val AUC",
                           "BN frozen", "initial weights", "train s"], rows))
    n_cls = max(len(r) - 2 for r in f1_rows)
    s.blocks.append(Table("tbl-f1", "Per-class F1 on the test set",
                          ["architecture", "stage", *[run.class_name(c) for c in range(n_cls)]], f1_rows))
    for arch in run.archs:
        for stage in STAGES:
            if not run.has(f"models/{arch}/{stage}/test"):
                s.blocks.append(Text(f"{arch} {stage}: stage not finished, no results.", "note"))
    s.blocks.extend(conf_tables)
    return s, histories


def _drift(run: _Run) -> tuple[Section, Section, dict]:
    s = Section("drift", "Drift of attribution maps, TL -> FT")
    deg = Section("degenerate", "Degenerate maps")
    per_sample: dict[tuple[str, str], dict] = {}
    present = [a for a in run.archs if run.has(f"drift/{a}")]
    for a in run.archs:
        if a not in present:
            s.blocks.append(Text(f"{a}: no drift metrics (stage drift/{a} not finished).", "note"))
    if not present:
        deg.blocks.append(Text("No drift stage in this archive: degenerate maps were not counted.", "note"))
        return s, deg, per_sample
    summaries: dict[tuple[str, str], dict] = {}
    info = []
    deg_rows = []
    for arch in present:
        attrs = {k: v for k, v in run.reader.read(f"drift/{arch}").items() if not isinstance(v, dict)}
        info.append(f"{arch}: sample set '{attrs.get('sample_set', '?')}', {attrs.get('n_selected', '?')} "
                    "samples selected")
        for method in run.reader.methods(arch):
            g = run.reader.read(f"{run.cell.drift_path(arch)}/{method}")
            summaries[(arch, method)] = g.get("summary", {})
            per_sample[(arch, method)] = g.get("per_sample", {})
            codes = g.get("degenerate", {})
            for stage in STAGES:
                if stage not in codes:
                    continue
                c = np.asarray(codes[stage]).reshape(-1)
                counts = [int((c == k).sum()) for k in DEGENERATE_CODES]
                deg_rows.append([arch, method, stage, *map(str, counts), str(int((c != 0).sum())), str(c.size)])
    s.blocks.append(Text(f"Per-sample metrics compare the stage-1 (TL) map with the stage-2 (FT) map of the same image "
                         f"and target class at CAM layer '{run.cell.layer}' (score: {run.cell.score}), upsampled "
                         f"bilinearly to the input size and normalised '{run.cell.norm}' (the primary cell of the "
                         "protocol grid; the other cells are in the ranking section). Values are macro means over "
                         "classes of per-class means, with seeded within-class bootstrap 95% intervals; classes with "
                         "fewer images than metrics.min_per_class are left out of the mean. "
                         + "; ".join(info) + "."))
    metrics_all: list[str] = []
    for summ in summaries.values():
        for m in summ:
            if m != "paired" and isinstance(summ[m], dict) and "mean" in summ[m] and m not in metrics_all:
                metrics_all.append(m)
    head = [m for m, _ in HEADLINE if m in metrics_all]
    rows = []
    for (arch, method), summ in summaries.items():
        n = summ.get(head[0], {}).get("n_per_class") if head else None
        n_txt = str(int(np.sum(n))) if n is not None else "-"
        rows.append([arch, method, n_txt, *[_interval(summ[m].get("mean"), summ[m].get("lo"), summ[m].get("hi"))
                                           if m in summ else "-" for m in head]])
    s.blocks.append(Table("tbl-drift-headline", "Headline drift metrics: mean [95% interval] (n = samples scored "
                          "for the first metric)", ["architecture", "method", "n", *[metric_label(m) for m in head]],
                          rows))
    rows = []
    for (arch, method), summ in summaries.items():
        for m in metrics_all:
            if m not in summ:
                continue
            v = summ[m]
            rows.append([arch, method, m, fmt(v.get("mean")), fmt(v.get("lo")), fmt(v.get("hi")),
                         str(int(np.sum(v.get("n_per_class", 0)))), str(v.get("n_excluded", "-"))])
    s.blocks.append(Table("tbl-drift", "Every drift metric: macro mean and 95% bootstrap interval (n used, n excluded "
                          "as non-finite)", ["architecture", "method", "metric", "mean", "95% lo", "95% hi", "n used",
                                             "n excluded"], rows, collapsed=len(rows) > 40))
    n_cls = len(run.class_names)
    rows = []
    for (arch, method), summ in summaries.items():
        for m in head + [m for m in metrics_all if m not in head]:
            if m in summ and "per_class" in summ[m]:
                pc = np.asarray(summ[m]["per_class"], dtype=np.float64).reshape(-1)
                rows.append([arch, method, m, *[fmt(x) for x in pc]])
                n_cls = max(n_cls, pc.size)
    s.blocks.append(Table("tbl-drift-per-class", "Per-class means of every drift metric (nan: no scored sample of "
                          "that class)", ["architecture", "method", "metric",
                                          *[run.class_name(c) for c in range(n_cls)]], rows,
                          collapsed=len(rows) > 40))
    rows = []
    for (arch, method), summ in summaries.items():
        for q, t in summ.get("paired", {}).items():
            if isinstance(t, dict):
                rows.append([arch, method, q, fmt(t.get("median_diff")), fmt(t.get("statistic"), 1),
                             fmt(t.get("pvalue"), 4), str(t.get("n", "-")), str(t.get("n_excluded", "-"))])
    if rows:
        s.blocks.append(Table("tbl-paired", "Paired tests between stages of map concentration and localisation "
                              "(Wilcoxon signed-rank, FT vs TL on the same samples)",
                              ["architecture", "method", "quantity", "median FT - TL", "statistic", "p", "n",
                               "n excluded"], rows))
    deg.blocks.append(Text("Maps that cannot be scored are counted and excluded, never scored: code 1 non-finite "
                           "values, 2 all zero, 3 constant."))
    if deg_rows:
        deg.blocks.append(Table("tbl-degenerate", "Degenerate maps per architecture, method and checkpoint",
                                ["architecture", "method", "stage", *DEGENERATE_CODES.values(), "degenerate",
                                 "of N"], deg_rows))
    else:
        deg.blocks.append(Text("The drift groups hold no degenerate-map codes.", "note"))
    return s, deg, per_sample


def _drift_figures(run: _Run, per_sample: dict, section: Section) -> None:
    if not per_sample:
        return
    archs = list(dict.fromkeys(a for a, _ in per_sample))
    methods = list(dict.fromkeys(m for _, m in per_sample))
    from . import figures

    keys: list[str] = []
    for ps in per_sample.values():
        for k in ps:
            if (_iou_k(k) is not None or k == "centroid_shift") and k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (_iou_k(k) is None, _iou_k(k) or 0.0))
    values: dict[str, dict] = {k: {} for k in keys}
    for (arch, method), ps in per_sample.items():
        use = np.ones(len(np.asarray(ps.get("labels", []))), dtype=bool)
        for flag in ("selected", "valid"):
            if flag in ps:
                use &= np.asarray(ps[flag], dtype=bool)
        for k in keys:
            if k in ps:
                values[k][(arch, method)] = np.asarray(ps[k], dtype=np.float64)[use]
    if keys:
        fig = figures.metric_distributions(values, archs, methods, {k: metric_unit(k) for k in keys},
                                           {k: metric_label(k) for k in keys})
        section.blocks.append(_figure("fig-distributions", "Distributions over the selected, scorable samples of the "
                                      "top-k% IoU and the centroid shift between TL and FT maps, per architecture "
                                      "(groups) and method (colours).", fig))
    points = {}
    for arch in archs:
        for method in methods:
            if not run.has(f"{run.cell.drift_path(arch)}/{method}/summary"):
                continue
            summ = run.reader.drift_summary(arch, method)
            ks = sorted((_iou_k(m), m) for m in summ if _iou_k(m) is not None)
            if ks:
                points[(arch, method)] = tuple(np.asarray([float(summ[m].get(f, np.nan)) for _, m in ks])
                                               if f else np.asarray([k for k, _ in ks])
                                               for f in (None, "mean", "lo", "hi"))
    if points:
        fig = figures.iou_against_k(points, archs, methods)
        section.blocks.append(_figure("fig-iou-k", "Macro-mean IoU of the top-k% regions of the TL and FT maps against "
                                      "k, with 95% bootstrap intervals; dashed: two independent random maps.", fig))


def _ranking(run: _Run) -> Section:
    from .summary import agreement_rows, counts_text, grid_rows

    s = Section("ranking", "Rank reversal of architectures")
    rank = run.reader.ranking()
    st = run.reader.stats_attrs()
    if not rank:
        s.blocks.append(Text("No statistics stage in this archive (stage 'stats' not finished): architectures were "
                             "not ranked.", "note"))
        return s
    if st.get("verdict"):
        s.blocks.append(Text(f"Verdict over the protocol grid: {st['verdict']}"))
    per_class = _json_list(st.get("n_ranked_per_class", "[]"))
    s.blocks.append(Text(
        f"Architectures are ranked by stability under each attribution method (macro mean of the metric; most stable "
        f"first) on one common set of {st.get('n_ranked', '?')} images (rule '{st.get('ranking_sample_set', '?')}'; "
        f"per class {' / '.join(f'{run.class_name(k)} {n}' for k, n in enumerate(per_class))}), so that a ranking is "
        f"not confounded with each architecture's class mix. Kendall tau compares two methods' orderings and is "
        "descriptive (over three architectures its p-value cannot fall below 0.33); a reversal means the most stable "
        "architecture differs; P(reverse) is its probability under a paired bootstrap that resamples the images once "
        f"per replicate for every method and architecture. Primary cell: layer '{run.cell.layer}', score "
        f"'{run.cell.score}', maps '{run.cell.norm}'."))
    rows, pair_rows = [], []
    for metric, rr in rank.items():
        if "unranked" in rr:
            rows.append([metric, "-", f"not ranked: {rr['unranked']}", "-"])
            continue
        higher = rr.get("higher_is_stable")
        absolute = rr.get("absolute")
        direction = ("higher is more stable" if _yes_no(higher) == "yes" else
                     ("smaller |value| is more stable" if _yes_no(absolute) == "yes" else "lower is more stable"))
        means = rr.get("means", {})
        for method, order in rr.get("rankings", {}).items():
            order = _json_list(order)
            m = means.get(method, {})
            rows.append([metric, method, " > ".join(map(str, order)),
                         ", ".join(f"{a} {fmt(m.get(a))}" for a in order if a in m) + f" ({direction})"])
        for pair in rr.get("kendall_tau", {}):
            pair_rows.append([metric, pair, fmt(rr["kendall_tau"].get(pair), 3),
                              _yes_no(rr.get("reverses", {}).get(pair)),
                              _yes_no(rr.get("fully_reversed", {}).get(pair)),
                              fmt(rr.get("p_reverse", {}).get(pair), 3),
                              fmt(rr.get("p_fully_reversed", {}).get(pair), 3)])
    s.blocks.append(Table("tbl-ranking", "Stability rankings per metric and method (primary cell)",
                          ["metric", "method", "ranking (most stable first)", "macro means"], rows))
    if pair_rows:
        s.blocks.append(Table("tbl-kendall", "Agreement of the rankings between methods (primary cell)",
                              ["metric", "methods", "Kendall tau (descriptive)", "reverses", "fully reversed",
                               "P(reverse)", "P(fully reversed)"], pair_rows))
    grid = grid_rows(run.reader)
    if grid:
        s.blocks.append(Table("tbl-grid", "Protocol sensitivity: the rankings in every cell of CAM layers x "
                              "differentiated scores x map normalisations, and whether the most stable architecture "
                              "differs between LayerCAM and each Grad-CAM++ reading (paired bootstrap P in brackets)",
                              ["layer", "score", "maps", "metric", "rankings (most stable first)", "reverses (P)"],
                              grid, collapsed=len(grid) > 40))
    agree = agreement_rows(run.reader)
    if agree:
        s.blocks.append(Table("tbl-agreement", "Method agreement: median over the test images of the per-image "
                              "Pearson r between two methods' maps of the same checkpoint (1: the methods give one "
                              "map, as they nearly do at a layer followed only by pooling and a linear head)",
                              ["architecture", "layer", "score", "methods", "transfer", "finetune"], agree))
    rows = []
    for arch in run.archs:
        if not run.has(run.cell.drift_path(arch)):
            continue
        for method in run.reader.methods(arch):
            summ = run.reader.drift_summary(arch, method)
            if isinstance(summ.get("iou@20"), dict):
                rows.append([arch, method, counts_text(summ["iou@20"])])
    if rows:
        s.blocks.append(Text("Images behind each per-architecture drift mean (metrics.sample_set, IoU@20%): total "
                             "(per class; * = left out of the macro mean for too few images): "
                             + "; ".join(f"{a} {m}: {n}" for a, m, n in rows) + ".", "note"))
    return s


# ---------------------------------------------------------------------------------------------- examples
def regenerate_images(run: _Run, indices: Sequence[int]) -> tuple[np.ndarray | None, str]:
    """The test images ``indices`` (n, H, W) in [0, 1], regenerated from the config, or None and the reason."""
    cfg = run.cfg
    if cfg is None:
        return None, "the stored configuration could not be read"
    d = cfg.data
    data = run.reader.read("data/test") if run.has("data/test") else {}
    labels = np.asarray(data.get("labels", []))
    try:
        if d.source == "synthetic":
            from .data import load_synthetic

            test = load_synthetic(0, 0, d.n_test, d.image_size, cfg.data_seed, d.difficulty, d.confounder).test
            # The test split depends only on (seed, split, index), not on the other splits' sizes; check that the
            # regenerated split is the archived one before showing it.
            if len(test) != len(labels) or not np.array_equal(test.labels, labels):
                return None, "the regenerated synthetic test set does not match the archived labels"
            if "lung_masks" in data and not np.array_equal(test.lung_masks, np.asarray(data["lung_masks"])):
                return None, "the regenerated synthetic test set does not match the archived lung masks"
            return test.images(np.asarray(indices, dtype=np.int64)).numpy()[:, 0], ""
        from .data import read_image

        ids = _strs(data.get("ids", []))
        root = Path(d.path) if d.source == "folder" else Path(d.path).parent
        out = []
        for i in indices:
            p = Path(ids[i])
            out.append(read_image(p if p.is_absolute() else root / p, d.image_size))
        return np.stack(out), ""
    except Exception as exc:  # unreadable or moved data must not stop the report
        return None, f"{type(exc).__name__}: {exc}"


def _examples(run: _Run) -> Section:
    s = Section("examples", "Example attribution maps")
    from . import figures

    n_wanted = int(run.cfg.report.n_examples) if run.cfg is not None else 4
    archs = [a for a in run.archs
             if all(run.has(f"attributions/{a}/{run.cell.layer}/{run.cell.score}/{st}") for st in STAGES)]
    for a in run.archs:
        if a not in archs:
            s.blocks.append(Text(f"{a}: no attribution maps (stage attributions/{a} not finished).", "note"))
    if not archs or not run.has("data/test") or n_wanted <= 0:
        if not run.has("data/test"):
            s.blocks.append(Text("No test set in the archive: no examples to show.", "note"))
        return s
    test = run.reader.read("data/test")
    labels = np.asarray(test["labels"])
    ids = _strs(test.get("ids", np.arange(len(labels))))
    size = (int(run.cfg.data.image_size),) * 2 if run.cfg is not None else (64, 64)
    if "lung_masks" in test:
        size = tuple(np.asarray(test["lung_masks"]).shape[1:])
    s.blocks.append(Text("Test images with their TL and FT maps for each method, upsampled bilinearly to the input "
                         "size and overlaid; both maps of a row share one colour scale (raw, unnormalised values), "
                         "so a change in magnitude is visible. Examples are the first selected, scorable samples "
                         "of each class in turn."))
    for arch in archs:
        usable = np.ones(len(labels), dtype=bool)
        scores: dict[str, dict] = {}
        for method in run.reader.methods(arch) if run.has(f"drift/{arch}") else []:
            ps = run.reader.drift(arch, method)
            pos = {sid: i for i, sid in enumerate(_strs(ps.get("ids", ids)))}
            ok = np.ones(len(pos), dtype=bool)
            for flag in ("selected", "valid"):
                if flag in ps:
                    ok &= np.asarray(ps[flag], dtype=bool)
            usable &= np.asarray([sid in pos and bool(ok[pos[sid]]) for sid in ids])
            scores[method] = {sid: (ps, pos[sid]) for sid in ids if sid in pos}
        if not usable.any():
            usable = np.ones(len(labels), dtype=bool)
            s.blocks.append(Text(f"{arch}: no selected, scorable sample; showing the first test samples instead.",
                                 "note"))
        idx = pick_examples(labels, usable, n_wanted)
        images, why = regenerate_images(run, idx)
        if images is None:
            s.blocks.append(Text(f"{arch}: the test images could not be regenerated ({why}); maps are shown without "
                                 "them.", "note"))
        base = f"attributions/{arch}/{run.cell.layer}/{run.cell.score}"
        methods = [m for m in run.methods if run.has(f"{base}/transfer/{m}") and run.has(f"{base}/finetune/{m}")]
        maps = {(m, st): run.reader.maps(arch, st, m) for m in methods for st in STAGES}
        rows = []
        for j, i in enumerate(idx):
            for m in methods:
                extra = ""
                if m in scores and ids[i] in scores[m]:
                    ps, k = scores[m][ids[i]]
                    parts = [f"{metric_label(q)} {fmt(np.asarray(ps[q])[k], 2)}" for q in ("iou@20", "centroid_shift")
                             if q in ps]
                    extra = "\n" + ", ".join(parts) if parts else ""
                title = f"{ids[i]}\n{run.class_name(int(labels[i]))}, {m}{extra}"
                rows.append(figures.MapRow(title, maps[(m, "transfer")][i], maps[(m, "finetune")][i],
                                           None if images is None else images[j]))
        if rows:
            fig = figures.map_overlays(rows, size)
            s.blocks.append(_figure(f"fig-examples-{_slug(arch)}", f"{arch}: test images, TL and FT maps per method "
                                    "(one colour scale per row).", fig))
    return s


# ---------------------------------------------------------------------------------------------- iFIM
def _fisher(run: _Run) -> Section:
    s = Section("fisher", "Input-dependent Fisher information (iFIM)")
    from . import figures

    present = [(a, st) for a in run.archs for st in STAGES if run.has(f"fisher/{a}/{st}")]
    if run.cfg is not None and not run.cfg.fisher.enabled:
        s.blocks.append(Text("The iFIM analysis is disabled in this run's configuration (fisher.enabled = false).",
                             "note"))
        return s
    for a in run.archs:
        if not any(p[0] == a for p in present):
            s.blocks.append(Text(f"{a}: no iFIM results (stage fisher/{a} not finished).", "note"))
    if not present:
        if not s.blocks:
            s.blocks.append(Text("No iFIM results in this archive (no fisher/<arch> stage finished).", "note"))
        return s
    s.blocks.append(Text("F(x) = J^T (diag p - p p^T) J has rank <= C - 1; its leading k eigenvectors (enough for the "
                         "configured energy share) span the high-sensitivity subspace. Perturbations of equal norm "
                         "along that subspace, its orthogonal complement and a random direction are compared by the "
                         "area over eps of |confidence change|; the gap is high minus complement per sample (mean "
                         "with seeded bootstrap 95% interval)."))
    rows, shares, comps, panels = [], {}, {}, []
    for arch, stage in present:
        f = run.reader.fisher(arch, stage)
        share = np.asarray(f.get("eigen_share", np.zeros((0, 0))), dtype=np.float64)
        if share.size:
            shares[(arch, stage)] = share
        summ = f.get("summary", {})
        area = np.asarray(summ.get("area_abs_conf_change", [np.nan] * 3), dtype=np.float64).reshape(-1)
        area = np.pad(area, (0, max(0, 3 - area.size)), constant_values=np.nan)
        pert = f.get("perturbation", {})
        try:
            gap = fisher_gap(pert, _n_boot(run), _seed(run)) if pert else (np.nan, np.nan, np.nan, 0)
        except (KeyError, ValueError) as exc:
            warnings.warn(f"fisher/{arch}/{stage}: no gap ({exc})", stacklevel=2)
            gap = (np.nan, np.nan, np.nan, 0)
        rank = np.asarray(f.get("rank", []), dtype=np.float64)
        rows.append([arch, stage, str(share.shape[0]), fmt(np.nanmean(share[:, 0]) if share.size else np.nan),
                     fmt(rank.mean() if rank.size else np.nan, 2), str(gap[3]), fmt(area[0]), fmt(area[1]),
                     fmt(area[2]), _interval(*gap[:3]), fmt(summ.get("wilcoxon_pvalue"), 4),
                     fmt(summ.get("kl_ratio_small_eps"), 3)])
        if "components" in f:
            comps[(arch, stage)] = f["components"]
        if pert:
            panels.extend(_perturbation_panels(arch, stage, pert))
    s.blocks.append(Table("tbl-fisher", "iFIM per architecture and stage: mean top-eigenvalue share and numerical rank "
                          "over the spectrum samples; area over eps of |confidence change| inside the high-sensitivity "
                          "subspace, its complement and a random direction; the gap (high - complement, mean [95% "
                          "interval]); Wilcoxon p of high vs complement; measured KL over 1/2 d^T F d at the smallest "
                          "eps", ["architecture", "stage", "n spectra", "top share", "mean rank", "n perturbed",
                                  "area high", "area complement", "area random", "gap", "Wilcoxon p", "KL ratio"],
                          rows))
    if shares:
        fig = figures.fisher_spectra(shares, [a for a in run.archs if any((a, st) in shares for st in STAGES)])
        s.blocks.append(_figure("fig-spectra", "iFIM spectra: share of each eigenvalue in the trace, by index, mean "
                                "over samples with 95% band, TL and FT checkpoints.", fig))
    for arch in dict.fromkeys(a for a, _ in comps):
        crow = []
        for stage in STAGES:
            c = comps.get((arch, stage))
            if not c or "x_high" not in c:
                continue
            x_high = np.asarray(c["x_high"], dtype=np.float64)
            x = np.asarray(c.get("x", x_high), dtype=np.float64)
            x_low = np.asarray(c.get("x_low", x - x_high), dtype=np.float64)
            cids = _strs(c.get("ids", np.arange(len(x))))
            k = np.asarray(c.get("k", [-1] * len(x))).reshape(-1)
            es = np.asarray(c.get("energy_share", [np.nan] * len(x)), dtype=np.float64).reshape(-1)
            n_show = min(len(x), run.cfg.report.n_examples if run.cfg is not None else 2, 4)
            for i in range(n_show):
                crow.append(figures.ComponentRow(f"{cids[i]} ({stage})\nk = {int(k[i])}, energy {fmt(es[i], 2)}",
                                                 _one_image(x[i]), _one_image(x_high[i]), _one_image(x_low[i])))
        if crow:
            s.blocks.append(_figure(f"fig-components-{_slug(arch)}", f"{arch}: input x, its high-sensitivity "
                                    "component x_high = V_k V_k^T x and the rest x_low, per checkpoint.",
                                    figures.component_panels(crow)))
    if panels:
        s.blocks.append(_figure("fig-perturbation", "Perturbation curves: mean over samples with 95% band of the "
                                "|confidence change| and KL divergence against the relative size eps of equal-norm "
                                "perturbations (high-sensitivity subspace vs complement vs random), and of removing "
                                "alpha x_high vs an equal-norm piece of the complement.",
                                figures.curve_grid(panels, ncols=3)))
    return s


def _one_image(a: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) by the channel mean; (H, W) unchanged."""
    return a.mean(0) if a.ndim == 3 else a


def _perturbation_panels(arch: str, stage: str, p: dict) -> list:
    from .figures import CurvePanel

    out = []
    kinds = _strs(p.get("kinds", []))
    valid = np.asarray(p.get("valid", []), dtype=bool).reshape(-1)

    def per_sample(key: str, kind_list: list[str]) -> dict[str, np.ndarray]:
        v = np.asarray(p[key], dtype=np.float64)  # (K, E, N, m)
        sel = valid if valid.size == v.shape[2] else np.ones(v.shape[2], dtype=bool)
        return {kind: v[j].mean(-1).T[sel] for j, kind in enumerate(kind_list)}

    eps = np.asarray(p.get("eps", []), dtype=np.float64).reshape(-1)
    title = f"{arch} {stage}"
    if "abs_conf_change" in p and kinds and eps.size:
        out.append(CurvePanel(title, eps, "relative size eps = |d| / |x|", "|change of predicted-class p|",
                              per_sample("abs_conf_change", kinds), logx=True))
    if "kl" in p and kinds and eps.size:
        refs = {}
        if "kl_pred" in p and "high" in kinds:
            pred = per_sample("kl_pred", kinds)["high"]
            refs = {"1/2 d^T F d (high)": np.nanmean(pred, 0) if pred.size else np.full(eps.size, np.nan)}
        out.append(CurvePanel(title, eps, "relative size eps = |d| / |x|", "KL(p(x) || p(x + d)) (nats)",
                              per_sample("kl", kinds), refs, logx=True, logy=True))
    rkinds = _strs(p.get("removal_kinds", []))
    alphas = np.asarray(p.get("alphas", []), dtype=np.float64).reshape(-1)
    if "removal_abs_conf_change" in p and rkinds and alphas.size:
        out.append(CurvePanel(f"{title}: removal", alphas, "removed fraction alpha of x_high (or equal norm)",
                              "|change of predicted-class p|", per_sample("removal_abs_conf_change", rkinds)))
    return out


def _bench(run: _Run) -> Section | None:
    b = run.reader.bench()
    if not b:
        return None
    s = Section("bench", "Benchmark records")
    rows = [[k, v] for k, v in _flatten(b)][:200]
    s.blocks.append(Table("tbl-bench", "Benchmark records stored in the archive (scalars and short arrays)",
                          ["record", "value"], rows, collapsed=len(rows) > 40))
    return s


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, str]]:
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, key)
        elif isinstance(v, np.ndarray):
            if v.size <= 8:
                yield key, ", ".join(fmt(x, 4) if np.issubdtype(v.dtype, np.number) else str(x)
                                     for x in v.reshape(-1))
        else:
            yield key, fmt(v, 4) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _figure(fid: str, caption: str, fig) -> Figure:
    from .figures import to_png

    return Figure(fid, caption, to_png(fig))


# ============================================================================================ assembly
def build_report(archive: str | os.PathLike) -> list[Section]:
    """Read an archive and build the report's sections (tables, figures as PNG, notes on what is missing).

    Args:
        archive: Path of a run archive (``archive.h5``).

    Returns:
        Sections in reading order: overview, configuration, provenance, data, classification, drift,
        degenerate, ranking, examples, fisher (and bench when the archive has records).

    Raises:
        TypeError: ``archive`` is not a path.
        drift.archive.ArchiveError: the file is missing or not a drift archive.
    """
    from . import figures

    with figures.plain_text():
        return _build_report(archive, figures)


def _build_report(archive: str | os.PathLike, figures) -> list[Section]:
    path = _check_path(archive, "archive")
    run = _Run.open(path)
    sections = [_overview(run, path), _configuration(run), _provenance(run), _data(run)]
    cls, histories = _classification(run)
    if histories:
        cls.blocks.append(_figure("fig-history", "Training curves: losses and validation scores per epoch, stage 1 "
                                  "(solid) then stage 2 (dashed).", figures.training_history(histories)))
    sections.append(cls)
    drift, deg, per_sample = _drift(run)
    _drift_figures(run, per_sample, drift)
    sections += [drift, deg, _ranking(run), _examples(run), _fisher(run)]
    bench = _bench(run)
    if bench is not None:
        sections.append(bench)
    return sections


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:0 auto;padding:1em 2em;
color:#1a1a1a;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{margin-top:1.8em;color:#0072B2}
nav ol{columns:2;font-size:.95em}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0;max-width:1100px}
th,td{border:1px solid #c8c8c8;padding:.25em .55em;text-align:left;vertical-align:top}th{background:#eef3f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}tr:nth-child(even) td{background:#fafafa}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto;font-size:.85em;border:1px solid #ddd}
.note{background:#fdf3dc;border-left:4px solid #E69F00;padding:.4em .8em}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#333;margin-top:.3em}details summary{cursor:pointer;color:#0072B2}
.scroll{overflow-x:auto}
"""

# Records, once the page has loaded, how many images decoded: a headless browser check reads these attributes.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-loaded", String(ok));
});
"""

_NUM = re.compile(r"^-?(\d+(\.\d*)?(e[-+]?\d+)?|nan|inf)( \[.*\])?$")


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        cells = "".join(f'<td class="num">{e(c)}</td>' if _NUM.match(c) else f"<td>{e(c)}</td>" for c in row)
        body.append(f"<tr>{cells}</tr>")
    out = (f'<div class="scroll"><table id="{e(t.id)}"><caption>{e(t.caption)}</caption><thead><tr>{head}</tr>'
           f"</thead><tbody>{''.join(body)}</tbody></table></div>")
    if t.collapsed:
        out = f"<details><summary>{e(t.caption)} ({len(t.rows)} rows)</summary>{out}</details>"
    return out


def render_html(sections: Sequence[Section], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG data URIs, a contents list."""
    e = html.escape
    nav = "".join(f'<li><a href="#{e(s.id)}">{e(s.title)}</a></li>' for s in sections)
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
             f'content="width=device-width, initial-scale=1"><title>{e(title)}</title><style>{_CSS}</style>'
             f"<script>{_SCRIPT}</script></head><body><h1>{e(title)}</h1><nav><ol>{nav}</ol></nav>"]
    for s in sections:
        parts.append(f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(f'<figure id="{e(b.id)}"><img src="data:image/png;base64,{data}" alt="{e(b.caption)}">'
                             f"<figcaption>{e(b.caption)}</figcaption></figure>")
            elif b.kind == "pre":
                pre = f"<pre>{e(b.text)}</pre>"
                if b.collapsed:
                    pre = f"<details><summary>show ({b.text.count(chr(10)) + 1} lines)</summary>{pre}</details>"
                parts.append(pre)
            elif b.kind == "h3":
                parts.append(f"<h3>{e(b.text)}</h3>")
            else:
                cls = ' class="note"' if b.kind == "note" else ""
                parts.append(f"<p{cls}>{e(b.text)}</p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)


_MD_SPECIAL = re.compile(r"([\\`*$~])|(?<!\S)_|_(?!\S)|\](?=\()")
_MD_LINE_START = re.compile(r"^(\s*)([#>+=-]|\d+[.)])")


def _md_inline(text: Any) -> str:
    """``text`` as literal inline Markdown: class names, ids and paths from the data never format, link or inject
    HTML. ``&``, ``<``, ``>`` become entities (an ``<img onerror=...>`` in a class name stays text); Markdown's
    inline syntax is backslash-escaped (``* ` $ ~ \\``, ``_`` next to a space or an end, the ``](`` of a
    link); newlines become spaces."""
    out = html.escape(str(text), quote=False).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), out)


def _md_text(text: Any) -> str:
    """A paragraph or heading as literal Markdown: :func:`_md_inline`, and a leading ``#``, ``-``, ``+``, ``=``,
    ``>`` or ``1.`` that would start a heading, list or quote is escaped too."""
    return _MD_LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), _md_inline(text))


def _md_cell(c: str) -> str:
    return _md_inline(c).replace("|", "\\|")


def _md_fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text`` (a class name with ``` cannot close it early)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(sections: Sequence[Section], title: str, figure_dir: str = "figures") -> str:
    """The same document as Markdown; figures are referenced as ``<figure_dir>/<figure id>.png``."""
    out = [f"# {_md_text(title)}", ""]
    for s in sections:
        out += [f"## {_md_text(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [f"**{_md_inline(b.caption)}**", "", _md_table(b.header, b.rows), ""]
            elif isinstance(b, Figure):
                # Alt text cannot hold brackets (one would end it); they read as parentheses there.
                alt = _md_inline(b.caption.replace("[", "(").replace("]", ")"))
                out += [f"![{alt}]({figure_dir}/{b.id}.png)", "", f"*{_md_inline(b.caption)}*", ""]
            elif b.kind == "pre":
                fence = _md_fence(b.text)
                out += [f"{fence}toml", b.text, fence, ""]
            elif b.kind == "h3":
                out += [f"### {_md_text(b.text)}", ""]
            else:
                out += [f"> **Note:** {_md_text(b.text)}" if b.kind == "note" else _md_text(b.text), ""]
    return "\n".join(out)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` with ``out_dir/figures/*.png``.

    Args:
        archive: Path of a run archive; incomplete archives are reported with notes on what is missing.
        out_dir: Folder to write into (created when missing).

    Returns:
        The path of ``report.html``.

    Raises:
        TypeError: ``archive`` or ``out_dir`` is not a path.
        ValueError: ``out_dir`` exists and is not a folder.
        drift.archive.ArchiveError: the archive is missing or unreadable.
    """
    out = _check_path(out_dir, "out_dir")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    sections = build_report(archive)
    title = f"drift report: {Path(archive).resolve().parent.name}/{Path(archive).name}"
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                _write_atomic(figs / f"{b.id}.png", b.png)
    _write_atomic(out / "report.md", render_markdown(sections, title, figs.name).encode("utf-8"))
    html_path = out / "report.html"
    _write_atomic(html_path, render_html(sections, title).encode("utf-8"))
    return html_path


# ============================================================================================ compare
def headline(archive: str | os.PathLike, n_boot: int = 1000, seed: int = 0) -> dict:
    """The headline numbers of an archive, keyed for comparison.

    Args:
        archive: Path of a run archive.
        n_boot, seed: Bootstrap resamples and seed of the accuracy and macro-AUC intervals (see
            :func:`classification_intervals`; the iFIM gap uses the archive's own ``metrics.n_boot`` and seed).

    Returns:
        {"classification": {(arch, stage): {"accuracy", "macro_auc": stored value,
                                            "accuracy_ci", "macro_auc_ci": (value, lo, hi) from the stored logits}},
         "drift": {(arch, method, metric): (mean, lo, hi)} for the :data:`drift.summary.HEADLINE` metrics,
         "ranking": {metric: {"rankings": {method: [arch, ...]}, "pairs": {pair: {"kendall_tau", "reverses"}},
                              "unranked": reason or None}},
         "fisher": {(arch, stage): (gap, lo, hi, n)} (see :func:`fisher_gap`)}
    """
    run = _Run.open(_check_path(archive, "archive"))
    out: dict[str, dict] = {"classification": {}, "drift": {}, "ranking": {}, "fisher": {}}
    for arch in run.archs:
        for stage in STAGES:
            if run.has(f"models/{arch}/{stage}/test"):
                ev = run.reader.evaluation(arch, stage)
                entry = {"accuracy": float(ev.get("accuracy", np.nan)),
                         "macro_auc": float(ev.get("macro_auc", np.nan))}
                try:
                    cis = classification_intervals(ev["logits"], ev["labels"], n_boot, seed)
                except (KeyError, ValueError):  # no (usable) logits stored: no interval
                    cis = {}
                for m in ("accuracy", "macro_auc"):
                    entry[f"{m}_ci"] = cis.get(m, (np.nan,) * 3)
                out["classification"][(arch, stage)] = entry
        if run.has(f"drift/{arch}"):
            for method in run.reader.methods(arch):
                summ = (run.reader.drift_summary(arch, method)
                        if run.has(f"{run.cell.drift_path(arch)}/{method}/summary") else {})
                for metric, _ in HEADLINE:
                    if isinstance(summ.get(metric), dict):
                        v = summ[metric]
                        out["drift"][(arch, method, metric)] = tuple(float(v.get(k, np.nan))
                                                                     for k in ("mean", "lo", "hi"))
        for stage in STAGES:
            if run.has(f"fisher/{arch}/{stage}/perturbation"):
                pert = run.reader.read(f"fisher/{arch}/{stage}/perturbation")
                try:
                    out["fisher"][(arch, stage)] = fisher_gap(pert, _n_boot(run), _seed(run))
                except (KeyError, ValueError):
                    continue
    for metric, rr in run.reader.ranking().items():
        entry = {"rankings": {m: [str(a) for a in _json_list(v)] for m, v in rr.get("rankings", {}).items()},
                 "pairs": {p: {"kendall_tau": float(t), "reverses": _yes_no(rr.get("reverses", {}).get(p)) == "yes"}
                           for p, t in rr.get("kendall_tau", {}).items()},
                 "unranked": rr.get("unranked")}
        out["ranking"][metric] = entry
    return out


def _beyond(a: tuple, b: tuple) -> str:
    """'yes' when the 95% intervals [lo, hi] of a and b do not overlap, 'no' when they do, '-' when unknown."""
    if a is None or b is None:
        return "-"
    (_, alo, ahi), (_, blo, bhi) = a[:3], b[:3]
    if not all(np.isfinite([alo, ahi, blo, bhi])):
        return "-"
    return "yes" if (blo > ahi or bhi < alo) else "no"


def _with_ci(value: Any, ci: tuple | None) -> str:
    """``value [lo, hi]``, or the value alone when the interval is unknown."""
    if ci is None or not np.all(np.isfinite(ci[1:3])):
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[1])}, {fmt(ci[2])}]"


def _comparable(a: Path, b: Path) -> None:
    ra, rb = ArchiveReader(a), ArchiveReader(b)
    for r, p in ((ra, a), (rb, b)):
        if not r.has("data/test/ids"):
            raise ValueError(f"cannot compare {a} and {b}: {p} has no test set (its 'data' stage has not run)")
    ca, cb = ra.class_names, rb.class_names
    if ca != cb:
        raise ValueError(f"cannot compare {a} and {b}: different class names ({ca} in {a}, {cb} in {b})")
    ia, ib = set(_strs(ra.read("data/test/ids"))), set(_strs(rb.read("data/test/ids")))
    if ia != ib:
        only_a, only_b = sorted(ia - ib), sorted(ib - ia)
        raise ValueError(f"cannot compare {a} and {b}: different test samples ({len(ia)} vs {len(ib)} ids; "
                         f"{len(only_a)} only in {a}, e.g. {only_a[:3]}; {len(only_b)} only in {b}, e.g. "
                         f"{only_b[:3]})")


def compare_tables(a: str | os.PathLike, b: str | os.PathLike, n_boot: int = 1000, seed: int = 0) -> list[Table]:
    """The comparison of two archives as tables (see :func:`compare`); refuses non-comparable archives.

    ``n_boot`` and ``seed`` set the bootstrap of the accuracy and macro-AUC intervals (:func:`headline`).
    """
    pa, pb = _check_path(a, "a"), _check_path(b, "b")
    _comparable(pa, pb)
    ha, hb = headline(pa, n_boot, seed), headline(pb, n_boot, seed)
    tables = []

    rows = []
    for key in _union(ha["classification"], hb["classification"]):
        va, vb = ha["classification"].get(key, {}), hb["classification"].get(key, {})
        row = list(key)
        for m in ("accuracy", "macro_auc"):
            x, y = va.get(m, np.nan), vb.get(m, np.nan)
            ia, ib = va.get(f"{m}_ci"), vb.get(f"{m}_ci")
            row += [_with_ci(x, ia), _with_ci(y, ib), fmt(y - x), _beyond(ia, ib)]
        rows.append(row)
    tables.append(Table("cmp-classification", f"Classification on the test set: stored value [95% bootstrap "
                        f"interval over test samples from the stored logits, {n_boot} resamples, seed {seed}]; "
                        "'beyond' = the two intervals do not overlap",
                        ["architecture", "stage", "accuracy A", "accuracy B", "delta accuracy",
                         "accuracy beyond intervals", "macro AUC A", "macro AUC B", "delta AUC",
                         "AUC beyond intervals"], rows))

    rows = []
    for key in _union(ha["drift"], hb["drift"]):
        va, vb = ha["drift"].get(key), hb["drift"].get(key)
        delta = vb[0] - va[0] if va is not None and vb is not None else np.nan
        rows.append([key[0], key[1], metric_label(key[2]), _interval(*va) if va else "-", _interval(*vb) if vb else "-",
                     fmt(delta), _beyond(va, vb)])
    tables.append(Table("cmp-drift", "Drift headline metrics: macro mean [95% bootstrap interval]; 'beyond' = the two "
                        "intervals do not overlap", ["architecture", "method", "metric", "A", "B", "delta (B - A)",
                                                     "beyond intervals"], rows))

    rows = []
    for metric in _union(ha["ranking"], hb["ranking"]):
        ra, rb = ha["ranking"].get(metric, {}), hb["ranking"].get(metric, {})
        for method in _union(ra.get("rankings", {}), rb.get("rankings", {})):
            xa, xb = ra.get("rankings", {}).get(method), rb.get("rankings", {}).get(method)
            rows.append([metric, method, " > ".join(xa) if xa else "-", " > ".join(xb) if xb else "-", "",
                         "-" if xa is None or xb is None else ("yes" if xa != xb else "no")])
        for pair in _union(ra.get("pairs", {}), rb.get("pairs", {})):
            xa, xb = ra.get("pairs", {}).get(pair), rb.get("pairs", {}).get(pair)
            desc = lambda x: "-" if x is None else (f"tau {fmt(x['kendall_tau'], 2)}, "  # noqa: E731
                                                    f"{'reversed' if x['reverses'] else 'not reversed'}")
            dt = xb["kendall_tau"] - xa["kendall_tau"] if xa and xb else np.nan
            changed = "-" if xa is None or xb is None else ("yes" if xa["reverses"] != xb["reverses"] else "no")
            rows.append([metric, pair, desc(xa), desc(xb), fmt(dt, 2), changed])
        for r_, side in ((ra, "A"), (rb, "B")):
            if r_.get("unranked"):
                rows.append([metric, "-", f"{side}: not ranked ({r_['unranked']})", "", "", "-"])
    tables.append(Table("cmp-ranking", "Ranking verdicts per metric: rankings per method (most stable first) and, per "
                        "method pair, Kendall tau and reversal; 'changed' = the ranking or the verdict differs",
                        ["metric", "method / pair", "A", "B", "delta tau", "changed"], rows))

    rows = []
    for key in _union(ha["fisher"], hb["fisher"]):
        va, vb = ha["fisher"].get(key), hb["fisher"].get(key)
        delta = vb[0] - va[0] if va is not None and vb is not None else np.nan
        rows.append([key[0], key[1], f"{_interval(*va[:3])} (n={va[3]})" if va else "-",
                     f"{_interval(*vb[:3])} (n={vb[3]})" if vb else "-", fmt(delta), _beyond(va, vb)])
    tables.append(Table("cmp-fisher", "iFIM gap: area over eps of |confidence change|, high-sensitivity subspace minus "
                        "complement, mean over samples [95% bootstrap interval]",
                        ["architecture", "stage", "A", "B", "delta (B - A)", "beyond intervals"], rows))
    return tables


def _union(a: dict, b: dict) -> list:
    return list(dict.fromkeys([*a, *b]))


def compare(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike | None = None, n_boot: int = 1000,
            seed: int = 0) -> str:
    """Headline numbers of two archives side by side, their differences (B - A) and which exceed the intervals.

    A difference of test accuracy, macro AUC, a drift metric or the iFIM gap is flagged when the two 95% bootstrap
    intervals do not overlap (lo_B > hi_A or hi_B < lo_A), a conservative reading of a difference. The accuracy
    and AUC intervals are computed here from each archive's stored test logits and labels (seeded percentile
    bootstrap over test samples, :func:`classification_intervals`). Rankings are flagged when the order or the
    reversal verdict changes.

    Args:
        a, b: Paths of two run archives of the same test set.
        out: Optional Markdown file to write the comparison to (a folder gets ``compare.md`` inside it).
        n_boot: Bootstrap resamples of the accuracy and AUC intervals (0: none, nothing flagged).
        seed: Seed of that bootstrap (the same for both archives).

    Returns:
        The comparison as plain text (what ``drift compare`` prints).

    Raises:
        ValueError: The archives are not comparable (different class names or test samples, or no test set);
            the message names both files.
        drift.archive.ArchiveError: A file is missing or not a drift archive.
    """
    pa, pb = _check_path(a, "a"), _check_path(b, "b")
    tables = compare_tables(pa, pb, n_boot, seed)
    ra, rb = ArchiveReader(pa), ArchiveReader(pb)
    # Archives written before data.seed existed drew their data from the run seed.
    who = [f"{k}: {p} (seed {r.attrs.get('seed', '?')}, data seed {r.attrs.get('data_seed', r.attrs.get('seed', '?'))}"
           f", commit {r.attrs.get('git_commit', '?')}, created {r.attrs.get('created', '?')})"
           for k, p, r in (("A", pa, ra), ("B", pb, rb))]
    text = ["Comparison of two run archives", *who, "delta = B - A; 'beyond intervals' = the 95% intervals do not "
            "overlap", ""]
    md = ["# drift compare", "", *[f"- {w}" for w in who], "", "delta = B - A; *beyond intervals* = the 95% intervals "
          "do not overlap.", ""]
    for t in tables:
        if not t.rows:
            text += [t.caption, "(nothing to compare: missing in both archives)", ""]
            md += [f"## {t.caption}", "", "_Nothing to compare: missing in both archives._", ""]
            continue
        text += [t.caption, table(t.header, t.rows), ""]
        md += [f"## {t.caption}", "", _md_table(t.header, t.rows), ""]
    if out is not None:
        o = _check_path(out, "out")
        if o.is_dir():
            o = o / "compare.md"
        o.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(o, "\n".join(md).encode("utf-8"))
    return "\n".join(text)
