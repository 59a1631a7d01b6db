"""Timed batch of drift metrics (``pair_metrics``), checked against SciPy, scikit-image and NumPy formulas."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.metrics import structural_similarity

from drift.metrics import pair_metrics


def cam_like(n: int, h: int, w: int, rng: torch.Generator) -> torch.Tensor:
    """(n, h, w) non-negative smooth maps: bilinear upsampling of random 4 x 4 maps, like upsampled CAMs."""
    low = torch.rand(n, 1, 4, 4, generator=rng, dtype=torch.float64)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def numpy_topk_weights(m: np.ndarray, k: int) -> np.ndarray:
    """Top-k membership with fractional ties: 1 above the k-th value, (k - n_above) / n_tied at it, 0 below."""
    m = m.ravel()
    t = np.sort(m)[::-1][k - 1]
    above, tied = m > t, m == t
    return above + tied * ((k - above.sum()) / tied.sum())


def numpy_centroid(m: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(m.shape)
    return np.array([(m * rows).sum(), (m * cols).sum()]) / m.sum()


def test_pair_metrics(timed, benchmark, bench_device, rng, single_thread):
    if bench_device.type == "cuda":
        n, h, w = 256, 224, 224
    else:
        n, h, w = 17, 23, int(torch.randint(13, 40, (1,), generator=rng))
    a, b = cam_like(n, h, w, rng), cam_like(n, h, w, rng)
    lung = torch.rand(n, h, w, generator=rng) < 0.4
    out = timed(pair_metrics, a.to(bench_device), b.to(bench_device), lung_mask=lung.to(bench_device))
    out = {k: v.cpu().numpy() for k, v in out.items()}
    benchmark.extra_info.update(pairs=n, height=h, width=w)

    assert out["valid"].all()
    check = range(n) if n <= 32 else range(0, n, n // 16)  # the GPU batch: a sample of the pairs
    with single_thread():
        check_against_references(out, a.numpy(), b.numpy(), lung.numpy(), check)


def check_against_references(out: dict, A: np.ndarray, B: np.ndarray, L: np.ndarray, check) -> None:
    """pair_metrics output against SciPy (correlations), scikit-image (SSIM) and NumPy (top-k IoU, centroids,
    lung-mass fraction) for the pairs in ``check``."""
    h, w = A.shape[1:]
    diag = math.hypot(h, w)
    for i in check:
        np.testing.assert_allclose(out["pearson"][i], stats.pearsonr(A[i].ravel(), B[i].ravel())[0], atol=1e-12)
        np.testing.assert_allclose(out["spearman"][i], stats.spearmanr(A[i].ravel(), B[i].ravel())[0], atol=1e-12)
        shift = np.linalg.norm(numpy_centroid(A[i]) - numpy_centroid(B[i])) / diag
        np.testing.assert_allclose(out["centroid_shift"][i], shift, rtol=1e-10, atol=1e-14)
        for key, f in (("iou@05", 0.05), ("iou@10", 0.1), ("iou@20", 0.2), ("iou@30", 0.3)):
            k = math.ceil(round(f * h * w, 9))
            # top-k sets are taken on the float32 maps (metrics.topk_iou's documented input precision)
            wa, wb = numpy_topk_weights(A[i].astype(np.float32), k), numpy_topk_weights(B[i].astype(np.float32), k)
            # pair_metrics reads ties as the weighted Jaccard index (metrics.topk_iou's default)
            jac = float(np.minimum(wa, wb).sum() / np.maximum(wa, wb).sum())
            assert out[key][i] == pytest.approx(jac, abs=1e-12), (key, i)
        # SSIM of the min-max normalised maps (skimage's Gaussian-window definition, data range 1).
        na = (A[i] - A[i].min()) / (A[i].max() - A[i].min())
        nb = (B[i] - B[i].min()) / (B[i].max() - B[i].min())
        ref = structural_similarity(na, nb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0)
        np.testing.assert_allclose(out["ssim"][i], ref, atol=1e-10)
        np.testing.assert_allclose(out["lung_mass_tl"][i], (A[i] * L[i]).sum() / A[i].sum(), rtol=1e-12)
        np.testing.assert_allclose(out["lung_mass_ft"][i], (B[i] * L[i]).sum() / B[i].sum(), rtol=1e-12)
