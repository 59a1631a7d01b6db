"""Speed and peak memory of the kernels: Triton kernel against its torch reference, on the same inputs.

``impl="kernel"`` is the public dispatch entry (``drift_kernels.fisher_gram`` ...) on CUDA tensors, which runs
the Triton kernel; it raises NotImplementedError in setup on a machine without CUDA, so asv records it as
skipped. ``impl="reference"`` is the torch reference (``fisher_gram_reference`` ...) on the same device. Their
ratio on one machine is the kernel's speed-up; Triton compiles during setup, never inside a timed call.

Shapes (B batch, C classes, D = input pixels) follow the study: 64 px single-channel inputs with five classes,
and 224 px with 14 classes (a CheXpert-sized head); maps at a 64 px and a 224 px input size.
"""

from __future__ import annotations

from ._support import device, generator, need, sync

FISHER_SIZES = {
    "B16-C5-64px": (16, 5, 64 * 64),
    "B8-C14-224px": (8, 14, 224 * 224),
}
MAP_SIZES = {
    "N128-64x64": (128, 64, 64),
    "N32-224x224": (32, 224, 224),
}
FRACTIONS = (0.05, 0.1, 0.2, 0.3)
PROJECT_COLUMNS = 4


def fisher_inputs(size: str, dev):
    """J (B, C, D) standard normal, p (B, C) = softmax of 3 x standard normal logits, x (B, D) uniform [0, 1)."""
    torch = need("torch")
    B, C, D = FISHER_SIZES[size]
    g = generator(1234)
    J = torch.randn(B, C, D, generator=g)
    p = torch.softmax(3 * torch.randn(B, C, generator=g), dim=1)
    x = torch.rand(B, D, generator=g)
    return J.to(dev), p.to(dev), x.to(dev)


def map_inputs(size: str, dev):
    """Two stacks of smooth non-negative maps (N, H, W): bilinear upsampling of random 7 x 7 maps, like CAMs."""
    torch = need("torch")
    N, H, W = MAP_SIZES[size]
    g = generator(4321)
    low = torch.rand(2, N, 1, 7, 7, generator=g)
    up = torch.nn.functional.interpolate(low.reshape(2 * N, 1, 7, 7), size=(H, W), mode="bilinear",
                                         align_corners=False)
    up = up.reshape(2, N, H, W)
    return up[0].contiguous().to(dev), up[1].contiguous().to(dev)


class _KernelBench:
    """Common setup: pick the implementation, check that the kernel really is what runs, warm up."""

    param_names = ["impl", "size"]
    timeout = 300

    def prepare(self, impl: str):
        self.dev = device(kernel=impl == "kernel")
        self.dk = need("drift_kernels")

    def check_backend(self, impl: str, t) -> None:
        if impl == "kernel" and self.dk.backend(t) != "triton":
            raise NotImplementedError("DRIFT_KERNELS or the machine routes this call to the torch reference")

    def call(self):
        out = self.fn()
        sync(self.dev)
        return out

    def warm_up(self) -> None:
        # On CUDA the first call compiles the Triton kernel; that must not land in a timed call. On the CPU the
        # reference needs no warm-up beyond asv's own.
        if self.dev.type == "cuda":
            self.call()


class FisherGram(_KernelBench):
    """K = G G^T (B, C, C) and G x (B, C) of the input-Fisher factor, softmax head."""

    params = (["reference", "kernel"], list(FISHER_SIZES))

    def setup(self, impl: str, size: str) -> None:
        self.prepare(impl)
        J, p, x = fisher_inputs(size, self.dev)
        self.check_backend(impl, J)
        f = self.dk.fisher_gram if impl == "kernel" else self.dk.fisher_gram_reference
        self.fn = lambda: f(J, p, x, "softmax")
        self.warm_up()

    def time_fisher_gram(self, impl: str, size: str) -> None:
        self.call()

    def peakmem_fisher_gram(self, impl: str, size: str) -> None:
        self.call()


class FisherProject(_KernelBench):
    """G^T W (B, D, m) of the input-Fisher factor for m = 4 columns, softmax head."""

    params = (["reference", "kernel"], list(FISHER_SIZES))

    def setup(self, impl: str, size: str) -> None:
        torch = need("torch")
        self.prepare(impl)
        J, p, _ = fisher_inputs(size, self.dev)
        W = torch.randn(J.shape[0], J.shape[1], PROJECT_COLUMNS, generator=generator(99)).to(self.dev)
        self.check_backend(impl, J)
        f = self.dk.fisher_project if impl == "kernel" else self.dk.fisher_project_reference
        self.fn = lambda: f(J, p, W, "softmax")
        self.warm_up()

    def time_fisher_project(self, impl: str, size: str) -> None:
        self.call()

    def peakmem_fisher_project(self, impl: str, size: str) -> None:
        self.call()


class TopkIoU(_KernelBench):
    """Intersections, unions and IoU of the top 5, 10, 20 and 30 % pixel sets of N map pairs."""

    params = (["reference", "kernel"], list(MAP_SIZES))

    def setup(self, impl: str, size: str) -> None:
        self.prepare(impl)
        a, b = map_inputs(size, self.dev)
        self.check_backend(impl, a)
        f = self.dk.topk_iou if impl == "kernel" else self.dk.topk_iou_reference
        self.fn = lambda: f(a, b, FRACTIONS)
        self.warm_up()

    def time_topk_iou(self, impl: str, size: str) -> None:
        self.call()

    def peakmem_topk_iou(self, impl: str, size: str) -> None:
        self.call()
