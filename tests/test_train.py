"""Training (drift.train): the two phases, BatchNorm modes and calibration, determinism, schedules, bf16 steps."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from drift import models
from drift.config import PhaseConfig
from drift.train import evaluate, train_finetune, train_transfer


def _tiny(rng, n=24, size=64, c=3):
    x = torch.rand(n, 1, size, size, generator=rng)
    y = torch.arange(n) % c
    x[y == 1, :, :20] += 0.5  # a learnable signal
    return TensorDataset(x, y)


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n or "num_batches" in n}


def test_transfer_phase_changes_no_backbone_parameter_or_bn_statistic(rng):
    torch.manual_seed(0)
    m = models.build("resnet10t", 3)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    head_before = m.head[-1].weight.clone()
    train_transfer(m, _tiny(rng), _tiny(rng, 9), PhaseConfig(epochs=2, batch_size=8), torch.device("cpu"), 0,
                   progress=False)
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, m.head[-1].weight)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert all(not mod.training for mod in m.backbone.modules() if isinstance(mod, _BatchNorm))


@pytest.mark.parametrize("bn_frozen", [True, False])
def test_finetune_phase_trains_backbone_and_honours_bn_mode(rng, bn_frozen):
    torch.manual_seed(0)
    m = models.build("resnet10t", 3)
    models.freeze_backbone(m)
    w0 = m.backbone.conv1[0].weight.clone()
    stats0 = _bn_stats(m.backbone)
    train_finetune(m, _tiny(rng), _tiny(rng, 9), PhaseConfig(epochs=1, batch_size=8, lr=1e-3, bn_frozen=bn_frozen),
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
    train_finetune(m, data, _tiny(rng, 9), PhaseConfig(epochs=2, batch_size=7, lr=1e-2, bn_frozen=False),
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
        train_transfer(m, data, val, PhaseConfig(epochs=1, batch_size=8), torch.device("cpu"), 3, progress=False)
        train_finetune(m, data, val, PhaseConfig(epochs=1, batch_size=8, lr=1e-3), torch.device("cpu"), 4,
                       progress=False)
        outs.append(evaluate(m, val, torch.device("cpu")).logits)
    assert (outs[0] == outs[1]).all()


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
    train_finetune(m, _tiny(rng, n), None, PhaseConfig(epochs=epochs, batch_size=bs, lr=lr, patience=epochs,
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
        train_finetune(m, data, None, PhaseConfig(epochs=3, batch_size=8, lr=0.3, optimizer="sgd", bn_frozen=True,
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
