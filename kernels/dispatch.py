"""One place that decides, per call, whether a Triton kernel or its torch reference runs.

``DRIFT_KERNELS`` (read at every call):

* ``auto`` (default): the Triton kernel for CUDA tensors; the torch reference for CPU tensors, except when
  ``TRITON_INTERPRET=1``, where the kernel runs on CPU tensors through Triton's interpreter. Inputs the kernels
  do not take (float64, more than 256 classes) go to the reference, which computes them exactly as specified.
  So do the Fisher cases where a recorded GPU measurement found the kernel slower than the best torch route
  (``kernels/torch_wins.json``, see :func:`torch_wins`).
* ``reference``: the torch reference everywhere.
* ``triton``: the kernel everywhere; a RuntimeError where it cannot run (no Triton, or a CPU tensor without
  the interpreter), a TypeError / ValueError for inputs it does not take.

Triton is imported only when a kernel is first needed, so ``import drift_kernels`` works without it (and then
every call uses the reference). Every entry validates its arguments the same way whichever backend runs.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from ._common import KERNEL_DTYPES, MAX_CLASSES, interpreting, triton_available
from ._validate import check_fisher_inputs, check_fractions, check_kernel_fisher, check_maps
from .reference import TopkTies, check_ties, fisher_gram_reference, fisher_project_reference, topk_iou_reference

MODES = ("auto", "reference", "triton")


def _mode() -> str:
    mode = os.environ.get("DRIFT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"DRIFT_KERNELS must be one of {', '.join(MODES)}; got {os.environ['DRIFT_KERNELS']!r}")
    return mode


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    """None when Triton imports; otherwise why not (then the references serve every call)."""
    if not triton_available():
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except ImportError as err:  # a broken install
        return f"import triton failed: {err}"
    return None


def _kernel_module(name: str) -> ModuleType:
    """The kernel module ``drift_kernels.<name>``, imported on first use (this is what imports Triton)."""
    return importlib.import_module(f"{__package__}.{name}")


def backend(t: torch.Tensor) -> str:
    """'triton' or 'reference': the backend a call on tensor t uses under the current ``DRIFT_KERNELS``.

    Args:
        t: the call's main tensor (J for the Fisher kernels, a for topk_iou); only its device matters here.

    Raises:
        ValueError: DRIFT_KERNELS holds an unknown mode.
        RuntimeError: DRIFT_KERNELS=triton where no kernel can run on t.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"backend expects a torch.Tensor, got {type(t).__name__}")
    mode = _mode()
    if mode == "reference":
        return "reference"
    if not (t.is_cuda or interpreting()):
        if mode == "triton":
            raise RuntimeError(
                f"DRIFT_KERNELS=triton but the tensor is on {t.device}: the kernels run on CUDA devices, "
                "or on the CPU through Triton's interpreter (TRITON_INTERPRET=1)"
            )
        return "reference"
    missing = _triton_import_error()
    if missing is None:
        return "triton"
    if mode == "triton":
        raise RuntimeError(f"DRIFT_KERNELS=triton but Triton is unusable: {missing}")
    return "reference"


#: Measured cases where torch beats the Fisher kernels: a JSON list of records {"op", "device", "dtype", "C"}
#: (op fisher_gram or fisher_project, the device name torch reports, J's dtype name, the class count), written
#: by ``bench/gpu_kernels.py --torch-wins`` from the rows whose kernel was slower than the best torch route in the
#: same run, and committed here. A missing file means no such measurement: the kernels serve every case.
TORCH_WINS = Path(__file__).with_name("torch_wins.json")


@functools.lru_cache(maxsize=4)
def _load_torch_wins(path: Path) -> frozenset[tuple[str, str, str, int]]:
    if not path.exists():
        return frozenset()
    try:
        records = json.loads(path.read_text())
        return frozenset((str(r["op"]), str(r["device"]), str(r["dtype"]), int(r["C"])) for r in records)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: expected a JSON list of {{op, device, dtype, C}} records ({err})") from None


def _device_name(t: torch.Tensor) -> str:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else t.device.type


def torch_wins(op: str, J: torch.Tensor) -> bool:
    """Whether a recorded measurement found torch faster than the kernel for op at J's device, dtype and C."""
    wins = _load_torch_wins(TORCH_WINS)
    return bool(wins) and (op, _device_name(J), str(J.dtype).removeprefix("torch."), int(J.shape[1])) in wins


def _fisher_kernel_takes(J: torch.Tensor, op: str) -> bool:
    return J.dtype in KERNEL_DTYPES and J.shape[1] <= MAX_CLASSES and not torch_wins(op, J)


def fisher_gram(
    J: torch.Tensor, p: torch.Tensor, x: torch.Tensor | None = None, head: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K = G G^T (B, C, C) and G x (B, C) of the input-Fisher factor G, G never materialised by the kernel.

    softmax: G_c = sqrt(p_c) (J_c - sum_j p_j J_j); sigmoid: G_c = sqrt(p_c (1 - p_c)) J_c.

    Args:
        J: (B, C, D) input Jacobian of the logits (float32, float16, bfloat16; float64 uses the reference).
        p: (B, C) probabilities in [0, 1].
        x: optional (B, D) vector to project onto the rows of G.
        head: 'softmax' or 'sigmoid'.

    Returns:
        K (B, C, C) and G x (B, C) (None without x), float32 (float64 for a float64 J).
    """
    check_fisher_inputs(J, p, head, x=x)
    if backend(J) == "triton" and (_mode() == "triton" or _fisher_kernel_takes(J, "fisher_gram")):
        check_kernel_fisher(J, MAX_CLASSES)
        return _kernel_module("fisher_gram_kernel")._launch(J, p, x, head)
    return fisher_gram_reference(J, p, x, head)


def fisher_project(J: torch.Tensor, p: torch.Tensor, W: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """G^T W (B, D, m) of the input-Fisher factor G (see :func:`fisher_gram`) for a small W (B, C, m).

    Args:
        J: (B, C, D) input Jacobian of the logits (float32, float16, bfloat16; float64 uses the reference).
        p: (B, C) probabilities in [0, 1].
        W: (B, C, m) weights, e.g. U diag(lambda)^-1/2 for the eigenvectors of F = G^T G.
        head: 'softmax' or 'sigmoid'.

    Returns:
        (B, D, m) float32 (float64 for a float64 J).
    """
    check_fisher_inputs(J, p, head, W=W)
    if backend(J) == "triton" and (_mode() == "triton" or _fisher_kernel_takes(J, "fisher_project")):
        check_kernel_fisher(J, MAX_CLASSES)
        return _kernel_module("fisher_project_kernel")._launch(J, p, W, head)
    return fisher_project_reference(J, p, W, head)


def topk_iou(
    a: torch.Tensor, b: torch.Tensor, fractions: Sequence[float], ties: TopkTies = "fractional"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersections, unions and IoU (N, T) of the top-k pixel sets of a and b (N, H, W), T fractions.

    For each fraction f a set holds k = ceil(f H W) pixels (``topk_count``) by value descending; with t the
    k-th largest value, ``ties`` decides the cut through the pixels equal to t:

    * ``"fractional"`` (default): each tied pixel weighs (k - #{v > t}) / #{v == t}, pixels above t weigh 1;
      inter = sum_i w_a,i w_b,i (the expected overlap when both maps break ties uniformly at random),
      union = 2k - inter, IoU = inter / union; all three float64. Equal to the index rule's counts when no
      tie group is cut.
    * ``"jaccard"``: the same weights, weighted Jaccard: inter = sum_i min(w_a,i, w_b,i), union = 2k - inter
      (= sum_i max); float64. Exactly 1 for identical maps; equal to the set IoU when no tie group is cut.
    * ``"index"``: the lower flat (row-major) index first; inter, union int64 and IoU float32.

    Raises:
        ValueError: a fraction outside (0, 1], an unknown tie rule, mismatched shapes or devices, or a map with
            NaN / inf (the message names the map index).
    """
    ties = check_ties(ties)
    fractions = check_fractions(fractions)
    check_maps(a, b)
    takes = a.dtype in KERNEL_DTYPES and b.dtype in KERNEL_DTYPES
    if backend(a) == "triton" and (_mode() == "triton" or takes):
        if not takes:
            raise TypeError(f"the Triton kernel reads maps as float32, float16 or bfloat16, got {a.dtype}, {b.dtype}")
        return _kernel_module("topk_iou_kernel")._launch(a, b, fractions, ties)
    return topk_iou_reference(a, b, fractions, ties)
