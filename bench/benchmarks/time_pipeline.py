"""Speed and peak memory of the hot paths of ``drift run``, on CUDA when there is one, else on the CPU.

* ``Cams``: Grad-CAM++ and LayerCAM of a batch, drift's engine against pytorch-grad-cam (``_hotpaths.CAMS``).
* ``Jacobian``: the exact input Jacobian J (B, C, D) and the iFIM spectrum built on it (``_hotpaths.JACOBIAN``,
  ``_hotpaths.IFIM_SPECTRUM``).
* ``DriftMetrics``: every drift metric of a batch of (TL, FT) map pairs at input size, with lung and lesion masks.
* ``SyntheticData``: generating the synthetic chest X-ray task.
* ``Layouts``: a forward pass (what BatchNorm calibration, transfer-phase features and validation cost per image) and a
  training step, in NCHW fp32, channels-last fp32 and channels-last bf16 (``drift.train.fast_layout``).

Models are random-init (pretrained=False); inputs come from fixed seeds, so every commit sees the same work.
"""

from __future__ import annotations

from ._hotpaths import CAMS, IFIM_SPECTRUM, JACOBIAN, N_CLASSES, cam_inputs, classifier, images, jacobian_inputs
from ._support import device, generator, need, need_attr, sync

CAM_ARCHS = ["resnet18", "densenet201"]
CAM_SIZE = 96  # px: a 3 x 3 last-block map for both backbones, the smallest that is not degenerate
CAM_BATCH = 4
JAC_ARCHS = ["resnet18", "densenet201"]
JAC_SIZE = 64
JAC_BATCH = 4


class Cams:
    """Grad-CAM++ and LayerCAM maps of one batch (``_hotpaths.CAMS``): ``engine`` drift (shared pass) or
    pytorch-grad-cam; both timings include min-max normalisation at the input size."""

    params = (["drift", "pytorch-grad-cam"], CAM_ARCHS)
    param_names = ["engine", "arch"]
    timeout = 300

    def setup(self, engine: str, arch: str) -> None:
        self.dev = device()
        self.fn = CAMS.call(engine, cam_inputs(arch, CAM_SIZE, CAM_BATCH, self.dev))
        if self.dev.type == "cuda":
            self.call()  # warm-up: allocator, cuDNN algorithm choice (asv warms up itself, except with --quick)

    def call(self):
        out = self.fn()
        sync(self.dev)
        return out

    def time_gradcampp_and_layercam(self, engine: str, arch: str) -> None:
        self.call()

    def peakmem_gradcampp_and_layercam(self, engine: str, arch: str) -> None:
        self.call()


class Jacobian:
    """Input Jacobian J (B, C, D) of the logits (``_hotpaths.JACOBIAN``, route ``loop``) and the iFIM eigenvalues
    on top of it (``_hotpaths.IFIM_SPECTRUM``)."""

    params = (JAC_ARCHS,)
    param_names = ["arch"]
    timeout = 300

    def setup(self, arch: str) -> None:
        self.dev = device()
        inputs = jacobian_inputs(arch, JAC_SIZE, JAC_BATCH, self.dev)
        self.jacobian = JACOBIAN.call("loop", inputs)
        self.spectrum = IFIM_SPECTRUM.call("drift", inputs)
        if self.dev.type == "cuda":  # warm-up: allocator, cuDNN algorithm choice
            self.jacobian()
            sync(self.dev)

    def time_input_jacobian(self, arch: str) -> None:
        self.jacobian()
        sync(self.dev)

    def peakmem_input_jacobian(self, arch: str) -> None:
        self.jacobian()
        sync(self.dev)

    def time_ifim_spectrum(self, arch: str) -> None:
        self.spectrum()
        sync(self.dev)


def smooth_maps(n: int, size: int, seed: int, dev):
    """(n, size, size) non-negative CAM-like maps: bilinear upsampling of random 3 x 3 maps."""
    torch = need("torch")
    low = torch.rand(n, 1, 3, 3, generator=generator(seed))
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0].to(dev)


def masks(n: int, size: int, dev):
    """Lung masks (two vertical ellipses) and lesion masks (a disk inside the left one), (n, size, size) bool."""
    torch = need("torch")
    g = generator(11)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    lung = (((xx + 0.45) / 0.3) ** 2 + (yy / 0.7) ** 2 <= 1) | (((xx - 0.45) / 0.3) ** 2 + (yy / 0.7) ** 2 <= 1)
    centre = torch.rand(n, 2, generator=g) * 0.3 - 0.15
    lesion = (xx + 0.45 - centre[:, :1, None]) ** 2 + (yy - centre[:, 1:, None]) ** 2 <= 0.15**2
    return lung.expand(n, size, size).to(dev), lesion.to(dev)


class DriftMetrics:
    """``drift.metrics.pair_metrics`` of N (TL, FT) pairs of maps at the input size, lung and lesion masks given."""

    params = ([32], [64, 128])
    param_names = ["pairs", "size"]
    timeout = 300

    def setup(self, pairs: int, size: int) -> None:
        self.pair_metrics = need_attr(need("drift.metrics"), "pair_metrics")
        self.dev = device()
        self.a = smooth_maps(pairs, size, 1, self.dev)
        self.b = smooth_maps(pairs, size, 2, self.dev)
        self.lung, self.lesion = masks(pairs, size, self.dev)

    def call(self):
        out = self.pair_metrics(self.a, self.b, lung_mask=self.lung, lesion_mask=self.lesion)
        sync(self.dev)
        return out

    def time_pair_metrics(self, pairs: int, size: int) -> None:
        self.call()


class SyntheticData:
    """``drift.data.load_synthetic``: 20 images with lung and lesion masks (one split), at two sizes."""

    params = ([64, 224],)
    param_names = ["size"]
    timeout = 300

    def setup(self, size: int) -> None:
        self.load = need_attr(need("drift.data"), "load_synthetic")

    def time_load_synthetic(self, size: int) -> None:
        self.load(20, 0, 0, size, 0)


class Layouts:
    """Forward pass and training step of a batch of 16 at 128 px per memory layout and precision."""

    params = (["resnet18", "densenet201"], ["fp32-nchw", "fp32-channels-last", "bf16-channels-last"])
    param_names = ["arch", "mode"]
    timeout = 300

    def setup(self, arch: str, mode: str) -> None:
        torch = need("torch")
        fast_layout = need_attr(need("drift.train"), "fast_layout")
        self.dev = device()
        self.model = classifier(arch, self.dev)
        self.x = images(16, 128, self.dev)
        self.y = torch.arange(16, device=self.dev) % N_CLASSES
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.nchw = mode == "fp32-nchw"
        self.ctx = fast_layout(self.model, "bf16" if mode.startswith("bf16") else "fp32", self.dev)
        self.prepare = (lambda x: x) if self.nchw else self.ctx.__enter__()
        self.forward()  # warm-up: oneDNN / cuDNN primitive choice

    def teardown(self, arch: str, mode: str) -> None:
        if not self.nchw:
            self.ctx.__exit__(None, None, None)

    def forward(self) -> None:
        torch = need("torch")
        with torch.no_grad():
            self.model(self.prepare(self.x))
        sync(self.dev)

    def time_forward(self, arch: str, mode: str) -> None:
        self.forward()

    def time_train_step(self, arch: str, mode: str) -> None:
        F = need("torch.nn.functional")
        self.model.train()
        loss = F.cross_entropy(self.model(self.prepare(self.x)).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.eval()
        sync(self.dev)
