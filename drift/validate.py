"""The checks of a run configuration, made before any compute: every bad setting raises
:class:`drift.config.ConfigError` naming its key, the value at fault and what is allowed."""

from __future__ import annotations

import math
import re
from typing import Any

from .config import PHASES, Config, ConfigError, PhaseConfig


def validate(cfg: Config) -> None:
    from .attribution import METHODS, NORMALIZE_MODES, PGC_METHODS, SCORES
    from .models import LAYER_PRESETS, REGISTRY
    from .stats import SELECTION_RULES

    _check_measure(cfg)
    for arch in cfg.run.archs:
        if arch not in REGISTRY and not (cfg.measure.model_a and arch == cfg.measure.name):
            raise ConfigError(f"run.archs: unknown architecture {arch!r}; registered: {', '.join(sorted(REGISTRY))}")
    if not cfg.run.archs:
        raise ConfigError("run.archs is empty")
    if cfg.data.source not in ("synthetic", "folder", "csv") and not (cfg.data.source == "arrays"
                                                                       and cfg.measure.model_a):
        raise ConfigError(f"data.source must be synthetic, folder or csv (arrays: drift.measure only), got "
                          f"{cfg.data.source!r}")
    if cfg.data.source in ("folder", "csv") and not cfg.data.path:
        raise ConfigError(f"data.source = {cfg.data.source!r} needs data.path")
    if cfg.run.seed < 0:
        raise ConfigError(f"run.seed must be >= 0, got {cfg.run.seed}")
    if cfg.data.seed < -1:
        raise ConfigError(f"data.seed must be >= 0, or -1 for run.seed, got {cfg.data.seed}")
    if not 32 <= cfg.data.image_size <= 1024:
        raise ConfigError(f"data.image_size must be in [32, 1024], got {cfg.data.image_size}")
    _check_run_and_data(cfg)
    if cfg.attribution.target not in ("true", "predicted"):
        raise ConfigError(f"attribution.target must be 'true' or 'predicted', got {cfg.attribution.target!r}")
    for key in ("sample_set", "ranking_sample_set"):
        if getattr(cfg.metrics, key) not in SELECTION_RULES:
            raise ConfigError(f"metrics.{key} must be one of {', '.join(SELECTION_RULES)}, "
                              f"got {getattr(cfg.metrics, key)!r}")
    _check_list(cfg.metrics.normalize, "metrics.normalize", NORMALIZE_MODES)
    _check_metrics_reading(cfg)
    _check_list(cfg.attribution.scores, "attribution.scores", SCORES)
    _check_list(cfg.attribution.layers, "attribution.layers", None)
    for layer in cfg.attribution.layers:
        if not isinstance(layer, str) or not layer or layer in ("targets", "saturated") or "/" in layer:
            raise ConfigError(f"attribution.layers: {layer!r} is neither a preset ({', '.join(LAYER_PRESETS)}) nor "
                              "a dotted module name")
    _check_list(cfg.attribution.methods, "attribution.methods", None)
    for m in cfg.attribution.methods:
        if m not in METHODS and not (isinstance(m, str) and m.startswith("pgc:") and m[4:] in PGC_METHODS):
            raise ConfigError(f"attribution.methods: unknown method {m!r}; gradient methods: "
                              f"{', '.join(sorted(METHODS))}; pytorch-grad-cam methods: pgc:<name> with <name> in "
                              f"{', '.join(PGC_METHODS)}")
    if "softmax" in cfg.attribution.scores and any(m.startswith("pgc:") for m in cfg.attribution.methods):
        raise ConfigError("attribution.scores = softmax works with the gradient methods only, not pgc:<name>")
    if isinstance(cfg.metrics.min_per_class, bool) or cfg.metrics.min_per_class < 1:
        raise ConfigError(f"metrics.min_per_class must be >= 1, got {cfg.metrics.min_per_class!r}")
    if cfg.metrics.n_boot < 1:
        raise ConfigError(f"metrics.n_boot must be >= 1 (bootstrap replicates of every interval), "
                          f"got {cfg.metrics.n_boot!r}")
    for f in cfg.metrics.fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"metrics.fractions: {f} is outside (0, 1]")
    if cfg.fisher.head not in ("softmax", "sigmoid"):
        raise ConfigError(f"fisher.head must be softmax or sigmoid, got {cfg.fisher.head!r}")
    _check_analysis(cfg)
    _check_baselines(cfg)
    for arch, scale in cfg.model.input_scale.items():
        if arch not in REGISTRY:
            raise ConfigError(f"model.input_scale: unknown architecture {arch!r}; "
                              f"registered: {', '.join(sorted(REGISTRY))}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.25 <= scale <= 4:
            raise ConfigError(f"model.input_scale.{arch} must be a number in [0.25, 4], got {scale!r}")
        side = round(cfg.data.image_size * scale)
        if not 32 <= side <= 1024:
            raise ConfigError(f"model.input_scale.{arch} = {scale} gives {side} px at data.image_size = "
                              f"{cfg.data.image_size}; the input side must be in [32, 1024]")
    _check_model(cfg)
    if cfg.data.source == "synthetic":
        check_batches(cfg, cfg.data.n_train)
    for name in PHASES:
        st = getattr(cfg.train, name)
        _check_phase(st, f"train.{name}")
        for arch in st.per_arch:
            if arch not in REGISTRY:
                raise ConfigError(f"train.{name}.per_arch: unknown architecture {arch!r}; "
                                  f"registered: {', '.join(sorted(REGISTRY))}")
            _check_phase(st.for_arch(arch, f"train.{name}"), f"train.{name}.per_arch.{arch}")


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def _int_at_least(value: Any, key: str, low: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}{meaning}, got {value!r}")


def _number_list(values: list, key: str, low: float, high: float, low_open: bool = True) -> None:
    """A non-empty list of numbers in (low, high] (or [low, high] when not ``low_open``)."""
    if not values:
        raise ConfigError(f"{key} is empty")
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    for v in values:
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or v > high or v < low or (low_open and v == low)):
            raise ConfigError(f"{key}: {v!r} is not a finite number in {bounds}")


def _check_run_and_data(cfg: Config) -> None:
    """Run and data settings that would otherwise fail (or mislead) only after minutes of compute."""
    if not isinstance(cfg.run.device, str) or not _DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N (N a GPU index), got {cfg.run.device!r}")
    _int_at_least(cfg.run.threads, "run.threads", 0, " (0 keeps torch's default)")
    d = cfg.data
    for key in ("n_train", "n_val", "n_test"):
        _int_at_least(getattr(d, key), f"data.{key}", 1, " (images of that split, synthetic data)")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ConfigError(f"data.{key} must be a number in (0, 1), got {v!r}")
    if d.val_fraction + d.test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction must be < 1 (train keeps the rest), got "
                          f"{d.val_fraction} + {d.test_fraction}")
    for key in ("difficulty", "confounder"):
        v = getattr(d, key)
        if not 0 <= v <= 1:
            raise ConfigError(f"data.{key} must be in [0, 1], got {v!r}")
    if not (d.confounder_transfer == -1 or 0 <= d.confounder_transfer <= 1):
        raise ConfigError(f"data.confounder_transfer must be in [0, 1] or -1 (= data.confounder), got "
                          f"{d.confounder_transfer!r}")
    if d.marker_region not in ("drawn", "slot"):
        raise ConfigError(f"data.marker_region must be drawn or slot, got {d.marker_region!r}")
    if d.source != "synthetic" and (d.confounder_transfer != -1 or d.marker_region != "drawn"):
        raise ConfigError("data.confounder_transfer and data.marker_region apply to the synthetic task "
                          "(data.source = synthetic)")
    if d.classes:
        if not all(isinstance(c, str) and c.strip() for c in d.classes):
            raise ConfigError(f"data.classes must list non-empty class names, got {d.classes!r}")
        if len(d.classes) < 2:
            raise ConfigError(f"data.classes must list at least 2 classes, got {d.classes!r}")
        _check_list(d.classes, "data.classes", None)
        if d.source == "synthetic":
            raise ConfigError("data.classes applies to real data (data.source = folder or csv); the synthetic "
                              "task has its own classes")


def _check_analysis(cfg: Config) -> None:
    """Attribution, metrics and iFIM settings, checked before any compute."""
    from .metrics import registry

    _int_at_least(cfg.attribution.batch_size, "attribution.batch_size", 1)
    if not math.isfinite(cfg.attribution.eps) or cfg.attribution.eps < 0:
        raise ConfigError(f"attribution.eps must be a finite number >= 0, got {cfg.attribution.eps!r}")
    _number_list(cfg.metrics.fractions, "metrics.fractions", 0, 1)
    _check_list(cfg.metrics.fractions, "metrics.fractions", None)
    rankable = [s for s in registry(cfg.metrics.fractions) if s.higher_is_stable is not None]
    known = [s.key for s in rankable if s.fraction is not None] + [s.key for s in rankable if s.fraction is None]
    _check_list(cfg.metrics.ranking_metrics, "metrics.ranking_metrics", None)
    for m in cfg.metrics.ranking_metrics:
        if m not in known:
            raise ConfigError(f"metrics.ranking_metrics: unknown metric {m!r}; known: {', '.join(known)} (iou@XX "
                              "keys follow metrics.fractions)")
    fc = cfg.fisher
    _int_at_least(fc.n_spectrum, "fisher.n_spectrum", 0, " (test images with eigenvalues; 0 = all)")
    _int_at_least(fc.n_components, "fisher.n_components", 1, " (test images with components and perturbations)")
    _int_at_least(fc.n_draws, "fisher.n_draws", 1)
    _int_at_least(fc.batch_size, "fisher.batch_size", 1)
    if not 0 < fc.energy <= 1:
        raise ConfigError(f"fisher.energy must be in (0, 1], got {fc.energy!r}")
    _number_list(fc.eps_grid, "fisher.eps_grid", 0, math.inf, low_open=False)
    cf = fc.cam_fraction
    if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 < cf <= 1:
        raise ConfigError(f"fisher.cam_fraction must be a share of the pixels in (0, 1], got {fc.cam_fraction!r}")
    _check_list(fc.eps_grid, "fisher.eps_grid", None)
    _number_list(fc.alphas, "fisher.alphas", 0, 1, low_open=False)
    _check_list(fc.alphas, "fisher.alphas", None)
    _int_at_least(cfg.report.n_examples, "report.n_examples", 0)


def _check_baselines(cfg: Config) -> None:
    """Seed-floor and randomisation-check settings."""
    b = cfg.baselines
    _int_at_least(b.seeds, "baselines.seeds", 0, " (seed replicas per phase; 0 = none)")
    for s in b.replica_seeds:
        _int_at_least(s, "baselines.replica_seeds", 0)
    if len(set(b.replica_seeds)) != len(b.replica_seeds):
        raise ConfigError(f"baselines.replica_seeds lists a seed twice: {b.replica_seeds}")
    _check_list(b.phases, "baselines.phases", ("finetune", "transfer"))
    _int_at_least(b.chains, "baselines.chains", 0, " (whole chains beside the run's own; 0 = none)")
    if b.randomize:
        _number_list(b.randomize, "baselines.randomize", 0, 1, low_open=False)
        _check_list(b.randomize, "baselines.randomize", None)
        if list(b.randomize) != sorted(b.randomize):
            raise ConfigError(f"baselines.randomize must be increasing (a cascade from the head down), "
                              f"got {b.randomize}")
    _int_at_least(b.n_images, "baselines.n_images", 2, " (test images of the randomisation check)")
    for key, lo, hi in (("flag_alpha", 0, 1), ("flag_normalised", -1, 1), ("min_logit_spread", 0, math.inf)):
        v = getattr(b, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ConfigError(f"baselines.{key} must be a number in [{lo}, {hi}], got {v!r}")
    _int_at_least(b.n_permutations, "baselines.n_permutations", 19, " (permutations of the randomisation flag's test)")


def _check_measure(cfg: Config) -> None:
    """``measure`` settings (``drift measure``): names, the image choice, the normalisation and replica files."""
    m = cfg.measure
    if m.images not in ("test", "all"):
        raise ConfigError(f"measure.images must be test or all, got {m.images!r}")
    if not isinstance(m.name, str) or not m.name or "/" in m.name or m.name == "targets":
        raise ConfigError(f"measure.name must be a non-empty name without '/', got {m.name!r}")
    if len(m.mean) != len(m.std):
        raise ConfigError(f"measure.mean {m.mean} and measure.std {m.std} must have the same length")
    if m.std:
        _number_list(m.std, "measure.std", 0.0, float("inf"))
    _int_at_least(m.channels, "measure.channels", 0, " (0: the model's own)")
    if len(set(m.replicas_b)) != len(m.replicas_b):
        raise ConfigError(f"measure.replicas_b lists a file twice: {m.replicas_b}")
    if (m.weights_a or m.model_b or m.weights_b or m.replicas_b) and not m.model_a:
        raise ConfigError("measure.* settings need measure.model_a (the first model)")


def _check_metrics_reading(cfg: Config) -> None:
    """The protocol readings of ``[metrics]``: resampling modes and the top-k tie rule."""
    from drift_kernels.reference import TOPK_TIES

    from .maps import UPSAMPLE_MODES

    _check_list(cfg.metrics.upsample, "metrics.upsample", UPSAMPLE_MODES)
    if cfg.metrics.method_sample not in ("common", "per-method"):
        raise ConfigError(f"metrics.method_sample must be common or per-method, got {cfg.metrics.method_sample!r}")
    from .metrics import CENTROID_NORMS

    if cfg.metrics.centroid_norm not in CENTROID_NORMS:
        raise ConfigError(f"metrics.centroid_norm must be one of {', '.join(CENTROID_NORMS)}, "
                          f"got {cfg.metrics.centroid_norm!r}")
    if len(set(cfg.metrics.binarize)) != len(cfg.metrics.binarize):
        raise ConfigError(f"metrics.binarize lists a value twice: {cfg.metrics.binarize}")
    if cfg.metrics.binarize:
        _number_list(cfg.metrics.binarize, "metrics.binarize", 0.0, 1.0)
    if cfg.metrics.average not in ("macro", "micro"):
        raise ConfigError(f"metrics.average must be macro or micro, got {cfg.metrics.average!r}")
    if cfg.metrics.ties not in TOPK_TIES:
        raise ConfigError(f"metrics.ties must be one of {', '.join(TOPK_TIES)}, got {cfg.metrics.ties!r}")


def _check_list(values: list, key: str, allowed: tuple[str, ...] | None) -> None:
    if not values:
        raise ConfigError(f"{key} is empty")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key} lists a value twice: {values}")
    if allowed is not None:
        for v in values:
            if v not in allowed:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(allowed)}")


WEIGHTS = ("synthetic-source", "none", "imagenet")
"""The named values of ``model.weights``; any other value is the path of a checkpoint or weights file."""


def _check_model(cfg: Config) -> None:
    """``model.dropout`` in [0, 1), ``model.weights`` a known name or an existing file (a near miss of a name gets
    a did-you-mean), and the synthetic-source pretraining settings."""
    import difflib
    from pathlib import Path

    m = cfg.model
    if isinstance(m.dropout, bool) or not isinstance(m.dropout, (int, float)) or not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be a probability in [0, 1), got {m.dropout!r}")
    w = m.weights
    if not isinstance(w, str) or not w:
        raise ConfigError(f"model.weights must be one of {', '.join(WEIGHTS)} or the path of a weights file, "
                          f"got {w!r}")
    if w not in WEIGHTS and not Path(w).is_file():
        near = difflib.get_close_matches(w.lower(), WEIGHTS, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"model.weights = {w!r} is neither one of {', '.join(WEIGHTS)} nor an existing weights "
                          f"file{hint}")
    if m.weights_file and not Path(m.weights_file).is_file():
        raise ConfigError(f"model.weights_file = {m.weights_file!r}: no such file")
    src = cfg.source
    if w == "synthetic-source":
        _int_at_least(src.epochs, "source.epochs", 1)
        _int_at_least(src.batch_size, "source.batch_size", 1)
        _int_at_least(src.n_train, "source.n_train", 1)
        _int_at_least(src.n_val, "source.n_val", 1)
        _finite_positive(src.lr, "source.lr")
        if src.batch_size > src.n_train:
            raise ConfigError(f"source.batch_size = {src.batch_size} is larger than source.n_train = {src.n_train}: "
                              "every step would be one smaller batch; lower the batch size")


def _finite_positive(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")


def check_batches(cfg: Config, n_train: int) -> None:
    """The training batch sizes against the ``n_train`` training images: a batch larger than the training set
    would silently be one smaller batch per epoch (another batch size than the configured one, and another
    learning-rate schedule). Checked at configuration time for synthetic data and once real data are read,
    before any training."""
    for name in PHASES:
        st = getattr(cfg.train, name)
        for arch in cfg.run.archs:
            s = st.for_arch(arch, f"train.{name}")
            if isinstance(s.batch_size, int) and s.batch_size > n_train:
                key = f"train.{name}" + (f".per_arch.{arch}" if arch in st.per_arch else "")
                raise ConfigError(f"{key}.batch_size = {s.batch_size} is larger than the {n_train} training images: "
                                  "every epoch would be one smaller batch; lower the batch size")


def _check_phase(st: PhaseConfig, where: str) -> None:
    if st.optimizer not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"{where}.optimizer must be adam, adamw or sgd, got {st.optimizer!r}")
    if st.schedule not in ("constant", "onecycle"):
        raise ConfigError(f"{where}.schedule must be constant or onecycle, got {st.schedule!r}")
    if st.precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"{where}.precision must be fp32, bf16 or auto, got {st.precision!r}")
    _int_at_least(st.epochs, f"{where}.epochs", 1)
    _int_at_least(st.batch_size, f"{where}.batch_size", 1)
    _int_at_least(st.patience, f"{where}.patience", 1)
    _finite_positive(st.lr, f"{where}.lr")
    if (isinstance(st.weight_decay, bool) or not isinstance(st.weight_decay, (int, float))
            or not math.isfinite(st.weight_decay) or st.weight_decay < 0):
        raise ConfigError(f"{where}.weight_decay must be a finite number >= 0, got {st.weight_decay!r}")
