"""The randomisation check of a map method, with nulls measured in the same run.

Cascading model randomisation (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018, section 3.1): the
trained model's layers are re-initialised from the head downwards (:func:`cascade`), and the maps of the
randomised model are compared with the trained model's on the same images. A method whose randomised-model maps
reproduce the trained model's maps *of the same image* does not explain the model (an edge detector passes through
any network).

**The randomised model** (:func:`randomised`) takes the re-initialised modules from a freshly built model of the
same architecture (its own initialiser: timm's for the registry's backbones) or, without a builder, each module's
``reset_parameters``; the BatchNorm statistics of the re-initialised modules are then re-estimated on training
images (:func:`recalibrate_bn`), as ``model.weights = "none"`` does, because default statistics (mean 0,
variance 1) make a deep network's output independent of its input. A randomised model whose logits barely vary
across images (:func:`logit_spread` below ``baselines.min_logit_spread``) is refused: no similarity is scored
at that cut (:class:`InputIndependent` names the cut).

**Similarities** (:func:`similarities`), per image: Pearson, Spearman (signed, and of the absolute maps), SSIM.

**Nulls**, measured on the same images (:func:`randomisation_scores`):

* ``seed``: the maps of two randomised models with different seeds, same image (what an architecture alone
  makes maps share; near 1 means the randomised maps are an architecture pattern and the check has no range);
* ``images``: the trained model's maps of different images (the input-independent component of its maps);
* ``cross``: trained vs randomised maps of *different* images, the permutation null of the flag below.

**Flag** (:func:`weight_test`). Statistic T = mean_i s(t_i, r_i) (s = Pearson of the maps t_i of the trained model
and r_i of the randomised model, image i). Null hypothesis: the randomised maps share nothing image-specific with
the trained maps (a method that depends on the weights), so the pairing of images is exchangeable; p = (1 + #{T_pi
>= T}) / (1 + P) over P random permutations pi, T_pi = mean_i s(t_i, r_pi(i)). The normalised similarity
(T - T0) / (1 - T0), T0 = the mean over i != j of s(t_i, r_j), is 0 when the randomised maps carry no more of the
image than a random pairing and 1 when they equal the trained maps. A cut *rejects* when p <= alpha and the
normalised similarity >= ``baselines.flag_normalised``; a method is **flagged** when every scored cut rejects
(an intersection-union test: its false-positive rate is at most alpha). :func:`simulate_flag_rate` measures it
(docs/controls.md holds the numbers).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .metrics import pearson, spearman, ssim
from .train import cumulative_bn

MapsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[tuple[str, str], dict[str, torch.Tensor]]]
"""(model, images, targets) -> {(layer, score): {method: maps (B, h, w)}}, e.g. :func:`drift.attribution.cams_multi`
with the run's settings bound."""

SIMILARITIES = ("pearson", "spearman", "abs_spearman", "ssim")
MIN_MAP_CELLS = 49
"""Maps with fewer cells than 7 x 7 are warned about: their few cells are dominated by the architecture's pattern."""


class InputIndependent(ValueError):
    """A randomised model whose logits do not vary across images (nothing to compare maps of)."""


# ---------------------------------------------------------------------------------------------- the cascade
@dataclass(frozen=True)
class Cut:
    """One cut of the cascade: the head and the top ``fraction`` of the backbone's parameterised layers."""

    fraction: float
    modules: tuple[str, ...]  # names of the re-initialised modules, head first, then downwards

    @property
    def label(self) -> str:
        return "head" if self.fraction == 0 else f"head + top {self.fraction:.0%}"


def parameterised_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules that own parameters directly (convolutions, linear layers, norms), in the order they
    first run on ``x[:1]`` (modules that do not run are left out)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
             for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def cascade(model: nn.Module, x: torch.Tensor, fractions: Sequence[float], head: str = "head") -> list[Cut]:
    """Cut points of a cascading randomisation from the top of ``model`` down.

    Args:
        model: the classifier; modules under ``head`` (the classification head) are randomised at every cut.
        x: a batch the model accepts (the execution order of its layers is read from ``x[:1]``).
        fractions: increasing fractions in [0, 1]: each cut also randomises the last ``ceil(f x L)`` of the
            backbone's L parameterised layers in execution order (0 = the head only, 1 = every layer).
        head: name prefix of the head's modules.

    Raises:
        ValueError: no parameterised module under ``head``.
    """
    layers = parameterised_layers(model, x)
    top = [n for n in layers if n == head or n.startswith(head + ".")]
    if not top:
        raise ValueError(f"randomisation: no parameterised module named {head!r} or under it; modules that run: "
                         f"{layers[-5:]}")
    body = [n for n in layers if n not in top][::-1]  # top of the backbone first
    return [Cut(float(f), tuple(top[::-1] + body[:math.ceil(f * len(body))])) for f in fractions]


def _reset(m: nn.Module) -> None:
    """PyTorch's default initialisation of one module; Kaiming-uniform weights (a = sqrt(5)), unit scales and zero
    biases for a module without ``reset_parameters``."""
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
        return
    with torch.no_grad():
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim > 1:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            elif "bias" in pname:
                p.zero_()
            else:
                p.fill_(1.0)


def randomised(model: nn.Module, modules: Sequence[str], seed: int,
               fresh: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A copy of ``model`` whose ``modules`` are re-initialised, seeded; the model itself is left untouched.

    Args:
        fresh: builds a newly initialised model of the same architecture (called under ``torch.manual_seed(seed)``):
            the re-initialised modules take its parameters and buffers, i.e. the architecture's own initialiser.
            None: each module's ``reset_parameters`` (:func:`_reset`), running statistics of norms reset.
    """
    out = copy.deepcopy(model)
    named = dict(out.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if fresh is None:
            for name in modules:
                _reset(named[name])
        else:
            ref = dict(fresh().named_modules())
            with torch.no_grad():
                for name in modules:
                    if name not in ref:
                        raise ValueError(f"randomisation: the freshly built model has no module {name!r}")
                    src = ref[name].state_dict()
                    for key, v in named[name].state_dict().items():
                        if src[key].shape != v.shape:
                            raise ValueError(f"randomisation: {name}.{key} has shape {tuple(v.shape)} in the model "
                                             f"and {tuple(src[key].shape)} in the freshly built one")
                        v.copy_(src[key].to(v))
    return out.eval()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, modules: Sequence[str], batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running statistics of the BatchNorm layers among ``modules`` on ``batches`` of inputs
    (cumulative average of batch mean and unbiased batch variance, as :func:`drift.train.calibrate_bn`); every
    other layer runs in inference mode and keeps its statistics. Returns the number of layers re-estimated."""
    named = dict(model.named_modules())
    bns = [named[n] for n in modules if isinstance(named.get(n), _BatchNorm)]
    if not bns:
        return 0
    with cumulative_bn(model, bns):
        for x in batches:
            model(x)
    return len(bns)


@torch.no_grad()
def logit_spread(model: nn.Module, x: torch.Tensor, batch_size: int = 16) -> float:
    """How much the model's output depends on its input: the mean over classes of the standard deviation over
    the images of ``x`` of the logit, in float64 (logit units)."""
    z = torch.cat([model(x[i:i + batch_size]).double() for i in range(0, len(x), batch_size)])
    return float(z.std(0).mean()) if len(z) > 1 else math.nan


def check_input_dependence(model: nn.Module, x: torch.Tensor, floor: float, where: str, batch_size: int = 16
                           ) -> float:
    """:func:`logit_spread` of ``model`` on ``x``; raises :class:`InputIndependent` naming ``where`` (the cut)
    when it is below ``floor``."""
    s = logit_spread(model, x, batch_size)
    if not s >= floor:
        raise InputIndependent(f"randomisation {where}: the randomised model's logits vary by {s:.3g} across "
                               f"{len(x)} images, below baselines.min_logit_spread = {floor:g}: its output does not "
                               "depend on its input, so its maps are not scored")
    return s


@dataclass
class CutMaps:
    """The randomised models of one cut: their logit spread, and their maps (None when the cut was refused)."""

    cut: Cut
    spread: float
    maps: dict[tuple[str, str], dict[str, torch.Tensor]] | None
    maps_other_seed: dict[tuple[str, str], dict[str, torch.Tensor]] | None
    refused: str = ""


def _maps(model: nn.Module, x, targets, maps_fn: MapsFn, batch_size: int):
    parts: dict[tuple[str, str], dict[str, list[torch.Tensor]]] = {}
    for lo in range(0, len(x), batch_size):
        res = maps_fn(model, x[lo:lo + batch_size], targets[lo:lo + batch_size])
        for key, by_method in res.items():
            for m, v in by_method.items():
                parts.setdefault(key, {}).setdefault(m, []).append(v.detach().float().cpu())
    return {k: {m: torch.cat(v) for m, v in d.items()} for k, d in parts.items()}


def randomisation_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, cuts: Sequence[Cut],
                       maps_fn: MapsFn, seed: int, batch_size: int = 16,
                       fresh: Callable[[], nn.Module] | None = None,
                       calibration: Callable[[], Iterable[torch.Tensor]] | None = None,
                       min_spread: float = 0.0, null_seed: bool = True) -> list[CutMaps]:
    """Maps of the randomised models, one :class:`CutMaps` per cut (maps on the CPU, float32).

    Every cut re-initialises from the *trained* model with the same seed (and ``fresh``), so the layers randomised
    at one cut carry the same random weights at every deeper cut (a cascade, as in Adebayo et al.). With
    ``calibration`` (a callable returning batches of training inputs) the BatchNorm statistics of the
    re-initialised modules are re-estimated. A randomised model with :func:`logit_spread` below ``min_spread`` is
    refused (warned, ``refused`` says why). With ``null_seed`` a second randomised model (seed + 1) gives the
    maps of the ``seed`` null."""
    out = []
    for cut in cuts:
        models = []
        for s in (seed, seed + 1) if null_seed else (seed,):
            rand = randomised(model, cut.modules, s, fresh)
            if calibration is not None:
                recalibrate_bn(rand, cut.modules, calibration())
            models.append(rand)
        try:
            spread = min(check_input_dependence(r, x, min_spread, f"cut {cut.label!r}", batch_size) for r in models)
        except InputIndependent as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
            out.append(CutMaps(cut, logit_spread(models[0], x, batch_size), None, None, str(exc)))
            continue
        maps = [_maps(r, x, targets, maps_fn, batch_size) for r in models]
        out.append(CutMaps(cut, spread, maps[0], maps[1] if null_seed else None))
        del models
    return out


# ---------------------------------------------------------------------------------------------- similarity
def prepare(maps: torch.Tensor, size: tuple[int, int], norm: str, subtract_mean: bool = False,
            where: str | None = None) -> torch.Tensor:
    """Maps (N, h, w) upsampled to ``size`` and normalised (:func:`drift.maps.normalize`), float64; with
    ``subtract_mean`` the mean map over the N images is subtracted afterwards (the data set's common pattern).
    Warns when the maps are coarser than 7 x 7, naming ``where`` (None: no warning)."""
    from .maps import normalize, upsample

    h, w = maps.shape[-2:]
    if where is not None and h * w < MIN_MAP_CELLS:
        warnings.warn(f"randomisation {where}: maps of {h} x {w} cells (coarser than 7 x 7) are dominated by the "
                      "architecture's pattern; consider baselines.subtract_mean_map = true", RuntimeWarning,
                      stacklevel=2)
    u = normalize(upsample(torch.as_tensor(maps).double(), size), norm)
    return u - u.mean(0, keepdim=True) if subtract_mean else u


def similarities(a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image similarities of maps a, b (N, H, W): Pearson, Spearman, Spearman of |a| and |b| (Adebayo's
    "absolute" rank correlation), SSIM (:mod:`drift.metrics`); each (N,) float64, NaN for a constant map."""
    out = {"pearson": pearson(a, b), "spearman": spearman(a, b), "abs_spearman": spearman(a.abs(), b.abs())}
    out["ssim"] = ssim(a, b) if min(a.shape[-2:]) >= 11 else torch.full((len(a),), math.nan, dtype=torch.float64)
    return {k: v.double().numpy() for k, v in out.items()}


def pearson_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N, N) Pearson r of a_i with b_j (maps (N, H, W)); rows or columns of constant maps are NaN."""
    za = a.flatten(1).double()
    zb = b.flatten(1).double()
    za = za - za.mean(1, keepdim=True)
    zb = zb - zb.mean(1, keepdim=True)
    za = za / za.norm(dim=1, keepdim=True)
    zb = zb / zb.norm(dim=1, keepdim=True)
    return (za @ zb.T).clamp(-1, 1).numpy()


def _off_diagonal_mean(s: np.ndarray) -> float:
    off = s[~np.eye(len(s), dtype=bool)]
    off = off[np.isfinite(off)]
    return float(off.mean()) if off.size else math.nan


def weight_test(s: np.ndarray, n_permutations: int = 999, seed: int = 0) -> dict[str, float]:
    """The permutation test of the flag on an (N, N) similarity matrix s[i, j] = s(t_i, r_j) (module docstring).

    Returns ``{"T": mean diagonal, "null": mean off-diagonal T0, "normalised": (T - T0) / (1 - T0), "p": the
    permutation p-value (1 + #{T_pi >= T}) / (1 + P)}`` over the images whose maps are not constant."""
    ok = np.isfinite(np.diag(s)) & np.isfinite(s).all(0) & np.isfinite(s).all(1)
    s = s[np.ix_(ok, ok)]
    n = len(s)
    if n < 2:
        return {"T": math.nan, "null": math.nan, "normalised": math.nan, "p": math.nan, "n": n}
    T = float(np.diag(s).mean())
    t0 = _off_diagonal_mean(s)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, n)), axis=1)
    tp = s[np.arange(n)[None, :], perms].mean(1)
    p = (1 + int((tp >= T - 1e-12).sum())) / (1 + n_permutations)
    norm = (T - t0) / (1 - t0) if t0 < 1 else math.nan
    return {"T": T, "null": t0, "normalised": float(norm), "p": float(p), "n": n}


def rejects(test: dict[str, float], alpha: float, min_normalised: float) -> bool:
    """Whether one cut's :func:`weight_test` says the randomised maps reproduce the trained maps' image content."""
    return bool(test["p"] <= alpha and test["normalised"] >= min_normalised)


def flagged(tests: Sequence[dict[str, float]], alpha: float, min_normalised: float) -> bool:
    """A method is flagged when every scored cut (finite p) rejects (intersection-union test, level alpha);
    no scored cut: not flagged."""
    scored = [t for t in tests if math.isfinite(t["p"])]
    return bool(scored) and all(rejects(t, alpha, min_normalised) for t in scored)


def randomisation_scores(trained: torch.Tensor, random: torch.Tensor, other_seed: torch.Tensor | None,
                         n_permutations: int, seed: int) -> dict:
    """Similarities of prepared maps (:func:`prepare`, (N, H, W) each) beside their nulls, for one cut.

    Returns ``{"per_sample": {similarity: (N,)}, "mean": {similarity: float}, "null_seed": {similarity: float}
    (random vs random', same image; NaN without ``other_seed``), "null_images": {similarity: float} (trained maps
    of image i vs image i + 1), "null_cross": {similarity: float} (trained i vs random i + 1), "test":
    :func:`weight_test` on Pearson}``."""
    n = len(trained)
    shift = torch.roll(torch.arange(n), -1)
    per = similarities(trained, random)

    def means(d: dict[str, np.ndarray]) -> dict[str, float]:
        return {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in d.items()}

    nan = {k: math.nan for k in SIMILARITIES}
    return {"per_sample": per, "mean": means(per),
            "null_seed": means(similarities(random, other_seed)) if other_seed is not None else nan,
            "null_images": means(similarities(trained, trained[shift])) if n > 1 else nan,
            "null_cross": means(similarities(trained, random[shift])) if n > 1 else nan,
            "test": weight_test(pearson_matrix(trained, random), n_permutations, seed)}


# ---------------------------------------------------------------------------------------------- its error rate
def _smooth_fields(rng: np.random.Generator, n: int, side: int, width: float) -> np.ndarray:
    """n random smooth non-negative maps (side x side): sums of 3 Gaussian bumps at random places."""
    yy, xx = np.mgrid[:side, :side]
    out = np.zeros((n, side, side))
    for _ in range(3):
        cy, cx = rng.uniform(0, side, (2, n, 1, 1))
        out += rng.uniform(0.5, 1.5, (n, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    return out


def simulate_flag_rate(depends_on_weights: bool, n_sim: int = 200, n_images: int = 24, n_cuts: int = 2,
                       side: int = 14, alpha: float = 0.05, min_normalised: float = 0.5, n_permutations: int = 199,
                       seed: int = 0) -> float:
    """Share of ``n_sim`` simulated methods flagged by :func:`flagged` at ``n_cuts`` cuts.

    Every map is a common pattern (the architecture's; the same for the trained and the randomised model) plus an
    image-specific part. ``depends_on_weights``: the randomised model's image-specific part is an independent
    smooth field (the maps follow the weights: the null of the flag, so the rate is its false-positive rate).
    Otherwise the randomised maps are the trained maps plus 20% noise (a method that ignores the weights: the
    rate is the flag's power)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sim):
        pattern = 2 * _smooth_fields(rng, 1, side, side / 3)
        t = pattern + _smooth_fields(rng, n_images, side, 2.0)
        tests = []
        for _cut in range(n_cuts):
            if depends_on_weights:
                r = pattern + _smooth_fields(rng, n_images, side, 2.0)
            else:
                r = t + 0.2 * t.std() * rng.standard_normal(t.shape)
            tests.append(weight_test(pearson_matrix(torch.as_tensor(t), torch.as_tensor(r)), n_permutations,
                                     int(rng.integers(2**31))))
        hits += flagged(tests, alpha, min_normalised)
    return hits / n_sim


# ---------------------------------------------------------------------------------------------- pipeline step
def run_check(pipe, arch: str, reader, size: tuple[int, int]) -> dict:
    """The randomisation check of ``arch``'s fine-tuned model in the ``baselines`` step, as archived under
    ``baselines/arch/<arch>/randomisation``: per cut its logit spreads (``spread``) and refusals; per layer, score
    and method and cut ``cut<i>`` the :func:`randomisation_scores` tree, and per method ``pearson_by_cut``,
    ``normalised_by_cut``, ``p_by_cut`` and ``flagged``."""
    from torch.utils.data import DataLoader, Subset

    from . import attributions_step
    from .attribution import cams_multi  # looked up per call, as the attributions step does
    from .models import build
    from .train import BN_CALIBRATION_IMAGES, calibration_subset

    cfg, b, a = pipe.cfg, pipe.cfg.baselines, pipe.cfg.attribution
    m = min(b.n_images, len(pipe.splits.test))
    idx = np.arange(m)
    model = pipe.trained(arch, "finetune").model.eval()
    x = pipe.test_images(idx).to(pipe.device)
    targets = torch.as_tensor(attributions_step.targets(pipe, arch, "finetune")[idx]).to(pipe.device)
    cuts = cascade(model, x, b.randomize)
    side = pipe.input_size(arch)

    def fresh() -> nn.Module:
        return build(arch, len(pipe.class_names), cfg.model.dropout,
                     0 if side == cfg.data.image_size else side).to(pipe.device)

    train = pipe.splits.train
    subset = Subset(train, calibration_subset(len(train), BN_CALIBRATION_IMAGES).tolist())

    def calibration():
        return (xb.to(pipe.device) for xb, _ in DataLoader(subset, batch_size=a.batch_size))

    def maps_fn(model, xb, tb):
        return cams_multi(model, xb, tb, methods=tuple(a.methods), layers=tuple(a.layers), scores=tuple(a.scores),
                          eps=a.eps)

    rand = randomisation_maps(model, x, targets, cuts, maps_fn, cfg.run.seed, a.batch_size, fresh=fresh,
                              calibration=calibration, min_spread=b.min_logit_spread)
    norm = cfg.metrics.normalize[0]
    out: dict = {"fractions": np.asarray([c.fraction for c in cuts]),
                 "n_modules": np.asarray([len(c.modules) for c in cuts]),
                 "labels": json.dumps([c.label for c in cuts]),
                 "spread": np.asarray([r.spread for r in rand]),
                 "refused": json.dumps([r.refused for r in rand]),
                 "trained_spread": logit_spread(model, x, a.batch_size)}
    for layer in a.layers:
        for score in a.scores:
            for method in a.methods:
                where = f"{arch} {layer} {score} {method}"
                own = prepare(torch.as_tensor(reader.maps(arch, "finetune", method, layer, score)[:m]), size, norm,
                              b.subtract_mean_map, where)
                node: dict = {}
                tests = []
                for i, r in enumerate(rand):
                    if r.maps is None:
                        tests.append({"T": math.nan, "null": math.nan, "normalised": math.nan, "p": math.nan})
                        continue
                    rm = prepare(r.maps[(layer, score)][method], size, norm, b.subtract_mean_map)
                    other = prepare(r.maps_other_seed[(layer, score)][method], size, norm, b.subtract_mean_map)
                    sc = randomisation_scores(own, rm, other, b.n_permutations, cfg.run.seed + i)
                    node[f"cut{i}"] = sc
                    tests.append(sc["test"])
                node["pearson_by_cut"] = np.asarray([t["T"] for t in tests])
                node["normalised_by_cut"] = np.asarray([t["normalised"] for t in tests])
                node["p_by_cut"] = np.asarray([t["p"] for t in tests])
                node["flagged"] = flagged(tests, b.flag_alpha, b.flag_normalised)
                out.setdefault(layer, {}).setdefault(score, {})[method] = node
    out["normalize"] = norm
    return out
