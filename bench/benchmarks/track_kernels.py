"""Accuracy of the kernels across commits: the errors ``_hotpaths`` checks, tracked as numbers.

For each input dtype the inputs are rounded to that dtype first, and the exact answer is the float64 evaluation
of the same rounded inputs, so only the arithmetic's error is tracked. ``impl="kernel"`` (Triton, CUDA only;
skipped elsewhere) and ``impl="reference"`` (the torch reference in the same dtype) are tracked side by side:
the kernels' rule is kernel error <= 2 x reference error.
"""

from __future__ import annotations

from ._hotpaths import (
    FISHER_GRAM,
    FISHER_PROJECT,
    TOPK_IOU,
    fisher_inputs,
    gram_error,
    map_inputs,
    project_error,
    topk_mismatches,
)
from ._support import device, need, sync

IMPLS = ["kernel", "reference"]
DTYPES = ["float32", "float16", "bfloat16"]
B, C, D, M = 6, 5, 64 * 64 + 3, 3  # odd D: the last tile of every split is partial
N, H, W = 17, 29, 31


class KernelError:
    """Error of each kernel entry (``impl="kernel"``) and of its torch reference on the same rounded inputs."""

    params = (IMPLS, DTYPES)
    param_names = ["impl", "dtype"]
    timeout = 300

    def setup(self, impl: str, dtype: str) -> None:
        self.dev = device(kernel=impl == "kernel")
        dt = getattr(need("torch"), dtype)
        self.fisher = fisher_inputs(B, C, D, self.dev, seed=2024, dtype=dt, m=M)
        self.maps = map_inputs(N, H, W, self.dev, seed=2025, dtype=dt, ties="index")
        FISHER_GRAM.call(impl, self.fisher)  # NotImplementedError where the kernel does not run

    def _run(self, path, impl: str, inputs):
        out = path.call(impl, inputs)()
        sync(self.dev)
        return out

    def track_fisher_gram_error(self, impl: str, dtype: str) -> float:
        return gram_error(self.fisher, self._run(FISHER_GRAM, impl, self.fisher))

    track_fisher_gram_error.unit = "relative error"

    def track_fisher_project_error(self, impl: str, dtype: str) -> float:
        return project_error(self.fisher, self._run(FISHER_PROJECT, impl, self.fisher))

    track_fisher_project_error.unit = "relative error"

    def track_topk_iou_mismatches(self, impl: str, dtype: str) -> int:
        """Entries of (intersection, union) that differ from a NumPy brute force of the same tie rule."""
        return topk_mismatches(self.maps, self._run(TOPK_IOU, impl, self.maps))

    track_topk_iou_mismatches.unit = "mismatched counts"
