"""drift_kernels: fused reductions of the drift suite, with torch references and one dispatch layer.

Public entries (each validates its inputs and dispatches):

* :func:`fisher_gram` -- K = G G^T and G x of the input-Fisher factor G, G never materialised.
* :func:`fisher_project` -- G^T W for a small W.
* :func:`topk_iou` -- intersections, unions and IoU of top-k pixel sets, for T fractions at once; ties at the
  cut are shared fractionally, the overlap read as the product of the memberships (``ties="fractional"``,
  default here) or as their weighted Jaccard index (``ties="jaccard"``: reflexive; drift's metric uses it), or
  go to the lower flat index (``ties="index"``).

Dispatch (:mod:`drift_kernels.dispatch`): the Triton kernel for CUDA tensors; the torch reference for CPU
tensors; the kernel itself through Triton's interpreter when ``TRITON_INTERPRET=1``. ``DRIFT_KERNELS=reference``
forces the reference everywhere, ``DRIFT_KERNELS=triton`` the kernel (an error where it cannot run). The kernels
live one op per module (``fisher_gram_kernel``, ``fisher_project_kernel``, ``topk_iou_kernel``, each with a
``*_triton`` launcher that takes ``out=``); those modules import Triton and are imported only when first used.
Nothing here touches CUDA at import time.
"""

from .dispatch import backend, fisher_gram, fisher_project, topk_iou
from .reference import (
    TOPK_TIES,
    fisher_factor,
    fisher_gram_reference,
    fisher_project_reference,
    topk_count,
    topk_iou_reference,
    topk_masks_reference,
    topk_weights_reference,
)

__all__ = [
    "TOPK_TIES",
    "backend",
    "fisher_factor",
    "fisher_gram",
    "fisher_gram_reference",
    "fisher_project",
    "fisher_project_reference",
    "topk_count",
    "topk_iou",
    "topk_iou_reference",
    "topk_masks_reference",
    "topk_weights_reference",
]
