"""The gradient-based CAM methods: each a function of a layer's activations A (B, K, h, w), the gradients
g = d s / d A of a target-class score and a denominator term eps, registered by name in :data:`METHODS`.

:mod:`drift.attribution` captures (A, g) in one forward and one backward pass and applies every requested method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CamMethod = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

METHODS: dict[str, CamMethod] = {}
"""Gradient-based CAM methods: name -> function(A (B, K, h, w), g (B, K, h, w), eps) -> map (B, h, w)."""

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

    Reference: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017, https://arxiv.org/abs/1610.02391: w_k is Eq. 1, the map Eq. 2.

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

    Reference: Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep
    Convolutional Networks", WACV 2018, https://arxiv.org/abs/1710.11063: w_k is Eq. 7, alpha Eq. 19 (the closed
    form for an exponential output Y = exp(S), with g = dS/dA), read as pytorch-grad-cam reads it: alpha applied
    to the gradients of the score itself, no normalisation of alpha over space (for tf-keras-vis's reading see
    :func:`gradcam_plusplus_tfkv`).

    pytorch-grad-cam uses eps = 1e-6; with small gradients (random weights, confident models) that eps changes
    the maps, so pass it explicitly when comparing with the reference. With eps = 0, alpha g is computed as
    g / (2 + sum_ab A_kab g), equal in exact arithmetic, since g^2 underflows for the tiny gradients of a
    saturated softmax score (0 / 0 otherwise).

    Args:
        A: activations (B, K, h, w).
        g: gradients of the target score with respect to A, (B, K, h, w).
        eps: added to the alpha denominator.

    Returns:
        Raw maps (B, h, w).
    """
    s = A.sum(dim=(2, 3), keepdim=True)
    if eps == 0:
        alpha_g = g / (2 + s * g)
    else:
        g2 = g * g
        alpha_g = g2 / (2 * g2 + s * g2 * g + eps) * g
    # Only g > 0 contributes (relu(g)); selecting instead of multiplying keeps 0 * inf (a vanishing
    # denominator where g <= 0) out of the weights.
    w = torch.where(g > 0, alpha_g, torch.zeros_like(g)).sum(dim=(2, 3))
    return torch.relu(torch.einsum("bk,bkhw->bhw", w, A))


@register_method("gradcam++_tfkv")
def gradcam_plusplus_tfkv(A: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Grad-CAM++ as tf-keras-vis computes it (``tf_keras_vis/gradcam_plus_plus.py``, after Chattopadhay et al.,
    "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional Networks", WACV 2018):
    alpha is normalised to sum 1 over space in each channel, which :func:`gradcam_plusplus` does not do.

    tf-keras-vis differentiates Y = exp(S) (the paper's exponential output), so with E = exp(S_b) per image and
    S_k = sum_ab A_kab:

        first = E g,  second = E g^2,  third = E g^3
        alpha_denom = 2 second + S_k third, plus 1 where second == 0
        alpha = second / alpha_denom, then alpha / sum_ij alpha (a sum of 0 replaced by 1)
        w_k = sum_ij alpha_kij relu(first_kij),  map = relu(sum_k w_k A_k)

    E cancels inside alpha, so alpha = g^2 / (2 g^2 + S_k g^3), and first = E g makes tf-keras-vis's raw map
    E_b times the map returned here: identical after any per-map normalisation (tf-keras-vis min-max normalises
    by default), and free of the overflow of exp(logit) in float32. alpha is computed as 1 / (2 + S_k g) where
    g != 0, equal in exact arithmetic, because g^2 underflows (and tf-keras-vis's alpha drops to 0) for the tiny
    gradients of a saturated softmax score; alpha = 0 where g = 0. Where 2 + S_k g = 0 with g != 0 (tf-keras-vis
    divides by zero there) alpha = g^2, the paper's reference code replacing the vanishing denominator by 1.
    alpha of a position with g < 0 weights nothing but still enters the normalising sum.

    At a layer followed only by global average pooling and a linear head (the ``block`` preset of every registry
    backbone), g is constant over space in each channel for both scores: g_kij = gamma_k, with gamma_k = W_tk / (hw)
    for the logit and sum_c p_t (delta_tc - p_c) W_ck / (hw) for the softmax probability. Then alpha_kij is the
    same at every ij (1 / (2 + S_k gamma_k), or gamma_k^2 where that denominator vanishes), the normalised alpha
    is 1 / (hw), and w_k = sum_ij relu(gamma_k) / (hw) = relu(gamma_k) (0 when gamma_k = 0). So the map equals
    LayerCAM's relu(sum_k relu(g_k) A_k) exactly: no per-image factor here, E_b in tf-keras-vis's raw maps.
    pytorch-grad-cam's reading gives w_k = hw relu(gamma_k) / (2 + S_k gamma_k) there: a per-channel factor, not a
    per-image one, so its maps differ.

    Args:
        A: activations (B, K, h, w).
        g: gradients of the target score with respect to A, (B, K, h, w).
        eps: unused (tf-keras-vis adds no epsilon; uniform signature).

    Returns:
        Raw maps (B, h, w).
    """
    s = A.sum(dim=(2, 3), keepdim=True)
    d = 2 + s * g
    alpha = torch.where(d == 0, g * g, 1 / torch.where(d == 0, torch.ones_like(d), d))
    alpha = torch.where(g == 0, torch.zeros_like(alpha), alpha)
    total = alpha.sum(dim=(2, 3), keepdim=True)
    alpha = alpha / torch.where(total == 0, torch.ones_like(total), total)
    w = (alpha * torch.relu(g)).sum(dim=(2, 3))
    return torch.relu(torch.einsum("bk,bkhw->bhw", w, A))


@register_method("layercam")
def layercam(A: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """LayerCAM: map_ij = relu(sum_k relu(g_kij) A_kij).

    Reference: Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization", IEEE
    Transactions on Image Processing 30, 5875-5888, 2021, https://ieeexplore.ieee.org/document/9462463: each
    location weighted by its own positive gradient (no spatial averaging of g, unlike Grad-CAM).

    Args:
        A: activations (B, K, h, w).
        g: gradients of the target score with respect to A, (B, K, h, w).
        eps: unused (uniform signature).

    Returns:
        Raw maps (B, h, w).
    """
    return torch.relu((torch.relu(g) * A).sum(dim=1))
