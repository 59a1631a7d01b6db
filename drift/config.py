"""Run configuration: one typed object passed down, loaded from TOML, overridable with ``key=value``.

The defaults are the demo study (synthetic data, the three study backbones, sized for a 2-core CPU) without
its per-architecture tables (``model.input_scale``, ``train.<phase>.per_arch``), which a config file could add
to but never remove; ``configs/demo.toml`` spells the values out and adds those tables. An unknown key in a
file or an override is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
    # The transfer phase's training and validation images at their own marker strength (a planted shift: the
    # marker appears only once fine-tuning starts); -1 = data.confounder. Same patients, plates aside.
    confounder_transfer: float = -1.0
    # What the marker masks hold, for the marker_mass metrics: "drawn" (the plates painted) or "slot" (every
    # test image's class plate region, painted or not, so a study and its null twin score the same pixels).
    marker_region: str = "drawn"
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
class PhaseConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    patience: int = 3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd
    bn_frozen: bool = True  # BatchNorm in inference mode (always so in the transfer phase)
    # Several CUDA processes (torchrun) with BatchNorm training (bn_frozen = false): batch statistics over the
    # global batch (SyncBatchNorm) instead of each process's share. Recorded per model; off leaves the hash as is.
    sync_bn: bool = False
    schedule: str = "constant"  # constant | onecycle (warm-up to lr over the first quarter, then cosine decay)
    precision: str = "fp32"  # fp32 | bf16 | auto: bf16 autocast of the training steps where the device has it
    # Per-architecture changes to the settings above, e.g. [train.finetune.per_arch.inception_v3] epochs = 5.
    per_arch: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_arch(self, arch: str, where: str = "train.<phase>") -> PhaseConfig:
        """These settings with ``per_arch[arch]`` applied (and no ``per_arch`` of their own)."""
        out = dataclasses.replace(self, per_arch={})
        values = self.per_arch.get(arch, {})
        if not isinstance(values, dict):
            raise ConfigError(f"config key {where}.per_arch.{arch} must be a table, got {values!r}")
        if "per_arch" in values:
            raise ConfigError(f"config key {where}.per_arch.{arch}.per_arch cannot nest")
        _merge(out, values, f"{where}.per_arch.{arch}")
        return out


PHASES = ("transfer", "finetune")
"""The training phases in order: transfer learning (frozen backbone, new head; the study's "stage 1"), then full
fine-tuning (every layer; "stage 2"). They name the tables of :class:`TrainConfig` and the ``<phase>`` of archive
paths."""


@dataclass
class TrainConfig:
    transfer: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=15, lr=1e-3, patience=4, precision="auto"))
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(
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
    sample_set: str = "tp_both"  # per-architecture drift tables: tp_both | all | tp_either | tp_all | tp_ft
    # Map normalisation before the metrics, applied to both checkpoints' maps alike: minmax | sum | none. The
    # first is the primary one; every one listed is scored (a cell of the protocol grid).
    normalize: list[str] = field(default_factory=lambda: ["minmax"])
    # Resampling of the layer's maps before the metrics, another axis of the protocol grid (every one listed is
    # scored, the first is primary): zoom-corners (scipy.ndimage.zoom order 1: tf-keras-vis), bilinear-halfpixel
    # (F.interpolate, align_corners=False), none (metrics at the layer's own grid; masks averaged down to it).
    upsample: list[str] = field(default_factory=lambda: ["bilinear-halfpixel"])
    # Top-k overlap: jaccard (weighted Jaccard of the fractional tie memberships: 1 for identical maps), fractional
    # (their product: the expected overlap under random tie breaks, below 1 for a map with itself when its cut
    # passes through ties), index (lower flat index first). Pixels <= 0 never enter a top set.
    ties: str = "jaccard"
    # Images the methods of a cell are summarised on: common (valid under every method of the cell: a method
    # comparison on one sample) or per-method (each method's own valid images).
    method_sample: str = "common"
    # The mean the drift tables lead with: macro (mean of the per-class means) or micro (mean over images); both
    # are stored in every summary.
    average: str = "macro"
    # IoU of the pixels at or above each threshold of the min-max normalised map (keys thr@XX), beside the top-k
    # IoU; [] = none.
    binarize: list[float] = field(default_factory=list)
    # Centroid shift over the map's diagonal, its longer side, or in pixels of the grid it is measured on.
    centroid_norm: str = "diagonal"
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
    # Relative perturbation sizes |d| / |x|: the smaller ones lie in the local regime (KL ratio within [0.8, 1.25]),
    # the larger ones in the finite-size regime (docs/controls.md says how the grid was chosen).
    eps_grid: list[float] = field(default_factory=lambda: [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1])
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    n_draws: int = 1
    batch_size: int = 8
    # The controls of the iFIM claim (drift.perturb): the same analysis of an untrained network of the same
    # architecture (BatchNorm statistics of the training images), and the share of each image's pixels, ranked by
    # the fine-tuned model's CAM (first method, layer and score), that the ``cam`` control perturbs.
    untrained: bool = True
    cam_fraction: float = 0.2


@dataclass
class BaselinesConfig:
    """Controls for the drift numbers (:mod:`drift.baselines`); both are off by default.

    The seed replicas repeat each training phase in ``phases`` from the same starting point with other training
    seeds; every pair among the run's model and its replicas is scored, and the systematic drift beyond seed noise
    is judged from them (:func:`drift.stats.systematic_drift`, :mod:`drift.verdicts`); ``chains`` adds whole
    chains (both phases retrained). The randomisation check (cascading model randomisation, Adebayo et al. 2018)
    re-initialises the fine-tuned model's layers from the head downwards and scores how far its maps move.
    """

    seeds: int = 0  # seed replicas per phase; 0 = none (at least 2 for a verdict on systematic drift)
    replica_seeds: list[int] = field(default_factory=list)  # explicit replica seeds (override ``seeds``)
    phases: list[str] = field(default_factory=lambda: ["finetune"])  # finetune and/or transfer
    # Whole chains beside the run's own: transfer phase with seed run.seed + 2000 + r, then fine-tuning from that
    # transfer model; judged by the energy test (at least 6 chains in all for a test at 0.05; docs/calibration.md).
    chains: int = 0
    # Cascade cut points: the head and this fraction of the backbone's parameterised layers (weights and
    # BatchNorm), counted from the top, are re-initialised; [] = no randomisation check.
    randomize: list[float] = field(default_factory=list)
    n_images: int = 48  # test images of the randomisation check (the first ones)
    # The flag (drift.randomisation): a cut rejects when the permutation test of "the randomised maps share the
    # trained maps' image content" has p <= flag_alpha and the normalised similarity (0 = a random pairing of images,
    # 1 = the trained maps) is >= flag_normalised; a method is flagged when every scored cut rejects.
    flag_alpha: float = 0.05
    flag_normalised: float = 0.5
    n_permutations: int = 999  # permutations of the flag's test
    # A randomised model whose logits vary by less than this (mean over classes of the std over images, logit
    # units) does not depend on its input: that cut is refused, not scored.
    min_logit_spread: float = 1e-3
    # Subtract each model's mean map over the check's images before comparing (removes the common pattern).
    subtract_mean_map: bool = False


@dataclass
class ReportConfig:
    enabled: bool = True
    n_examples: int = 4


@dataclass
class MeasureConfig:
    """``drift measure``: two checkpoints of a classifier drift did not train (:mod:`drift.measure`).

    Models are specs of :func:`drift.user_models.load_model`: ``timm:<name>`` (or a timm name) with a state-dict
    file, ``module:function`` or ``file.py:function`` factories (state-dict file optional), or a registry name
    with a ``drift run`` checkpoint. Model A fills the archive's ``transfer`` slot, model B the ``finetune`` slot.
    """

    model_a: str = ""
    weights_a: str = ""
    model_b: str = ""  # empty: the same spec as model_a
    weights_b: str = ""
    # State-dict files of replicas of model B (B retrained with other seeds): the retraining-noise floor.
    replicas_b: list[str] = field(default_factory=list)
    name: str = "model"  # the architecture name the archive files the pair under
    images: str = "test"  # the images measured: test (the data's test split, as drift run) | all (every split)
    # Input normalisation of both models; empty: timm's pretrained_cfg for timm models, none for factories.
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    channels: int = 0  # input channels the networks take; 0: timm's in_chans, or the images' own for factories


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
    measure: MeasureConfig = field(default_factory=MeasureConfig)

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

    def hashed_settings(self, *sections: str) -> dict[str, Any]:
        """The values :meth:`part_hash` hashes: the named sections without the settings that only locate or run
        things (``run.out``, ``run.progress``, ``run.threads``, ``run.device``: the device type and thread count
        are part of the environment fingerprint instead; ``data.path``: the data fingerprint covers the data
        wherever they lie; ``model.cache_dir``: a cache's location)."""
        d = self.to_dict()
        for k in ("out", "progress", "threads", "device"):
            d["run"].pop(k)
        d["data"].pop("path")
        for k, default in (("confounder_transfer", -1.0), ("marker_region", "drawn")):  # settings added later:
            if d["data"].get(k) == default:  # at their defaults, the hash of configs written before them
                d["data"].pop(k)
        d["model"].pop("cache_dir")
        for phase in d["train"].values():  # sync_bn off: the hash of configs written before it existed
            if not phase.get("sync_bn", True):
                phase.pop("sync_bn")
        return {k: d[k] for k in sections}

    def part_hash(self, *sections: str) -> str:
        """Hash of the named config sections (:meth:`hashed_settings`)."""
        return hashlib.sha256(json.dumps(self.hashed_settings(*sections), sort_keys=True).encode()).hexdigest()[:16]

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
    "fisher": (*_TRAINED, "attribution", "fisher"),  # attribution: the CAM region of the ``cam`` control
    "stats": (*_TRAINED, "attribution", "metrics"),
    "baselines": (*_TRAINED, "attribution", "metrics", "baselines"),
}
"""Config sections each pipeline step depends on (its own and those of the steps before it)."""


class ConfigError(ValueError):
    pass


RENAMED_KEYS = {"baselines.stages": "baselines.phases", "baselines.flag_pearson": "baselines.flag_normalised"}
"""Keys of earlier versions read under their new name (configs stored in older archives still load)."""


def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set the dataclass fields of ``obj`` from ``values``, recursing; unknown keys and bad types raise."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if path in RENAMED_KEYS:
            new = RENAMED_KEYS[path].rpartition(".")[2]
            if new in values:
                raise ConfigError(f"config keys {path!r} and {RENAMED_KEYS[path]!r} are the same setting "
                                  f"(the first is its earlier name): give only {RENAMED_KEYS[path]!r}")
            key, path = new, RENAMED_KEYS[path]
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


def validate(cfg: Config) -> None:
    """Every setting checked before any compute (:func:`drift.validate.validate`); a bad one raises
    :class:`ConfigError` naming its key."""
    from .validate import validate as check

    check(cfg)


def from_toml_text(text: str) -> Config:
    cfg = Config()
    _merge(cfg, tomllib.loads(text), "")
    return cfg


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


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string that reads back as exactly ``text`` (backslashes, quotes and control
    characters escaped): how the command line passes a path option as a ``key=value`` override."""
    return json.dumps(str(text), ensure_ascii=False).replace("\x7f", "\\u007f")
