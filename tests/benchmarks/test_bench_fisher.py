"""Timed Jacobian engine and iFIM spectrum, checked against brute force: per-sample autograd Jacobians and the
eigenvalues of the explicit D x D Fisher matrix F = J^T (diag(p) - p p^T) J.
"""

import numpy as np
import torch
from torch import nn

from drift.fisher import ifim, input_jacobian
from drift.models import build

N_CLASSES = 5


def small_cnn(num_classes: int) -> nn.Module:
    """Conv-BN-ReLU x 3, global pooling, linear head: (B, 1, H, W) -> (B, C), a test-sized classifier."""
    layers: list[nn.Module] = []
    widths = [1, 8, 16, 16]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


def setting(device: torch.device, rng: torch.Generator):
    """(model, x (B, 1, H, W)): drift's resnet18 at 224 px, batch 8 on a GPU (the timed run); on the CPU a small
    CNN at an odd size (D = H * W <= 441), so that the brute-force D x D Fisher matrix stays cheap."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    if device.type == "cuda":
        model, size, batch = build("resnet18", N_CLASSES), 224, 8
    else:
        model, size, batch = small_cnn(N_CLASSES), int(torch.randint(9, 22, (1,), generator=rng)), 3
        # Random running statistics: BatchNorm in eval mode is then more than the identity.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval().to(device), torch.rand(batch, 1, size, size, generator=rng).to(device)


def brute_force_jacobian(model, x: torch.Tensor) -> np.ndarray:
    """(B, C, D) float64 from torch.autograd.functional.jacobian of the whole batch, (B, C, B, D), whose
    off-diagonal blocks must vanish (in eval mode samples do not interact).

    The same batched forward as the engine's: a batch of one can take other kernels, whose rounding may flip a
    max-pool argmax between nearly equal inputs and so pick another (equally valid) subgradient.
    """
    B = x.shape[0]
    full = torch.autograd.functional.jacobian(lambda xb: model(xb), x)  # (B, C, B, *S)
    full = full.reshape(B, full.shape[1], B, -1).double().cpu().numpy()
    idx = np.arange(B)
    diag = full[idx, :, idx]  # (B, C, D)
    off = full.copy()
    off[idx, :, idx] = 0
    assert np.abs(off).max() <= 1e-12 * np.abs(diag).max(), "samples of a batch interact: not in eval mode?"
    return diag


def fisher_eigenvalues(J: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of F = J^T (diag(p) - p p^T) J for one sample, J (C, D), p (C,).

    The D x D matrix itself when D <= 1024; for larger (GPU) inputs the same nonzero eigenvalues from the C x C
    matrix M^1/2 J J^T M^1/2, M = diag(p) - p p^T.
    """
    M = np.diag(p) - np.outer(p, p)
    if J.shape[1] <= 1024:
        return np.linalg.eigvalsh(J.T @ M @ J)
    w, V = np.linalg.eigh(M)
    half = V @ np.diag(np.sqrt(np.clip(w, 0, None))) @ V.T
    return np.linalg.eigvalsh(half @ J @ J.T @ half)


def test_input_jacobian(timed, benchmark, bench_device, rng, single_thread):
    model, x = setting(bench_device, rng)
    J, z = timed(input_jacobian, model, x)
    with single_thread():
        ref = brute_force_jacobian(model, x)
    err = float(np.abs(J.double().cpu().numpy() - ref).max() / np.abs(ref).max())
    benchmark.extra_info.update(max_rel_error=err, batch=x.shape[0], size=x.shape[-1])
    assert J.shape == (x.shape[0], N_CLASSES, x[0].numel())
    assert err <= 1e-5


def test_ifim_spectrum(timed, benchmark, bench_device, rng, single_thread):
    model, x = setting(bench_device, rng)
    res = timed(ifim, model, x, eigenvectors=False)

    with single_thread():
        J = brute_force_jacobian(model, x)
        with torch.no_grad():
            p = torch.softmax(model(x).double(), dim=1).cpu().numpy()
        lams = [fisher_eigenvalues(J[b], p[b]) for b in range(x.shape[0])]
    worst = 0.0
    for b, lam in enumerate(lams):
        top = lam[::-1][: N_CLASSES - 1]  # rank F <= C - 1 for a softmax head
        got = res.eigenvalues[b].cpu().numpy()
        assert got.shape == (N_CLASSES - 1,)
        worst = max(worst, float(np.abs(got - top).max() / top[0]))
    benchmark.extra_info.update(max_rel_error=worst)
    assert worst <= 1e-4
