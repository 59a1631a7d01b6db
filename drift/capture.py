"""Activations and gradients at target layers of a classifier, from one forward and one backward pass per score.

The forward pass is hooked at every target layer; the backward pass differentiates a target-class score
(:data:`SCORES`): ``"logit"``, s = sum_b z_b[t_b] (the logit of each image's target class, summed over the
batch), or ``"softmax"``, s = sum_b softmax(z_b)[t_b] (the class probability: what tf-keras-vis's
CategoricalScore differentiates on a Keras model with a softmax output; the softmax of float64 logits, the
gradient cast back to the model's dtype), and yields each layer's activations
A (B, K, h, w) and gradients g = d s / d A (B, K, h, w). :func:`capture` returns one layer's (A, g); the CAMs of
:mod:`drift.attribution` are functions of them.

Target layers are modules, dotted names, or the presets of :data:`drift.models.LAYER_PRESETS` (``block``,
``last-conv``, ``stride16``), resolved through the model's registry architecture (``model.arch``, or a timm
model's ``pretrained_cfg["architecture"]``) by :func:`resolve_target_layer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SCORES", "Capture", "capture", "float32_saturated", "resolve_target_layer"]

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


def resolve_target_layer(model: nn.Module, layer: nn.Module | str | None,
                         input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, str]:
    """The target layer module and its dotted name.

    Args:
        model: the classifier.
        layer: a submodule of ``model``, its dotted name, a preset of :data:`drift.models.LAYER_PRESETS`
            (resolved through the model's registry architecture), or None for ``model.cam_layer``. On a model
            outside the registry, and for ``"auto"`` on any model, presets are resolved by
            :func:`drift.layers.resolve` from a forward pass at ``input_shape``.
        input_shape: (B, C, H, W) of the images, for the presets of models outside the registry.

    Raises:
        ValueError: unknown name (listing valid ones), a preset on a model outside the registry, a module that
            is not part of ``model``, or None for a model without a ``cam_layer``.
        TypeError: ``layer`` of another type.
    """
    if isinstance(layer, str):
        from drift import layers as any_layers
        from drift.models import LAYER_PRESETS, REGISTRY, cam_layer_name

        arch = _model_arch(model)
        if layer in any_layers.PRESETS and (layer == "auto" or arch not in REGISTRY) and input_shape is not None:
            layer = any_layers.resolve(model, layer, tuple(input_shape))
        elif layer in LAYER_PRESETS:
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
    """Evaluate in inference mode, then restore every submodule's own flag (transfer-phase models mix modes)."""
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
    """The differentiated score s. The softmax is taken of the logits cast to float64, and autograd casts the
    gradient back to the logits' dtype: in float32, p_t rounds to exactly 1 from a logit margin of about 17, where
    the float32 derivative p_t (1 - p_t) is 0 while the true one is ~1e-7 (already 11 % off at margin 15); in
    float64 it stays exact to a margin of about 36 and, rounded to float32, representable down to ~1e-38."""
    if score == "logit":
        return logits.gather(1, t[:, None]).sum()
    return logits.to(torch.float64).softmax(dim=1).gather(1, t[:, None]).sum()


def float32_saturated(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the float32 softmax probability of the target class, softmax(z)[t] of logits z (B, C) cast to
    float32, is exactly 1 or 0, so that its float32 derivative p_t (1 - p_t) vanishes (the images whose softmax
    score a float32 computation would get wrong; drift's is taken in float64, :func:`_score_value`)."""
    t = torch.as_tensor(targets, device=logits.device).long()
    p = logits.to(torch.float32).softmax(dim=1).gather(1, t[:, None])[:, 0]
    return (p == 1) | (p == 0)


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
    module, name = resolve_target_layer(model, layer, tuple(x.shape))
    x = x.to(_model_device(model, x.device))
    with _eval_mode(model):
        (A,), grads, logits, t = _capture_all(model, x, [(module, name)], targets, (score,))
    return Capture(A, grads[score][0], logits, t, name, score)
