"""Accuracy of the kernels across commits: error against float64 and brute-force references.

For each input dtype the inputs are rounded to that dtype first, and the exact answer is the float64 evaluation
of the same rounded inputs, so only the arithmetic's error is tracked. ``impl="kernel"`` (Triton, CUDA only;
skipped elsewhere) and ``impl="reference"`` (the torch reference in the same dtype) are tracked side by side:
the kernels' test rule is kernel error <= 2 x reference error.
"""

from __future__ import annotations

from ._support import device, generator, need, sync

IMPLS = ["kernel", "reference"]
DTYPES = ["float32", "float16", "bfloat16"]
B, C, D, M = 6, 5, 64 * 64 + 3, 3  # odd D: the last tile of every split is partial
N, H, W = 17, 29, 31
FRACTIONS = (0.05, 0.1, 0.2, 0.3)


def _relative(torch, got, exact) -> float:
    """max |got - exact| / max |exact| over the whole output."""
    exact = exact.double()
    return float((got.double() - exact).abs().max() / exact.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


class KernelError:
    """Error of each kernel entry (``impl="kernel"``) and of its torch reference on the same rounded inputs."""

    params = (IMPLS, DTYPES)
    param_names = ["impl", "dtype"]
    timeout = 300

    def setup(self, impl: str, dtype: str) -> None:
        self.dev = dev = device(kernel=impl == "kernel")
        torch = self.torch = need("torch")
        dk = self.dk = need("drift_kernels")
        dt = getattr(torch, dtype)
        g = generator(2024)
        self.J = torch.randn(B, C, D, generator=g).to(dt).to(dev)
        if impl == "kernel" and dk.backend(self.J) != "triton":
            raise NotImplementedError("DRIFT_KERNELS or the machine routes this call to the torch reference")
        self.p = torch.softmax(3 * torch.randn(B, C, generator=g), dim=1).to(dev)
        self.x = torch.rand(B, D, generator=g).to(dt).to(dev)
        self.W = torch.randn(B, C, M, generator=g).to(dev)
        # Maps quantised to 8 levels hold many ties, so the tie rule (value descending, then lower flat index
        # first) decides most of the top-k sets.
        self.a = (torch.randint(0, 8, (N, H, W), generator=g).float() / 7).to(dt).to(dev)
        self.b = (torch.randint(0, 8, (N, H, W), generator=g).float() / 7).to(dt).to(dev)

    def track_fisher_gram_error(self, impl: str, dtype: str) -> float:
        dk, J, p, x = self.dk, self.J, self.p, self.x
        f = dk.fisher_gram if impl == "kernel" else dk.fisher_gram_reference
        K, Gx = f(J, p, x, "softmax")
        sync(self.dev)
        K64, Gx64 = dk.fisher_gram_reference(J.double(), p.double(), x.double(), "softmax")
        return max(_relative(self.torch, K, K64), _relative(self.torch, Gx, Gx64))

    track_fisher_gram_error.unit = "relative error"

    def track_fisher_project_error(self, impl: str, dtype: str) -> float:
        dk, J, p, Wm = self.dk, self.J, self.p, self.W
        f = dk.fisher_project if impl == "kernel" else dk.fisher_project_reference
        V = f(J, p, Wm, "softmax")
        sync(self.dev)
        return _relative(self.torch, V, dk.fisher_project_reference(J.double(), p.double(), Wm.double(), "softmax"))

    track_fisher_project_error.unit = "relative error"

    def track_topk_iou_mismatches(self, impl: str, dtype: str) -> int:
        """Entries of (intersection, union) that differ from a NumPy brute force of the same tie rule."""
        np = need("numpy")
        dk = self.dk
        f = dk.topk_iou if impl == "kernel" else dk.topk_iou_reference
        inter, union, _ = f(self.a, self.b, FRACTIONS, ties="index")
        sync(self.dev)
        fa = self.a.float().reshape(N, -1).cpu().numpy()
        fb = self.b.float().reshape(N, -1).cpu().numpy()
        bad = 0
        for t, frac in enumerate(FRACTIONS):
            k = dk.topk_count(H * W, frac)
            sa = np.zeros(fa.shape, dtype=bool)
            sb = np.zeros(fb.shape, dtype=bool)
            np.put_along_axis(sa, np.argsort(-fa, axis=1, kind="stable")[:, :k], True, axis=1)
            np.put_along_axis(sb, np.argsort(-fb, axis=1, kind="stable")[:, :k], True, axis=1)
            bad += int((inter[:, t].cpu().numpy() != (sa & sb).sum(1)).sum())
            bad += int((union[:, t].cpu().numpy() != (sa | sb).sum(1)).sum())
        return bad

    track_topk_iou_mismatches.unit = "mismatched counts"
