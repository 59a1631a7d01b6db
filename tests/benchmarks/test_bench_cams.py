"""Timed CAM engines: drift's (Grad-CAM++ and LayerCAM from one forward and one backward pass) and the reference,
pytorch-grad-cam's GradCAMPlusPlus and LayerCAM (a pass each). Each test checks the maps it timed against the
other engine after the reference's normalisation (min-max per map at the input size).
"""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from drift.attribution import cams, normalize, upsample
from drift.models import build

PGC_EPS = 1e-6  # pytorch-grad-cam's Grad-CAM++ adds this to the alpha denominator; drift takes it as eps
N_CLASSES = 5


def setting(device: torch.device, rng: torch.Generator):
    """(model, x (B, 1, H, W), targets (B,)): a study backbone at 224 px on a GPU, resnet18 at 72 px (3 x 3
    maps at 72 px) with an odd batch on the CPU."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    if device.type == "cuda":
        arch, size, batch = "densenet201", 224, 16
    else:
        arch, size, batch = "resnet18", 72, 3
    model = build(arch, N_CLASSES).eval().to(device)
    x = torch.rand(batch, 1, size, size, generator=rng).to(device)
    targets = torch.randint(0, N_CLASSES, (batch,), generator=rng).to(device)
    return model, x, targets


def drift_maps(model, x, targets):
    """drift's maps normalised like the reference: bilinear to the input size, then min-max per map."""
    raw = cams(model, x, targets, methods=("gradcam++", "layercam"), eps=PGC_EPS)
    return {m: normalize(upsample(v, tuple(x.shape[-2:])), "minmax").cpu().numpy() for m, v in raw.items()}, raw


def reference_maps(model, x, targets):
    wanted = [ClassifierOutputTarget(int(t)) for t in targets.tolist()]
    out = {}
    for name, cls in (("gradcam++", GradCAMPlusPlus), ("layercam", LayerCAM)):
        cam = cls(model=model, target_layers=[model.cam_layer])
        try:
            out[name] = cam(input_tensor=x, targets=wanted)
        finally:
            cam.activations_and_grads.release()
    return out


def assert_same(ours: dict, ref: dict, raw: dict) -> None:
    for m in ("gradcam++", "layercam"):
        span = raw[m].amax(dim=(1, 2)) - raw[m].amin(dim=(1, 2))
        assert (span > 0).any(), f"{m}: every map is constant, the comparison would be vacuous"
        assert ours[m].shape == ref[m].shape
        err = np.abs(ours[m] - ref[m]).max()
        assert err <= 1e-4, f"{m}: max |drift - pytorch-grad-cam| = {err}"


@pytest.mark.parametrize("engine", ["drift", "pytorch-grad-cam"])
def test_cams_gradcampp_and_layercam(timed, benchmark, bench_device, rng, single_thread, engine):
    model, x, targets = setting(bench_device, rng)
    if engine == "drift":
        ours, raw = timed(drift_maps, model, x, targets)
        with single_thread():
            ref = reference_maps(model, x, targets)
    else:
        ref = timed(reference_maps, model, x, targets)
        with single_thread():
            ours, raw = drift_maps(model, x, targets)
    benchmark.extra_info.update(batch=x.shape[0], size=x.shape[-1])
    assert_same(ours, ref, raw)
