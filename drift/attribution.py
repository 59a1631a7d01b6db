"""Class activation maps (CAMs) of a classifier at one or several target layers.

:mod:`drift.capture` runs the model once forward, with hooks on every target layer, and once backward per score,
and yields each layer's activations A (B, K, h, w) and the gradients g = d s / d A (B, K, h, w) of a target-class
score (:data:`SCORES`): ``"logit"``, s = sum_b z_b[t_b] (the logit of each image's target class, summed over the
batch), or ``"softmax"``, s = sum_b softmax(z_b)[t_b] (the class probability). Every gradient-based method is a
small function of (A, g, eps) registered in :data:`METHODS`; :func:`cams_multi` serves all requested methods,
layers and scores from the same pass, :func:`cams` one layer and one score. pytorch-grad-cam is the reference
(same formulas, same hook point); its methods that need other passes (Score-CAM, Eigen-CAM, ...) are reachable as
``"pgc:<name>"`` behind the same interface.

Target layers are modules, dotted names, or the presets of :data:`drift.models.LAYER_PRESETS` (``block``,
``last-conv``, ``stride16``), resolved by :func:`drift.capture.resolve_target_layer`.

Maps are returned raw (unnormalised) at the target layer's resolution (B, h, w); :func:`upsample` brings them to
the input size and :func:`normalize` rescales them when a caller needs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

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
from .capture import (  # noqa: F401  (SCORES, Capture, capture, resolve_target_layer: part of this interface)
    SCORES,
    Capture,
    _capture_all,
    _check_input,
    _check_scores,
    _check_targets,
    _eval_mode,
    _model_device,
    capture,
    resolve_target_layer,
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
            # Makes the layer output require grad even when the backbone is frozen (transfer-phase models).
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
    resolved = [resolve_target_layer(model, layer, tuple(x.shape)) for layer in layers]
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
    forward and one backward pass (:func:`drift.capture.capture`): each is a function of A (B, K, h, w), the
    layer's activations, and g = d s / d A, the gradients of the target-class score (the logit, or the softmax
    probability with ``score="softmax"``), stated with its paper and equation in :mod:`drift.cam_methods`.

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
