"""Speed and peak memory of the kernels (``_hotpaths``: FISHER_GRAM, FISHER_PROJECT, TOPK_IOU), Triton kernel
against its torch reference on the same inputs.

``impl="kernel"`` is the public dispatch entry (``drift_kernels.fisher_gram`` ...) on CUDA tensors, which runs
the Triton kernel; it raises NotImplementedError in setup on a machine without CUDA, so asv records it as
skipped. ``impl="reference"`` is the torch reference on the same device. Their ratio on one machine is the
kernel's speed-up; Triton compiles during setup, never inside a timed call.

Shapes (B batch, C classes, D = input pixels) follow the study: 64 px single-channel inputs with five classes,
and 224 px with 14 classes (a CheXpert-sized head); maps at a 64 px and a 224 px input size.
"""

from __future__ import annotations

from ._hotpaths import FISHER_GRAM, FISHER_PROJECT, TOPK_IOU, fisher_inputs, map_inputs
from ._support import device, sync

FISHER_SIZES = {
    "B16-C5-64px": (16, 5, 64 * 64),
    "B8-C14-224px": (8, 14, 224 * 224),
}
MAP_SIZES = {
    "N128-64x64": (128, 64, 64),
    "N32-224x224": (32, 224, 224),
}


class _KernelBench:
    """Setup shared by the suites below: the device, the inputs of ``sizes[size]``, the timed call; a warm-up call
    on CUDA (the first call compiles the Triton kernel, which must not land in a timed call)."""

    param_names = ["impl", "size"]
    timeout = 300

    def setup(self, impl: str, size: str) -> None:
        self.dev = device(kernel=impl == "kernel")
        self.fn = self.path.call(impl, self.build(*self.sizes[size], self.dev, seed=self.seed))
        if self.dev.type == "cuda":
            self.call()

    def call(self):
        out = self.fn()
        sync(self.dev)
        return out


def _suite(name: str, path, build, sizes: dict, seed: int, doc: str) -> type:
    """An asv suite timing ``path``'s reference and kernel on each of ``sizes``: ``time_<op>`` and
    ``peakmem_<op>``."""

    def run(self, impl: str, size: str) -> None:
        self.call()

    attrs = {"__doc__": doc, "params": (["reference", "kernel"], list(sizes)), "path": path,
             "build": staticmethod(build), "sizes": sizes, "seed": seed,
             f"time_{path.name}": run, f"peakmem_{path.name}": run}  # fmt: skip
    return type(name, (_KernelBench,), attrs)


FisherGram = _suite("FisherGram", FISHER_GRAM, fisher_inputs, FISHER_SIZES, 1234,
                    "K = G G^T (B, C, C) and G x (B, C) of the input-Fisher factor, softmax head.")
FisherProject = _suite("FisherProject", FISHER_PROJECT, fisher_inputs, FISHER_SIZES, 1234,
                       "G^T W (B, D, m) of the input-Fisher factor for m = 4 columns, softmax head.")
TopkIoU = _suite("TopkIoU", TOPK_IOU, map_inputs, MAP_SIZES, 4321,
                 "Intersections, unions and IoU of the top 5, 10, 20 and 30 % pixel sets of N map pairs.")
