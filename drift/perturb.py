"""Perturbation experiments on the iFIM subspaces (:mod:`drift.fisher` states the maths).

For each image x and relative size eps, unit directions u of :mod:`drift.directions` (``high``: inside the top-k
iFIM subspace, ``complement``: orthogonal to it, ``random``, and the controls ``jacobian``, ``gradient``, ``cam``,
``span_rest`` of :func:`drift.directions.control_directions`), so that all perturbations d = eps |x| u have the
same L2 norm.

Recorded per eps and kind, from float64 logits (the model's logits cast to float64 before the head, so that a
saturated softmax still resolves a change): the primary outcome, the change of the predicted class's log-odds
L(x) - L(x + d), L = log p_pred - log(1 - p_pred) (= z_pred - logsumexp_{c != pred} z_c for softmax, z_pred for
sigmoid; pred = argmax of p(x)), which does not saturate; beside it the confidence change p_pred(x) - p_pred(x + d),
the margin change M(x) - M(x + d) with M = z_pred - max_{c != pred} z_c, prediction flips (argmax changes),
KL(p(x) || p(x + d)) (computed as log(1 + sum_c p_c (expm1(y_c) - y_c)), y = delta z - sum_c p_c delta z_c,
non-negative by construction; :mod:`drift.head_scores`), the set's accuracy and macro one-vs-rest AUC, and the
second-order prediction 1/2 d^T F d = 1/2 |G d|^2 of the KL with the ratio KL / (1/2 d^T F d): where its median
lies in [0.8, 1.25] (:data:`LOCAL_RATIO`) the eps is in the *local* regime the Fisher describes, elsewhere in
the finite-size regime.
Removal / attenuation: x - alpha x_high against x - alpha |x_high| u_complement (an equal-norm random piece of the
complement), for alpha in [0, 1].

What the experiment can show: ``high`` moving the prediction more than ``complement`` holds for any
differentiable classifier to first order (every direction outside span(G) leaves p unchanged to first order), so
that gap is a consistency check. The claim that the top-k subspace is *where the model is sensitive* is tested
against the controls of equal norm: the unweighted Jacobian's top directions, the confidence gradient, noise in
the CAM region, the rest of span(G), and the same analysis of an untrained network (:mod:`drift.ifim_study`).

Every random draw of sample i comes from its own generator seeded by (seed, i), so results depend on the seed
alone: not on the batch size, the device or the order samples are processed in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .directions import (
    CONTROL_KINDS,
    Directions,
    control_directions,
    perturbation_directions,
    removal_inputs,
    sample_generator,
)
from .fisher import IFIM, _check_head, fisher_apply, head_probs, ifim_from_jacobian, input_jacobian
from .head_scores import kl_from_logits, logodds_and_margin
from .stats import area as _area
from .stats import macro_auc, paired_test

# Directions, perturbation_directions, removal_inputs and sample_generator live in drift.directions; they stay
# importable from here, beside the experiment that draws them.
__all__ = [
    "KINDS",
    "REMOVAL_KINDS",
    "Directions",
    "PerturbationResult",
    "macro_auc",
    "perturbation_directions",
    "removal_inputs",
    "run_perturbations",
    "sample_generator",
]

KINDS = ("high", "complement", "random", *CONTROL_KINDS)
REMOVAL_KINDS = ("high", "complement")
METRICS = ("logodds_change", "abs_logodds_change", "conf_change", "abs_conf_change", "margin_change", "kl", "flip")
LOCAL_RATIO = (0.8, 1.25)
"""The local regime: median KL / (1/2 d^T F d) within these bounds."""


@dataclass
class PerturbationResult:
    """Outcome of :func:`run_perturbations` for N samples, E eps values, A alphas and m draws per sample.

    Per-sample arrays (K kinds ``KINDS`` = high, complement, random, jacobian, gradient, cam, span_rest; removal
    kinds = high, complement), all from float64 logits:
        logodds_change, abs_logodds_change, conf_change, abs_conf_change, margin_change, kl, kl_pred, kl_ratio,
        flip: (K, E, N, m) -- L(x) - L(x + d) (log-odds of pred), its absolute value, p_pred(x) - p_pred(x + d),
            its absolute value, M(x) - M(x + d) (margin), KL(p(x) || p(x + d)), 1/2 d^T F d, their ratio, argmax
            changed (0/1). NaN where the kind's direction does not exist for the sample (high: k = 0; span_rest:
            rank <= k; cam: no region; gradient: zero gradient).
        probs: (K, E, N, m, C) probabilities at x + d (the AUCs' inputs).
        removal_<metric>: (2, A, N, m) for the metrics above but kl_pred / kl_ratio (high removal is
            deterministic: its m copies are equal); removal_probs (2, A, N, m, C).
    Set-level arrays (over the valid samples): accuracy, auc (K, E, m); removal_accuracy, removal_auc (2, A, m).
    Curves (means over samples and draws): ``curves[metric]`` (K, E) for the metrics, kl_pred, accuracy, auc,
    kl_ratio (median over samples and draws of kl / kl_pred) and local (1 where that median lies in
    :data:`LOCAL_RATIO`); ``removal_curves[metric]`` (2, A).
    """

    head: str
    eps: np.ndarray
    alphas: np.ndarray
    n_draws: int
    seed: int
    labels: np.ndarray
    k: np.ndarray
    rank: np.ndarray
    energy_share: np.ndarray
    valid: np.ndarray
    x_norm: np.ndarray
    high_norm: np.ndarray
    clean_probs: np.ndarray
    clean_pred: np.ndarray
    clean_accuracy: float
    clean_auc: float
    conf_change: np.ndarray
    abs_conf_change: np.ndarray
    kl: np.ndarray
    kl_pred: np.ndarray
    flip: np.ndarray
    logodds_change: np.ndarray
    abs_logodds_change: np.ndarray
    margin_change: np.ndarray
    kl_ratio: np.ndarray
    probs: np.ndarray
    accuracy: np.ndarray
    auc: np.ndarray
    removal_conf_change: np.ndarray
    removal_abs_conf_change: np.ndarray
    removal_kl: np.ndarray
    removal_flip: np.ndarray
    removal_logodds_change: np.ndarray
    removal_abs_logodds_change: np.ndarray
    removal_margin_change: np.ndarray
    removal_probs: np.ndarray
    removal_accuracy: np.ndarray
    removal_auc: np.ndarray
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    removal_curves: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, float | np.ndarray]:
        """Areas under the curves, paired high-vs-complement tests and the confidence gaps.

        * ``area_<metric>`` (3,): trapezoid integral over eps of each curve (the curve's single value if E = 1).
        * ``removal_area_<metric>`` (2,): the same over alpha for the removal curves.
        * ``wilcoxon_statistic``, ``wilcoxon_pvalue``, ``wilcoxon_n``: two-sided Wilcoxon signed-rank test, paired
          by sample, of the per-sample area (over eps, mean over draws) of the absolute confidence change
          |p_pred(x) - p_pred(x + d)|, high vs complement. The absolute change is the primary statistic: a random
          direction and its negative are equally likely, so to first order in eps the signed change averages out.
        * ``wilcoxon_signed_statistic``, ``wilcoxon_signed_pvalue``: the same test on the signed change.
        * ``confidence_gap`` / ``abs_confidence_gap`` (E,): high minus complement mean (signed / absolute) confidence
          change per eps; ``confidence_gap_area`` / ``abs_confidence_gap_area``: their areas.
        * ``removal_confidence_gap`` (A,): high minus complement mean confidence change per alpha.
        * ``kl_ratio_small_eps``: median KL / (1/2 d^T F d) of the high-subspace perturbations at the smallest eps.
        * ``n_valid``: samples with a non-empty high-sensitivity subspace (every test uses these).

        The primary outcome, the log-odds change (high vs complement is a consistency check: it cannot fail to
        first order; the controls are the test):

        * ``logodds_gap`` (E,), ``logodds_gap_area``: high minus complement mean |L(x) - L(x + d)|;
          ``wilcoxon_logodds_statistic`` / ``_pvalue``: the paired test above on its per-sample area.
        * ``vs_<kind>_logodds_gap`` (E,): high minus <kind> mean |delta L| per eps, for every other kind;
          ``vs_<kind>_pvalue`` (E,): two-sided Wilcoxon signed-rank p per eps, paired by sample (means over
          draws), of |delta L| high vs <kind>; ``vs_<kind>_margin_pvalue`` (E,): the same test of |margin change|
          (the classification half, per image); ``vs_<kind>_flip_gap`` (E,): high minus <kind> flip rate.
        * ``kl_ratio_high`` (E,): median KL / (1/2 d^T F d) of the high kind; ``local`` (E,) 1 where it lies in
          :data:`LOCAL_RATIO` (the local regime), 0 in the finite-size regime.
        """
        hi, co = KINDS.index("high"), KINDS.index("complement")
        out: dict[str, float | np.ndarray] = {}
        for name, curve in self.curves.items():
            out[f"area_{name}"] = _area(curve, self.eps)
        for name, curve in self.removal_curves.items():
            out[f"removal_area_{name}"] = _area(curve, self.alphas)
        for suffix, values in (("", self.abs_conf_change), ("_signed", self.conf_change)):
            # (3, E, N, m) -> mean over draws -> (3, N, E) -> area over eps -> (3, N)
            per_sample = _area(values[:, :, self.valid].mean(-1).transpose(0, 2, 1), self.eps)
            test = paired_test(per_sample[co], per_sample[hi])
            stat, pval = test.statistic, test.pvalue
            out[f"wilcoxon{suffix}_statistic"], out[f"wilcoxon{suffix}_pvalue"] = stat, pval
        out["wilcoxon_n"] = int(self.valid.sum())
        for prefix, name in (("", "conf_change"), ("abs_", "abs_conf_change")):
            gap = self.curves[name][hi] - self.curves[name][co]
            out[f"{prefix}confidence_gap"] = gap
            out[f"{prefix}confidence_gap_area"] = float(_area(gap, self.eps))
        out["removal_confidence_gap"] = self.removal_curves["conf_change"][0] - self.removal_curves["conf_change"][1]
        out["kl_ratio_small_eps"] = float(self.curves["kl_ratio"][hi, int(np.argmin(self.eps))])
        lo = self.abs_logodds_change[:, :, self.valid].mean(-1)  # (K, E, N)
        mg = np.abs(self.margin_change[:, :, self.valid]).mean(-1)  # (K, E, N)
        test = paired_test(_area(lo[co].T, self.eps), _area(lo[hi].T, self.eps))
        out["wilcoxon_logodds_statistic"], out["wilcoxon_logodds_pvalue"] = test.statistic, test.pvalue
        out["logodds_gap"] = self.curves["abs_logodds_change"][hi] - self.curves["abs_logodds_change"][co]
        out["logodds_gap_area"] = float(_area(out["logodds_gap"], self.eps))
        for j, kind in enumerate(KINDS):
            if j == hi:
                continue
            out[f"vs_{kind}_logodds_gap"] = self.curves["abs_logodds_change"][hi] - self.curves["abs_logodds_change"][j]
            out[f"vs_{kind}_flip_gap"] = self.curves["flip"][hi] - self.curves["flip"][j]
            out[f"vs_{kind}_pvalue"] = np.array([paired_test(lo[j, e], lo[hi, e]).pvalue for e in range(len(self.eps))])
            out[f"vs_{kind}_margin_pvalue"] = np.array([paired_test(mg[j, e], mg[hi, e]).pvalue
                                                        for e in range(len(self.eps))])
        out["kl_ratio_high"] = self.curves["kl_ratio"][hi]
        out["local"] = self.curves["local"][hi]
        out["n_valid"] = int(self.valid.sum())
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every field, curve and summary entry as a flat name -> numpy array map (HDF5-ready: strings as bytes).

        Curves appear as ``curve_<metric>`` / ``removal_curve_<metric>``, summary entries as ``summary_<name>``.
        """
        out: dict[str, np.ndarray] = {
            "kinds": np.array(KINDS, dtype="S"),
            "removal_kinds": np.array(REMOVAL_KINDS, dtype="S"),
            "head": np.array(self.head, dtype="S"),
        }
        for name, value in vars(self).items():
            if name in ("curves", "removal_curves", "head"):
                continue
            out[name] = np.asarray(value)
        out.update({f"curve_{n}": np.asarray(v) for n, v in self.curves.items()})
        out.update({f"removal_curve_{n}": np.asarray(v) for n, v in self.removal_curves.items()})
        out.update({f"summary_{n}": np.asarray(v) for n, v in self.summary().items()})
        return out


def _grid(values, name: str, lo: float, hi: float) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1) if values is not None else np.zeros(0)
    if arr.size == 0 or not np.isfinite(arr).all() or (arr < lo).any() or (arr > hi).any():
        raise ValueError(f"{name} must be a non-empty list of finite values in [{lo}, {hi}], got {values!r}")
    return arr


def _forward(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])


#: Outcomes of :class:`_Perturbations` with one value per sample (sample axis 0); the others have the sample axis 2.
_PER_SAMPLE = ("clean_probs", "k", "rank", "energy_share", "valid", "x_norm", "high_norm")


class _Perturbations:
    """The experiment of :func:`run_perturbations`: :meth:`batch` measures one batch (its Jacobian computed by the
    caller), :meth:`result` joins the batches' outcomes, in sample order, into a :class:`PerturbationResult`."""

    def __init__(
        self,
        model: nn.Module,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        n: int,
        eps_grid: Sequence[float],
        alphas: Sequence[float],
        k: int | None,
        energy: float,
        head: str,
        n_draws: int,
        seed: int,
        batch_size: int,
        rtol: float | None,
    ) -> None:
        _check_head(head)
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be (N,) = ({n},) integers, got shape {lab.shape} dtype {lab.dtype}")
        for name, v in (("batch_size", batch_size), ("n_draws", n_draws)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.model, self.lab, self.n = model, lab, n
        self.eps = _grid(eps_grid, "eps_grid", 0.0, math.inf)
        self.al = _grid(alphas, "alphas", 0.0, 1.0)
        self.k, self.energy, self.head, self.m, self.seed = k, energy, head, n_draws, seed
        self.batch_size, self.rtol = batch_size, rtol

    def batch(
        self, xb: torch.Tensor, J: torch.Tensor, z0: torch.Tensor, start: int, spectrum: IFIM | None = None,
        region: torch.Tensor | None = None,
    ) -> tuple[Directions, dict[str, np.ndarray]]:
        """Measure samples start .. start + B - 1 from their inputs xb (B, *S), Jacobian J and logits z0.

        Args:
            spectrum: :func:`drift.fisher.ifim_from_jacobian` of (J, head probabilities of z0, xb); computed here
                when None.
            region: (B, *S) bool, the pixels of the ``cam`` control (None: that kind's outcomes are NaN).

        Returns:
            The batch's :class:`Directions` (x_high and the components among them) and its outcomes as float64
            arrays (sample axis 0 for the names in ``_PER_SAMPLE``, else 2).
        """
        model, head, lab = self.model, self.head, self.lab
        E, A, m, nk = len(self.eps), len(self.al), self.m, len(KINDS)
        nd = xb.dim() - 1
        B, C = z0.shape
        if lab.min() < 0 or lab.max() >= C:
            raise ValueError(
                f"labels must lie in [0, {C}) for a model with C = {C} logits, got [{lab.min()}, {lab.max()}]"
            )
        if spectrum is None:
            spectrum = ifim_from_jacobian(J, head_probs(z0, head), xb, head, self.rtol, eigenvectors=False, logits=z0)
        spec, p0 = spectrum, spectrum.probs
        dirs = perturbation_directions(
            J, p0, xb, head, self.k, self.energy, m, self.seed, first_index=start, spectrum=spec
        )
        ctrl = control_directions(J, p0, xb, spec, dirs.components.k, head, m, self.seed, start, region)
        out: dict[str, np.ndarray] = {}

        def store(name: str, value: torch.Tensor) -> None:
            out[name] = value.detach().double().cpu().numpy()

        # (K, B, m, *S) unit directions; a direction that does not exist (empty subspace, no region) perturbs
        # nothing and its outcomes become NaN.
        U = torch.stack([dirs.high, dirs.complement, dirs.random, *(ctrl[k] for k in CONTROL_KINDS)])
        defined = torch.isfinite(U.flatten(3)).all(-1)  # (K, B, m)
        U = torch.nan_to_num(U)
        xn = xb.flatten(1).norm(dim=1)  # (B,)
        scale = torch.as_tensor(self.eps, dtype=xb.dtype, device=xb.device).view(1, E, 1, 1) * xn.view(1, 1, B, 1)
        d = scale.view(1, E, B, 1, *([1] * nd)) * U.unsqueeze(1)  # (K, E, B, m, *S)
        inputs = xb.view(1, 1, B, 1, *xb.shape[1:]) + d

        # 1/2 d^T F d = 1/2 scale^2 |G u|^2 for unit u.
        Gu = torch.stack([fisher_apply(J, p0, U[i].flatten(2).transpose(1, 2), head) for i in range(nk)])
        q_unit = 0.5 * Gu.double().pow(2).sum(2)  # (K, B, m)
        kl_pred = scale.double().pow(2) * q_unit.unsqueeze(1)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=xb.device)
        kl_pred = torch.where(defined.unsqueeze(1), kl_pred, nan)

        hi_in, co_in = removal_inputs(xb, dirs.x_high, dirs.complement, self.al)  # (A, B, *S), (A, B, m, *S)
        bs = self.batch_size
        z_pert = _forward(model, inputs.reshape(-1, *xb.shape[1:]), bs).view(nk, E, B, m, C)
        # High removal is deterministic: one forward pass, its logits shared by the m draws.
        z_hi = _forward(model, hi_in.reshape(-1, *xb.shape[1:]), bs).view(A, B, 1, C).expand(A, B, m, C)
        z_co = _forward(model, torch.nan_to_num(co_in).reshape(-1, *xb.shape[1:]), bs).view(A, B, m, C)
        z_rem = torch.stack([z_hi, z_co])  # (2, A, B, m, C)

        # Every outcome from float64 logits: a float32 softmax saturates (p_pred = 1 at a margin of ~17).
        z0d = z0.double()
        p0d = head_probs(z0d, head)
        pred0 = p0d.argmax(1)
        conf0 = p0d.gather(1, pred0[:, None]).squeeze(1)
        lo0, mg0 = logodds_and_margin(z0d, pred0, head)
        ok_pert = defined.unsqueeze(1)  # (K, 1, B, m)
        for prefix, z1, lead, ok in (("", z_pert, (nk, E), ok_pert), ("removal_", z_rem, (len(REMOVAL_KINDS), A),
                                                                        None)):
            z1 = z1.double()
            p1 = head_probs(z1, head)
            pv = pred0.view(1, 1, B, 1).expand(*lead, B, m)
            lo1, mg1 = logodds_and_margin(z1, pv, head)
            conf = conf0.view(1, 1, B, 1) - p1.gather(-1, pv.unsqueeze(-1)).squeeze(-1)
            dlo = lo0.view(1, 1, B, 1) - lo1
            values = {"conf_change": conf, "abs_conf_change": conf.abs(), "logodds_change": dlo,
                      "abs_logodds_change": dlo.abs(), "margin_change": mg0.view(1, 1, B, 1) - mg1,
                      "flip": (p1.argmax(-1) != pred0.view(1, 1, B, 1)).double(),
                      "kl": kl_from_logits(z0d.view(1, 1, B, 1, C), z1, head)}
            for name, v in values.items():
                store(prefix + name, v if ok is None else torch.where(ok, v, nan))
            store(prefix + "probs", p1)
        store("defined", ok_pert.double())
        store("kl_pred", kl_pred)
        store("clean_probs", p0)
        store("k", dirs.components.k)
        store("rank", spec.rank)
        store("energy_share", dirs.components.energy_share)
        store("valid", dirs.components.k > 0)
        store("x_norm", xn)
        store("high_norm", dirs.x_high.flatten(1).norm(dim=1))
        return dirs, out

    def result(self, parts: Sequence[dict[str, np.ndarray]]) -> PerturbationResult:
        """The experiment's outcome from the outcomes of :meth:`batch` covering samples 0 .. N - 1 in order."""
        arrays = {
            name: np.concatenate([p[name] for p in parts], axis=0 if name in _PER_SAMPLE else 2) for name in parts[0]
        }
        lab, N, m, eps, al = self.lab, self.n, self.m, self.eps, self.al
        if len(arrays["valid"]) != N:
            raise ValueError(f"the batches hold {len(arrays['valid'])} samples, not N = {N}")
        E, nk = len(eps), len(KINDS)
        valid = arrays.pop("valid").astype(bool)
        if not valid.all():
            warnings.warn(
                f"{int((~valid).sum())} of {N} samples have an empty high-sensitivity subspace (F = 0 at x): their "
                "high-kind outcomes are NaN and set-level accuracy/AUC use the other samples",
                RuntimeWarning,
                stacklevel=3,
            )
            hi = KINDS.index("high")
            for name in (*METRICS, "kl_pred"):
                arrays[name][hi][:, ~valid] = np.nan
            for name in METRICS:
                arrays["removal_" + name][:, :, ~valid] = np.nan

        lv = lab[valid]

        defined = arrays.pop("defined")[:, 0].astype(bool)  # (K, N, m)

        def set_metrics(probs: np.ndarray, kinds_defined: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            """(L1, L2, N, m, C) -> accuracy and macro AUC (L1, L2, m) over the valid samples (NaN for a kind
            whose direction is missing for a valid sample)."""
            L1, L2 = probs.shape[:2]
            acc, auc = np.full((L1, L2, m), np.nan), np.full((L1, L2, m), np.nan)
            for i in range(L1):
                for j in range(L2):
                    for t in range(m):
                        if kinds_defined is not None and not kinds_defined[i, valid, t].all():
                            continue
                        pr = probs[i, j, valid, t]
                        acc[i, j, t] = np.mean(pr.argmax(-1) == lv) if len(lv) else np.nan
                        auc[i, j, t] = macro_auc(lv, pr)
            return acc, auc

        accuracy, auc = set_metrics(arrays["probs"], defined)
        r_accuracy, r_auc = set_metrics(arrays["removal_probs"])
        clean = arrays["clean_probs"]

        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(arrays["kl_pred"] > 0, arrays["kl"] / arrays["kl_pred"], np.nan)
        arrays["kl_ratio"] = ratio
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices (empty subspace everywhere) stay NaN
            curves = {name: np.nanmean(arrays[name], axis=(2, 3)) for name in (*METRICS, "kl_pred")}
            curves["kl_ratio"] = np.nanmedian(ratio.reshape(nk, E, -1), axis=-1)
            curves["local"] = ((curves["kl_ratio"] >= LOCAL_RATIO[0]) & (curves["kl_ratio"] <= LOCAL_RATIO[1])
                               ).astype(np.float64)
            removal_curves = {n: np.nanmean(arrays["removal_" + n], axis=(2, 3)) for n in METRICS}
        curves["accuracy"], curves["auc"] = accuracy.mean(-1), auc.mean(-1)
        removal_curves["accuracy"], removal_curves["auc"] = r_accuracy.mean(-1), r_auc.mean(-1)

        arrays["k"], arrays["rank"] = arrays["k"].astype(np.int64), arrays["rank"].astype(np.int64)
        return PerturbationResult(
            head=self.head,
            eps=eps,
            alphas=al,
            n_draws=m,
            seed=int(self.seed),
            labels=lab.astype(np.int64),
            valid=valid,
            clean_pred=clean.argmax(1),
            clean_accuracy=float(np.mean(clean[valid].argmax(1) == lv)) if len(lv) else math.nan,
            clean_auc=macro_auc(lv, clean[valid]),
            accuracy=accuracy,
            auc=auc,
            removal_accuracy=r_accuracy,
            removal_auc=r_auc,
            curves=curves,
            removal_curves=removal_curves,
            **arrays,  # the per-sample outcomes of the batches, under their field names
        )


def run_perturbations(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    eps_grid: Sequence[float] = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    k: int | None = None,
    energy: float = 0.9,
    head: str = "softmax",
    n_draws: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    rtol: float | None = None,
    region: torch.Tensor | None = None,
) -> PerturbationResult:
    """Equal-norm perturbations along the top-k iFIM subspace, its complement and random directions; removal.

    For each sample, eps in ``eps_grid`` and draw: d = eps |x| u with u from :func:`perturbation_directions`;
    for each alpha: x - alpha x_high and x - alpha |x_high| u_complement (:func:`removal_inputs`). One Jacobian
    per batch serves the spectrum, the components and the second-order prediction 1/2 d^T F d.

    Args:
        model: classifier in eval mode, (B, *S) -> (B, C) logits.
        x: (N, *S) inputs.
        labels: (N,) int class indices in [0, C) (accuracy and AUC).
        eps_grid: (E,) relative perturbation norms |d| / |x| >= 0.
        alphas: (A,) attenuation factors in [0, 1].
        k: subspace size (capped at each sample's rank); None: smallest k holding ``energy`` of the trace.
        energy: share of the trace when k is None.
        head: ``"softmax"`` or ``"sigmoid"``.
        n_draws: random directions per sample, kind and eps.
        seed: seed of every random draw (results are identical for the same seed).
        batch_size: samples per Jacobian and inputs per forward pass.
        rtol: eigenvalue tolerance (None: ``drift.fisher.default_rtol``).
        region: (N, *S) bool, the pixels of the ``cam`` control (e.g. the top CAM region); None: NaN outcomes.

    Returns:
        :class:`PerturbationResult`.
    """
    _check_head(head)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a (N, ...) tensor with N >= 1, got {getattr(x, 'shape', type(x).__name__)}")
    N = x.shape[0]
    if region is not None and (region.shape != x.shape or region.dtype != torch.bool):
        raise ValueError(f"region must be a bool tensor shaped like x {tuple(x.shape)}, got {tuple(region.shape)} "
                         f"{region.dtype}")
    exp = _Perturbations(model, labels, N, eps_grid, alphas, k, energy, head, n_draws, seed, batch_size, rtol)
    parts = []
    for start in range(0, N, batch_size):
        xb = x[start : start + batch_size]
        J, z0 = input_jacobian(model, xb)
        rb = None if region is None else region[start : start + batch_size]
        parts.append(exp.batch(xb, J, z0, start, region=rb)[1])
    return exp.result(parts)
