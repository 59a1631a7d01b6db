"""The study's reading of a map pair: resampling (``metrics.upsample``) against scipy and a numpy formula, masks on a
layer's grid, the reflexive top-k overlap of :func:`drift.metrics.topk_iou` (only positive pixels in a top set),
and the protocol cell with its resampling axis (old archives read as bilinear-halfpixel cells)."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import scipy.ndimage
import torch

from drift import metrics as M
from drift.archive import LEGACY_UPSAMPLE, Archive, ArchiveReader, Cell
from drift.h5tree import write_tree
from drift.maps import UPSAMPLE_MODES, to_grid, upsample


def _shape(rng, lo, hi):
    return tuple(int(v) for v in torch.randint(lo, hi, (2,), generator=rng))


def test_zoom_corners_matches_scipy_zoom_order_1(rng):
    for _ in range(6):
        h, w = _shape(rng, 1, 10)
        H, W = _shape(rng, 11, 80)
        maps = torch.rand(3, h, w, generator=rng, dtype=torch.float64)
        got = upsample(maps, (H, W), "zoom-corners")
        want = np.stack([scipy.ndimage.zoom(m.numpy(), (H / h, W / w), order=1) for m in maps])
        assert got.shape == want.shape == (3, H, W)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
        got32 = upsample(maps.float(), (H, W), "zoom-corners")
        np.testing.assert_allclose(got32.numpy(), want, rtol=1e-6, atol=1e-6)


def _halfpixel(m: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres, u = (i + 0.5) h / H - 0.5 clamped to [0, h - 1], by loops."""
    h, w = m.shape

    def axis(n_out, n_in):
        u = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(u).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, u - lo

    r0, r1, fr = axis(H, h)
    c0, c1, fc = axis(W, w)
    out = np.empty((H, W))
    for i in range(H):
        for j in range(W):
            top = m[r0[i], c0[j]] * (1 - fc[j]) + m[r0[i], c1[j]] * fc[j]
            bot = m[r1[i], c0[j]] * (1 - fc[j]) + m[r1[i], c1[j]] * fc[j]
            out[i, j] = top * (1 - fr[i]) + bot * fr[i]
    return out


def test_bilinear_halfpixel_and_none(rng):
    h, w = _shape(rng, 2, 9)
    H, W = _shape(rng, 11, 40)
    maps = torch.rand(2, h, w, generator=rng, dtype=torch.float64)
    got = upsample(maps, (H, W), "bilinear-halfpixel")
    for k in range(2):
        np.testing.assert_allclose(got[k].numpy(), _halfpixel(maps[k].numpy(), H, W), rtol=0, atol=1e-12)
    assert upsample(maps, (H, W), "none") is maps
    assert torch.equal(upsample(maps, (H, W)), got)  # the default reading is unchanged
    assert UPSAMPLE_MODES[0] == "zoom-corners"
    with pytest.raises(ValueError, match="upsample mode must be one of.*'nearest'"):
        upsample(maps, H, "nearest")


def test_masks_on_the_layer_grid_are_cell_fractions(rng):
    H, W = _shape(rng, 11, 40)
    h, w = _shape(rng, 2, 8)
    mask = torch.rand(3, H, W, generator=rng) < 0.4
    got = to_grid(mask, (h, w))
    for r in range(h):
        for c in range(w):
            rows = slice(math.floor(r * H / h), math.ceil((r + 1) * H / h))
            cols = slice(math.floor(c * W / w), math.ceil((c + 1) * W / w))
            want = mask[:, rows, cols].double().mean(dim=(1, 2))
            torch.testing.assert_close(got[:, r, c], want, rtol=0, atol=1e-12)
    assert to_grid(None, (h, w)) is None and to_grid(mask, (H, W)) is mask
    assert to_grid(mask[0], (h, w)).shape == (h, w)


def _set_iou(x: np.ndarray, y: np.ndarray, k: int) -> float:
    sx, sy = set(np.argsort(-x, kind="stable")[:k]), set(np.argsort(-y, kind="stable")[:k])
    return len(sx & sy) / len(sx | sy)


def test_topk_iou_reflexive_with_ties_and_zero_plateaus(rng):
    """IoU(m, m) = 1 exactly for every fraction with enough positive pixels; NaN (a degenerate fraction, counted
    by topk_short) where a map has fewer positive pixels than k: zeros never enter a top set."""
    N, H, W = 6, 13, 19
    levels = torch.randint(0, 4, (N, H, W), generator=rng).double()
    keep = torch.rand(N, H, W, generator=rng) < torch.linspace(0.05, 0.9, N).view(N, 1, 1)
    m = torch.where(keep, levels, torch.zeros_like(levels))
    fr = (0.05, 0.1, 0.2, 0.3, 0.5)
    got = M.topk_iou(m, m.clone(), fr)
    n_pos = (m > 0).flatten(1).sum(1)
    for t, f in enumerate(fr):
        k = math.ceil(round(f * H * W, 9))
        for i in range(N):
            if n_pos[i] >= k:
                assert got[i, t].item() == 1.0, (i, f)
            else:
                assert math.isnan(got[i, t].item()), (i, f)
    assert torch.equal(M.topk_short(m, fr), torch.stack([n_pos < math.ceil(round(f * H * W, 9)) for f in fr], 1))
    assert bool(got.isfinite().any()) and bool(got.isnan().any())  # both cases were drawn


def test_topk_iou_is_set_iou_without_ties_and_symmetric(rng):
    N, H, W = 5, 11, 17
    a, b = torch.rand(N, H, W, generator=rng), torch.rand(N, H, W, generator=rng)
    fr = (0.05, 0.2, 0.37)
    got = M.topk_iou(a, b, fr)
    for i in range(N):
        for t, f in enumerate(fr):
            k = math.ceil(round(f * H * W, 9))
            assert got[i, t].item() == pytest.approx(_set_iou(a[i].numpy().ravel(), b[i].numpy().ravel(), k),
                                                     abs=1e-12)
    q = (a * 3).floor()
    r = (b * 3).floor()
    assert torch.equal(M.topk_iou(q, r, fr), M.topk_iou(r, q, fr))


def test_pair_metrics_at_a_layer_grid(rng):
    a, b = torch.rand(4, 5, 7, generator=rng), torch.rand(4, 5, 7, generator=rng)
    lung = to_grid(torch.rand(4, 37, 41, generator=rng) < 0.5, (5, 7))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        M.pair_metrics(a, b, lung_mask=lung)
    out = M.pair_metrics(a, b, lung_mask=lung, small=True)
    assert out["ssim"].isnan().all() and out["pearson"].isfinite().all()
    torch.testing.assert_close(out["lung_mass_tl"], M.mass_fraction(a, lung))


def test_cell_keys_and_version_3_archives(tmp_path):
    for cell in (Cell("last-conv", "softmax", "minmax", "zoom-corners"), Cell("block", "logit", "none"),
                 Cell("features.norm5", "logit", "sum", "none")):
        assert Cell.parse(cell.key) == cell
    assert Cell("b", "s", "minmax").key == "b/s/minmax" and Cell("b", "s", "minmax").upsample == LEGACY_UPSAMPLE
    assert Cell("b", "s", "minmax", "none").key == "b/s/minmax@none"
    with pytest.raises(ValueError, match="cell key"):
        Cell.parse("b/minmax")
    path = tmp_path / "a.h5"
    ar = Archive(path, "", "", {"seed": 0})
    with ar.commit("drift/m") as f:
        write_tree(f.require_group("drift/m"), {"block": {"logit": {
            "minmax": {"gradcam": {"summary": {}}}, "minmax@zoom-corners": {"gradcam": {"summary": {}}},
            "agreement": {}}}})
    # A version-3 archive: no checksums (no root digest, no digest per commit).
    records = [{k: v for k, v in c.items() if k != "digest"} for c in ArchiveReader(path).commits]
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 3
        f.attrs["commits"] = json.dumps(records)
        del f.attrs["digest"]
    r = ArchiveReader(path)
    assert r.cells() == [Cell("block", "logit", "minmax"), Cell("block", "logit", "minmax", "zoom-corners")]
    Archive(path, "", "")  # resuming upgrades it in place
    with h5py.File(path) as f:
        assert int(f.attrs["schema_version"]) == 4 and json.loads(f.attrs["commits"])[0]["name"] == "drift/m"
