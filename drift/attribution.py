"""Class activation maps (CAMs) of a classifier at one or several target layers.

One place runs the model once forward, with hooks on every target layer, and once backward per score, and yields
each layer's activations A (B, K, h, w) and the gradients g = d s / d A (B, K, h, w) of a target-class score
(:data:`SCORES`): ``"logit"``, s = sum_b z_b[t_b] (the logit of each image's target class, summed over the
batch), or ``"softmax"``, s = sum_b softmax(z_b)[t_b] (the class probability: what tf-keras-vis's
CategoricalScore differentiates on a Keras model with a softmax output). :func:`capture` returns one layer's
(A, g). Every gradient-based method is a small function of (A, g, eps) registered in :data:`METHODS`;
:func:`cams_multi` serves all requested methods, layers and scores from the same pass, :func:`cams` one layer
and one score. pytorch-grad-cam is the reference (same formulas, same hook point); its methods that need other
passes (Score-CAM, Eigen-CAM, ...) are reachable as ``"pgc:<name>"`` behind the same interface.

Target layers are modules, dotted names, or the presets of :data:`drift.models.LAYER_PRESETS` (``block``,
``last-conv``, ``stride16``), resolved through the model's registry architecture (``model.arch``, or a timm
model's ``pretrained_cfg["architecture"]``).

Maps are returned raw (unnormalised) at the target layer's resolution (B, h, w); :func:`upsample` brings them to
the input size and :func:`normalize` rescales them when a caller needs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cam_methods import (  # noqa: F401  (the methods are part of this module's interface)
    METHODS,
    CamMethod,
    gradcam,
    gradcam_plusplus,
    gradcam_plusplus_tfkv,
    layercam,
    register_method,
)
from .maps import NORMALIZE_MODES, normalize, upsample  # noqa: F401  (part of this module's interface)

# pytorch-grad-cam classes reachable as "pgc:<key>"; imported lazily (the reference pulls in cv2 and ttach).
PGC_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "layercam": "LayerCAM",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "kpcacam": "KPCA_CAM",
    "randomcam": "RandomCAM",
}

SCORES = ("logit", "softmax")
"""Differentiated target-class scores: the logit z_t, or the softmax probability softmax(z)_t."""


@dataclass
class Capture:
    """What one forward and backward pass at the target layer yields.

    Attributes:
        activations: A, the layer's output (B, K, h, w), detached.
        gradients: g = d s / d A (B, K, h, w) with s = sum_b logits[b, targets[b]] (score ``"logit"``) or
            s = sum_b softmax(logits[b])[targets[b]] (score ``"softmax"``).
        logits: model output (B, C), detached.
        targets: class index per image (B,) int64.
        layer: the layer's dotted name (for messages).
        score: the differentiated score, one of :data:`SCORES`.
    """

    activations: torch.Tensor
    gradients: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    layer: str
    score: str = "logit"


def _layer_name(model: nn.Module, layer: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is layer:
            return name or type(layer).__name__
    return None


def _model_arch(model: nn.Module) -> str | None:
    arch = getattr(model, "arch", None)
    if isinstance(arch, str):
        return arch
    cfg = getattr(model, "pretrained_cfg", None)  # a bare timm model
    if isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str):
        return cfg["architecture"]
    return None


def resolve_target_layer(model: nn.Module, layer: nn.Module | str | None) -> tuple[nn.Module, str]:
    """The target layer module and its dotted name.

    Args:
        model: the classifier.
        layer: a submodule of ``model``, its dotted name, a preset of :data:`drift.models.LAYER_PRESETS`
            (resolved through the model's registry architecture), or None for ``model.cam_layer``.

    Raises:
        ValueError: unknown name (listing valid ones), a preset on a model outside the registry, a module that
            is not part of ``model``, or None for a model without a ``cam_layer``.
        TypeError: ``layer`` of another type.
    """
    if isinstance(layer, str):
        from drift.models import LAYER_PRESETS, REGISTRY, cam_layer_name

        if layer in LAYER_PRESETS:
            arch = _model_arch(model)
            if arch not in REGISTRY:
                has = "no registry architecture (no arch attribute)" if arch is None else f"architecture {arch!r}"
                raise ValueError(
                    f"layer {layer!r} is a preset ({', '.join(LAYER_PRESETS)}) of the registry architectures "
                    f"({', '.join(REGISTRY)}); {type(model).__name__} has {has}: pass a dotted module name"
                )
            layer = cam_layer_name(arch, layer)
    if layer is None:
        layer = getattr(model, "cam_layer", None)
        if layer is None:
            raise ValueError(
                f"{type(model).__name__} has no cam_layer: pass layer= as a module or a dotted name "
                "(e.g. 'features.norm5' for timm's densenet201)"
            )
    if isinstance(layer, str):
        from drift.models import resolve_layer

        module = resolve_layer(model, layer)
        return module, layer
    if isinstance(layer, nn.Module):
        name = _layer_name(model, layer)
        if name is None:
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}")
        return layer, name
    raise TypeError(f"layer must be an nn.Module, a dotted name or None, got {type(layer).__name__}")


@contextmanager
def _eval_mode(model: nn.Module):
    """Evaluate in inference mode, then restore every submodule's own flag (stage-1 models mix modes)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # Assign the flags directly: train() may be overridden (e.g. to keep BatchNorm frozen).
        for m, flag in flags:
            m.training = flag


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (B = 0)")


def _check_targets(targets, batch: int, n_classes: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(targets, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"targets must have shape ({batch},) (one class per image), got {tuple(t.shape)}")
    t = t.long().clone()  # a normal tensor even when made under torch.inference_mode() (gather saves it)
    bad = (t < 0) | (t >= n_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(t[i])} is not a class index of a {n_classes}-class output")
    return t


def _score_value(logits: torch.Tensor, t: torch.Tensor, score: str) -> torch.Tensor:
    if score == "logit":
        return logits.gather(1, t[:, None]).sum()
    return logits.softmax(dim=1).gather(1, t[:, None]).sum()


def _check_scores(scores: str | Sequence[str]) -> list[str]:
    scores = [scores] if isinstance(scores, str) else list(scores)
    if not scores:
        raise ValueError(f"scores is empty; choose from {SCORES}")
    for sc in scores:
        if sc not in SCORES:
            raise ValueError(f"unknown score {sc!r}; choose from {SCORES}")
    if len(set(scores)) != len(scores):
        raise ValueError(f"scores lists a name twice: {scores}")
    return scores


def _capture_all(model: nn.Module, x: torch.Tensor, layers: list[tuple[nn.Module, str]], targets,
                 scores: Sequence[str]):
    # A caller inside torch.inference_mode() still gets gradients at the layers.
    with torch.inference_mode(False):
        return _capture_all_grad(model, x, layers, targets, scores)


def _capture_all_grad(model: nn.Module, x: torch.Tensor, layers: list[tuple[nn.Module, str]], targets,
                      scores: Sequence[str]):
    """One forward pass hooked at every (distinct) layer, one ``autograd.grad`` per score over all of them.

    Returns:
        (activations: list of (B, K, h, w) per layer, {score: list of gradients per layer}, logits (B, C),
        targets (B,)), all detached.
    """
    store: dict[int, torch.Tensor] = {}

    def make_hook(i: int, name: str):
        def hook(module: nn.Module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"layer {name!r} outputs {what}; CAMs need a (B, K, h, w) feature map")
            if i in store:
                raise ValueError(f"layer {name!r} ran more than once in one forward pass; pick a layer that runs once")
            # Everything below the first target layer ran without autograd bookkeeping (no graph kept for the
            # backbone); from here on the head must be recorded to differentiate the score with respect to A.
            torch.set_grad_enabled(True)
            if output.requires_grad:
                # Already in the graph (downstream of an earlier target layer): it must stay a node of it, since a
                # leaf here would cut the gradient path back to the earlier layers.
                store[i] = output
            else:
                store[i] = output.detach().requires_grad_(True)
            # A copy feeds the rest of the network: in-place ops downstream (an inplace ReLU) then neither alter
            # the stored activation nor trip autograd's check on leaves.
            return store[i].clone()

        return hook

    handles = [module.register_forward_hook(make_hook(i, name)) for i, (module, name) in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    for i, (_, name) in enumerate(layers):
        if i not in store:
            raise ValueError(f"layer {name!r} did not run in the forward pass of {type(model).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        what = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits (B={x.shape[0]}, C), got {what}")
    if not logits.requires_grad:
        raise ValueError(
            f"the model output does not depend on layer {layers[0][1]!r} through autograd (is the head run under "
            "no_grad?)"
        )
    t = logits.detach().argmax(dim=1) if targets is None else _check_targets(targets, *logits.shape, logits.device)
    acts = [store[i] for i in range(len(layers))]
    grads: dict[str, list[torch.Tensor]] = {}
    for k, sc in enumerate(scores):
        g = torch.autograd.grad(_score_value(logits, t, sc), acts, retain_graph=k + 1 < len(scores),
                                allow_unused=True)
        for gi, (_, name) in zip(g, layers):
            if gi is None:
                raise ValueError(f"the model output does not depend on layer {name!r} through autograd")
        grads[sc] = [gi.detach() for gi in g]
    return [a.detach() for a in acts], grads, logits.detach(), t


def capture(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    layer: nn.Module | str | None = None,
    score: str = "logit",
) -> Capture:
    """Activations A and gradients g = d s / d A at the target layer, from one forward and one backward pass.

    s = sum_b z_b[t_b], the target-class logits summed over the batch (score ``"logit"``), or
    s = sum_b softmax(z_b)[t_b] (score ``"softmax"``); images do not interact in eval mode, so g of image b is the
    gradient of its own score. The model runs in eval mode; every submodule's train/eval flag and every
    requires_grad flag is as it was afterwards, and no parameter ``.grad`` is written (the gradient is taken with
    ``torch.autograd.grad`` on the captured activation, which also works for frozen backbones). x is moved to the
    model's device.

    Args:
        model: classifier returning logits (B, C).
        x: input batch (B, Cin, H, W).
        targets: class index per image (B,); None: the predicted class (argmax of the logits).
        layer: target layer (module, dotted name, preset, or None for ``model.cam_layer``).
        score: one of :data:`SCORES`.

    Returns:
        A :class:`Capture`; activations and gradients keep the layer's dtype.
    """
    _check_input(x)
    (score,) = _check_scores((score,))
    module, name = resolve_target_layer(model, layer)
    x = x.to(_model_device(model, x.device))
    with _eval_mode(model):
        (A,), grads, logits, t = _capture_all(model, x, [(module, name)], targets, (score,))
    return Capture(A, grads[score][0], logits, t, name, score)


def _split_methods(methods: str | Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = list(methods)
    if not methods:
        raise ValueError(
            "methods is empty; choose from " + ", ".join(list(METHODS) + ["pgc:" + k for k in PGC_METHODS])
        )
    grad, pgc = [], []
    for m in methods:
        if m in METHODS:
            grad.append(m)
        elif isinstance(m, str) and m.startswith("pgc:") and m[4:] in PGC_METHODS:
            pgc.append(m)
        else:
            raise ValueError(
                f"unknown CAM method {m!r}; gradient methods: {sorted(METHODS)}; "
                f"pytorch-grad-cam methods: {['pgc:' + k for k in PGC_METHODS]}"
            )
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods lists a name twice: {methods}")
    return methods, grad, pgc


def _warn_degenerate(name: str, hw: tuple[int, int], size: tuple[int, int], stacklevel: int = 4) -> None:
    if hw[0] * hw[1] == 1:
        warnings.warn(
            f"layer {name!r} gives a 1 x 1 map at input size {size[0]} x {size[1]}: every CAM is constant after "
            "upsampling (degenerate); use a larger input",
            stacklevel=stacklevel,
        )


def _pgc_maps(model, x, targets, module, name, methods) -> dict[str, torch.Tensor]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    shape: dict[str, tuple[int, ...]] = {}

    def record(m, i, o):
        shape.setdefault("hw", tuple(o.shape[-2:]))

    handles = [module.register_forward_hook(record)]
    # The reference zeroes and accumulates parameter .grad (loss.backward()): put the caller's back afterwards.
    saved = [(p, p.grad) for p in model.parameters()]
    wanted = None
    if targets is not None:
        t = torch.as_tensor(targets)
        wanted = [ClassifierOutputTarget(int(c)) for c in t.reshape(-1).tolist()] if t.ndim == 1 else None

        def check(m, i, logits):
            # The class count is known only once the model has run: check before the reference indexes with it.
            _check_targets(targets, x.shape[0], logits.shape[-1], logits.device)

        handles.append(model.register_forward_hook(check))
    out = {}
    try:
        for m in methods:
            cam = getattr(pytorch_grad_cam, PGC_METHODS[m[4:]])(model=model, target_layers=[module])
            # Makes the layer output require grad even when the backbone is frozen (stage-1 models).
            cam.compute_input_gradient = True
            try:
                with torch.enable_grad():
                    maps = cam(input_tensor=x, targets=wanted)
            finally:
                cam.activations_and_grads.release()
            maps = torch.from_numpy(maps).to(x.device, torch.float32)
            out[m] = F.interpolate(maps[:, None], size=shape["hw"], mode="area")[:, 0]
    finally:
        for h in handles:
            h.remove()
        for p, grad in saved:
            p.grad = grad
    _warn_degenerate(name, shape["hw"], tuple(x.shape[-2:]), stacklevel=5)
    return out


def _cams_all(model, x, targets, methods, layers, scores, eps) -> list[list[dict[str, torch.Tensor]]]:
    """Maps per layer, per score, per method: ``out[i][j][method]`` for ``layers[i]`` and ``scores[j]``."""
    _check_input(x)
    methods, grad_methods, pgc_methods = _split_methods(methods)
    scores = _check_scores(scores)
    if pgc_methods and "softmax" in scores:
        raise ValueError(
            f"pytorch-grad-cam methods ({', '.join(pgc_methods)}) explain the logit only; score 'softmax' works "
            "with the gradient methods"
        )
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    resolved = [resolve_target_layer(model, layer) for layer in layers]
    # Two names of one module (a preset and its dotted name) share one hook.
    unique: list[tuple[nn.Module, str]] = []
    slot = []
    for module, name in resolved:
        ids = [i for i, (m, _) in enumerate(unique) if m is module]
        if not ids:
            unique.append((module, name))
        slot.append(ids[0] if ids else len(unique) - 1)
    x = x.to(_model_device(model, x.device))
    maps: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with _eval_mode(model):
        if grad_methods:
            acts, grads, _, t = _capture_all(model, x, unique, targets, scores)
            for u, (A, (_, name)) in enumerate(zip(acts, unique)):
                _warn_degenerate(name, tuple(A.shape[-2:]), tuple(x.shape[-2:]))
                A = A.float()
                for sc in scores:
                    g = grads[sc][u].float()
                    maps[u, sc] = {m: METHODS[m](A, g, float(eps)) for m in grad_methods}
            if targets is None:
                # pytorch-grad-cam methods explain the same classes as the gradient methods.
                targets = t
        if pgc_methods:
            for u, (module, name) in enumerate(unique):
                maps.setdefault((u, "logit"), {}).update(_pgc_maps(model, x, targets, module, name, pgc_methods))
    return [[{m: maps[u, sc][m] for m in methods} for sc in scores] for u in slot]


def cams_multi(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    methods: str | Sequence[str] = ("gradcam++", "layercam"),
    layers: str | Sequence[nn.Module | str | None] = ("block",),
    scores: str | Sequence[str] = ("logit",),
    eps: float = 0.0,
) -> dict[tuple[nn.Module | str | None, str], dict[str, torch.Tensor]]:
    """CAMs of every requested method at several layers for several scores, from one forward pass.

    The forward pass is hooked at every layer; the first hooked layer to run becomes the root of the recorded
    graph (the backbone below it runs without autograd bookkeeping) and later ones stay nodes of that graph (a
    later layer outside it, e.g. on a parallel branch of a frozen backbone, becomes a root too), so one
    ``torch.autograd.grad`` per score gives the gradients at all layers at once. Each (layer, score) then
    gets the maps of :func:`cams`, with the same formulas, guarantees (eval mode, flags and parameter ``.grad``
    left as they were, frozen backbones supported) and 1 x 1 warning. ``"pgc:<name>"`` methods run
    pytorch-grad-cam's own passes per layer and exist for the ``"logit"`` score only.

    Args:
        model: classifier returning logits (B, C).
        x: input batch (B, Cin, H, W); moved to the model's device.
        targets: class index per image (B,); None: each image's predicted class.
        methods: method names (a single name is accepted).
        layers: target layers: presets of :data:`drift.models.LAYER_PRESETS` (resolved through ``model.arch``),
            dotted names, modules, or None for ``model.cam_layer`` (a single name is accepted).
        scores: scores of :data:`SCORES` to differentiate (a single name is accepted).
        eps: Grad-CAM++ denominator term (pytorch-grad-cam uses 1e-6).

    Returns:
        {(layer as given, score): {method: maps (B, h, w) float32 on the model's device}}, layers outermost, in
        the order given.

    Raises:
        ValueError: a layer or score listed twice, an unknown score or method, a pgc method with score
            ``"softmax"``, or a layer that cannot be resolved or does not run once.
    """
    layers = [layers] if isinstance(layers, (str, nn.Module)) or layers is None else list(layers)
    if not layers:
        raise ValueError("layers is empty; pass presets (block, last-conv, stride16), dotted names or modules")
    if any(sum(other is layer or (isinstance(layer, str) and other == layer) for other in layers) > 1
           for layer in layers):
        raise ValueError(f"layers lists a layer twice: {layers}")
    scores = _check_scores(scores)
    out = _cams_all(model, x, targets, methods, layers, scores, eps)
    return {(layer, sc): out[i][j] for i, layer in enumerate(layers) for j, sc in enumerate(scores)}


def cams(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    methods: str | Sequence[str] = ("gradcam++", "layercam"),
    layer: nn.Module | str | None = None,
    eps: float = 0.0,
    score: str = "logit",
) -> dict[str, torch.Tensor]:
    """CAMs of every requested method at the target layer, raw, at the layer's resolution.

    Gradient methods (:data:`METHODS`: ``gradcam``, ``gradcam++``, ``gradcam++_tfkv``, ``layercam``) share one
    forward and one backward pass (:func:`capture`): with A (B, K, h, w) the layer's activations and g = d s / d A
    the gradients of the target-class score (the logit, or the softmax probability with ``score="softmax"``),

        gradcam:        relu(sum_k mean_ij(g_k) A_k)
        gradcam++:      relu(sum_k w_k A_k), w_k = sum_ij alpha_kij relu(g_kij),
                        alpha = g^2 / (2 g^2 + sum_ab A_kab g^3 + eps), alpha = 0 where g = 0
        gradcam++_tfkv: as gradcam++ with eps = 0 and alpha normalised to sum 1 over space per channel
                        (tf-keras-vis; see :func:`gradcam_plusplus_tfkv`)
        layercam:       relu(sum_k relu(g_k) A_k)

    Methods ``"pgc:<name>"`` (keys of :data:`PGC_METHODS`) run pytorch-grad-cam's own class, each with its own
    passes; those maps are the reference's output, i.e. min-max normalised to [0, 1] per map and resized to the
    input size, then area-averaged back to the layer resolution here. They are therefore NOT raw maps, and they
    explain the logit only.

    The model runs in eval mode and is left with its train/eval and requires_grad flags and parameter ``.grad``
    unchanged. A 1 x 1 layer map triggers a warning naming the layer and input size.

    Args:
        model: classifier returning logits (B, C).
        x: input batch (B, Cin, H, W); moved to the model's device.
        targets: class index per image (B,); None: each image's predicted class.
        methods: method names (a single name is accepted).
        layer: target layer (module, dotted name, preset, or None for ``model.cam_layer``).
        eps: Grad-CAM++ denominator term (pytorch-grad-cam uses 1e-6).
        score: one of :data:`SCORES`.

    Returns:
        {method: maps (B, h, w) float32 on the model's device}, in the order of ``methods``.
    """
    return _cams_all(model, x, targets, methods, [layer], [score], eps)[0][0]
