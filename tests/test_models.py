import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from drift import models
from drift.config import StageConfig
from drift.train import evaluate, train_finetune, train_transfer


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


def _tiny(rng, n=24, size=64, c=3):
    x = torch.rand(n, 1, size, size, generator=rng)
    y = torch.arange(n) % c
    x[y == 1, :, :20] += 0.5  # a learnable signal
    return TensorDataset(x, y)


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n or "num_batches" in n}


def test_transfer_stage_changes_no_backbone_parameter_or_bn_statistic(rng):
    torch.manual_seed(0)
    m = models.build("resnet10t", 3)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    head_before = m.head[-1].weight.clone()
    train_transfer(m, _tiny(rng), _tiny(rng, 9), StageConfig(epochs=2, batch_size=8), torch.device("cpu"), 0,
                   progress=False)
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, m.head[-1].weight)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert all(not mod.training for mod in m.backbone.modules() if isinstance(mod, _BatchNorm))


@pytest.mark.parametrize("bn_frozen", [True, False])
def test_finetune_stage_trains_backbone_and_honours_bn_mode(rng, bn_frozen):
    torch.manual_seed(0)
    m = models.build("resnet10t", 3)
    models.freeze_backbone(m)
    w0 = m.backbone.conv1[0].weight.clone()
    stats0 = _bn_stats(m.backbone)
    train_finetune(m, _tiny(rng), _tiny(rng, 9), StageConfig(epochs=1, batch_size=8, lr=1e-3, bn_frozen=bn_frozen),
                   torch.device("cpu"), 0, progress=False)
    assert not torch.equal(w0, m.backbone.conv1[0].weight)
    stats1 = _bn_stats(m.backbone)
    changed = any(not torch.equal(stats0[k], stats1[k]) for k in stats0)
    assert changed is (not bn_frozen)


def test_finetune_with_training_bn_ends_with_precise_statistics(rng):
    """Training-mode BatchNorm ends with exact statistics of the kept weights, not the last steps' running average."""
    import copy

    torch.manual_seed(0)
    m = models.build("resnet10t", 3)
    data = _tiny(rng)
    train_finetune(m, data, _tiny(rng, 9), StageConfig(epochs=2, batch_size=7, lr=1e-2, bn_frozen=False),
                   torch.device("cpu"), 0, progress=False)
    # Reference: the inputs of every BatchNorm layer in one training-mode pass over the whole set (one batch).
    ref = copy.deepcopy(m).train()
    bns = [b for b in ref.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda mod, inp, i=i: seen.setdefault(i, inp[0].detach()))
             for i, b in enumerate(bns)]
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    got = [b for b in m.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert len(seen) == len(got) > 5
    for i, b in enumerate(got):
        a = seen[i].double()
        torch.testing.assert_close(b.running_mean.double(), a.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.running_var.double(), a.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)


def test_training_is_deterministic_for_a_seed(rng):
    data, val = _tiny(rng), _tiny(rng, 9)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = models.build("resnet10t", 3)
        train_transfer(m, data, val, StageConfig(epochs=1, batch_size=8), torch.device("cpu"), 3, progress=False)
        train_finetune(m, data, val, StageConfig(epochs=1, batch_size=8, lr=1e-3), torch.device("cpu"), 4,
                       progress=False)
        outs.append(evaluate(m, val, torch.device("cpu")).logits)
    assert (outs[0] == outs[1]).all()


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    m = models.build("resnet10t", 4).eval()
    sha = models.save_checkpoint(m, tmp_path / "c.pt", {"stage": "transfer"})
    assert sha == models.sha256_file(tmp_path / "c.pt")
    m2 = models.load_checkpoint(tmp_path / "c.pt", "resnet10t", 4)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2.eval()(x))
    with pytest.raises(ValueError, match="expected resnet18"):
        models.load_checkpoint(tmp_path / "c.pt", "resnet18", 4)

    import argparse  # any class outside the weights-only allow-list stands for an arbitrary pickled object

    torch.save({"state_dict": {}, "payload": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        models.load_state(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        models.load_state(tmp_path / "junk.pt")


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
    models.save_checkpoint(m, tmp_path / "c.pt")
    back = models.load_checkpoint(tmp_path / "c.pt", "resnet10t", 3).eval()
    assert back.input_size == side
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    with pytest.raises(ValueError, match="input_size 8"):
        models.build("resnet10t", 3, input_size=8)


def test_imagenet_weights_offline_and_absent_name_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: nothing is fetched, the error names what was looked for
    m = models.build("resnet10t", 3)
    with pytest.raises(FileNotFoundError, match="resnet10t"):
        models.load_imagenet(m)
    with pytest.raises(FileNotFoundError, match="nothere"):
        models.load_imagenet(m, str(tmp_path / "nothere.pth"))


def test_backbone_weights_file_loads_and_wrong_one_is_named(tmp_path):
    src = models.build("resnet10t", 3)
    torch.save(src.backbone.state_dict(), tmp_path / "w.pth")
    dst = models.build("resnet10t", 3)
    models.load_backbone_weights(dst, models.load_state(tmp_path / "w.pth"), "w.pth")
    assert torch.equal(dst.backbone.conv1[0].weight, src.backbone.conv1[0].weight)
    with pytest.raises(ValueError, match="w.pth"):
        models.load_backbone_weights(models.build("resnet18", 3), models.load_state(tmp_path / "w.pth"), "w.pth")


def test_imagenet_weights_come_from_a_local_hub_cache(tmp_path, monkeypatch):
    """A cache laid out as the hub lays it out (refs/main -> snapshots/<rev>/model.safetensors) is used offline."""
    import timm
    from safetensors.torch import save_file

    src = models.build("resnet10t", 3)
    hub = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    repo = tmp_path / "hub" / ("models--" + hub.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    dst = models.build("resnet10t", 3)
    origin = models.load_imagenet(dst)
    assert hub in origin
    assert torch.equal(dst.backbone.conv1[0].weight, src.backbone.conv1[0].weight)


@pytest.mark.parametrize("limit", [None, 6])
def test_calibrate_bn_sets_batch_averaged_statistics_and_changes_no_parameter(rng, limit):
    """After calibration every BatchNorm holds the average over batches of its input's batch mean and unbiased
    variance in training mode (precise-BN), computed here independently from hooked inputs in float64 on a copy
    of the model (over the calibration subset when the pass is limited); parameters, momenta and modes are
    untouched."""
    import copy

    from drift.train import calibrate_bn, calibration_subset

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    m = models.build("resnet10t", 3)
    m.bn_frozen = True
    m.train()
    n = int(torch.randint(7, 23, (1,), generator=rng))
    x = torch.rand(n, 1, 45, 53, generator=rng)
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    ref = copy.deepcopy(m)
    params = {k: v.clone() for k, v in m.named_parameters()}
    bns = [mod for mod in m.modules() if isinstance(mod, _BatchNorm)]
    momenta = [b.momentum for b in bns]
    assert calibrate_bn(m, data, torch.device("cpu"), batch_size=5, max_images=limit) == len(bns)
    chosen = calibration_subset(n, limit)
    assert len(chosen) == (n if limit is None else limit) and len(set(chosen.tolist())) == len(chosen)
    x = x[torch.as_tensor(chosen)]

    ref_bns = [mod for mod in ref.modules() if isinstance(mod, _BatchNorm)]
    stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(ref_bns))}

    def capture(i):
        def hook(mod, inp):
            a = inp[0].double().transpose(0, 1).reshape(mod.num_features, -1)
            stats[i].append((a.mean(1), a.var(1, unbiased=True)))
        return hook

    hooks = [b.register_forward_pre_hook(capture(i)) for i, b in enumerate(ref_bns)]
    ref.eval()
    for b in ref_bns:
        b.train()  # normalise with batch statistics, as during calibration
    with torch.no_grad():
        for lo in range(0, len(x), 5):
            ref.features(x[lo:lo + 5])
    for h in hooks:
        h.remove()
    for i, b in enumerate(bns):
        mean = torch.stack([s[0] for s in stats[i]]).mean(0)
        var = torch.stack([s[1] for s in stats[i]]).mean(0)
        torch.testing.assert_close(b.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.running_var.double(), var, rtol=1e-4, atol=1e-5)
        assert int(b.num_batches_tracked) == len(stats[i])
    assert [b.momentum for b in bns] == momenta
    assert all(torch.equal(v, params[k]) for k, v in m.named_parameters())
    assert all(not b.training for b in m.backbone.modules() if isinstance(b, _BatchNorm)), "BatchNorm mode kept"


def test_bf16_inference_passes_match_fp32_to_bf16_accuracy(rng):
    """BatchNorm calibration and stage-1 pooled features under bf16 autocast agree with the fp32 passes to bf16
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


@pytest.mark.parametrize("n, bs, epochs", [(23, 5, 3), (9, 4, 2), (16, 4, 1), (5, 5, 3), (7, 7, 1)])
def test_onecycle_schedule_follows_the_formula(rng, monkeypatch, n, bs, epochs):
    """Every step's learning rate is OneCycleLR's (cosine warm-up to lr, cosine decay) where torch defines it;
    runs too short for a warm-up step (4 steps: OneCycleLR divides by zero) decay from lr by the same cosine."""
    import math

    lrs = []
    step = torch.optim.Adam.step

    def recording(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    torch.manual_seed(0)
    m = models.build("resnet10t", 3)
    lr = 1e-3 + 4e-3 * torch.rand(1, generator=rng).item()
    train_finetune(m, _tiny(rng, n), None, StageConfig(epochs=epochs, batch_size=bs, lr=lr, patience=epochs,
                                                      schedule="onecycle"), torch.device("cpu"), 0, progress=False)
    total = epochs * math.ceil(n / bs)
    if total > 4:  # the reference library
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    else:  # no warm-up step: cosine from lr to lr / 25e4 over the run
        ref = [lr / 25e4 + (lr - lr / 25e4) * (1 + math.cos(math.pi * i / max(total - 1, 1))) / 2
               for i in range(total)]
    assert len(lrs) == total
    assert lrs == pytest.approx(ref, rel=1e-9)


def test_bf16_training_step_is_close_to_fp32_and_returns_a_standard_layout_model(rng):
    """Six SGD steps under bf16 autocast move the weights like fp32 steps, to bf16 accuracy, not exactly (each
    step sees the updated weights: no bf16 copy of a weight is reused across steps)."""
    from drift.train import resolve_precision

    data = _tiny(rng, 16)
    updates, models_ = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = models.build("resnet10t", 3)
        w0 = m.backbone.conv1[0].weight.detach().clone()
        train_finetune(m, data, None, StageConfig(epochs=3, batch_size=8, lr=0.3, optimizer="sgd", bn_frozen=True,
                                                  patience=3, precision=precision), torch.device("cpu"), 0,
                       progress=False)
        updates[precision] = m.backbone.conv1[0].weight.detach() - w0
        models_[precision] = m
    ref, got = updates["fp32"], updates["bf16"]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel
    for m in models_.values():  # trained channels-last, handed back in the standard layout
        assert all(p.is_contiguous() for p in m.parameters())
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == (
        "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", torch.device("cpu"))
