"""One place that decides, per call, whether a kernel or its reference runs (see package docstring).

Placeholder dispatch: always the reference. The Triton kernels replace the bodies below.
"""

from __future__ import annotations

import torch

from .reference import fisher_gram_reference, fisher_project_reference, topk_iou_reference


def backend(t: torch.Tensor) -> str:
    return "reference"


def fisher_gram(J, p, x=None, head="softmax"):
    return fisher_gram_reference(J, p, x, head)


def fisher_project(J, p, W, head="softmax"):
    return fisher_project_reference(J, p, W, head)


def topk_iou(a, b, fractions):
    return topk_iou_reference(a, b, tuple(fractions))
