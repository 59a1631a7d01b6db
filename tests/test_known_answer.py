"""Known-answer studies: the planted marker's data, the paired-change test, the verdicts' calibration on simulated
study pairs, and a reduced planted / null pair through the whole pipeline."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from drift import config, stats
from drift import known_answer as ka
from drift.data import load_synthetic
from drift.data.synthetic import render_chest
from drift.pipeline import Pipeline
from drift.stats import macro_mean_test


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def px(images) -> np.ndarray:
    """(N, S, S) pixels of an ImageSet."""
    return images.images().numpy()[:, 0]


# ---------------------------------------------------------------------------------------------- data
def test_marker_strengths_change_only_the_plates_and_nest(rng):
    """Same seed at two strengths: identical images outside the plates of the images tagged at the higher one;
    the tagged images at the lower strength are a subset; slot masks are the plates wherever painted."""
    seed, size = _seed(rng) % 1000, 48 + 2 * int(torch.randint(0, 8, (1,), generator=rng))
    n = 23
    lo = load_synthetic(n, 3, 3, size, seed, 0.3, 0.3, marker_region="slot").train
    hi = load_synthetic(n, 3, 3, size, seed, 0.3, 0.8).train
    none = load_synthetic(n, 3, 3, size, seed, 0.3, 0.0).train
    np.testing.assert_array_equal(lo.labels, hi.labels)
    tagged_hi = hi.marker_masks.any(axis=(1, 2))
    painted_lo = (px(lo) != px(none)).any(axis=(1, 2))
    assert painted_lo.sum() > 0 and (painted_lo <= tagged_hi).all()  # nested
    for c in range(5):  # round(r n_c) tagged per class
        members = hi.labels == c
        assert tagged_hi[members].sum() == round(0.8 * members.sum())
    # outside the plates every strength draws the same pixels
    diff = px(hi) != px(none)
    assert not (diff & ~hi.marker_masks).any()
    # slot masks: every image has its class's plate region; where painted it is exactly the plate
    assert lo.marker_masks.any(axis=(1, 2)).all()
    np.testing.assert_array_equal(lo.marker_masks[tagged_hi], hi.marker_masks[tagged_hi])
    assert not (px(lo) != px(none))[~lo.marker_masks].any()


def test_render_chest_slot_mask_does_not_change_the_image(rng):
    seed, label = _seed(rng), int(torch.randint(0, 5, (1,), generator=rng))
    img, lung, lesion, plate = render_chest(np.random.default_rng(seed), 57, label, 0.4, marker=False, slot=True)
    img0, lung0, lesion0, none = render_chest(np.random.default_rng(seed), 57, label, 0.4)
    img1, _, _, drawn = render_chest(np.random.default_rng(seed), 57, label, 0.4, marker=True)
    np.testing.assert_array_equal(img, img0)
    assert not none.any() and plate.any()
    np.testing.assert_array_equal(plate, drawn)
    assert not (plate & lung).any()  # the plate lies outside the lungs
    assert (img1 != img0)[plate].any() and not (img1 != img0)[~plate].any()


def test_transfer_phase_trains_on_the_unmarked_twin_of_the_finetuning_images(tmp_path):
    small = ["data.image_size=48", "data.n_train=11", "data.n_val=5", "data.n_test=6", "train.transfer.batch_size=4",
             "train.finetune.batch_size=4"]
    cfg = config.load("configs/planted.toml", [*small, f'run.out="{tmp_path}"'])
    pipe = Pipeline(cfg)
    fit, ft = pipe.transfer_splits, pipe.splits
    twin = load_synthetic(11, 5, 6, 48, cfg.data_seed, cfg.data.difficulty, 0.0)
    np.testing.assert_array_equal(px(fit.train), px(twin.train))
    np.testing.assert_array_equal(px(fit.val), px(twin.val))
    assert (px(ft.train) != px(fit.train)).any()
    assert not ((px(ft.train) != px(fit.train)) & ~ft.train.marker_masks).any()
    null = Pipeline(config.load("configs/null.toml", [*small, f'run.out="{tmp_path}/n"']))
    assert null.transfer_splits is null.splits
    np.testing.assert_array_equal(px(null.splits.train), px(fit.train))
    np.testing.assert_array_equal(null.splits.test.marker_masks, ft.test.marker_masks)  # same scored pixels


@pytest.mark.parametrize("bad", ["data.confounder_transfer=1.5", 'data.marker_region="plates"'])
def test_bad_marker_settings_are_named(bad):
    from drift.validate import validate

    with pytest.raises(config.ConfigError, match=bad.split("=")[0]):
        validate(config.load("configs/planted.toml", [bad]))


# ---------------------------------------------------------------------------------------------- the test
def test_macro_mean_test_against_scipy_and_the_stratified_formula(rng):
    g = np.random.default_rng(_seed(rng))
    n = int(g.integers(17, 60))
    v = g.standard_t(5, n) + 0.2
    t = macro_mean_test(v)
    ref = scipy.stats.ttest_1samp(v, 0.0)
    assert t.estimate == pytest.approx(v.mean(), rel=1e-12)
    assert t.p_two_sided == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = ref.confidence_interval(0.95)
    assert (t.low, t.high) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    # with classes: the mean of class means, variance sum_c s_c^2 / (C^2 n_c)
    labels = g.permutation(np.arange(n) % 3)
    v[g.random(n) < 0.1] = np.nan
    t = macro_mean_test(v, labels)
    ok = np.isfinite(v)
    means = [v[ok & (labels == c)].mean() for c in range(3)]
    var = sum(v[ok & (labels == c)].var(ddof=1) / (ok & (labels == c)).sum() for c in range(3)) / 9
    assert t.estimate == pytest.approx(np.mean(means), rel=1e-12)
    assert t.se == pytest.approx(math.sqrt(var), rel=1e-12)
    assert t.df == ok.sum() - 3 and t.n_images == ok.sum()
    assert t.p_lower + t.p_higher == pytest.approx(1.0)


def test_constant_and_empty_changes(rng):
    t = macro_mean_test(np.zeros(9))
    assert t.estimate == 0 and t.se == 0 and t.p_two_sided == 1.0
    t = macro_mean_test(np.full(4, np.nan))
    assert math.isnan(t.estimate) and t.n_images == 0


# ---------------------------------------------------------------------------------------------- calibration
def test_verdicts_hold_their_level_under_the_null_and_find_a_planted_shift(rng):
    """Simulated triples with known answers through :func:`judge`: no planted effect -> detection, any outcome,
    S planted > S twin and the placebo's detections all at most alpha (binomial bound); a strong effect -> found."""
    seed = _seed(rng)
    null_rates, strong = ka.calibrate(n_studies=100, effects=(0.0, 5.0), seed=seed, n_images=50)
    bound = 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)
    for x in (null_rates.detected, null_rates.any_found, null_rates.contrast_found, null_rates.placebo_detected,
              null_rates.placebo_any, strong.placebo_detected, strong.placebo_any):
        assert x <= bound
    assert strong.detected >= 0.8 and strong.contrast_found >= 0.9
    inflated = ka.KnownAnswerRate(0.0, 120, 0.0, 0.2, 0.0, 0.0, 0.0)
    assert ka.calibration_failures([inflated]) == ["effect 0: some outcome found 0.200 > 0.05 + 2 se"]


def test_the_verdict_is_the_difference_in_differences(rng):
    """Changes built by hand: a generic change shared with the twin is not a planted shift; the same change plus
    a planted part is, and each row's estimate is the macro mean of the per-image difference."""
    g = np.random.default_rng(_seed(rng))
    p, twin, placebo = ka.simulate(g, 0.0, n_images=41)
    for m in p.changes:
        for key, sign, _ in ka.OUTCOMES:
            generic = 5.0 + g.standard_normal(41) * 0.01  # large, identical in both: no shift
            p.changes[m][key] = generic + sign * 0.5 + g.standard_normal((3, 41)) * 0.05
            twin.changes[m][key] = generic + g.standard_normal((4, 41)) * 0.05
    res = ka.judge(p, twin)
    for r in res["rows"]:
        if r["study"] == "planted" and r["expected"] != "0" and r["outcome"] in p.changes["layercam"]:
            diff = p.changes[r["method"]][r["outcome"]].mean(0) - twin.changes[r["method"]][r["outcome"]].mean(0)
            ref = np.mean([diff[p.labels == c].mean() for c in range(5)])
            assert r["estimate"] == pytest.approx(ref, rel=1e-12)
            assert r["found"] and np.sign(r["estimate"]) == (1 if r["expected"] == "+" else -1)
    res = ka.judge(twin, twin)  # a study against itself: every difference is 0, nothing found
    assert not any(r["found"] for r in res["rows"])


def test_model_mean_contrast_against_the_formula(rng):
    """Estimate: macro mean of the model-averaged differences; variance: stratified image part + each study's
    variance of its models' macro means / M; Welch-Satterthwaite df."""
    g = np.random.default_rng(_seed(rng))
    n, ma, mb = int(g.integers(20, 50)), 3, int(g.integers(2, 5))
    labels = g.permutation(np.arange(n) % 4)
    a, b = g.standard_normal((ma, n)) + 0.3, g.standard_normal((mb, n))
    a[1, 3] = np.nan  # an image missing under one model leaves every study
    t, resampled = stats.model_mean_contrast(a, b, labels)
    keep = np.isfinite(a).all(0)
    d = a[:, keep].mean(0) - b[:, keep].mean(0)
    lab = labels[keep]
    cls = range(4)
    est = np.mean([d[lab == c].mean() for c in cls])
    var_img = sum(d[lab == c].var(ddof=1) / (lab == c).sum() for c in cls) / 16

    def macro(x):
        return np.mean([x[lab == c].mean() for c in cls])

    va = np.var([macro(r) for r in a[:, keep]], ddof=1) / ma
    vb = np.var([macro(r) for r in b[:, keep]], ddof=1) / mb
    var = var_img + va + vb
    df = var**2 / (var_img**2 / (keep.sum() - 4) + va**2 / (ma - 1) + vb**2 / (mb - 1))
    assert resampled and t.estimate == pytest.approx(est, rel=1e-12)
    assert t.se == pytest.approx(math.sqrt(var), rel=1e-10) and t.df == pytest.approx(df, rel=1e-10)
    q = scipy.stats.t.ppf(0.975, df)
    assert t.low == pytest.approx(est - q * math.sqrt(var), rel=1e-9)
    one, res1 = stats.model_mean_contrast(a[:1], b, labels)
    assert not res1 and math.isfinite(one.estimate)  # one model: no model part, flagged as such


def test_an_image_only_interval_calls_seed_noise_a_shift(rng):
    """The control that motivates the model part: placebo studies with a seed effect shared by every image of a
    model. An interval over images only (the model-averaged differences as fixed) rejects far above alpha; the
    model-resampled interval holds it."""
    g = np.random.default_rng(_seed(rng))
    naive = valid = 0
    for _ in range(60):
        _, twin, placebo = ka.simulate(g, 0.0, n_images=40, seed_effect=0.5)
        a, b = placebo.changes["layercam"]["lung_mass_change"], twin.changes["layercam"]["lung_mass_change"]
        naive += macro_mean_test(a.mean(0) - b.mean(0), twin.labels).p_two_sided <= 0.05
        valid += stats.model_mean_contrast(a, b, twin.labels)[0].p_two_sided <= 0.05
    assert naive >= 20 and valid <= 0.05 * 60 + 3 * math.sqrt(0.05 * 0.95 * 60)


def test_judge_rejects_studies_on_different_images(rng):
    p, twin, _ = ka.simulate(np.random.default_rng(_seed(rng)), 0.5, n_images=23)
    twin.ids = twin.ids[::-1].copy()
    with pytest.raises(ValueError, match="same test images"):
        ka.judge(p, twin)


def test_two_models_give_no_systematic_verdict(rng):
    p, twin, _ = ka.simulate(np.random.default_rng(_seed(rng)), 3.0, n_images=31, n_models=2)
    res = ka.judge(p, twin)
    rows = [r for r in res["rows"] if r["outcome"] == "systematic_vs_twin"]
    assert rows and not any(r["judged"] or r["found"] for r in rows)
    primary = [r for r in res["rows"] if r["study"] == "planted" and r["outcome"] in ka.PRIMARY
               and r["expected"] != "0"]
    assert primary and all(r["judged"] for r in primary)  # two models per study: the model part has 1 df
    assert "no verdict" in res["sentence"]


def test_dose_response_rows_table_and_figure(rng):
    """Strengths 0 (the twin), 1 and 4 of simulated studies: one row per (strength, method), the twin without
    differences in differences, each study's outcome rows equal to judge's own, and a figure that renders."""
    from drift.figures import dose_figure, to_png

    g = np.random.default_rng(_seed(rng))
    studies = []
    p1, twin, _ = ka.simulate(g, 1.0, n_images=37)
    g2 = np.random.default_rng(_seed(rng))
    p4, _, _ = ka.simulate(g2, 4.0, n_images=37)
    p4.labels, p4.ids = twin.labels, twin.ids  # the same images as the twin
    studies = [twin, p1, p4]
    rows = ka.dose_response(studies, twin)
    assert [r["strength"] for r in rows] == [0, 0, 1, 1, 4, 4]
    assert all(r["marker_mass_change"] is None and r["detected"] is None for r in rows[:2])
    ref = {(r["method"], r["outcome"]): r for r in ka.judge(p4, twin)["rows"] if r["study"] == "planted"
           and r["expected"] != "0"}
    for r in rows[4:]:
        assert r["lung_mass_change"]["estimate"] == ref[r["method"], "lung_mass_change"]["estimate"]
        assert r["lung_mass_change"]["found"] == ref[r["method"], "lung_mass_change"]["found"]
    table = ka.dose_markdown(rows)
    assert table.count("\n") == len(rows) + 2 and "| twin |" in table
    png = to_png(dose_figure(rows))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_cli_reports_the_verdict_at_every_layer_both_studies_hold(rng, monkeypatch, capsys):
    """``drift known-answer`` judges at ``--layer`` (default the config's first) and ends its record with one line
    per layer held by both studies: here simulated studies whose plate is resolved at one layer only (effect 6)
    and not at the other (effect 0), so the lines must differ, each equal to judge's own verdict there."""
    from drift.cli import main

    g = np.random.default_rng(_seed(rng))
    n = int(g.integers(31, 50))
    per_layer = {"fine": ka.simulate(g, 6.0, n_images=n), "coarse": ka.simulate(g, 0.0, n_images=n)}
    for trio in per_layer.values():
        for st in trio:
            st.labels, st.ids = per_layer["fine"][1].labels, per_layer["fine"][1].ids

    def fake_read(path, arch=None, layer=None, **_):
        layer = layer or "coarse"
        st = per_layer[layer][("planted", "twin", "placebo").index(path)]
        st.info.update(layer=layer, layers=["coarse", "fine"], cell=f"{layer}, logit, minmax")
        return st

    monkeypatch.setattr(ka, "read_study", fake_read)
    expect = {la: ka.judge(*per_layer[la]) for la in ("coarse", "fine")}  # the archives' order of layers
    assert all(expect["fine"]["detected"].values()) and not any(expect["coarse"]["detected"].values())
    for argv, chosen in ((["planted", "twin", "--placebo", "placebo"], "coarse"),
                         (["planted", "twin", "--placebo", "placebo", "--layer", "fine"], "fine")):
        code = main(["known-answer", *argv])
        out = capsys.readouterr().out
        assert code == (0 if chosen == "fine" else 1)
        assert f"(above: {chosen})" in out and expect[chosen]["sentence"] in out
        assert out[out.index("| layer |"):].strip() == ka.layers_markdown(expect).strip()
        assert "| fine | gradcam++, layercam | none | none |" in out
        assert "| coarse | none | gradcam++, layercam | none |" in out
    # A placebo without the other layer: that layer is left out of the table, the verdict above it is printed.
    real_read = fake_read

    def placebo_coarse_only(path, arch=None, layer=None, **kw):
        st = real_read(path, arch, layer, **kw)
        if path == "placebo":
            st.info["layers"] = ["coarse"]
        return st

    monkeypatch.setattr(ka, "read_study", placebo_coarse_only)
    assert main(["known-answer", "planted", "twin", "--placebo", "placebo"]) == 1
    out = capsys.readouterr().out
    assert expect["coarse"]["sentence"] in out and "| layer |" not in out
