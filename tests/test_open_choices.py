"""The protocol's open choices as settings: the tp_ft sample set, the micro mean beside the macro mean, IoU by a
threshold on the normalised map, the centroid normalisation, the common sample of a cell's methods and the reason
an empty cell gives."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from drift import config, stats
from drift import metrics as M
from drift.drift_step import empty_reason, method_counts


def test_tp_ft_selects_images_correct_under_fine_tuning(rng):
    n = 41
    y, p1, p2 = (torch.randint(0, 3, (n,), generator=rng).numpy() for _ in range(3))
    got = stats.select_samples(y, p1, p2, "tp_ft")
    assert np.array_equal(got, np.array([y[i] == p2[i] for i in range(n)]))
    assert "tp_ft" in stats.SELECTION_RULES
    config.load(None, ['metrics.sample_set="tp_ft"'])


def test_micro_mean_beside_macro(rng):
    n = 97
    labels = torch.randint(0, 4, (n,), generator=rng).numpy()
    values = torch.rand(n, generator=rng, dtype=torch.float64).numpy() + labels  # class means differ
    values[3] = np.nan
    agg = stats.aggregate(values, labels, 4, n_boot=400, seed=1, min_per_class=1)
    ok = np.isfinite(values)
    assert agg.micro == pytest.approx(values[ok].mean(), abs=1e-12)
    assert agg.mean == pytest.approx(np.mean([values[ok & (labels == c)].mean() for c in range(4)]), abs=1e-12)
    assert agg.micro_lo < agg.micro < agg.micro_hi
    # the image bootstrap's spread is the standard error of a mean of n values, to Monte Carlo error
    se = values[ok].std(ddof=1) / np.sqrt(ok.sum())
    assert (agg.micro_hi - agg.micro_lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.2)
    empty = stats.aggregate(values, labels, 4, n_boot=10, min_per_class=1000)
    assert np.isnan(empty.micro) and np.isnan(empty.micro_lo)


def test_threshold_iou_against_numpy(rng):
    a, b = torch.rand(5, 13, 17, generator=rng), torch.rand(5, 13, 17, generator=rng)
    a[1] = (a[1] * 4).floor()  # ties at the threshold
    b[4] = 0.3  # constant: no binarisation
    th = (0.25, 0.5, 0.9)
    got = M.threshold_iou(a, b, th)
    for i in range(5):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        for t, v in enumerate(th):
            if np.ptp(y) == 0:
                assert np.isnan(got[i, t].item())
                continue
            bx, by = (x - x.min()) / np.ptp(x) >= v, (y - y.min()) / np.ptp(y) >= v
            assert got[i, t].item() == pytest.approx((bx & by).sum() / (bx | by).sum(), abs=1e-12)
    assert M.threshold_key(0.5) == "thr@50" and M.threshold_key(0.125) == "thr@12.5"
    out = M.pair_metrics(a.abs(), b.abs(), thresholds=th)
    torch.testing.assert_close(out["thr@25"][:4], got[:4, 0], equal_nan=True)


@pytest.mark.parametrize("norm", M.CENTROID_NORMS)
def test_centroid_normalisations(rng, norm):
    a, b = torch.rand(3, 11, 19, generator=rng), torch.rand(3, 11, 19, generator=rng)
    got = M.centroid_shift(a, b, norm)
    ys, xs = np.mgrid[0:11, 0:19]
    for i in range(3):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        ca = np.array([(x * ys).sum(), (x * xs).sum()]) / x.sum()
        cb = np.array([(y * ys).sum(), (y * xs).sum()]) / y.sum()
        scale = {"diagonal": np.hypot(11, 19), "side": 19.0, "pixels": 1.0}[norm]
        assert got[i].item() == pytest.approx(np.linalg.norm(ca - cb) / scale, rel=1e-10)
    out = M.pair_metrics(a, b, centroid_norm=norm)
    torch.testing.assert_close(out["centroid_shift"], got)
    with pytest.raises(ValueError, match="centroid norm must be one of"):
        M.centroid_shift(a, b, "area")


def test_empty_reason_names_the_degenerate_maps():
    n = 7
    sel = np.ones(n, bool)
    zero = {"transfer": np.full(n, 2), "finetune": np.array([0, 0, 3, 0, 0, 0, 0])}
    why = empty_reason(sel, np.zeros(n, bool), zero, np.zeros(n, bool))
    assert why == "all 7 transfer maps are all zero; 1 of 7 finetune maps are constant"
    assert empty_reason(np.zeros(n, bool), np.ones(n, bool), zero, np.zeros(n, bool)) == \
        "no test image is in the sample set"
    assert "valid under every method" in empty_reason(sel, np.ones(n, bool), zero, np.zeros(n, bool))
    assert empty_reason(sel, np.ones(n, bool), zero, np.ones(n, bool)) == ""


def test_method_counts_and_common_sample(rng):
    n = 30
    pipe = types.SimpleNamespace(splits=types.SimpleNamespace(test=types.SimpleNamespace(
        ids=[f"img{i}" for i in range(n)])))
    sel = torch.rand(n, generator=rng).numpy() < 0.7
    valid = {m: torch.rand(n, generator=rng).numpy() < q for m, q in (("a", 0.9), ("b", 0.5), ("c", 0.7))}
    common = valid["a"] & valid["b"] & valid["c"]
    for m in valid:
        got = method_counts(pipe, sel, valid, m, "common")
        assert got["n_common"] == int((sel & common).sum()) and got["n_valid"] == int((sel & valid[m]).sum())
        assert got["dropped"] == str([f"img{i}" for i in range(n) if sel[i] and not valid[m][i]]).replace("'", '"')


def test_settings_are_validated():
    cfg = config.load(None, ['metrics.upsample=["zoom-corners", "none"]', 'metrics.ties="index"',
                             'metrics.method_sample="per-method"', 'metrics.average="micro"',
                             "metrics.binarize=[0.5]", 'metrics.centroid_norm="side"'])
    assert cfg.metrics.upsample == ["zoom-corners", "none"] and cfg.metrics.binarize == [0.5]
    for bad, match in (('metrics.upsample=["nearest"]', "metrics.upsample"), ('metrics.ties="random"', "metrics.ties"),
                       ('metrics.method_sample="all"', "method_sample"), ('metrics.average="median"', "average"),
                       ("metrics.binarize=[1.5]", "metrics.binarize"), ('metrics.centroid_norm="x"', "centroid_norm")):
        with pytest.raises(config.ConfigError, match=match):
            config.load(None, [bad])


def test_summary_notes_name_counts_dropped_images_and_empty_reasons(tmp_path):
    from drift.archive import Archive, ArchiveReader, Cell
    from drift.h5tree import write_tree
    from drift.summary import sample_notes

    ar = Archive(tmp_path / "a.h5", "", "", {"seed": 0})
    cell = Cell("last-conv", "softmax", "minmax", "zoom-corners")
    groups = {
        "gradcam++": {"methods": {"rule": "common", "n_common": 18, "n_valid": 18,
                                  "dropped": '["x1", "x2", "x3", "x4", "x5", "x6", "x7"]'},
                      "empty": "", "degenerate": {"topk_short": {"iou@05": 0, "iou@20": 3}}},
        "layercam": {"methods": {"rule": "common", "n_common": 18, "n_valid": 67, "dropped": "[]"},
                     "empty": "all 200 transfer maps are all zero", "degenerate": {"topk_short": {"iou@20": 0}}},
    }
    for arch in ("m",):
        with ar.commit(f"models/{arch}/transfer") as f:
            f.require_group(f"models/{arch}/transfer")
        with ar.commit(f"drift/{arch}") as f:
            write_tree(f.require_group(cell.drift_path(arch)), groups)
    lines = sample_notes(ArchiveReader(tmp_path / "a.h5"), cell)
    assert lines[0] == ("  m: methods compared on the 18 images valid under every method; gradcam++ 18 valid "
                        "(drops x1, x2, x3, x4, x5, ... (7 in all)); layercam 67 valid")
    assert "  m gradcam++: no top-k IoU where a map has fewer positive pixels than k: iou@20 3 images" in lines
    assert "  m layercam: no image scored: all 200 transfer maps are all zero" in lines
    assert len(lines) == 3
