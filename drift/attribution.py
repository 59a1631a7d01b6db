"""Class activation maps (CAMs) of a classifier at one target layer.

One place, :func:`capture`, runs the model once forward and once backward and returns the target layer's
activations A (B, K, h, w) and the gradients g = d s / d A (B, K, h, w) of the target-class score
s = sum_b z_b[t_b] (the logit of each image's target class, summed over the batch). Every gradient-based method
is then a small function of (A, g, eps) registered in :data:`METHODS`; :func:`cams` serves all requested methods
from the same capture. pytorch-grad-cam is the reference (same formulas, same hook point); its methods that need
other passes (Score-CAM, Eigen-CAM, ...) are reachable as ``"pgc:<name>"`` behind the same interface.

Maps are returned raw (unnormalised) at the target layer's resolution (B, h, w); :func:`upsample` brings them to
the input size and :func:`normalize` rescales them when a caller needs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CamMethod = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

METHODS: dict[str, CamMethod] = {}
"""Gradient-based CAM methods: name -> function(A (B, K, h, w), g (B, K, h, w), eps) -> map (B, h, w)."""

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

NORMALIZE_MODES = ("none", "minmax", "sum")


def register_method(name: str) -> Callable[[CamMethod], CamMethod]:
    """Decorator adding a gradient-based method ``fn(A, g, eps) -> (B, h, w)`` to :data:`METHODS` as ``name``."""

    def deco(fn: CamMethod) -> CamMethod:
        if name in METHODS or name.startswith("pgc:"):
            raise ValueError(f"CAM method name {name!r} is taken or reserved")
        METHODS[name] = fn
        return fn

    return deco


@register_method("gradcam")
def gradcam(A: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Grad-CAM: map = relu(sum_k w_k A_k) with w_k = mean_ij g_kij.

    Args:
        A: activations (B, K, h, w).
        g: gradients of the target score with respect to A, (B, K, h, w).
        eps: unused (uniform signature).

    Returns:
        Raw maps (B, h, w).
    """
    w = g.mean(dim=(2, 3))
    return torch.relu(torch.einsum("bk,bkhw->bhw", w, A))


@register_method("gradcam++")
def gradcam_plusplus(A: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Grad-CAM++: map = relu(sum_k w_k A_k), w_k = sum_ij alpha_kij relu(g_kij), with

    alpha_kij = g_kij^2 / (2 g_kij^2 + (sum_ab A_kab) g_kij^3 + eps), and alpha = 0 where g = 0.

    pytorch-grad-cam uses eps = 1e-6; with small gradients (random weights, confident models) that eps changes
    the maps, so pass it explicitly when comparing with the reference.

    Args:
        A: activations (B, K, h, w).
        g: gradients of the target score with respect to A, (B, K, h, w).
        eps: added to the alpha denominator.

    Returns:
        Raw maps (B, h, w).
    """
    g2 = g * g
    s = A.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + s * g2 * g + eps)
    # Only g > 0 contributes (relu(g)); selecting instead of multiplying keeps 0 * inf (a vanishing
    # denominator where g <= 0) and 0 / 0 (g = 0, eps = 0) out of the weights.
    w = torch.where(g > 0, alpha * g, torch.zeros_like(g)).sum(dim=(2, 3))
    return torch.relu(torch.einsum("bk,bkhw->bhw", w, A))


@register_method("layercam")
def layercam(A: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """LayerCAM: map_ij = relu(sum_k relu(g_kij) A_kij).

    Args:
        A: activations (B, K, h, w).
        g: gradients of the target score with respect to A, (B, K, h, w).
        eps: unused (uniform signature).

    Returns:
        Raw maps (B, h, w).
    """
    return torch.relu((torch.relu(g) * A).sum(dim=1))


@dataclass
class Capture:
    """What one forward and backward pass at the target layer yields.

    Attributes:
        activations: A, the layer's output (B, K, h, w), detached.
        gradients: g = d s / d A (B, K, h, w) with s = sum_b logits[b, targets[b]].
        logits: model output (B, C), detached.
        targets: class index per image (B,) int64.
        layer: the layer's dotted name (for messages).
    """

    activations: torch.Tensor
    gradients: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    layer: str


def _layer_name(model: nn.Module, layer: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is layer:
            return name or type(layer).__name__
    return None


def resolve_target_layer(model: nn.Module, layer: nn.Module | str | None) -> tuple[nn.Module, str]:
    """The target layer module and its dotted name.

    Args:
        model: the classifier.
        layer: a submodule of ``model``, its dotted name, or None for ``model.cam_layer``.

    Raises:
        ValueError: unknown name (listing valid ones), a module that is not part of ``model``, or None for a
            model without a ``cam_layer``.
        TypeError: ``layer`` of another type.
    """
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


def _capture(model: nn.Module, x: torch.Tensor, layer: nn.Module, name: str, targets) -> Capture:
    # A caller inside torch.inference_mode() still gets gradients at the layer.
    with torch.inference_mode(False):
        return _capture_grad(model, x, layer, name, targets)


def _capture_grad(model: nn.Module, x: torch.Tensor, layer: nn.Module, name: str, targets) -> Capture:
    store: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {name!r} outputs {what}; CAMs need a (B, K, h, w) feature map")
        if "A" in store:
            raise ValueError(f"layer {name!r} ran more than once in one forward pass; pick a layer that runs once")
        # Everything below the layer ran without autograd bookkeeping (no graph kept for the backbone);
        # from here on the head must be recorded to differentiate the score with respect to A.
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        store["A"] = leaf
        # A copy feeds the rest of the network: in-place ops downstream (an inplace ReLU) then neither alter
        # the stored activation nor trip autograd's check on leaves.
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if "A" not in store:
        raise ValueError(f"layer {name!r} did not run in the forward pass of {type(model).__name__}")
    A = store["A"]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        what = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits (B={x.shape[0]}, C), got {what}")
    if not logits.requires_grad:
        raise ValueError(
            f"the model output does not depend on layer {name!r} through autograd (is the head run under no_grad?)"
        )
    t = logits.detach().argmax(dim=1) if targets is None else _check_targets(targets, *logits.shape, logits.device)
    score = logits.gather(1, t[:, None]).sum()
    (g,) = torch.autograd.grad(score, A)
    return Capture(A.detach(), g.detach(), logits.detach(), t, name)


def capture(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    layer: nn.Module | str | None = None,
) -> Capture:
    """Activations A and gradients g = d s / d A at the target layer, from one forward and one backward pass.

    s = sum_b z_b[t_b], the target-class logits summed over the batch (images do not interact in eval mode, so
    g of image b is the gradient of its own logit). The model runs in eval mode; every submodule's train/eval
    flag and every requires_grad flag is as it was afterwards, and no parameter ``.grad`` is written (the
    gradient is taken with ``torch.autograd.grad`` on the captured activation, which also works for frozen
    backbones). x is moved to the model's device.

    Args:
        model: classifier returning logits (B, C).
        x: input batch (B, Cin, H, W).
        targets: class index per image (B,); None: the predicted class (argmax of the logits).
        layer: target layer (module, dotted name or None for ``model.cam_layer``).

    Returns:
        A :class:`Capture`; activations and gradients keep the layer's dtype.
    """
    _check_input(x)
    module, name = resolve_target_layer(model, layer)
    x = x.to(_model_device(model, x.device))
    with _eval_mode(model):
        return _capture(model, x, module, name, targets)


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


def _warn_degenerate(name: str, hw: tuple[int, int], size: tuple[int, int]) -> None:
    if hw[0] * hw[1] == 1:
        warnings.warn(
            f"layer {name!r} gives a 1 x 1 map at input size {size[0]} x {size[1]}: every CAM is constant after "
            "upsampling (degenerate); use a larger input",
            stacklevel=3,
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
    _warn_degenerate(name, shape["hw"], tuple(x.shape[-2:]))
    return out


def cams(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    methods: str | Sequence[str] = ("gradcam++", "layercam"),
    layer: nn.Module | str | None = None,
    eps: float = 0.0,
) -> dict[str, torch.Tensor]:
    """CAMs of every requested method at the target layer, raw, at the layer's resolution.

    Gradient methods (:data:`METHODS`: ``gradcam``, ``gradcam++``, ``layercam``) share one forward and one
    backward pass (:func:`capture`): with A (B, K, h, w) the layer's activations and g = d s / d A the gradients
    of the target-class logit,

        gradcam:   relu(sum_k mean_ij(g_k) A_k)
        gradcam++: relu(sum_k w_k A_k), w_k = sum_ij alpha_kij relu(g_kij),
                   alpha = g^2 / (2 g^2 + sum_ab A_kab g^3 + eps), alpha = 0 where g = 0
        layercam:  relu(sum_k relu(g_k) A_k)

    Methods ``"pgc:<name>"`` (keys of :data:`PGC_METHODS`) run pytorch-grad-cam's own class, each with its own
    passes; those maps are the reference's output, i.e. min-max normalised to [0, 1] per map and resized to the
    input size, then area-averaged back to the layer resolution here. They are therefore NOT raw maps.

    The model runs in eval mode and is left with its train/eval and requires_grad flags and parameter ``.grad``
    unchanged. A 1 x 1 layer map triggers a warning naming the layer and input size.

    Args:
        model: classifier returning logits (B, C).
        x: input batch (B, Cin, H, W); moved to the model's device.
        targets: class index per image (B,); None: each image's predicted class.
        methods: method names (a single name is accepted).
        layer: target layer (module, dotted name or None for ``model.cam_layer``).
        eps: Grad-CAM++ denominator term (pytorch-grad-cam uses 1e-6).

    Returns:
        {method: maps (B, h, w) float32 on the model's device}, in the order of ``methods``.
    """
    _check_input(x)
    methods, grad_methods, pgc_methods = _split_methods(methods)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    module, name = resolve_target_layer(model, layer)
    x = x.to(_model_device(model, x.device))
    out: dict[str, torch.Tensor] = {}
    with _eval_mode(model):
        if grad_methods:
            cap = _capture(model, x, module, name, targets)
            _warn_degenerate(name, tuple(cap.activations.shape[-2:]), tuple(x.shape[-2:]))
            A, g = cap.activations.float(), cap.gradients.float()
            for m in grad_methods:
                out[m] = METHODS[m](A, g, float(eps))
            if targets is None:
                # pytorch-grad-cam methods explain the same classes as the gradient methods.
                targets = cap.targets
        if pgc_methods:
            out.update(_pgc_maps(model, x, targets, module, name, pgc_methods))
    return {m: out[m] for m in methods}


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps (B, h, w) to (B, H, W), half-pixel centres (F.interpolate, align_corners=False).

    Args:
        maps: (B, h, w) floating maps.
        size: H (square) or (H, W).

    Returns:
        (B, H, W) maps in the input dtype.
    """
    _check_maps(maps)
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size}")
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalize(maps: torch.Tensor, mode: str = "minmax") -> torch.Tensor:
    """Per-map rescaling of maps (B, H, W).

    Modes:
        ``"none"``: the maps unchanged.
        ``"minmax"``: (m - min m) / (max m - min m); a constant map (max = min) gives zeros.
        ``"sum"``: m / sum m (unit mass, meant for non-negative maps); a map summing to zero gives zeros.

    Non-finite maps stay non-finite (never turned into zeros).

    Args:
        maps: (B, H, W) floating maps.
        mode: one of ``"none"``, ``"minmax"``, ``"sum"``.

    Returns:
        (B, H, W) maps in the input dtype.
    """
    _check_maps(maps)
    if mode == "none":
        return maps
    if mode == "minmax":
        lo = maps.amin(dim=(1, 2), keepdim=True)
        span = maps.amax(dim=(1, 2), keepdim=True) - lo
        out = (maps - lo) / span
        return torch.where(span == 0, torch.zeros_like(out), out)
    if mode == "sum":
        total = maps.sum(dim=(1, 2), keepdim=True)
        out = maps / total
        return torch.where(total == 0, torch.zeros_like(out), out)
    raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")


def _check_maps(maps: torch.Tensor) -> None:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be a torch.Tensor (B, H, W), got {type(maps).__name__}")
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, H, W), got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"maps must be floating, got dtype {maps.dtype}")
