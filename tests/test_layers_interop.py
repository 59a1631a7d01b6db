"""Layer presets for any timm CNN (drift.layers) and drift's maps for Quantus and Captum (drift.interop)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from drift import layers
from drift.attribution import cams_multi
from drift.interop import CamAttribution, explain_func, export_maps

FAMILIES = ("efficientnet_b0", "convnext_atto", "regnetx_002", "mobilenetv3_small_050", "vgg11")


def _order(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Brute force: every named module in the order its forward pass finishes, and its (first) tensor output."""
    finished, outs = [], {}
    names = {id(m): n for n, m in model.named_modules() if n}

    def hook(m, i, o):
        finished.append(names[id(m)])
        outs[names[id(m)]] = o  # the last call's output

    hooks = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return finished, outs


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_of_timm_families_outside_the_registry(family, rng):
    import timm

    # VGG's pre-logits MLP (a 7 x 7 convolution to 4096 channels, 100M weights) narrowed: same modules, faster.
    kw = {"mlp_ratio": 0.01} if family.startswith("vgg") else {}
    model = timm.create_model(family, pretrained=False, num_classes=3, **kw)
    side = 64 + int(torch.randint(0, 8, (1,), generator=rng))  # an odd size now and then
    x = torch.rand(1, 3, side, side, generator=rng)
    got = {p: layers.resolve(model, p, tuple(x.shape)) for p in layers.PRESETS}
    finished, outs = _order(model, x)
    mods = dict(model.named_modules())
    # auto: the module whose output is what timm's forward_features returns (the last map before pooling).
    with torch.no_grad():
        feats = model.forward_features(x)
    assert torch.equal(outs[got["auto"]], feats), (family, got["auto"])
    # block and stride16: timm's own stage declarations, with the channels and strides it declares.
    info = list(model.feature_info)
    assert got["block"] == info[-1]["module"]
    assert outs[got["block"]].shape[1] == info[-1]["num_chs"]
    at16 = [e for e in info if e["reduction"] == 16][-1]
    assert got["stride16"] == at16["module"]
    assert outs[got["stride16"]].shape[1] == at16["num_chs"]
    assert outs[got["stride16"]].shape[-1] in (math.floor(side / 16), math.ceil(side / 16))
    # last-conv: the last Conv2d to finish no later than auto.
    convs = [n for n in finished[: max(i for i, n in enumerate(finished) if n == got["auto"]) + 1]
             if isinstance(mods[n], nn.Conv2d)]
    assert got["last-conv"] == convs[-1]
    # Every preset gives CAMs through the engine, at its layer's grid.
    res = cams_multi(model, x, torch.tensor([2]), methods=("layercam",), layers=tuple(layers.PRESETS))
    for p in layers.PRESETS:
        assert res[p, "logit"]["layercam"].shape == (1, *outs[got[p]].shape[-2:])


def test_unknown_layer_lists_candidates_and_a_vit_is_refused(rng):
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"'layer9'.*closest candidates.*candidate layers.*layer4 512x2x2"):
        layers.resolve(model, "layer9", (1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"'fc' returns \(1, 3\)"):
        layers.resolve(model, "fc", (1, 3, 64, 64))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64)
    with pytest.raises(ValueError, match=r"works on tokens.*\(1, 17, 192\).*no token-to-grid reshape"):
        layers.resolve(vit, "auto", (1, 3, 64, 64))
    with pytest.raises(ValueError, match="no layer returns a map larger than 1 x 1"):
        layers.resolve(model, "auto", (1, 3, 2, 2))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_export_maps_layout_and_degenerate_flags(rng):
    raw = torch.rand(5, 3, 4, generator=rng)
    raw[1] = 0
    raw[2] = 0.7
    raw[3, 0, 0] = float("nan")
    out, codes = export_maps(raw, (13, 11))
    assert out.shape == (5, 1, 13, 11) and out.dtype == np.float32
    assert codes.tolist() == [0, 2, 3, 1, 0]
    # Bilinear at half-pixel centres, then min-max: brute force with the 1-D interpolation weights.
    def axis_weights(n_in, n_out):
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            c = min(max((o + 0.5) * n_in / n_out - 0.5, 0), n_in - 1)
            lo = int(np.floor(c))
            hi = min(lo + 1, n_in - 1)
            w[o, lo] += 1 - (c - lo)
            w[o, hi] += c - lo
        return w
    up = axis_weights(3, 13) @ raw[4].double().numpy() @ axis_weights(4, 11).T
    np.testing.assert_allclose(out[4, 0], (up - up.min()) / (up.max() - up.min()), atol=1e-5)


def test_captum_layer_gradcam_equals_drift_gradcam(rng):
    captum_attr = pytest.importorskip("captum.attr", reason="Captum is an optional extra (.[interop])")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = _Net().eval()
    x = torch.rand(6, 1, 19, 17, generator=rng)
    t = torch.randint(0, 4, (6,), generator=rng)
    ref = captum_attr.LayerGradCam(model, model.body[4]).attribute(x, target=t, relu_attributions=True)
    got = CamAttribution(model, "body.4", "gradcam", batch_size=4).attribute(x, t)
    assert got.shape == ref.shape == (6, 1, 9, 8)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    assert CamAttribution(model, "auto", "gradcam").attribute(x, t, upsample_to_input=True).shape == (6, 1, 19, 17)


def test_quantus_localisation_and_randomisation_on_drifts_maps(rng):
    quantus = pytest.importorskip("quantus", reason="Quantus is an optional extra (.[interop])")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = _Net().eval()
    x = torch.rand(5, 1, 20, 20, generator=rng).numpy()
    y = np.asarray(torch.randint(0, 4, (5,), generator=rng))
    s = np.zeros((5, 1, 20, 20), np.float32)
    for k in range(5):
        r, c = (int(v) for v in torch.randint(0, 12, (2,), generator=rng))
        s[k, 0, r:r + 8, c:c + 8] = 1
    a = explain_func(model, x, y, method="gradcam++", layer="auto")
    assert a.shape == (5, 1, 20, 20) and a.dtype == np.float32
    # Pointing game on drift's maps, against the brute force: is the map's maximum inside the mask?
    got = quantus.PointingGame(disable_warnings=True)(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s,
                                                        device="cpu")
    want = [bool(s[k, 0].reshape(-1)[np.argmax(a[k, 0])]) for k in range(5)]
    assert [bool(g) for g in got] == want
    # A randomisation metric re-explains each randomised model through drift's explain_func.
    mprt = quantus.RandomLogit(num_classes=4, seed=1, disable_warnings=True)
    scores = mprt(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu", explain_func=explain_func,
                  explain_func_kwargs={"method": "layercam", "layer": "body"})
    assert len(scores) == 5 and np.all(np.isfinite(scores))


def test_auto_on_a_registry_classifier_is_its_block_layer(rng):
    from drift.capture import resolve_target_layer
    from drift.models import build

    model = build("resnet10t", 3).eval()
    side = 64 + int(torch.randint(0, 5, (1,), generator=rng))
    auto, name = resolve_target_layer(model, "auto", (1, 1, side, side))
    assert name == "backbone.layer4" and auto is resolve_target_layer(model, "block")[0]
