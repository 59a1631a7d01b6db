"""Run configuration: one typed object passed down, loaded from TOML, overridable with ``key=value``.

The defaults are the demo study (synthetic data, the three study backbones, sized for a 2-core CPU) without
its per-architecture tables (``model.input_scale``, ``train.<stage>.per_arch``), which a config file could add
to but never remove; ``configs/demo.toml`` spells the values out and adds those tables. An unknown key in a
file or an override is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunConfig:
    seed: int = 0
    out: str = "runs/demo"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    archs: list[str] = field(default_factory=lambda: ["densenet201", "resnetv2_50", "inception_v3"])
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | folder | csv
    path: str = ""  # class-folder root or CSV manifest for real data
    image_size: int = 128
    n_train: int = 1200
    n_val: int = 100
    n_test: int = 150
    difficulty: float = 0.0
    confounder: float = 0.0  # correlation of a class marker outside the lungs; 0 = off
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    skip_bad: bool = False
    # Real data: the expected class names, in label order. A label or class folder outside the list is an error
    # (a typo never becomes a class of its own); empty = the sorted names found in the data.
    classes: list[str] = field(default_factory=list)
    # Seed of the synthetic images and of the real-data split; -1 = run.seed. Fix it to vary only training
    # (initialisation, batch order, dropout) across run seeds: the archives then share one test set.
    seed: int = -1


@dataclass
class ModelConfig:
    weights: str = "synthetic-source"  # synthetic-source | none (random init) | imagenet | <checkpoint path>
    weights_file: str = ""  # local ImageNet weights file (imagenet)
    cache_dir: str = ".cache/drift"  # synthetic-source weights are cached here (`drift pretrain` fills it)
    dropout: float = 0.2
    # Per-architecture input scale: the model resamples its input to round(scale x data.image_size) px. The study
    # feeds InceptionV3 299 px and the others 224 px (299 / 224 = 1.33); the demo draws 160 px images and
    # feeds DenseNet201 and ResNetV2-50 at 0.8 (128 px), InceptionV3 at 160 px, where its CAM layer (Mixed_7c)
    # has 3 x 3 cells instead of 2 x 2. Architectures not named: 1.
    input_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """Pretraining on a synthetic source task (stand-in for ImageNet when no weights are at hand).

    The whole backbone trains with a temporary linear head on ``n_train`` source images drawn at the side the
    backbone sees (windows of ``crop`` times that side), then its BatchNorm statistics are re-estimated on whole
    images and ``n_val`` held-out whole images give the source accuracy. Every value here is part of the
    weights' cache key.
    """

    task: str = "lesion-attributes"  # lesion-attributes | textures (drift.data.SOURCE_TASKS)
    crop: float = 1.0  # train on windows of this fraction of the side around the opacity (1 = whole images)
    n_train: int = 3000
    n_val: int = 300
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 16
    schedule: str = "onecycle"  # constant | onecycle
    precision: str = "auto"  # fp32 | bf16 | auto


@dataclass
class StageConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    patience: int = 3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd
    bn_frozen: bool = True  # BatchNorm in inference mode (always so in the transfer stage)
    # Several CUDA processes (torchrun) with BatchNorm training (bn_frozen = false): batch statistics over the
    # global batch (SyncBatchNorm) instead of each process's share. Recorded per model; off leaves the hash as is.
    sync_bn: bool = False
    schedule: str = "constant"  # constant | onecycle (warm-up to lr over the first quarter, then cosine decay)
    precision: str = "fp32"  # fp32 | bf16 | auto: bf16 autocast of the training steps where the device has it
    # Per-architecture changes to the settings above, e.g. [train.finetune.per_arch.inception_v3] epochs = 5.
    per_arch: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_arch(self, arch: str, where: str = "train.<stage>") -> StageConfig:
        """These settings with ``per_arch[arch]`` applied (and no ``per_arch`` of their own)."""
        out = dataclasses.replace(self, per_arch={})
        values = self.per_arch.get(arch, {})
        if not isinstance(values, dict):
            raise ConfigError(f"config key {where}.per_arch.{arch} must be a table, got {values!r}")
        if "per_arch" in values:
            raise ConfigError(f"config key {where}.per_arch.{arch}.per_arch cannot nest")
        _merge(out, values, f"{where}.per_arch.{arch}")
        return out


@dataclass
class TrainConfig:
    transfer: StageConfig = field(default_factory=lambda: StageConfig(epochs=15, lr=1e-3, patience=4, precision="auto"))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(
        epochs=3, lr=2e-3, batch_size=16, patience=3, bn_frozen=False, schedule="onecycle", precision="auto"))


@dataclass
class AttributionConfig:
    # gradcam++: pytorch-grad-cam's reading (alpha not normalised); gradcam++_tfkv: tf-keras-vis's reading (alpha
    # normalised to sum 1 over space per channel), the study's toolchain; layercam; gradcam; pgc:<name>.
    methods: list[str] = field(default_factory=lambda: ["gradcam++", "gradcam++_tfkv", "layercam"])
    # CAM layers, all captured in one forward and one backward pass: presets block (last block, post-activation),
    # last-conv (the last convolution before the head: tf-keras-vis's "penultimate layer"), stride16 (a finer
    # layer at output stride 16), or any dotted module name. The first is the primary layer of the summary.
    layers: list[str] = field(default_factory=lambda: ["last-conv", "block"])
    # Score differentiated: logit (the class logit) or softmax (the class probability, what tf-keras-vis's
    # CategoricalScore differentiates on a Keras model with a softmax output). The first is the primary one.
    scores: list[str] = field(default_factory=lambda: ["logit"])
    target: str = "true"  # true | predicted
    eps: float = 0.0  # Grad-CAM++ denominator epsilon (pytorch-grad-cam uses 1e-6)
    batch_size: int = 16


@dataclass
class MetricsConfig:
    sample_set: str = "tp_both"  # per-architecture drift tables: tp_both | all | tp_either | tp_all
    # Map normalisation before the metrics, applied to both checkpoints' maps alike: minmax | sum | none. The
    # first is the primary one; every one listed is scored (a cell of the protocol grid).
    normalize: list[str] = field(default_factory=lambda: ["minmax"])
    # Images on which architectures are ranked: tp_all (correct under both checkpoints of every architecture:
    # one common sample, so the ranking is not confounded with each architecture's class mix) or a per-arch rule.
    ranking_sample_set: str = "tp_all"
    # Classes with fewer scored images than this are left out of a macro mean (and said so).
    min_per_class: int = 5
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    n_boot: int = 1000
    ranking_metrics: list[str] = field(default_factory=lambda: ["iou@20", "centroid_shift", "pearson"])


@dataclass
class FisherConfig:
    enabled: bool = True
    head: str = "softmax"  # softmax | sigmoid
    n_spectrum: int = 20  # test samples with eigenvalues; 0 = all
    n_components: int = 12  # test samples with components and perturbation curves
    energy: float = 0.9
    eps_grid: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    n_draws: int = 1
    batch_size: int = 8


@dataclass
class BaselinesConfig:
    """Controls for the drift numbers (:mod:`drift.baselines`); both are off by default.

    The seed floor repeats each stage in ``stages`` from the same starting point with other training seeds and
    scores the drift between the run's model and each replica of the same stage (what drift looks like with no
    change of stage). The randomisation check (cascading model randomisation, Adebayo et al. 2018) re-initialises
    the fine-tuned model's layers from the head downwards and scores how far its maps move.
    """

    seeds: int = 0  # seed replicas per stage; 0 = no seed floor
    replica_seeds: list[int] = field(default_factory=list)  # explicit replica seeds (override ``seeds``)
    stages: list[str] = field(default_factory=lambda: ["finetune"])  # finetune and/or transfer
    # Cascade cut points: the head and this fraction of the backbone's parameterised layers (weights and
    # BatchNorm), counted from the top, are re-initialised; [] = no randomisation check.
    randomize: list[float] = field(default_factory=list)
    n_images: int = 48  # test images of the randomisation check (the first ones)
    # A method whose maps keep a mean Pearson correlation >= this with the trained model's maps at every cut
    # point is flagged: its maps carry little information about the model.
    flag_pearson: float = 0.5


@dataclass
class ReportConfig:
    enabled: bool = True
    n_examples: int = 4


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    @property
    def data_seed(self) -> int:
        """The seed of the data (synthetic images, real-data split): ``data.seed``, or ``run.seed`` when -1."""
        return self.run.seed if self.data.seed == -1 else self.data.seed

    def science_hash(self) -> str:
        """Hash of what the trained checkpoints depend on (data, weights, training; not output folder, progress
        bars, thread count, or the analysis settings, whose changes a resume recomputes: :meth:`step_hash`)."""
        return self.part_hash("run", "data", "model", "source", "train")

    def part_hash(self, *sections: str) -> str:
        """Hash of the named config sections (``run`` without out, progress and threads)."""
        d = self.to_dict()
        for k in ("out", "progress", "threads"):
            d["run"].pop(k)
        for stage in d["train"].values():  # sync_bn off: the hash of configs written before it existed
            if not stage.get("sync_bn", True):
                stage.pop("sync_bn")
        return hashlib.sha256(json.dumps({k: d[k] for k in sections}, sort_keys=True).encode()).hexdigest()[:16]

    def step_hash(self, step: str) -> str:
        """Fingerprint of the settings a pipeline step's results depend on: a committed step whose fingerprint
        differs is stale and recomputed on resume."""
        return self.part_hash(*STEP_SECTIONS[step])


_TRAINED = ("run", "data", "model", "source", "train")
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("run", "data"),
    "train": _TRAINED,
    "attributions": (*_TRAINED, "attribution"),
    "drift": (*_TRAINED, "attribution", "metrics"),
    "fisher": (*_TRAINED, "fisher"),
    "stats": (*_TRAINED, "attribution", "metrics"),
    "baselines": (*_TRAINED, "attribution", "metrics", "baselines"),
}
"""Config sections each pipeline step depends on (its own and those of the steps before it)."""


class ConfigError(ValueError):
    pass


def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set the dataclass fields of ``obj`` from ``values``, recursing; unknown keys and bad types raise."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if isinstance(current, dict):  # a free-form table (per_arch): merged key by key, checked by its owner
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a table, got {value!r}")
            setattr(obj, key, _merge_tables(current, value))
            continue
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a table, got {value!r}")
            _merge(current, value, path)
            continue
        setattr(obj, key, _coerce(current, value, path))


def _merge_tables(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in values.items():
        out[key] = (_merge_tables(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def _coerce(current: Any, value: Any, path: str) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"config key {path!r} must be a list, got {value!r}")
        return value
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"config key {path!r} must be {type(current).__name__}, got {value!r}")
    return value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file (if any), then ``key=value`` overrides (values parsed as TOML).

    A file may start from another: a top-level ``extends = "other.toml"`` (relative to the file) loads that file
    first and applies this one's values over it (tables merge key by key)."""
    cfg = Config()
    if path is not None:
        _merge(cfg, _read_toml(Path(path), ()), "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.finetune.lr=1e-5)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as run.device=cpu
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(cfg, nested, "")
    validate(cfg)
    return cfg


def _read_toml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The values of a config file with its ``extends`` chain applied (base first)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(map(str, (*chain, path.resolve())))}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    base = values.pop("extends", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends must be the path of another config file, got {base!r}")
    return _merge_tables(_read_toml(path.parent / base, (*chain, path.resolve())), values)


def from_toml_text(text: str) -> Config:
    cfg = Config()
    _merge(cfg, tomllib.loads(text), "")
    return cfg


def validate(cfg: Config) -> None:
    from .attribution import METHODS, NORMALIZE_MODES, PGC_METHODS, SCORES
    from .models import LAYER_PRESETS, REGISTRY
    from .stats import SELECTION_RULES

    for arch in cfg.run.archs:
        if arch not in REGISTRY:
            raise ConfigError(f"run.archs: unknown architecture {arch!r}; registered: {', '.join(sorted(REGISTRY))}")
    if not cfg.run.archs:
        raise ConfigError("run.archs is empty")
    if cfg.data.source not in ("synthetic", "folder", "csv"):
        raise ConfigError(f"data.source must be synthetic, folder or csv, got {cfg.data.source!r}")
    if cfg.data.source != "synthetic" and not cfg.data.path:
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
    _check_list(cfg.attribution.scores, "attribution.scores", SCORES)
    _check_list(cfg.attribution.layers, "attribution.layers", None)
    for layer in cfg.attribution.layers:
        if not isinstance(layer, str) or not layer or layer == "targets" or "/" in layer:
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
    for name in ("transfer", "finetune"):
        st = getattr(cfg.train, name)
        _check_stage(st, f"train.{name}")
        for arch in st.per_arch:
            if arch not in REGISTRY:
                raise ConfigError(f"train.{name}.per_arch: unknown architecture {arch!r}; "
                                  f"registered: {', '.join(sorted(REGISTRY))}")
            _check_stage(st.for_arch(arch, f"train.{name}"), f"train.{name}.per_arch.{arch}")


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
    _check_list(fc.eps_grid, "fisher.eps_grid", None)
    _number_list(fc.alphas, "fisher.alphas", 0, 1, low_open=False)
    _check_list(fc.alphas, "fisher.alphas", None)
    _int_at_least(cfg.report.n_examples, "report.n_examples", 0)


def _check_baselines(cfg: Config) -> None:
    """Seed-floor and randomisation-check settings."""
    b = cfg.baselines
    _int_at_least(b.seeds, "baselines.seeds", 0, " (seed replicas per stage; 0 = no seed floor)")
    for s in b.replica_seeds:
        _int_at_least(s, "baselines.replica_seeds", 0)
    if len(set(b.replica_seeds)) != len(b.replica_seeds):
        raise ConfigError(f"baselines.replica_seeds lists a seed twice: {b.replica_seeds}")
    _check_list(b.stages, "baselines.stages", ("finetune", "transfer"))
    if b.randomize:
        _number_list(b.randomize, "baselines.randomize", 0, 1, low_open=False)
        _check_list(b.randomize, "baselines.randomize", None)
        if list(b.randomize) != sorted(b.randomize):
            raise ConfigError(f"baselines.randomize must be increasing (a cascade from the head down), "
                              f"got {b.randomize}")
    _int_at_least(b.n_images, "baselines.n_images", 2, " (test images of the randomisation check)")
    if (isinstance(b.flag_pearson, bool) or not isinstance(b.flag_pearson, (int, float))
            or not -1 <= b.flag_pearson <= 1):
        raise ConfigError(f"baselines.flag_pearson must be a correlation in [-1, 1], got {b.flag_pearson!r}")


def _check_list(values: list, key: str, allowed: tuple[str, ...] | None) -> None:
    if not values:
        raise ConfigError(f"{key} is empty")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key} lists a value twice: {values}")
    if allowed is not None:
        for v in values:
            if v not in allowed:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(allowed)}")


def _check_stage(st: StageConfig, where: str) -> None:
    if st.optimizer not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"{where}.optimizer must be adam, adamw or sgd, got {st.optimizer!r}")
    if st.schedule not in ("constant", "onecycle"):
        raise ConfigError(f"{where}.schedule must be constant or onecycle, got {st.schedule!r}")
    if st.precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"{where}.precision must be fp32, bf16 or auto, got {st.precision!r}")
    if st.epochs < 1 or st.batch_size < 1 or st.lr <= 0:
        raise ConfigError(f"{where}: epochs, batch_size and lr must be positive")


def dumps_toml(d: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for the config's own shapes (tables of scalars and lists of scalars)."""
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = ""
    if lines:
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(lines) + "\n\n"
    for k, v in tables:
        out += dumps_toml(v, f"{prefix}.{k}" if prefix else k)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")
