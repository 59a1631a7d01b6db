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
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

LEGACY_PREPROCESSING: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "resnetv2_50": (IMAGENET_MEAN, IMAGENET_STD),
}
"""The (mean, std) an earlier registry gave a backbone whose pretrained weights declare another normalisation.
``resnetv2_50``'s timm weights (and Keras's ResNet50V2 ``preprocess_input``) map [0, 1] to [-1, 1]: mean = std =
0.5. Models of these backbones record their normalisation (``input_mean`` / ``input_std`` attributes of
``models/<arch>/<phase>``); :func:`drift.summary.summary_text` marks an archive whose models lack it."""


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
        mean, std: per-channel normalisation of its pretrained weights, as timm's pretrained config of
            ``timm_name`` declares it (:func:`pretrained_preprocessing`; a test holds every spec to it).
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
    # Its timm weights (resnetv2_50.a1h_in1k) declare mean = std = 0.5, as Keras's ResNet50V2 preprocessing.
    "resnetv2_50": BackboneSpec(
        "resnetv2_50", "norm", 224, 32, 64, INCEPTION_MEAN, INCEPTION_STD, study=True,
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


def pretrained_preprocessing(arch: str) -> dict:
    """The input normalisation timm's pretrained config declares for the default weights of ``arch``.

    Read from ``timm.models.get_pretrained_cfg(spec.timm_name)`` (part of timm's code: no download). The model
    maps an input x in [0, 1] to (x - mean) / std per channel.

    Returns:
        ``{"mean": (3,) tuple, "std": (3,) tuple, "weights": "<timm name>.<tag>", "input_size": (3, H, W)}``.

    Raises:
        ValueError: unknown ``arch``, or timm has no pretrained config for it.
    """
    spec = get_spec(arch)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    if cfg is None:
        raise ValueError(f"{arch}: timm {timm.__version__} has no pretrained config for {spec.timm_name!r}")
    tag = getattr(cfg, "tag", None)
    return {"mean": tuple(float(v) for v in cfg.mean), "std": tuple(float(v) for v in cfg.std),
            "weights": f"{spec.timm_name}.{tag}" if tag else spec.timm_name, "input_size": tuple(cfg.input_size)}


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

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Use per-channel ``mean`` and ``std`` (3 values each, std > 0) for the inputs from now on."""
        m, sd = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if m.shape != (3,) or sd.shape != (3,) or not bool((sd > 0).all()) or not bool(m.isfinite().all()):
            raise ValueError(f"{self.arch}: normalisation needs 3 finite means and 3 positive stds, got {mean}, {std}")
        self.mean.copy_(m.view(1, 3, 1, 1))
        self.std.copy_(sd.view(1, 3, 1, 1))

    @property
    def normalization(self) -> dict[str, list[float]]:
        """The per-channel ``mean`` and ``std`` the model applies to its [0, 1] input (what the archive records)."""
        return {"mean": [float(v) for v in self.mean.flatten()], "std": [float(v) for v in self.std.flatten()]}

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
    """Transfer phase (the study's stage 1): no backbone parameter trains and BatchNorm stays in inference mode."""
    for prm in model.backbone.parameters():
        prm.requires_grad_(False)
    model.bn_frozen = True
    model.train(model.training)


def unfreeze(model: Classifier, bn_frozen: bool) -> None:
    """Fine-tuning phase (the study's stage 2): every parameter trains; BatchNorm mode as configured."""
    for prm in model.parameters():
        prm.requires_grad_(True)
    model.bn_frozen = bn_frozen
    model.train(model.training)


def build(arch: str, num_classes: int, dropout: float = 0.2, input_size: int = 0) -> Classifier:
    """A randomly initialised :class:`Classifier` (weights are loaded separately)."""
    return Classifier(arch, num_classes, dropout, input_size)
