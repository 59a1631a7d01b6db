"""Known-answer studies: a planted evidence shift the pipeline must find, and null studies it must not flag.

A **planted study** (``configs/planted.toml``) trains its transfer phase on the synthetic chest task without the
shortcut marker and fine-tunes on images where a class-correlated marker plate sits outside the lungs
(``data.confounder_transfer = 0``, ``data.confounder = r``); the test images carry it at the same strength. Its
**null twin** (``configs/null.toml``) is the same recipe at strength 0: same patients, the same transfer phase
(neither sees a plate there, so with one seed it is the same checkpoint), same replicas. Both score the plate's
*slot* region in every test image (``data.marker_region = "slot"``), painted or not, so they measure the same pixels.

**Why the twin is the reference, not zero.** Fine-tuning changes the maps without any marker: unfreezing the
backbone moves evidence onto (or off) the lungs, the lesions and every region outside them, the marker's slot
included. A reduced pair (resnet10t, 64 px) showed it: the null twin's lung-mass fraction rose by 0.065 and its slot
share fell by 0.001, both far outside their intervals, with no plate anywhere. So "the planted study's lung mass
falls" and "the twin's changes stay within their intervals" test the generic change of fine-tuning as much as the
plate. The planted shift is what the plate adds to it: per test image (the two studies share the patients), the
**difference in differences** (FT - TL)_planted - (FT - TL)_twin. Both readings are reported; the verdict uses the
second.

**Why seed replicas.** Two null studies that differ only in their training seed differ too: in the same reduced
setting a placebo (the twin's recipe, another seed) gave a lung-mass difference in differences of +0.046 with an
image-only interval of [+0.035, +0.057] against the twin. An interval over images treats the two fine-tuned models as
fixed and would call that seed noise a shift. So each study's change is averaged over its fine-tuned models (the
run's and its seed replicas, ``baselines.seeds``) and the interval adds each study's model variance
(:func:`drift.stats.model_mean_contrast`); a study with one fine-tuned model gets no verdict.

The planted verdict, per attribution method at the study's cell (the archive's primary cell), each a one-sided test
in the expected direction on the difference in differences (macro mean over classes of the model-averaged
per-image differences, images and models resampled, on the images in both studies' sample sets):

* ``marker_mass_change`` > 0: the share of map mass on the marker region rises more than in the twin;
* ``lung_mass_change`` < 0 and ``lesion_energy_change`` < 0: less of the maps' mass in the lungs, less energy on
  the lesion;
* ``pointing_change`` < 0: fewer pointing-game hits on the lesion (the map's peak inside it);
* the systematic drift beyond seed noise of :data:`SYSTEMATIC_METRIC` exceeds the twin's: S_planted - S_twin > 0
  (:func:`drift.stats.systematic_contrast` on the shared images, both studies' fine-tuned models resampled).

Holm adjusts the family (every method x outcome) on two-sided p-values of the expected direction (2 x the one-sided
p): an outcome is *found* when its Holm-adjusted p is at most alpha, which unadjusted is its 95% interval lying on
the expected side of 0. A method *detects* the planted shift when both :data:`PRIMARY` outcomes are found (marker
share up, lung mass down: the answer the design fixes); the other three are judged in the same family and reported,
their direction not guaranteed (see :data:`PRIMARY`). Each study's own TL -> FT changes and its S are reported
beside them, described (no verdict).

**The null check.** A study with no plate, judged the same way against the twin, must not be detected: a *placebo*,
the twin's recipe with other fine-tuning seeds (``configs/null.toml`` with ``baselines.replica_seeds = [2000,
2001]``): the same transfer checkpoint, other fine-tuned models, the same images. Under it the difference in
differences has mean 0 and S is the same, so "detected" is a false positive; its rate is what :func:`calibrate`
measures on simulated triples (:func:`simulate`), judged by :func:`judge`, the function that judges archives
(``docs/known-answer.md``). **Scope:** the planted study and its twin share the transfer checkpoint by construction
(the transfer phase never sees a plate), so the verdict resamples fine-tuning seeds given that checkpoint. A
placebo with another transfer phase (``run.seed = 1``: other source weights, another transfer checkpoint) differs
from the twin by more than that, and the demo-size run of one was "found" on three secondary outcomes
(``results/planted.md``): a comparison across transfer checkpoints needs whole chains.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .stats.contrast import holm
from .stats.systematic import model_mean_contrast, systematic_contrast, systematic_drift, systematic_form
from .verdicts import ALPHA

OUTCOMES: tuple[tuple[str, int, str], ...] = (
    ("marker_mass_change", +1, "marker-region share of map mass"),
    ("lung_mass_change", -1, "lung-mass fraction"),
    ("lesion_energy_change", -1, "lesion energy"),
    ("pointing_change", -1, "pointing-game hits on the lesion"),
)
"""The marker-specific outcomes: (per-image key, expected sign of FT - TL under the planted shift, label)."""

PRIMARY = ("marker_mass_change", "lung_mass_change")
"""The known answer itself: the plate lies outside the lungs, so a model that learns it moves evidence onto the
plate and off the lungs. A method *detects* the planted shift when both are found. The other outcomes (lesion
energy, pointing game, S - S twin) are judged in the same Holm family and reported, but their direction is not
fixed by the design: a lesion can only lose evidence the transfer model gave it, and the plate draws the transfer
model's maps too (it is in the test images of both phases), which made the reduced pair's planted study drift
*less* than its twin, while on the demo's recipe it drifted more (``results/planted.md``)."""

SYSTEMATIC_METRIC = "pearson"
"""The metric of the systematic-drift outcomes: 1 - Pearson r, whose disattenuated form is the one the calibration
shows unbiased under seed noise and valid for contrasts (:data:`drift.stats.systematic.RANKABLE_FORMS`)."""


@dataclass
class StudyArrays:
    """What :func:`judge` reads from one study, per attribution method.

    Attributes:
        name: How sentences name the study (e.g. the archive path or "planted r=0.9").
        labels: (N,) classes of the test images.
        ids: (N,) test image ids (a planted study and its twin must share them).
        changes: {method: {outcome key: (M, N) FT - TL per fine-tuned model (the run's, then its seed replicas)
            and image, NaN outside the sample}}.
        systematic: {method: (d_tl (M, N), d_ft (M, M, N))} of :data:`SYSTEMATIC_METRIC`; empty without replicas.
        info: free description (architecture, cell, marker strength, accuracies) carried into the records.
    """

    name: str
    labels: np.ndarray
    ids: np.ndarray
    changes: dict
    systematic: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def read_study(path, arch: str | None = None, cell=None, methods: Sequence[str] | None = None,
               metric: str = SYSTEMATIC_METRIC, layer: str | None = None) -> StudyArrays:
    """The per-image outcomes of a run archive (:class:`StudyArrays`), at ``cell`` (default: the primary cell), or
    at the primary cell's score, normalisation and resampling on CAM layer ``layer``.

    Raises:
        ValueError: the archive lacks drift metrics for ``arch``, the marker masks (``data.marker_region``), or the
            lesion masks the outcomes need; the message names the archive and what is missing.
    """
    from .archive import ArchiveReader

    r = ArchiveReader(path)
    cfg = r.config
    archs = [a for a in cfg.run.archs if r.has(f"drift/{a}")]
    if not archs:
        raise ValueError(f"{path}: no drift metrics in this archive")
    arch = arch or archs[0]
    if arch not in archs:
        raise ValueError(f"{path}: no drift metrics for {arch!r} (has {archs})")
    cell = cell or r.primary_cell()
    if layer is not None:
        stored = r.layers(arch)
        if layer not in stored:
            raise ValueError(f"{path}: no maps of {arch} at layer {layer!r} (has {stored})")
        cell = cell._replace(layer=layer)
    methods = list(methods or r.methods(arch, cell))
    changes, systematic = {}, {}
    labels = ids = None
    for m in methods:
        per = r.drift(arch, m, cell)
        missing = [k for k in ("marker_mass_change", "lung_mass_change", "lesion_energy_change", "pointing_tl")
                   if k not in per]
        if missing:
            raise ValueError(f"{path}: {arch} {m} at {cell} has no {', '.join(missing)} (a known-answer study "
                             "needs the synthetic task's lung, lesion and marker masks: data.marker_region = "
                             "\"slot\")")
        use = per["selected"].astype(bool) & per["valid"].astype(bool)
        labels, ids = np.asarray(per["labels"]), np.asarray(per["ids"]).astype(str)

        base = f"baselines/arch/{arch}/seeds/finetune/{cell.key}/{m}"
        models = [per]
        if r.has(f"{base}/systematic"):
            sysn = r.read(f"{base}/systematic")[metric.replace("/", "_")]
            systematic[m] = (np.asarray(sysn["d_tl"]), np.asarray(sysn["d_ft"]))
            # the replicas the estimator uses (a replica with the run's own seed is the run's model again)
            models += [r.read(f"{base}/fixed_vs_{name}/per_sample") for name in json.loads(sysn["models"])
                       if name != "run"]
        changes[m] = {}
        for k, _, _ in OUTCOMES:
            rows = []
            for x in models:
                v = (np.asarray(x["pointing_ft"], np.float64) - np.asarray(x["pointing_tl"], np.float64)
                     if k == "pointing_change" else np.asarray(x[k], np.float64))
                rows.append(np.where(use & np.asarray(x["valid"]).astype(bool), v, np.nan))
            changes[m][k] = np.stack(rows)
    ev = {ph: r.evaluation(arch, ph)["accuracy"] for ph in ("transfer", "finetune")
          if r.has(f"models/{arch}/{ph}")}
    d = cfg.data
    info = {"arch": arch, "cell": str(cell), "layer": cell.layer, "layers": r.layers(arch), "strength": d.confounder,
            "strength_transfer": d.confounder if d.confounder_transfer == -1 else d.confounder_transfer,
            "marker_region": d.marker_region, "accuracy": ev, "metric": metric}
    return StudyArrays(str(path), labels, ids, changes, systematic, info)


def _row(study: str, method: str, outcome: str, sign: int, est, low, high, p_dir: float, label: str,
         judged: bool = True) -> dict:
    return {"study": study, "method": method, "outcome": outcome, "expected": "+" if sign > 0 else
            ("-" if sign < 0 else "0"), "label": label, "estimate": est, "low": low, "high": high,
            "p": min(1.0, 2 * p_dir) if math.isfinite(p_dir) else math.nan, "judged": judged, "found": False,
            "p_holm": math.nan}


def _described(st: StudyArrays, role: str, ci: float, min_per_class: int) -> list[dict]:
    """A study's own TL -> FT changes and its S: described, no verdict."""
    rows = []
    for m, ch in st.changes.items():
        for key, _, label in OUTCOMES:
            t, _ = model_mean_contrast(ch[key], None, st.labels, ci, min_per_class)
            rows.append(_row(role, m, key, 0, t.estimate, t.low, t.high, math.nan,
                             f"{label}, FT - TL ({ch[key].shape[0]} models)", False))
        if m in st.systematic:
            s = systematic_drift(*st.systematic[m], st.labels, ci, min_per_class, systematic_form(SYSTEMATIC_METRIC))
            rows.append(_row(role, m, "systematic", 0, s.estimate, s.low, s.high, math.nan,
                             f"systematic drift S ({SYSTEMATIC_METRIC})", False))
    return rows


def _shift_rows(p: StudyArrays, twin: StudyArrays, ci: float, min_per_class: int, role: str) -> list[dict]:
    """The verdict's family: per method the difference in differences of every outcome and S_p - S_twin."""
    rows = []
    form = systematic_form(SYSTEMATIC_METRIC)
    for m, ch in p.changes.items():
        if m not in twin.changes:
            raise ValueError(f"{twin.name} has no maps of {m!r} ({p.name} has)")
        for key, sign, label in OUTCOMES:
            t, resampled = model_mean_contrast(ch[key], twin.changes[m][key], p.labels, ci, min_per_class)
            rows.append(_row(role, m, key, sign, t.estimate, t.low, t.high, t.p_higher if sign > 0 else t.p_lower,
                             f"{label}, FT - TL minus the twin's" + ("" if resampled else ", one model"),
                             resampled))  # no verdict without each study's seed noise (fewer than 2 models)
        label = f"S - S twin ({SYSTEMATIC_METRIC})"
        if m in p.systematic and m in twin.systematic:
            c = systematic_contrast(p.systematic[m], twin.systematic[m], p.labels, ci, min_per_class, form)
            rows.append(_row(role, m, "systematic_vs_twin", +1, c.estimate, c.low, c.high, c.p_higher, label,
                             c.models_resampled))  # no verdict without the model part (fewer than 3 models)
        else:  # no replicas: no verdict on systematic drift, so no detection
            rows.append(_row(role, m, "systematic_vs_twin", +1, math.nan, math.nan, math.nan, math.nan,
                             label + ", no replicas", False))
    return rows


def _adjust(rows: list[dict], alpha: float) -> None:
    """Holm over the judged rows with a finite p; ``found`` = adjusted p <= alpha."""
    judged = [r for r in rows if r["judged"] and math.isfinite(r["p"])]
    adj = holm([r["p"] for r in judged]) if judged else []
    for r in rows:
        r["judged"] = r["judged"] and math.isfinite(r["p"])
        r["p_holm"] = math.nan
        r["found"] = False
    for r, a in zip(judged, adj):
        r["p_holm"] = float(a)
        r["found"] = bool(a <= alpha)


def _check_twins(a: StudyArrays, b: StudyArrays) -> None:
    if len(a.ids) != len(b.ids) or (a.ids != b.ids).any() or (a.labels != b.labels).any():
        raise ValueError(f"{a.name} and {b.name} must score the same test images (same data seed and test split): "
                         "their ids or labels differ")


def _detected(rows: list[dict], st: StudyArrays) -> dict:
    """{method: every primary outcome found}."""
    return {m: all(r["found"] for r in rows if r["method"] == m and r["outcome"] in PRIMARY) for m in st.changes}


def judge(planted: StudyArrays, twin: StudyArrays, placebo: StudyArrays | None = None, alpha: float = ALPHA,
          min_per_class: int = 1) -> dict:
    """The known-answer verdicts: is the planted shift detected against the null twin, and (with ``placebo``, a
    study without the plate) is the placebo, judged the same way, left undetected?

    Returns:
        ``{"rows": [...], "detected": {method: bool}, "placebo_detected": {method: bool}, "sentence": str}``: one row
        per test or description (study role, method, outcome, expected sign, estimate, interval at 1 - alpha, p,
        Holm-adjusted p, ``judged``, ``found``). Holm runs over each study's own family.

    Raises:
        ValueError: the studies do not share their test images (ids and labels) or their methods.
    """
    ci = 1 - alpha
    _check_twins(planted, twin)
    shift = _shift_rows(planted, twin, ci, min_per_class, "planted")
    _adjust(shift, alpha)
    detected = _detected(shift, planted)
    rows = shift
    placebo_detected: dict = {}
    if placebo is not None:
        _check_twins(placebo, twin)
        pl = _shift_rows(placebo, twin, ci, min_per_class, "placebo")
        _adjust(pl, alpha)
        placebo_detected = _detected(pl, placebo)
        rows = rows + pl
    for st, role in ((planted, "planted"), (twin, "twin")) + (((placebo, "placebo"),) if placebo else ()):
        rows = rows + _described(st, role, ci, min_per_class)
    return {"rows": rows, "detected": detected, "placebo_detected": placebo_detected,
            "sentence": _sentence(rows, detected, placebo_detected, alpha)}


def _sentence(rows: list[dict], detected: dict, placebo: dict, alpha: float) -> str:
    def part(role: str, det: dict, name: str) -> str:
        fam = [r for r in rows if r["study"] == role and r["expected"] != "0"]
        n = sum(r["judged"] for r in fam)
        by = [m for m, ok in det.items() if ok]
        head = f"{name}: detected by {', '.join(by)}" if by else f"{name}: not detected"
        head += (f" (marker share up and lung mass down against the null twin; Holm over {n} tests, family-wise "
                 f"alpha {alpha:g})")
        if role != "planted":
            return head
        more = []
        for m in det:
            found = [r["outcome"] for r in fam if r["method"] == m and r["outcome"] not in PRIMARY and r["found"]]
            not_found = [r["outcome"] + ("" if r["judged"] else " (no verdict: too few seed replicas)")
                         for r in fam if r["method"] == m and r["outcome"] not in PRIMARY and not r["found"]]
            more.append(f"{m}: also found {', '.join(found) or 'nothing else'}"
                        + (f", not {', '.join(not_found)}" if not_found else ""))
        return "; ".join([head, *more])
    out = [part("planted", detected, "Planted shift")]
    if placebo:
        out.append(part("placebo", placebo, "placebo (no marker)"))
    return "; ".join(out) + "."


# ---------------------------------------------------------------------------------------------- calibration
def _pearson_instability(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - Pearson r over the last axis."""
    za = (a - a.mean(-1, keepdims=True)) / a.std(-1, keepdims=True)
    zb = (b - b.mean(-1, keepdims=True)) / b.std(-1, keepdims=True)
    return 1.0 - (za * zb).mean(-1)


def simulate(rng: np.random.Generator, effect: float, n_images: int = 60, n_models: int = 3,
             methods: Sequence[str] = ("gradcam++", "layercam"), generic: float = 0.6, noise: float = 0.8,
             pixels: int = 36, n_classes: int = 5, seed_effect: float = 0.5) -> tuple[StudyArrays, StudyArrays,
                                                                                      StudyArrays]:
    """A planted study with marker effect ``effect``, its null twin and a placebo (no marker, another training
    seed), on the same images, each with ``n_models`` fine-tuned models, with known answers.

    Per fine-tuned model r, image i, method and outcome the TL -> FT change is ``generic_i + sign x effect x g_i +
    u_r + e_ri``: a generic change of fine-tuning shared by the three studies (class-dependent, the same patients),
    an image's susceptibility g (log-normal, mean 1) to the plate (planted study only), a seed effect u_r ~ N(0,
    ``seed_effect``^2) shared by every image of one model (what makes two trained models differ as wholes), and
    skewed, heavy-tailed noise e with class-dependent scale and mean 0 (a centred gamma times a t_4 scale).
    Pointing changes are differences of two Bernoulli hits; fine-tuning raises the hit probability by 0.1 + a seed
    effect, and the plate lowers it by ``0.3 effect g``. Maps for the systematic drift are ``pixels``-vectors
    FT_r = TL + generic v + effect w + noise eps_r (v the generic change, w the planted one, eps_r each model's seed
    noise), scored by 1 - Pearson r; the three share TL and v (one transfer checkpoint).
    """
    labels = rng.permutation(np.arange(n_images) % n_classes)
    ids = np.array([f"sim-{i}" for i in range(n_images)])
    scale = 0.5 + rng.random(n_classes)
    shared = {(m, key): 0.3 * rng.standard_normal(n_classes)[labels] + 0.2 * rng.standard_normal(n_images)
              for m in methods for key, _, _ in OUTCOMES}
    p_tl = {m: rng.uniform(0.3, 0.8, n_images) for m in methods}
    g = {m: rng.lognormal(-0.125, 0.5, n_images) for m in methods}
    tl, v = rng.standard_normal((n_images, pixels)), rng.standard_normal((n_images, pixels))
    w = rng.standard_normal((n_images, pixels))
    shape = (n_models, n_images)

    def study(eff: float, name: str, tl: np.ndarray, v: np.ndarray) -> StudyArrays:
        changes, systematic = {}, {}
        for m in methods:
            ch = {}
            for key, sign, _ in OUTCOMES:
                u = seed_effect * rng.standard_normal((n_models, 1))
                if key == "pointing_change":
                    hit_tl = rng.random(n_images) < p_tl[m]
                    p_ft = np.clip(p_tl[m] + 0.1 + 0.2 * u - 0.3 * eff * g[m], 0, 1)
                    ch[key] = (rng.random(shape) < p_ft).astype(float) - hit_tl.astype(float)
                    continue
                k = 2.0
                e = (rng.gamma(k, 1 / np.sqrt(k), shape) - np.sqrt(k)) * rng.standard_t(4, shape) / 1.4
                ch[key] = shared[m, key] + sign * eff * g[m] + u + scale[labels] * e
            changes[m] = ch
            ft = tl[None] + generic * v[None] + eff * w[None] + noise * rng.standard_normal(
                (n_models, n_images, pixels))
            d_tl = _pearson_instability(tl[None], ft)
            d_ft = _pearson_instability(ft[:, None], ft[None])
            idx = np.arange(n_models)
            d_ft[idx, idx] = 0.0
            systematic[m] = (d_tl, d_ft)
        return StudyArrays(name, labels, ids, changes, systematic, {"strength": eff})

    return (study(effect, f"planted effect {effect:g}", tl, v), study(0.0, "null twin", tl, v),
            study(0.0, "placebo", tl, v))


@dataclass
class KnownAnswerRate:
    """Rates over simulated study triples at one planted effect."""

    effect: float
    n_studies: int
    detected: float  # share of methods x studies where the planted study's primary outcomes were both found
    any_found: float  # share of studies where some outcome of the planted study was found (family-wise)
    contrast_found: float  # share of methods x studies where S planted - S twin was found
    placebo_detected: float  # share of methods x studies where the placebo was detected
    placebo_any: float  # share of studies where some outcome of the placebo was found (family-wise)

    def mc_se(self, rate: float) -> float:
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.n_studies)


def calibrate(n_studies: int = 400, effects: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0), seed: int = 0,
              n_images: int = 60, alpha: float = ALPHA) -> list[KnownAnswerRate]:
    """Judge ``n_studies`` simulated triples (:func:`simulate`) at every effect with :func:`judge`.

    At effect 0 the planted study has no plate: ``detected``, ``any_found`` and ``contrast_found`` are then
    false-positive rates, each to be at most alpha; the placebo's two rates are false-positive rates at every
    effect. At effects > 0 the first three are powers.
    """
    out = []
    for j, eff in enumerate(effects):
        rng = np.random.default_rng([seed, j])
        det = anyf = con = pdet = pany = 0.0
        for _ in range(n_studies):
            p, twin, placebo = simulate(rng, eff, n_images)
            res = judge(p, twin, placebo, alpha)
            rows = [r for r in res["rows"] if r["judged"]]
            det += np.mean(list(res["detected"].values()))
            pdet += np.mean(list(res["placebo_detected"].values()))
            anyf += any(r["found"] for r in rows if r["study"] == "planted")
            pany += any(r["found"] for r in rows if r["study"] == "placebo")
            cons = [r["found"] for r in rows if r["study"] == "planted" and r["outcome"] == "systematic_vs_twin"]
            con += np.mean(cons) if cons else 0.0
        out.append(KnownAnswerRate(eff, n_studies, det / n_studies, anyf / n_studies, con / n_studies,
                                   pdet / n_studies, pany / n_studies))
    return out


def calibration_markdown(rates: list[KnownAnswerRate], alpha: float = ALPHA, seconds: float | None = None) -> str:
    """The calibration table: false-positive rates at effect 0, powers above it, with Monte Carlo standard errors."""
    lines = ["| planted effect | studies | planted shift detected | some planted outcome found | S planted > S twin "
             "| placebo detected | some placebo outcome found |", "|---|---|---|---|---|---|---|"]
    for r in rates:
        cells = [f"{x:.3f} ± {r.mc_se(x):.3f}" for x in (r.detected, r.any_found, r.contrast_found,
                                                         r.placebo_detected, r.placebo_any)]
        lines.append(f"| {r.effect:g} | {r.n_studies} | " + " | ".join(cells) + " |")
    note = (f"\nAt effect 0 every column is a false-positive rate (nominal at most {alpha:g}); above 0 the first three "
            "are powers and the placebo's stay false-positive rates (the placebo never has the plate).")
    if seconds is not None:
        note += f" {seconds:.0f} s."
    return "\n".join(lines) + "\n" + note + "\n"


def calibration_failures(rates: list[KnownAnswerRate], alpha: float = ALPHA) -> list[str]:
    """False-positive rates above alpha by more than 2 Monte Carlo standard errors."""
    bad = []
    for r in rates:
        fprs = {"placebo detected": r.placebo_detected, "some placebo outcome found": r.placebo_any}
        if r.effect == 0:
            fprs.update({"detected": r.detected, "some outcome found": r.any_found,
                         "S planted > S twin": r.contrast_found})
        bad += [f"effect {r.effect:g}: {k} {v:.3f} > {alpha:g} + 2 se" for k, v in fprs.items()
                if v > alpha + 2 * math.sqrt(alpha * (1 - alpha) / r.n_studies)]
    return bad


# ---------------------------------------------------------------------------------------------- dose response
DOSE_COLUMNS = (("systematic", "S"), ("systematic_vs_twin", "S - S twin"),
                ("marker_mass_change", "marker share"), ("lung_mass_change", "lung mass"),
                ("lesion_energy_change", "lesion energy"), ("pointing_change", "pointing"))
"""The dose-response record's columns (key, short label): the study's own S (described), and the verdict's
outcomes against the null twin (S - S twin and the differences in differences)."""


def dose_response(studies: Sequence[StudyArrays], twin: StudyArrays, alpha: float = ALPHA,
                  min_per_class: int = 1) -> list[dict]:
    """One row per (study, method), sorted by marker strength: its own S and, for every study but the twin, the
    outcomes of :func:`judge` against the twin (each study a Holm family of its own).

    Returns:
        ``[{"strength", "method", "study", "accuracy", "detected", key: {"estimate", "low", "high", "found"} or
        None}]`` for the keys of :data:`DOSE_COLUMNS`.
    """
    out = []
    ci = 1 - alpha
    for st in studies:
        if st is twin or st.name == twin.name:
            res = {"rows": _described(twin, "planted", ci, min_per_class), "detected": {}}
        else:
            res = judge(st, twin, None, alpha, min_per_class)
        judged = {(r["method"], r["outcome"]): r for r in res["rows"] if r["study"] == "planted"
                  and (r["expected"] != "0" or r["outcome"] == "systematic")}
        for m in st.changes:
            row = {"strength": float(st.info.get("strength", math.nan)), "method": m, "study": st.name,
                   "cell": st.info.get("cell", ""),
                   "accuracy": st.info.get("accuracy", {}).get("finetune", math.nan),
                   "detected": res["detected"].get(m)}
            for key, _ in DOSE_COLUMNS:
                r = judged.get((m, key))
                row[key] = ({"estimate": r["estimate"], "low": r["low"], "high": r["high"], "found": r["found"]}
                            if r else None)
            out.append(row)
    return sorted(out, key=lambda r: (r["strength"], r["method"]))


def dose_markdown(rows: list[dict]) -> str:
    """The dose-response table: one line per (strength, method); * marks an outcome found (Holm within the study;
    S itself is described)."""
    head = "| strength | method | FT accuracy | " + " | ".join(lab for _, lab in DOSE_COLUMNS) + " | detected |"
    lines = [head, "|" + "---|" * (len(DOSE_COLUMNS) + 4)]
    for r in rows:
        cells = []
        for key, _ in DOSE_COLUMNS:
            x = r[key]
            cells.append("—" if x is None else f"{x['estimate']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"
                         + ("*" if x["found"] else ""))
        det = "twin" if r["detected"] is None else ("yes" if r["detected"] else "no")
        lines.append(f"| {r['strength']:g} | {r['method']} | {r['accuracy']:.3f} | " + " | ".join(cells)
                     + f" | {det} |")
    where = sorted({str(r["cell"]) for r in rows if r.get("cell")})
    return ("Dose response at " + "; ".join(where) + ":\n\n" if where else "") + "\n".join(lines) + "\n"


def layers_markdown(readings: Mapping[str, dict]) -> str:
    """The verdict's dependence on the CAM layer: one line per layer of ``{layer: judge(...) result}``, which
    methods detect the planted shift there and which detect the placebo."""
    lines = ["| layer | planted shift detected by | not detected by | placebo detected by |", "|---|---|---|---|"]
    for layer, res in readings.items():
        def names(d, want):
            return ", ".join(m for m, v in d.items() if v == want) or "none"

        lines.append(f"| {layer} | {names(res['detected'], True)} | {names(res['detected'], False)} | "
                     f"{names(res['placebo_detected'], True) if res['placebo_detected'] else '(no placebo)'} |")
    return "\n".join(lines) + "\n"


def verdict_markdown(res: dict) -> str:
    """The rows of :func:`judge` as a Markdown table, and its sentence."""
    lines = ["| study | method | outcome | expected | estimate | 95% interval | p (2-sided) | Holm p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["expected"] == "0":
            verdict = "described"
        elif not r["judged"]:
            verdict = "no verdict"
        else:
            verdict = "found" if r["found"] else "not found"
        lines.append(f"| {r['study']} | {r['method']} | {r['label']} | {r['expected']} | {r['estimate']:+.4f} | "
                     f"[{r['low']:+.4f}, {r['high']:+.4f}] | {r['p']:.3g} | {r['p_holm']:.3g} | {verdict} |")
    return "\n".join(lines) + "\n\n" + res["sentence"] + "\n"
