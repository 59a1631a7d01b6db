"""Backbone registry, the classifier wrapper, CAM target layers, freezing and weights.

Every classifier in drift takes a grayscale (or RGB) image in [0, 1], shape (B, 1|3, H, W); the model itself
expands grayscale to the three channels the backbone expects and applies the backbone's normalisation. So the
Fisher analysis and the attribution maps live in the image's own pixel space, not in a normalised copy.

The head is the study's: global average pool -> dropout -> linear to C classes, on the backbone's last feature
map (``forward_features``). The CAM target layer of each study backbone is that last convolutional block,
post-activation -- the equivalent of the Keras layers ``relu`` (DenseNet201), ``post_relu`` (ResNet50V2) and
``mixed10`` (InceptionV3).

Each backbone also names CAM layers by preset (:data:`LAYER_PRESETS`, :func:`cam_layer_name`):

    ``block``      the last block, post-activation (``BackboneSpec.cam_layer``); output stride 32.
    ``last-conv``  the last convolution executed before the head (pre-BatchNorm); output stride 32. This is the
                   layer tf-keras-vis's Grad-CAM / Grad-CAM++ use by default: ``penultimate_layer=None`` starts at
                   the model's last layer and, with ``seek_penultimate_conv_layer=True`` (the default), walks
                   ``model.layers`` backwards to the first ``Conv`` layer; naming a non-convolutional layer such as
                   ``relu`` / ``post_relu`` / ``mixed10`` walks back from it in the same way, so a Keras study that
                   passed those names without ``seek_penultimate_conv_layer=False`` explained this layer.
    ``stride16``   a finer layer at output stride 16 (8 x 8 maps at 128 px, 14 x 14 at 224 px).

:func:`keras_layer_name` gives the Keras Applications layer of each preset for the study backbones.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


LAYER_PRESETS = ("block", "last-conv", "stride16")
"""CAM layer presets every registry backbone names (see the module docstring)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What drift needs to know about a backbone.

    Attributes:
        timm_name: name passed to ``timm.create_model``.
        cam_layer: dotted name of the CAM target layer inside the backbone (last block, post-activation): the
            ``block`` preset.
        input_size: the backbone's native input size in pixels.
        min_size: smallest input the backbone accepts.
        cam_min_size: smallest input whose target-layer map is larger than 1 x 1.
        mean, std: per-channel normalisation of its pretrained weights.
        study: one of the study's three architectures (False: small models for tests and smoke runs).
        last_conv: dotted name of the last ``nn.Conv2d`` executed in the backbone's forward pass (``last-conv``).
        stride16: dotted name of a layer at output stride 16 that runs once per forward pass (``stride16``).
        keras: the Keras Applications layer names of the presets ``block``, ``last-conv``, ``stride16`` (in
            :data:`LAYER_PRESETS` order); empty for backbones without a Keras counterpart.
    """

    timm_name: str
    cam_layer: str
    input_size: int
    min_size: int
    cam_min_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    study: bool = False
    last_conv: str = ""
    stride16: str = ""
    keras: tuple[str, ...] = ()

    @property
    def layers(self) -> dict[str, str]:
        """Preset name -> dotted module name inside the backbone (presets a spec leaves empty are omitted)."""
        names = {"block": self.cam_layer, "last-conv": self.last_conv, "stride16": self.stride16}
        return {k: v for k, v in names.items() if v}


REGISTRY: dict[str, BackboneSpec] = {
    # Keras DenseNet201: the last conv is conv5_block32_2_conv (dense block 4 has 32 layers), its last block
    # relu (bn -> relu after conv5_block32_concat); at stride 16 the transition's BatchNorm + ReLU before its
    # 1 x 1 conv and 2 x 2 average pool (Keras pool4_bn -> pool4_relu; timm folds both into one module).
    "densenet201": BackboneSpec(
        "densenet201", "features.norm5", 224, 32, 64, study=True,
        last_conv="features.denseblock4.denselayer32.conv2", stride16="features.transition3.norm",
        keras=("relu", "conv5_block32_2_conv", "pool4_relu"),
    ),
    # Keras ResNet50V2 downsamples in the LAST block of each stack (stack2's stride1), timm's resnetv2_50 in the
    # first block of a stage: both have 6 blocks of width 1024 in the fourth stage, but Keras runs only blocks
    # 1-5 at stride 16, so its last stride-16 block output is conv4_block5_out where timm's is stages.2.
    "resnetv2_50": BackboneSpec(
        "resnetv2_50", "norm", 224, 32, 64, study=True,
        last_conv="stages.3.blocks.2.conv3", stride16="stages.2",
        keras=("post_relu", "conv5_block3_3_conv", "conv4_block5_out"),
    ),
    # Keras InceptionV3 names its 94 convolutions conv2d, conv2d_1, ..., conv2d_93 in creation order (in a fresh
    # Keras session); conv2d_93 is mixed10's branch_pool convolution, created and executed last as in timm.
    # Mixed_5b..Mixed_7c are Keras mixed0..mixed10, so Mixed_6e (stride 16) is mixed7.
    "inception_v3": BackboneSpec(
        "inception_v3", "Mixed_7c", 299, 75, 128, INCEPTION_MEAN, INCEPTION_STD, study=True,
        last_conv="Mixed_7c.branch_pool.conv", stride16="Mixed_6e",
        keras=("mixed10", "conv2d_93", "mixed7"),
    ),
    "resnet18": BackboneSpec("resnet18", "layer4", 224, 32, 64, last_conv="layer4.1.conv2", stride16="layer3"),
    # resnet10t's single layer4 block runs its average-pool shortcut (downsample = AvgPool2d, Conv2d, BatchNorm)
    # after conv2, so the last convolution executed is the shortcut's 1 x 1 conv.
    "resnet10t": BackboneSpec("resnet10t", "layer4", 176, 32, 64, last_conv="layer4.0.downsample.1",
                              stride16="layer3"),
}

STUDY_ARCHS = tuple(name for name, spec in REGISTRY.items() if spec.study)


def get_spec(arch: str) -> BackboneSpec:
    """The registry entry of ``arch``; an unknown name is an error listing the registered ones."""
    try:
        return REGISTRY[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def cam_layer_name(arch: str, layer: str) -> str:
    """The dotted module name (inside the backbone) of CAM layer ``layer`` of ``arch``.

    Args:
        arch: registry name.
        layer: a preset of :data:`LAYER_PRESETS`, or a dotted module name, returned unchanged (it is checked
            against the model when resolved, :func:`resolve_layer`).

    Raises:
        ValueError: unknown ``arch``, or a preset the backbone does not name.
    """
    spec = get_spec(arch)
    if layer not in LAYER_PRESETS:
        return layer
    names = spec.layers
    if layer not in names:
        raise ValueError(f"{arch} names no {layer!r} CAM layer; it names {', '.join(names)}")
    return names[layer]


def keras_layer_name(arch: str, preset: str) -> str | None:
    """The Keras Applications layer that corresponds to CAM layer ``preset`` of ``arch``.

    Args:
        arch: registry name.
        preset: a preset of :data:`LAYER_PRESETS`; a dotted module name has no Keras counterpart here.

    Returns:
        The Keras layer name (as in ``tf.keras.applications``; InceptionV3's convolutions are numbered in creation
        order in a fresh Keras session), or None for a non-study backbone or a dotted module name.

    Raises:
        ValueError: unknown ``arch``.
    """
    spec = get_spec(arch)
    if preset not in LAYER_PRESETS or not spec.keras:
        return None
    return dict(zip(LAYER_PRESETS, spec.keras))[preset]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` called ``name`` (dotted), also accepted relative to ``model.backbone``.

    Raises:
        ValueError: naming the layer, the closest valid names and how to list them all.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        inner = dict(backbone.named_modules())
        if name in inner and name:
            return inner[name]
        modules.update({k: v for k, v in inner.items() if k})
    names = [k for k in modules if k]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    top = [k for k in names if "." not in k]
    raise ValueError(
        f"no layer named {name!r} in {type(model).__name__}; closest valid names: {close or 'none'}; "
        f"top-level layers: {top[:20]}{' ...' if len(top) > 20 else ''} "
        f"(all {len(names)} names: dict(model.named_modules()).keys())"
    )


class Classifier(nn.Module):
    """A timm backbone with the study's head; input (B, 1|3, H, W) in [0, 1], output logits (B, C).

    Args:
        arch: registry name.
        num_classes: C.
        dropout: dropout rate before the linear layer.
        input_size: side in pixels every input is resampled to (bilinear, antialiased when shrinking) before
            the backbone; 0 feeds the input at its own size. Part of the model: CAMs come at the backbone's
            resolution of the resampled input, gradients flow back to the input as given.
    """

    def __init__(self, arch: str, num_classes: int, dropout: float = 0.2, input_size: int = 0):
        super().__init__()
        self.arch = arch
        self.spec = get_spec(arch)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if input_size and input_size < self.spec.min_size:
            raise ValueError(f"{arch}: input_size {input_size} is below its minimum size {self.spec.min_size} px")
        self.input_size = int(input_size)
        self.backbone = timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0, global_pool="")
        width = self.backbone.num_features
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout), nn.Linear(width, num_classes)
        )
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        # Keras practice: BatchNorm stays in inference mode while the backbone is adapted. Honoured by train().
        self.bn_frozen = False

    @property
    def num_classes(self) -> int:
        return self.head[-1].out_features

    @property
    def cam_layer(self) -> nn.Module:
        """The registry's CAM target layer (last convolutional block, post-activation)."""
        return resolve_layer(self.backbone, self.spec.cam_layer)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> normalised (B, 3, H, W)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.arch}: expected input (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            shrink = min(x.shape[-2:]) > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        if min(x.shape[-2:]) < self.spec.min_size:
            raise ValueError(
                f"{self.arch}: input {tuple(x.shape[-2:])} is below its minimum size {self.spec.min_size} px"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (B, F, h, w): the CAM target layer's output."""
        return self.backbone.forward_features(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self.bn_frozen:
            set_bn_eval(self.backbone)
        return self


def set_bn_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in inference mode (running statistics used and not updated)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def freeze_backbone(model: Classifier) -> None:
    """Stage 1 (transfer learning): no backbone parameter trains and BatchNorm stays in inference mode."""
    for prm in model.backbone.parameters():
        prm.requires_grad_(False)
    model.bn_frozen = True
    model.train(model.training)


def unfreeze(model: Classifier, bn_frozen: bool) -> None:
    """Stage 2 (full fine-tuning): every parameter trains; BatchNorm mode as configured."""
    for prm in model.parameters():
        prm.requires_grad_(True)
    model.bn_frozen = bn_frozen
    model.train(model.training)


def build(arch: str, num_classes: int, dropout: float = 0.2, input_size: int = 0) -> Classifier:
    """A randomly initialised :class:`Classifier` (weights are loaded separately)."""
    return Classifier(arch, num_classes, dropout, input_size)


# --------------------------------------------------------------------------------------------------- weights


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model: Classifier, path: str | os.PathLike, meta: dict | None = None) -> str:
    """Write the model's state (tensors and plain metadata only) atomically; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"arch": model.arch, "num_classes": model.num_classes, "input_size": model.input_size,
               "state_dict": model.state_dict()}
    payload["meta"] = {k: str(v) for k, v in (meta or {}).items()}
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # Disk full, quota, read-only folder (torch's zip writer reports these as RuntimeError): no partial file
        # is left under either name.
        tmp.unlink(missing_ok=True)
        from .archive import OutputError

        lines = str(exc).strip().splitlines()
        why = getattr(exc, "strerror", None) or (lines[-1] if lines else type(exc).__name__)
        raise OutputError(f"cannot write checkpoint {path}: {why}") from None
    return sha256_file(path)


def load_state(path: str | os.PathLike) -> dict:
    """Read a checkpoint or weights file without unpickling arbitrary objects (safetensors or weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors" or path.name.endswith("model.safetensors"):
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise ValueError(f"cannot read weights from {path}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj
    if isinstance(obj, dict):
        return {"state_dict": obj}
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")


def load_checkpoint(path: str | os.PathLike, arch: str, num_classes: int, dropout: float = 0.2) -> Classifier:
    """A :class:`Classifier` restored from :func:`save_checkpoint`'s file (with its input size); arch and C
    must match."""
    obj = load_state(path)
    if obj.get("arch", arch) != arch or int(obj.get("num_classes", num_classes)) != num_classes:
        raise ValueError(
            f"checkpoint {path} is {obj.get('arch')} with {obj.get('num_classes')} classes, "
            f"expected {arch} with {num_classes}"
        )
    model = build(arch, num_classes, dropout, int(obj.get("input_size", 0)))
    model.load_state_dict(obj["state_dict"])
    return model


def load_backbone_weights(model: Classifier, state: dict, source: str) -> None:
    """Load a backbone state dict (timm names, optionally prefixed ``backbone.``); classifier keys are dropped."""
    sd = state.get("state_dict", state)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    own = model.backbone.state_dict()
    kept = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} backbone tensors of {model.arch} missing or of another shape "
            f"(first: {missing[:3]}); is this a {model.spec.timm_name} checkpoint?"
        )
    model.backbone.load_state_dict(kept)


def _hub_cache_dir() -> Path:
    """timm's (Hugging Face's) local model cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


_HUB_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


class _WeightsUnavailableError(FileNotFoundError, ValueError):
    """No ImageNet weights in the local cache, and none could be downloaded.

    A ``ValueError`` like every other configuration error, and a ``FileNotFoundError`` as the weights are a missing
    file.
    """


def _hub_source(name: str) -> tuple[str, str | None, list[str]]:
    """Where timm reads the pretrained weights of ``name`` from on the Hugging Face hub.

    Args:
        name: timm model name.

    Returns:
        The repo id, the revision (None: the default branch) and the weight file names in timm's order: a
        safetensors file first, then the pickled file it stands in for. An empty repo id when timm knows no hub
        weights for ``name``.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return "", None, []
    repo, _, revision = hub.partition("@")
    filename = getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return repo, revision or None, [filename]
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    alt = safe.get(filename) or (filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    return repo, revision or None, [alt, filename] if alt else [filename]


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is on, as huggingface_hub read it at import or now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in _HUB_TRUE


def _hub_endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` as set now, else what huggingface_hub read at import (huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _why(exc: BaseException) -> str:
    """One line on why a download failed: the error and the error it wraps, if any."""
    parts = []
    for err in (exc, exc.__cause__):
        if err is not None:
            lines = str(err).strip().splitlines()
            parts.append(f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__)
    return ", caused by ".join(parts)


def _fetch_hub_weights(name: str, arch: str, cache: Path) -> tuple[str, str, str]:
    """The local path of timm's pretrained weights of ``name``: from the Hugging Face cache ``cache`` when there,
    else downloaded into it (unless offline).

    Args:
        name: timm model name.
        arch: registry name, for the error message.
        cache: the hub cache folder.

    Returns:
        Repo id, file name and local path of the weights.

    Raises:
        _WeightsUnavailableError: timm has no hub weights for ``name``, or they are neither in the cache nor
            downloadable; the message names the repo, the files, the cache and the ways to provide them.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision, filenames = _hub_source(name)
    local = f"set model.weights_file to a .safetensors/.pth file of {name}"
    if not repo:
        raise _WeightsUnavailableError(f"no ImageNet weights for {arch}: timm names no Hugging Face repo for {name}; "
                                       f"{local}")
    offline, endpoint = _hub_offline(), _hub_endpoint()
    failures, unreachable = [], False
    for filename in filenames:
        try:
            path = hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache),
                                   local_files_only=offline or unreachable, endpoint=endpoint)
            return repo, filename, str(path)
        except Exception as exc:  # not in the repo or cache, hub unreachable or refusing, disk full: reported below
            if not unreachable:
                failures.append(f"{filename}: {_why(exc)}")
            # An unreachable hub (after huggingface_hub's retries) is not asked again: further files, cache only.
            unreachable = unreachable or isinstance(exc, LocalEntryNotFoundError)
    looked = " or ".join(f"{repo}/{f}" for f in filenames) + (f" (revision {revision})" if revision else "")
    how = ("offline mode is on (HF_HUB_OFFLINE), so nothing was downloaded" if offline
           else f"downloading from {endpoint} failed ({'; '.join(failures)})"
           + ("; on a machine without network access, HF_HUB_OFFLINE=1 skips the attempt" if unreachable else ""))
    raise _WeightsUnavailableError(
        f"no ImageNet weights for {arch} (timm model {name}): {looked} is not in the Hugging Face cache {cache}, and "
        f"{how}. To provide them, {local}, or copy ~/.cache/huggingface/hub from a machine with network access "
        f"(where the weights have been loaded once) to {cache}."
    )


def _read_weights(path: str | os.PathLike) -> dict:
    """:func:`load_state`, with a one-line reason when ``torch.load`` refuses the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a safetensors file nor a state dict saved by ``torch.save``; names the file.
    """
    try:
        return load_state(path)
    except ValueError as exc:
        if exc.__cause__ is None:  # already one line naming the file
            raise
        lines = [ln.strip() for ln in str(exc.__cause__).splitlines() if ln.strip()]
        unpickler = [ln[ln.rfind(" ", 0, ln.find("Unpickler error")) + 1:] + " " + nxt
                     for ln, nxt in zip(lines, [*lines[1:], ""]) if "Unpickler error" in ln]
        why = unpickler[0] if unpickler else lines[0] if lines else type(exc.__cause__).__name__
        raise ValueError(f"cannot read weights from {path}: not a safetensors file nor a state dict saved by "
                         f"torch.save that loads with weights_only=True ({why[:200].strip()})") from None


def _load_error_summary(exc: BaseException) -> str:
    """``load_state_dict``'s error in one line: each kind of mismatch, its count and the first keys."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    parts = []
    for ln in lines[1:]:
        kind, _, keys = ln.partition(": ")
        if kind.endswith("key(s) in state_dict"):
            names = [k.strip('" ') for k in keys.split(", ")]
            parts.append(f"{kind.removesuffix(' in state_dict').lower()}: {len(names)} (first: {', '.join(names[:3])})")
        else:
            parts.append(ln[:160])
    return "; ".join(parts[:3])[:400] if parts else (lines[0] if lines else type(exc).__name__)


def _with_placeholder_head(name: str, sd: dict) -> dict:
    """``sd`` with timm's classifier of ``name`` replaced by zeros of the pretrained shape.

    The classifier is never used (the study's head is new), so a backbone-only file, or one with another number of
    classes, passes timm's strict load like a full ImageNet checkpoint.
    """
    with torch.device("meta"):
        ref = timm.create_model(name)
    heads = ref.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    if not heads:
        return dict(sd)
    prefixes = tuple(h + "." for h in heads)
    out = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    out.update({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.state_dict().items() if k.startswith(prefixes)})
    return out


def _timm_pretrained_state(name: str, state: dict, source: str) -> dict:
    """``state`` passed through timm's own loading of pretrained weights for ``name`` (its key conversions, then a
    strict load), as the full model's state dict.

    Raises:
        ValueError: ``state`` does not hold the weights of ``name``; the message names ``source``.
    """
    sd = state.get("state_dict", state)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source} holds no tensors of {name} (empty, or not a state dict)")
    sd = _with_placeholder_head(name, sd)
    try:
        ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd})
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source} does not hold the weights of timm's {name}: {_load_error_summary(exc)}") from None
    return ref.state_dict()


def load_imagenet(model: Classifier, weights_file: str | None = None) -> str:
    """Load ImageNet weights into the backbone of ``model``; the head stays as initialised.

    The weights come from ``weights_file`` when given, else from timm's pretrained weights on the Hugging Face hub,
    fetched the way timm fetches them: from the local cache (``HF_HUB_CACHE``, or ``HF_HOME``/hub, by default
    ``~/.cache/huggingface/hub``) when there, else downloaded once into it from ``HF_ENDPOINT`` (huggingface.co by
    default). ``HF_HUB_OFFLINE=1`` allows the cache only. Hub files go through timm's key conversions and a strict
    load, as with ``timm.create_model(name, pretrained=True)``.

    Args:
        model: the classifier whose backbone receives the weights.
        weights_file: a local .safetensors/.pth file of the backbone (timm names, optionally prefixed
            ``backbone.``, or a drift checkpoint); empty or None: timm's pretrained weights.

    Returns:
        Where the weights came from: the file, or the hub repo, file and commit.

    Raises:
        FileNotFoundError: ``weights_file`` does not exist.
        ValueError: a file is not a valid checkpoint of the backbone (the message names the file), or no weights
            are cached and none can be downloaded (the message names the timm model, the repo and files looked
            for, the cache folder and how to provide the weights; this error is also a FileNotFoundError).
    """
    name = model.spec.timm_name
    if weights_file:
        state = _read_weights(weights_file)
        try:
            load_backbone_weights(model, state, weights_file)
        except ValueError as direct:
            # timm's own file of the model (as found on the hub), if its keys need timm's conversion.
            try:
                converted = _timm_pretrained_state(name, state, str(weights_file))
            except ValueError:
                raise direct from None
            load_backbone_weights(model, converted, str(weights_file))
        return str(weights_file)
    cache = _hub_cache_dir()
    repo, filename, path = _fetch_hub_weights(name, model.arch, cache)
    where = f"{repo}/{filename} (cached as {path})"
    try:
        state = _read_weights(path)
    except (OSError, ValueError) as exc:
        folder = cache / ("models--" + repo.replace("/", "--"))
        raise ValueError(f"{exc}. It is {repo}/{filename} from the Hugging Face hub: delete {folder} to download "
                         f"it again, or set model.weights_file") from None
    load_backbone_weights(model, _timm_pretrained_state(name, state, where), where)
    commit = Path(path).parent.name if Path(path).parent.parent.name == "snapshots" else "unknown"
    return f"timm pretrained {repo}/{filename} (commit {commit})"
