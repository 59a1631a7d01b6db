"""Speed and peak memory of the hot paths of ``drift run``, on CUDA when there is one, else on the CPU.

* ``Cams``: Grad-CAM++ and LayerCAM of a batch, drift's engine (one forward and one backward pass serve both)
  against pytorch-grad-cam (``GradCAMPlusPlus`` and ``LayerCAM``, a forward and a backward pass each).
* ``Jacobian``: the exact input Jacobian J (B, C, D) and the iFIM spectrum built on it.
* ``DriftMetrics``: every drift metric of a batch of (TL, FT) map pairs at input size, with lung and lesion masks.
* ``SyntheticData``: generating the synthetic chest X-ray task.
* ``Layouts``: a forward pass (what BatchNorm calibration, stage-1 features and validation cost per image) and a
  training step, in NCHW fp32, channels-last fp32 and channels-last bf16 (``drift.train.fast_layout``).

Models are random-init (pretrained=False); inputs come from fixed seeds, so every commit sees the same work.
"""

from __future__ import annotations

from ._support import device, generator, need, need_attr, sync

CAM_ARCHS = ["resnet18", "densenet201"]
CAM_SIZE = 96  # px: a 3 x 3 last-block map for both backbones, the smallest that is not degenerate
CAM_BATCH = 4
JAC_ARCHS = ["resnet18", "densenet201"]
JAC_SIZE = 64
JAC_BATCH = 4
N_CLASSES = 5


def classifier(arch: str, dev):
    """drift's classifier (timm backbone + head), random init, eval mode, on ``dev``."""
    torch = need("torch")
    models = need("drift.models")
    torch.manual_seed(0)
    return need_attr(models, "build")(arch, N_CLASSES).eval().to(dev)


def images(batch: int, size: int, dev):
    """A batch (B, 1, H, W) of uniform [0, 1) grayscale images."""
    return need("torch").rand(batch, 1, size, size, generator=generator(7)).to(dev)


class Cams:
    """Grad-CAM++ and LayerCAM maps of one batch: ``engine`` drift (shared pass) or pytorch-grad-cam."""

    params = (["drift", "pytorch-grad-cam"], CAM_ARCHS)
    param_names = ["engine", "arch"]
    timeout = 300

    def setup(self, engine: str, arch: str) -> None:
        torch = need("torch")
        self.dev = device()
        model = classifier(arch, self.dev)
        x = images(CAM_BATCH, CAM_SIZE, self.dev)
        targets = torch.arange(CAM_BATCH, device=self.dev) % N_CLASSES
        if engine == "drift":
            cams = need_attr(need("drift.attribution"), "cams")
            # eps = 1e-6: pytorch-grad-cam's Grad-CAM++ denominator term, so both engines compute the same maps.
            self.fn = lambda: cams(model, x, targets, methods=("gradcam++", "layercam"), eps=1e-6)
        else:
            pgc = need("pytorch_grad_cam")
            target_cls = need("pytorch_grad_cam.utils.model_targets").ClassifierOutputTarget
            wanted = [target_cls(int(t)) for t in targets.tolist()]
            layer = model.cam_layer

            def run_reference():
                out = []
                for cls in (pgc.GradCAMPlusPlus, pgc.LayerCAM):
                    cam = cls(model=model, target_layers=[layer])
                    try:
                        out.append(cam(input_tensor=x, targets=wanted))
                    finally:
                        cam.activations_and_grads.release()
                return out

            self.fn = run_reference
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
    """Input Jacobian J (B, C, D) of the logits (route ``loop``) and the iFIM eigenvalues on top of it."""

    params = (JAC_ARCHS,)
    param_names = ["arch"]
    timeout = 300

    def setup(self, arch: str) -> None:
        fisher = need("drift.fisher")
        self.input_jacobian = need_attr(fisher, "input_jacobian")
        self.ifim = need_attr(fisher, "ifim")
        self.dev = device()
        self.model = classifier(arch, self.dev)
        self.x = images(JAC_BATCH, JAC_SIZE, self.dev)
        if self.dev.type == "cuda":  # warm-up: allocator, cuDNN algorithm choice
            self.input_jacobian(self.model, self.x)
            sync(self.dev)

    def time_input_jacobian(self, arch: str) -> None:
        self.input_jacobian(self.model, self.x)
        sync(self.dev)

    def peakmem_input_jacobian(self, arch: str) -> None:
        self.input_jacobian(self.model, self.x)
        sync(self.dev)

    def time_ifim_spectrum(self, arch: str) -> None:
        self.ifim(self.model, self.x, eigenvectors=False)
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
