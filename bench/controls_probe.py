"""The probes behind the controls' defaults (docs/controls.md): not part of the pipeline.

``eps``: trains a small classifier on the synthetic task for a few epochs (about a minute on a laptop CPU at 64 px)
and prints, per eps, the median ratio KL / (1/2 d^T F d) of every direction kind of ``drift.perturb`` for the
trained network and for an untrained one of the same architecture (BatchNorm statistics of the training images),
with the mean |change of the predicted-class log-odds|:

    python bench/controls_probe.py eps --arch resnet10t --size 64 --epochs 4

``spread``: the logit spread (``drift.randomisation.logit_spread``) of fully re-initialised backbones at demo size,
with PyTorch's default reset and with the architecture's own initialiser and BatchNorm statistics of training
images (at the full cut the trained weights play no part):

    python bench/controls_probe.py spread --size 160 --archs inception_v3 resnetv2_50 densenet201
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from drift import randomisation as rd
from drift.data.synthetic import load_synthetic
from drift.models import build
from drift.perturb import KINDS, run_perturbations
from drift.train import calibrate_bn

EPS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def probe_eps(arch: str, size: int, epochs: int, n_images: int, seed: int) -> None:
    torch.manual_seed(seed)
    t0 = time.time()
    s = load_synthetic(400, 20, 24, size, seed, 0.0)
    tr, te = s.train, s.test
    xtr, ytr = tr.images(np.arange(len(tr))), torch.as_tensor(tr.labels)
    xte, yte = te.images(np.arange(len(te))), np.asarray(te.labels)
    C = len(tr.class_names)
    untrained = build(arch, C)
    calibrate_bn(untrained, tr, torch.device("cpu"), max_images=256)
    model = build(arch, C)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for ep in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1).numpy() == yte).mean()
        print(f"epoch {ep}: test accuracy {acc:.2f} ({time.time() - t0:.0f} s)", flush=True)
    for name, m in (("trained", model), ("untrained", untrained.eval())):
        res = run_perturbations(m, xte[:n_images], yte[:n_images], eps_grid=EPS, alphas=[1.0], seed=seed,
                                batch_size=6)
        print(f"{name}: median KL / (1/2 d^T F d) per eps and kind; mean |dL| (log-odds) of high, complement, "
              "jacobian, gradient")
        print("  eps      " + " ".join(f"{k:>10s}" for k in KINDS))
        for e, ep in enumerate(EPS):
            lo = res.curves["abs_logodds_change"][:, e]
            print(f"  {ep:<8g} " + " ".join(f"{res.curves['kl_ratio'][k, e]:10.3f}" for k in range(len(KINDS)))
                  + " | " + " ".join(f"{lo[KINDS.index(k)]:.3g}" for k in ("high", "complement", "jacobian",
                                                                            "gradient")), flush=True)


def probe_spread(archs: list[str], size: int, seed: int) -> None:
    s = load_synthetic(64, 4, 16, size, seed, 0.0)
    xtr, xte = s.train.images(np.arange(64)), s.test.images(np.arange(16))
    C = len(s.train.class_names)
    for arch in archs:
        torch.manual_seed(seed)
        model = build(arch, C).eval()
        cut = rd.cascade(model, xte[:2], [1.0])[0]
        default = rd.logit_spread(rd.randomised(model, cut.modules, seed), xte, 8)
        own = rd.randomised(model, cut.modules, seed, fresh=lambda arch=arch: build(arch, C))
        rd.recalibrate_bn(own, cut.modules, xtr.split(16))
        print(f"{arch}: logit spread over {len(xte)} images, default reset {default:.3g}, own initialiser + "
              f"BatchNorm statistics of {len(xtr)} training images {rd.logit_spread(own, xte, 8):.3g}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="probe", required=True)
    e = sub.add_parser("eps")
    e.add_argument("--arch", default="resnet10t")
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--epochs", type=int, default=4)
    e.add_argument("--images", type=int, default=12)
    e.add_argument("--seed", type=int, default=0)
    sp = sub.add_parser("spread")
    sp.add_argument("--archs", nargs="+", default=["inception_v3", "resnetv2_50", "densenet201"])
    sp.add_argument("--size", type=int, default=160)
    sp.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.probe == "eps":
        probe_eps(a.arch, a.size, a.epochs, a.images, a.seed)
    else:
        probe_spread(a.archs, a.size, a.seed)


if __name__ == "__main__":
    main()
