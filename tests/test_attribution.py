"""CAM engine: formulas against brute-force loops, parity with pytorch-grad-cam, capture hygiene, bad input."""

import copy
import re
import warnings

import cv2
import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from drift.attribution import METHODS, SCORES, cams, cams_multi, capture, normalize, resolve_target_layer, upsample
from drift.models import build, freeze_backbone

PGC_EPS = 1e-6  # pytorch_grad_cam/grad_cam_plusplus.py adds this to the alpha denominator


def _np(t):
    return t.detach().cpu().double().numpy()


def _loop_maps(A, g, eps):
    """The three formulas written channel by channel and pixel by pixel in float64."""
    B, K, h, w = A.shape
    out = {m: np.zeros((B, h, w)) for m in ("gradcam", "gradcam++", "layercam")}
    for b in range(B):
        for k in range(K):
            Ak, gk = A[b, k], g[b, k]
            w_gc = gk.mean()
            s = Ak.sum()
            w_pp = 0.0
            for i in range(h):
                for j in range(w):
                    gij = gk[i, j]
                    if gij > 0:
                        w_pp += gij**2 / (2 * gij**2 + s * gij**3 + eps) * gij
            out["gradcam"][b] += w_gc * Ak
            out["gradcam++"][b] += w_pp * Ak
            out["layercam"][b] += np.maximum(gk, 0) * Ak
    return {m: np.maximum(v, 0) for m, v in out.items()}


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_methods_match_brute_force_formulas(rng, eps):
    A = torch.rand(3, 7, 5, 13, generator=rng, dtype=torch.float64) * 2
    g = torch.randn(3, 7, 5, 13, generator=rng, dtype=torch.float64)
    g[torch.rand(g.shape, generator=rng, dtype=torch.float64) < 0.2] = 0  # exercises the alpha = 0 branch
    ref = _loop_maps(_np(A), _np(g), eps)
    for m in ("gradcam", "gradcam++", "layercam"):
        got = METHODS[m](A, g, eps)
        assert got.shape == (3, 5, 13)
        np.testing.assert_allclose(_np(got), ref[m], rtol=1e-10, atol=1e-12, err_msg=m)


class _Tiny(nn.Module):
    """conv -> [target conv] -> inplace ReLU -> mean pool -> linear: dz_c/dA_kij = W_ck [A_kij > 0] / (h w)."""

    def __init__(self, rng):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.target = nn.Conv2d(6, 5, 3, stride=2)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(5, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=rng))

    def forward(self, x):
        return self.fc(self.act(self.target(self.stem(x))).mean(dim=(2, 3)))


def test_capture_gradients_and_targets_analytic(rng):
    model = _Tiny(rng)
    x = torch.randn(5, 3, 17, 13, generator=rng)
    with torch.no_grad():
        A_ref = model.target(model.stem(x))
        logits = model(x)
    t = torch.randint(0, 4, (5,), generator=rng)
    cap = capture(model, x, targets=t, layer="target")
    h, w = A_ref.shape[-2:]
    g_ref = model.fc.weight.detach()[t][:, :, None, None] * (A_ref > 0) / (h * w)
    # The stored activations are the layer's output, untouched by the inplace ReLU that follows it.
    torch.testing.assert_close(cap.activations, A_ref)
    assert (cap.activations < 0).any()
    torch.testing.assert_close(cap.gradients, g_ref)
    torch.testing.assert_close(cap.logits, logits)
    lc = cams(model, x, targets=t.tolist(), methods="layercam", layer=model.target)["layercam"]
    torch.testing.assert_close(lc, torch.relu((torch.relu(g_ref) * A_ref).sum(1)))
    # Callers under no_grad or inference_mode get the same maps.
    with torch.no_grad():
        torch.testing.assert_close(cams(model, x, t, methods="layercam", layer="target")["layercam"], lc)
    with torch.inference_mode():
        xi, ti = x.clone(), t.clone()
        torch.testing.assert_close(cams(model, xi, ti, methods="layercam", layer="target")["layercam"], lc)
    # Default targets are the predicted classes.
    default = capture(model, x, layer="target")
    assert torch.equal(default.targets, logits.argmax(1))
    explicit = capture(model, x, targets=logits.argmax(1), layer="target")
    torch.testing.assert_close(default.gradients, explicit.gradients)


def _reference_both(model, layer, x, targets):
    """pytorch-grad-cam end to end: GradCAMPlusPlus via __call__, LayerCAM from the same captured A and g
    through the reference's own get_cam_image and scale_cam_image steps (one pass of the slow backbone)."""
    cam = GradCAMPlusPlus(model=model, target_layers=[layer])
    try:
        pp = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])
        A = cam.activations_and_grads.activations[0].numpy()
        g = cam.activations_and_grads.gradients[0].numpy()
    finally:
        cam.activations_and_grads.release()
    raw = LayerCAM.get_cam_image(None, x, layer, None, A, g, False)
    size = (x.shape[-1], x.shape[-2])
    lc = scale_cam_image(scale_cam_image(np.maximum(raw, 0), size))
    return {"gradcam++": pp, "layercam": lc}


def _check_parity(ours, ref, size):
    for m, r in ref.items():
        raw = ours[m]
        # An all-zero map is legitimate (every weight negative) but at least one map must carry structure.
        span = raw.amax(dim=(1, 2)) - raw.amin(dim=(1, 2))
        assert (span > 0).any(), f"{m}: constant maps only, the comparison would be vacuous"
        got = normalize(upsample(raw, size), "minmax").cpu().numpy()
        assert got.shape == r.shape
        err = np.abs(got - r).max()
        assert err <= 1e-4, f"{m}: max |ours - pytorch-grad-cam| = {err}"


@pytest.mark.parametrize(
    "arch, layer, size",
    [
        ("densenet201", "features.norm5", (96, 96)),
        ("resnetv2_50", "norm", (97, 75)),
        ("inception_v3", "Mixed_7c", (160, 139)),
    ],
)
def test_parity_with_pytorch_grad_cam_study_backbones(rng, arch, layer, size):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    x = torch.rand(3, 3, *size, generator=rng)
    ours = cams(model, x, layer=layer, eps=PGC_EPS)
    targets = model(x).argmax(1)
    ref = _reference_both(model, dict(model.named_modules())[layer], x, targets)
    _check_parity(ours, ref, size)


def test_parity_small_model_every_method_end_to_end(rng):
    # A random network's Grad-CAM maps are all zero (every channel weight negative) for all of a few images in
    # about one network in twenty (3 images: 9 of 150 draws; every class once: 1 of 150), which would make the
    # comparison vacuous: draw another network then.
    for _ in range(8):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
        model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
        x = torch.rand(5, 3, 77, 93, generator=rng)
        t = torch.randperm(5, generator=rng)
        ours = cams(model, x, targets=t, methods=("gradcam", "gradcam++", "layercam"), layer="layer4",
                    eps=PGC_EPS)
        if all((m.amax(dim=(1, 2)) > m.amin(dim=(1, 2))).any() for m in ours.values()):
            break
    else:
        pytest.fail("8 random networks in a row gave constant maps for every image: the comparison would be vacuous")
    ref = {}
    for m, cls in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("layercam", LayerCAM)):
        cam = cls(model=model, target_layers=[model.layer4])
        try:
            ref[m] = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
        finally:
            cam.activations_and_grads.release()
    _check_parity(ours, ref, (77, 93))


def test_flags_modes_and_grads_restored_on_transfer_model(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = build("resnet18", 5)
    freeze_backbone(model)
    model.train()  # head in train mode, backbone BatchNorm frozen in eval: a mixed state to restore
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    head = model.head[-1]
    head.weight.grad = torch.randn(head.weight.shape, generator=rng)
    old_grad = head.weight.grad.clone()
    x = torch.rand(3, 1, 64, 96, generator=rng)
    out = cams(model, x, methods=("gradcam++", "layercam", "pgc:gradcam"))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(head.weight.grad, old_grad, rtol=0, atol=0)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.3.weight")
    assert all(v.shape == (3, 2, 3) and v.dtype == torch.float32 for v in out.values())
    # Frozen parameters do not stop the gradient at the layer: maps equal those of the unfrozen model.
    assert (out["layercam"] > 0).any()
    for p in model.parameters():
        p.requires_grad_(True)
    again = cams(model, x, methods=("gradcam++", "layercam"))
    torch.testing.assert_close(again["layercam"], out["layercam"])
    torch.testing.assert_close(again["gradcam++"], out["gradcam++"])


def test_default_layer_and_layer_errors(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = build("resnet18", 3).eval()
    x = torch.rand(2, 3, 65, 71, generator=rng)
    by_default = cams(model, x)
    by_name = cams(model, x, layer="backbone.layer4")
    by_module = cams(model, x, layer=model.backbone.layer4)
    for m in by_default:
        torch.testing.assert_close(by_default[m], by_name[m])
        torch.testing.assert_close(by_default[m], by_module[m])
    with pytest.raises(ValueError, match="layer5"):
        cams(model, x, layer="backbone.layer5")
    with pytest.raises(ValueError, match="not a submodule"):
        cams(model, x, layer=nn.Conv2d(3, 3, 1))
    tiny = _Tiny(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cam_layer.*layer="):
        cams(tiny, torch.rand(2, 3, 9, 9))
    with pytest.raises(ValueError, match="'fc' outputs"):
        cams(tiny, torch.rand(2, 3, 9, 9), layer="fc")


def test_bad_inputs_are_named(rng):
    model = _Tiny(rng)
    x = torch.rand(3, 3, 11, 11, generator=rng)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cams(model, x[0], layer="target")
    with pytest.raises(TypeError, match="dtype"):
        cams(model, (x * 255).to(torch.uint8), layer="target")
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        cams(model, x, targets=[0, 1], layer="target")
    with pytest.raises(ValueError, match=r"targets\[1\] = 7"):
        cams(model, x, targets=[0, 7, 1], layer="target")
    with pytest.raises(TypeError, match="integer"):
        cams(model, x, targets=torch.zeros(3), layer="target")
    with pytest.raises(ValueError, match=re.escape("unknown CAM method 'gradcam+'")):
        cams(model, x, methods=("gradcam+",), layer="target")
    with pytest.raises(ValueError, match="eps"):
        cams(model, x, layer="target", eps=-1.0)


def test_one_by_one_map_warns_naming_layer_and_size(rng):
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    with pytest.warns(UserWarning, match=r"'layer4'.*1 x 1.*32 x 32"):
        out = cams(model, torch.rand(2, 3, 32, 32, generator=rng), layer="layer4")
    assert out["layercam"].shape == (2, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cams(model, torch.rand(2, 3, 64, 64, generator=rng), layer="layer4")


def test_pgc_method_is_reference_output_at_layer_resolution(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    x = torch.rand(3, 3, 64, 96, generator=rng)
    got = cams(model, x, methods=("pgc:eigencam",), layer="layer4")["pgc:eigencam"]
    cam = EigenCAM(model=model, target_layers=[model.layer4])
    try:
        full = cam(input_tensor=x, targets=None)
    finally:
        cam.activations_and_grads.release()
    # 64 x 96 input, 2 x 3 map: each map pixel is the mean of a 32 x 32 block of the reference's output.
    blocks = full.reshape(3, 2, 32, 3, 32).mean(axis=(2, 4))
    np.testing.assert_allclose(got.numpy(), blocks, atol=1e-5)


def test_upsample_matches_cv2_and_normalize_matches_numpy(rng):
    maps = torch.rand(5, 3, 7, generator=rng)
    got = upsample(maps, (13, 17)).numpy()
    ref = np.stack([cv2.resize(m, (17, 13), interpolation=cv2.INTER_LINEAR) for m in maps.numpy()])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert upsample(maps, 5).shape == (5, 5, 5)

    m = torch.rand(5, 13, 17, generator=rng, dtype=torch.float64)
    m[1] = 0.25  # constant
    m[2, 3, 4] = float("nan")
    a = m.numpy()
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mm = (a - lo) / (hi - lo)
        sm = a / a.sum(axis=(1, 2), keepdims=True)
    mm[1] = 0
    got_mm = normalize(m, "minmax").numpy()
    np.testing.assert_allclose(got_mm[[0, 1, 3, 4]], mm[[0, 1, 3, 4]], rtol=1e-12)
    assert np.isnan(got_mm[2]).all()  # a non-finite map stays non-finite, never zeros
    np.testing.assert_allclose(normalize(m, "sum").numpy()[[0, 1, 3, 4]], sm[[0, 1, 3, 4]], rtol=1e-12)
    assert torch.equal(normalize(torch.zeros(2, 3, 3), "sum"), torch.zeros(2, 3, 3))
    assert normalize(m, "none") is m
    with pytest.raises(ValueError, match="mode"):
        normalize(m, "max")
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        upsample(m[0], 9)


# ------------------------------------------------------------------- several layers and scores in one pass


def _randomize_bn(model, gen):
    """Random BatchNorm scales and shifts, with running statistics then measured on random images: timm
    zero-initialises the last BatchNorm of every residual block, which would make the gradient at a block's last
    convolution identically zero, and made-up statistics would let activations grow without bound."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    with torch.no_grad():
        for mod in bns:
            sign = torch.where(torch.rand(mod.weight.shape, generator=gen) < 0.2, -1.0, 1.0)
            mod.weight.copy_(sign * (0.5 + torch.rand(mod.weight.shape, generator=gen)))
            mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen))
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.rand(4, 1, 64, 64, generator=gen))
    for mod in bns:
        mod.momentum = 0.1
    return model.eval()


GRAD_METHODS = ("gradcam", "gradcam++", "gradcam++_tfkv", "layercam")


def _close(got, ref, what):
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()) + 1e-12, msg=what)


def test_cams_multi_equals_single_layer_cams_and_an_independent_softmax_gradient(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = _randomize_bn(build("resnet10t", 4), rng)
    x = torch.rand(3, 1, 80, 96, generator=rng)
    t = torch.randint(0, 4, (3,), generator=rng)
    layers = ("stride16", "last-conv", "block", "backbone.layer2")
    multi = cams_multi(model, x, t, methods=GRAD_METHODS, layers=layers, scores=("logit", "softmax"))
    assert list(multi) == [(layer, s) for layer in layers for s in ("logit", "softmax")]
    assert all(p.grad is None for p in model.parameters())
    for (layer, score), maps in multi.items():
        single = cams(model, x, t, methods=GRAD_METHODS, layer=layer, score=score)
        assert list(maps) == list(GRAD_METHODS)
        for m in GRAD_METHODS:
            assert maps[m].dtype == torch.float32
            _close(maps[m], single[m], f"{layer} {score} {m}")
    assert multi["stride16", "logit"]["layercam"].shape == (3, 5, 6)
    assert multi["block", "logit"]["layercam"].shape == (3, 3, 3)

    # The softmax probability differentiated through a plain forward pass (graph kept everywhere).
    plain = copy.deepcopy(model).eval()
    acts = {}

    def keep(name):
        def hook(mod, i, o):
            o.retain_grad()
            acts[name] = o

        return hook

    for layer in layers:
        name = {"stride16": "layer3", "last-conv": "layer4.0.downsample.1", "block": "layer4"}.get(layer, "layer2")
        plain.backbone.get_submodule(name).register_forward_hook(keep(layer))
    plain(x).softmax(1).gather(1, t[:, None]).sum().backward()
    for layer in layers:
        A, g = acts[layer].detach(), acts[layer].grad
        assert (g != 0).any()
        ref = {"layercam": torch.relu((torch.relu(g) * A).sum(1))}
        ref.update({m: METHODS[m](A, g, 0.0) for m in ("gradcam", "gradcam++", "gradcam++_tfkv")})
        for m, r in ref.items():
            torch.testing.assert_close(multi[layer, "softmax"][m], r, rtol=1e-5, atol=1e-5 * float(r.abs().max()),
                                       msg=f"{layer} {m}")
    assert (multi["block", "softmax"]["layercam"] > 0).any()

    # A frozen backbone (the transfer phase) gives the same maps at every layer.
    freeze_backbone(model)
    frozen = cams_multi(model, x, t, methods=GRAD_METHODS, layers=layers, scores=("logit", "softmax"))
    for key, maps in multi.items():
        for m in GRAD_METHODS:
            _close(frozen[key][m], maps[m], f"frozen {key} {m}")


class _TwoBranch(nn.Module):
    """stem -> (conv_a, conv_b in parallel) -> inplace ReLU of the concatenation -> mean -> linear."""

    def __init__(self, rng):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.down = nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=rng))

    def forward(self, x):
        s = self.stem(x)
        a, b = self.down(self.conv_a(s)), self.conv_b(s)
        return self.fc(torch.relu_(torch.cat([a, b], 1)).mean(dim=(2, 3)))


@pytest.mark.parametrize("frozen", [False, True])
def test_cams_multi_parallel_branches_and_a_layer_feeding_later_ones(rng, frozen):
    """conv_b runs after conv_a but not below it: with frozen parameters its output is not in the graph and
    becomes a second root; stem feeds both and its gradient must flow through the stored later layers."""
    model = _TwoBranch(rng)
    for p in model.parameters():
        p.requires_grad_(not frozen)
    x = torch.rand(2, 3, 12, 10, generator=rng)
    layers = ("conv_b", "conv_a", "stem", model.down)
    multi = cams_multi(model, x, methods=GRAD_METHODS, layers=layers, scores=("softmax", "logit"))
    for (layer, score), maps in multi.items():
        single = cams(model, x, methods=GRAD_METHODS, layer=layer, score=score)
        for m in GRAD_METHODS:
            _close(maps[m], single[m], f"{layer} {score} {m}")
    assert all(p.grad is None for p in model.parameters())
    # stem's gradient from an independent plain pass.
    ref = model.stem(x).detach().requires_grad_(True)
    s = ref
    a, b = model.down(model.conv_a(s)), model.conv_b(s)
    z = model.fc(torch.relu(torch.cat([a, b], 1)).mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(z.gather(1, z.argmax(1, keepdim=True)).sum(), ref)
    _close(multi["stem", "logit"]["layercam"], torch.relu((torch.relu(g) * ref.detach()).sum(1)), "stem")


def test_cams_multi_and_presets_errors(rng):
    model = _Tiny(rng)
    x = torch.rand(2, 3, 11, 11, generator=rng)
    with pytest.raises(ValueError, match="twice"):
        cams_multi(model, x, layers=("target", "target"))
    with pytest.raises(ValueError, match="twice"):
        cams_multi(model, x, layers="target", scores=("logit", "logit"))
    with pytest.raises(ValueError, match="unknown score 'prob'"):
        cams_multi(model, x, layers="target", scores="prob")
    with pytest.raises(ValueError, match="unknown score"):
        capture(model, x, layer="target", score="probability")
    with pytest.raises(ValueError, match="pytorch-grad-cam.*softmax"):
        cams(model, x, methods=("layercam", "pgc:gradcam"), layer="target", score="softmax")
    # Presets of a model outside the registry resolve through drift.layers at the input's shape.
    from drift import layers as any_layers

    block = any_layers.resolve(model, "block", tuple(x.shape))
    torch.testing.assert_close(cams_multi(model, x, layers=("target", "block"))["block", "logit"]["layercam"],
                               cams(model, x, layer=block)["layercam"])
    with pytest.raises(ValueError, match="preset.*_Tiny.*dotted"):
        resolve_target_layer(model, "block")  # no input shape to trace with
    conv = nn.Conv2d(3, 3, 1)
    twice = nn.Sequential(conv, nn.ReLU(), conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'0' ran more than once"):
        cams_multi(twice, torch.rand(1, 3, 8, 8), layers=("3", "0"))
    # A bare timm model resolves presets through its pretrained_cfg architecture.
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64, generator=rng)
    by_preset = cams_multi(net, x, layers=("last-conv", "stride16"))
    assert torch.equal(by_preset["last-conv", "logit"]["layercam"],
                       cams(net, x, layer="layer4.1.conv2")["layercam"])
    assert by_preset["stride16", "logit"]["layercam"].shape == (2, 4, 4)
    cap = capture(net, x, layer="block", score="softmax")
    assert cap.layer == "layer4" and cap.score == "softmax"


# ---------------------------------------------------------------------------------------- gradcam++_tfkv


def _tfkv_reference(A, g, score):
    """tf-keras-vis's GradcamPlusPlus in float64 NumPy, channels first, from its source: Y = exp(score) per
    image; alpha_denom = 2 Y g^2 + Y g^3 sum(A) plus 1 where Y g^2 == 0; alpha normalised over space (a zero
    sum replaced by 1); weights relu(Y g) alpha summed over space; map relu(sum_k w_k A_k)."""
    B, K, h, w = A.shape
    out = np.zeros((B, h, w))
    for b in range(B):
        e = np.exp(score[b])
        for k in range(K):
            first = e * g[b, k]
            second = first * g[b, k]
            third = second * g[b, k]
            denom = 2.0 * second + third * A[b, k].sum()
            denom = denom + (second == 0.0)
            alphas = second / denom
            total = alphas.sum()
            alphas = alphas / (total + (total == 0.0))
            out[b] += (np.maximum(first, 0.0) * alphas).sum() * A[b, k]
    return np.maximum(out, 0.0)


def test_gradcam_plusplus_tfkv_matches_tf_keras_vis_formula_on_hand_made_gradients(rng):
    A = torch.rand(3, 6, 5, 7, generator=rng, dtype=torch.float64) * 2 - 0.3
    g = torch.randn(3, 6, 5, 7, generator=rng, dtype=torch.float64)
    g[:, 0] = 0  # no gradient in a channel: alpha sums to 0
    g[:, 1] = -g[:, 1].abs()  # only negative gradients: weight 0 but alpha non-zero
    g[:, 2][torch.rand(g[:, 2].shape, generator=rng, dtype=torch.float64) < 0.8] = 0  # sparse
    g[1, 3] = 0.5  # constant over space
    g[2, 4] *= 1e-30  # tiny gradients (a saturated softmax): g^2 underflows in float32
    score = torch.randn(3, generator=rng, dtype=torch.float64).numpy()
    ref = _tfkv_reference(_np(A), _np(g), score)
    got = METHODS["gradcam++_tfkv"](A, g, 0.0).numpy() * np.exp(score)[:, None, None]
    assert (ref > 0).any()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    # float32 input gives the float64 maps to float32 accuracy, tiny gradients included (no underflow to 0).
    lone = torch.zeros_like(g)
    lone[:, 4] = g[:, 4]  # the tiny-gradient channel alone decides image 2's map
    ref32 = _tfkv_reference(_np(A), _np(lone), np.zeros(3))
    got32 = METHODS["gradcam++_tfkv"](A.float(), lone.float(), 0.0).double().numpy()
    assert ref32[2].max() > 0
    # float32 sums of g^2 and g^3 over the map, then a ratio: a few hundred ulps (2.3e-5 seen); an underflow is 100%
    np.testing.assert_allclose(got32, ref32, rtol=1e-4, atol=1e-4 * ref32.max())
    for method in ("gradcam++", "gradcam++_tfkv"):
        assert torch.isfinite(METHODS[method](A.float(), 1e-30 * g.float(), 0.0)).all(), method
    # pytorch-grad-cam's reading is another map (alpha not normalised).
    assert not np.allclose(METHODS["gradcam++"](A, g, 0.0).numpy() * np.exp(score)[:, None, None], ref)


@pytest.mark.parametrize("arch", ["resnet10t", "resnet18"])
def test_gradcam_plusplus_tfkv_matches_tf_keras_vis_formula_on_network_gradients(rng, arch):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = _randomize_bn(build(arch, 4), rng)
    x = torch.rand(3, 1, 96, 96, generator=rng)
    layers = ("last-conv", "stride16", "block", "backbone.layer2.0.conv1")
    multi = cams_multi(model, x, methods=("gradcam++_tfkv",), layers=layers, scores=("logit", "softmax"))
    structured = 0
    for layer in layers:
        for score in ("logit", "softmax"):
            cap = capture(model, x, layer=layer, score=score)
            # The engine's float32 maps are the method applied to the captured float32 (A, g).
            _close(multi[layer, score]["gradcam++_tfkv"], METHODS["gradcam++_tfkv"](cap.activations, cap.gradients),
                   f"{layer} {score}")
            A, g = cap.activations.double(), cap.gradients.double()
            nz = float((g != 0).double().mean())
            assert nz > 0
            if layer == "last-conv":  # followed by BatchNorm, the residual sum and a ReLU
                assert nz < 0.9, f"{layer}: the gradient should be sparse, {nz:.2f} non-zero"
            z = cap.logits.double()
            s = z if score == "logit" else z.softmax(1)
            s = s.gather(1, cap.targets[:, None])[:, 0].numpy()
            ref = _tfkv_reference(A.numpy(), g.numpy(), s)
            ours = METHODS["gradcam++_tfkv"](A, g, 0.0).numpy() * np.exp(s)[:, None, None]
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12 * ref.max(), err_msg=f"{layer} {score}")
            structured += bool((ref.max(axis=(1, 2)) > ref.min(axis=(1, 2))).any())
    assert structured >= 4, f"only {structured} of 8 (layer, score) pairs gave non-constant maps"


@pytest.mark.parametrize("arch", ["resnet10t", "resnet18"])
def test_block_layer_gradient_is_uniform_and_gradcam_plusplus_tfkv_equals_layercam(rng, arch):
    """Below only global average pooling and a linear head the gradient is constant over space, for the logit
    and the softmax probability; the normalised alphas are then 1 / (hw) and tf-keras-vis's Grad-CAM++ is
    LayerCAM exactly."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = _randomize_bn(build(arch, 5), rng)
    x = torch.rand(4, 1, 96, 128, generator=rng)
    for score in SCORES:
        cap = capture(model, x, layer="block", score=score)
        g = cap.gradients
        assert torch.equal(g, g[:, :, :1, :1].expand_as(g))
        assert (g != 0).all()
    out = cams_multi(model, x, methods=("gradcam++_tfkv", "layercam"), layers="block", scores=SCORES)
    for score in SCORES:
        tfkv, lc = out["block", score]["gradcam++_tfkv"], out["block", score]["layercam"]
        assert (lc.amax(dim=(1, 2)) > lc.amin(dim=(1, 2))).any()
        torch.testing.assert_close(tfkv, lc, rtol=1e-5, atol=1e-6 * float(lc.abs().max()))


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    x = torch.rand(4, 3, 97, 129, generator=rng)
    cpu = cams(model, x, layer="layer4", methods=("gradcam", "gradcam++", "layercam"))
    gpu = cams(model.cuda(), x.cuda(), layer="layer4", methods=("gradcam", "gradcam++", "layercam"))
    for m in cpu:
        assert gpu[m].device.type == "cuda"
        torch.testing.assert_close(gpu[m].cpu(), cpu[m], rtol=1e-3, atol=1e-3 * float(cpu[m].abs().max()))
