import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from drift import models, weights


@pytest.mark.parametrize("arch, size, fmap", [("densenet201", 96, 3), ("resnetv2_50", 96, 3),
                                              ("inception_v3", 139, 3), ("resnet10t", 67, 3)])
def test_cam_layer_is_the_last_feature_map(arch, size, fmap):
    """The registry's CAM layer produces exactly the feature map the head pools (last block, post-activation)."""
    torch.manual_seed(0)
    m = models.build(arch, 5).eval()
    seen = {}
    h = m.cam_layer.register_forward_hook(lambda mod, i, o: seen.setdefault("a", o))
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        feats = m.features(x)
        logits = m(x)
    h.remove()
    assert torch.equal(seen["a"], feats)
    assert feats.shape[-1] == fmap and logits.shape == (2, 5)
    ref = m.head[-1](feats.mean((2, 3)))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    if arch != "resnet10t":
        assert (feats >= 0).all(), "post-activation layer must be non-negative"


def _inception_side(side: int, stride: int) -> int:
    """Map side of timm's inception_v3 at output stride 16 or 32: its stem and reduction blocks use unpadded
    3 x 3 convolutions and poolings, so the side is not side / stride."""
    h = (side - 3) // 2 + 1 - 2  # Conv2d_1a (3 x 3, stride 2), Conv2d_2a (3 x 3)
    h = (h - 3) // 2 + 1 - 2  # Conv2d_2b (padded), max pool (3 x 3, stride 2), Conv2d_4a (3 x 3)
    h = (h - 3) // 2 + 1  # max pool (3 x 3, stride 2): stride 8
    h = (h - 3) // 2 + 1  # Mixed_6a: stride 16
    return h if stride == 16 else (h - 3) // 2 + 1  # Mixed_7a: stride 32


@pytest.mark.parametrize("arch, side", [("densenet201", 128), ("resnetv2_50", 128), ("inception_v3", 160),
                                        ("resnet18", 128), ("resnet10t", 128), ("resnet10t", 224)])
def test_layer_presets_run_once_last_conv_runs_last_and_strides_hold(arch, side):
    """Hooks on every nn.Conv2d of the whole classifier: the last-conv preset is the last convolution to run;
    every preset runs once with a 4-D output at its output stride (block, last-conv: 32; stride16: 16)."""
    from torch import nn

    torch.manual_seed(0)
    m = models.build(arch, 3).eval()
    names = {p: models.cam_layer_name(arch, p) for p in models.LAYER_PRESETS}
    assert names["block"] == m.spec.cam_layer and m.cam_layer is models.resolve_layer(m.backbone, names["block"])
    convs, seen = [], {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: convs.append(n))
             for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    for p, n in names.items():
        hooks.append(models.resolve_layer(m.backbone, n).register_forward_hook(
            lambda mod, i, o, p=p: seen.setdefault(p, []).append(tuple(o.shape))))
    with torch.no_grad():
        m(torch.rand(1, 1, side, side))
    for h in hooks:
        h.remove()
    assert convs[-1] == "backbone." + names["last-conv"]
    assert isinstance(models.resolve_layer(m.backbone, names["last-conv"]), nn.Conv2d)
    for preset, stride in (("block", 32), ("last-conv", 32), ("stride16", 16)):
        assert len(seen[preset]) == 1, f"{preset} ran {len(seen[preset])} times"
        shape = seen[preset][0]
        want = _inception_side(side, stride) if arch == "inception_v3" else side // stride
        assert len(shape) == 4 and shape[-2:] == (want, want), (preset, shape)


def test_layer_preset_names_and_keras_counterparts():
    assert models.LAYER_PRESETS == ("block", "last-conv", "stride16")
    keras = {arch: tuple(models.keras_layer_name(arch, p) for p in models.LAYER_PRESETS) for arch in models.STUDY_ARCHS}
    assert keras == {"densenet201": ("relu", "conv5_block32_2_conv", "pool4_relu"),
                     "resnetv2_50": ("post_relu", "conv5_block3_3_conv", "conv4_block5_out"),
                     "inception_v3": ("mixed10", "conv2d_93", "mixed7")}
    assert models.cam_layer_name("densenet201", "last-conv") == "features.denseblock4.denselayer32.conv2"
    assert models.cam_layer_name("resnet18", "layer4.0") == "layer4.0"  # a dotted name passes through
    assert models.keras_layer_name("resnet18", "block") is None
    assert models.keras_layer_name("densenet201", "features.norm5") is None
    with pytest.raises(ValueError, match="densenet201"):
        models.cam_layer_name("densenet999", "block")
    with pytest.raises(ValueError, match="densenet201"):
        models.keras_layer_name("densenet999", "block")


def test_gray_input_equals_three_equal_channels():
    m = models.build("resnet10t", 3).eval()
    x = torch.rand(3, 1, 65, 71)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x.repeat(1, 3, 1, 1)))


def test_wrong_layer_and_arch_names_list_valid_ones():
    m = models.build("resnet10t", 3)
    with pytest.raises(ValueError, match="layer4"):
        models.resolve_layer(m, "layer44")
    with pytest.raises(ValueError, match="densenet201"):
        models.build("densenet999", 3)
    with pytest.raises(ValueError, match="minimum size"):
        m(torch.rand(1, 1, 20, 20))


@pytest.mark.parametrize("side, hw", [(71, (45, 53)), (40, (57, 63))])
def test_input_size_resamples_like_interpolate_and_survives_a_checkpoint(tmp_path, rng, side, hw):
    """A model with input_size gives the logits of the same weights on F.interpolate'd input (bilinear,
    antialiased when shrinking), passes gradients back at the input's own shape, and its checkpoint keeps it."""
    import torch.nn.functional as F

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    m = models.build("resnet10t", 3, input_size=side).eval()
    plain = models.build("resnet10t", 3).eval()
    plain.load_state_dict(m.state_dict())
    x = torch.rand(3, 1, *hw, generator=rng, requires_grad=True)
    ref = F.interpolate(x.detach(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=min(hw) > side)
    torch.testing.assert_close(m(x), plain(ref), rtol=1e-5, atol=1e-6)
    m(x).sum().backward()
    assert x.grad.shape == x.shape and x.grad.abs().sum() > 0
    weights.save_checkpoint(m, tmp_path / "c.pt")
    back = weights.load_checkpoint(tmp_path / "c.pt", "resnet10t", 3).eval()
    assert back.input_size == side
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    with pytest.raises(ValueError, match="input_size 8"):
        models.build("resnet10t", 3, input_size=8)


def test_bf16_inference_passes_match_fp32_to_bf16_accuracy(rng):
    """BatchNorm calibration and transfer-phase pooled features under bf16 autocast agree with the fp32 passes to bf16
    accuracy (and are not the fp32 numbers); statistics stay fp32, weights come back in the standard layout."""
    import copy

    from drift.train import calibrate_bn, pooled_features

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    n = int(torch.randint(9, 25, (1,), generator=rng))
    x = torch.rand(n, 1, 51, 47, generator=rng)
    data = TensorDataset(x, torch.randint(0, 3, (n,), generator=rng))
    ref = models.build("resnet10t", 3)
    fast = copy.deepcopy(ref)
    calibrate_bn(ref, data, torch.device("cpu"), batch_size=6)
    calibrate_bn(fast, data, torch.device("cpu"), batch_size=6, precision="bf16")
    pairs = [(a, b) for a, b in zip(ref.modules(), fast.modules()) if isinstance(a, _BatchNorm)]
    for a, b in pairs:
        assert b.running_mean.dtype == torch.float32 and b.running_var.dtype == torch.float32
        scale = a.running_var.sqrt().max()
        torch.testing.assert_close(b.running_mean, a.running_mean, rtol=0, atol=float(0.05 * scale))
        torch.testing.assert_close(b.running_var, a.running_var, rtol=0.1, atol=float(0.01 * scale ** 2))
    assert any(not torch.equal(a.running_var, b.running_var) for a, b in pairs)
    f32 = pooled_features(ref, data, torch.device("cpu"), batch_size=7).tensors[0]
    f16 = pooled_features(ref, data, torch.device("cpu"), batch_size=7, precision="bf16").tensors[0]
    assert f16.dtype == torch.float32 and f16.shape == f32.shape
    err = ((f16 - f32).norm() / f32.norm()).item()
    assert 0 < err < 0.03, err
    assert all(p.is_contiguous() for p in ref.parameters())
