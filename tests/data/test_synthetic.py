"""The synthetic chest X-ray task: determinism, shapes, masks against the drawn pixels, balance, confounder."""

import hashlib
import re

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

from drift.data import MARKER_SLOTS, SYNTHETIC_CLASSES, load_synthetic, render_chest


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_same_seed_same_bytes_and_other_seed_differs(rng):
    seed = _seed(rng)
    a = load_synthetic(7, 3, 5, 67, seed, difficulty=0.3, confounder=0.5)
    b = load_synthetic(7, 3, 5, 67, seed, difficulty=0.3, confounder=0.5)
    c = load_synthetic(7, 3, 5, 67, seed + 1, difficulty=0.3, confounder=0.5)
    for name in ("train", "val", "test"):
        sa, sb, sc = getattr(a, name), getattr(b, name), getattr(c, name)
        assert _digest(sa.images().numpy()) == _digest(sb.images().numpy())
        for attr in ("labels", "lung_masks", "lesion_masks", "marker_masks"):
            assert np.array_equal(getattr(sa, attr), getattr(sb, attr))
        assert sa.ids == sb.ids
        assert not np.array_equal(sa.images().numpy(), sc.images().numpy())


def test_splits_share_no_image_and_ids_are_unique(rng):
    seed = _seed(rng)
    splits = load_synthetic(13, 5, 11, 64, seed)
    digests, ids = set(), []
    for s in (splits.train, splits.val, splits.test):
        for i in range(len(s)):
            digests.add(_digest(s[i][0].numpy()))
        ids += s.ids
    assert len(digests) == 13 + 5 + 11
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"syn-{seed}-\d{{5}}", i) for i in ids)
    assert ids == [f"syn-{seed}-{i:05d}" for i in range(29)]


def test_a_split_does_not_depend_on_the_other_split_sizes(rng):
    seed = _seed(rng)
    a = load_synthetic(3, 2, 6, 64, seed)
    b = load_synthetic(9, 1, 6, 64, seed)
    assert torch.equal(a.test.images(), b.test.images())
    assert np.array_equal(a.test.labels, b.test.labels)


@pytest.mark.parametrize("size", [67, 129])
def test_shapes_dtypes_and_range(rng, size):
    splits = load_synthetic(6, 2, 3, size, _seed(rng), difficulty=float(torch.rand(1, generator=rng)))
    for s, n in ((splits.train, 6), (splits.val, 2), (splits.test, 3)):
        assert len(s) == n and s.class_names == SYNTHETIC_CLASSES
        assert s.labels.dtype == np.int64 and s.labels.shape == (n,)
        for masks in (s.lung_masks, s.lesion_masks, s.marker_masks):
            assert masks.dtype == bool and masks.shape == (n, size, size)
        image, label = s[n - 1]
        assert image.shape == (1, size, size) and image.dtype == torch.float32 and isinstance(label, int)
        stack = s.images()
        assert stack.shape == (n, 1, size, size) and stack.dtype == torch.float32
        assert torch.isfinite(stack).all() and stack.min() >= 0 and stack.max() <= 1
        assert stack.std() > 0.1  # a picture, not a flat field


def test_largest_size_renders(rng):
    s = load_synthetic(2, 0, 0, 512, _seed(rng)).train
    assert s.images().shape == (2, 1, 512, 512)
    assert s.lung_masks.mean() > 0.1


def test_masks_are_anatomically_consistent(rng):
    splits = load_synthetic(40, 0, 0, 67, _seed(rng), difficulty=float(torch.rand(1, generator=rng)),
                            confounder=1.0)
    s = splits.train
    for i in range(len(s)):
        lung, lesion, marker = s.lung_masks[i], s.lesion_masks[i], s.marker_masks[i]
        assert not (lesion & ~lung).any(), "lesion pixels outside the lungs"
        assert lesion.any() == (s.labels[i] != 0)
        assert not (marker & lung).any() and not (marker & lesion).any()
        assert 0.12 < lung.mean() < 0.45
        # Two lung fields, one in each half of the image.
        comps, n = ndimage.label(lung)
        sizes = np.bincount(comps.ravel())[1:]
        big = np.flatnonzero(sizes > 0.2 * sizes.max()) + 1
        assert len(big) == 2, f"expected two lung fields, got component sizes {sorted(sizes)}"
        centres = [ndimage.center_of_mass(comps == k)[1] for k in big]
        assert min(centres) < 67 / 2 < max(centres)


@pytest.mark.parametrize("label", [1, 2, 3, 4])
def test_lesion_mask_matches_the_drawn_pixels(rng, label):
    # The same stream drawn as 'normal' is the same patient with the same noise, so the difference is the lesion.
    for size in (67, 97):
        for _ in range(4):
            seed = _seed(rng)
            d = float(torch.rand(1, generator=rng))
            normal = render_chest(np.random.default_rng(seed), size, 0, d)
            image, lung, lesion, _ = render_chest(np.random.default_rng(seed), size, label, d)
            assert np.array_equal(lung, normal[1])
            diff = np.abs(image - normal[0])
            assert lesion.any()
            assert not ((diff > 0) & ~lung).any(), "lesion drawn outside the lung mask"
            assert (diff[lesion] > 0).mean() > 0.97, "mask pixels where nothing was drawn"
            near = ndimage.binary_dilation(lesion, iterations=1)
            assert diff[near].sum() >= 0.85 * diff.sum(), "drawn energy outside the lesion mask"
            strong = diff > 0.5 * np.median(diff[lesion])
            far = strong & ~ndimage.binary_dilation(lesion, iterations=2)
            assert far.sum() <= 0.01 * lesion.sum() + 2
            # Opacities are brighter than the lung they sit in.
            assert (image - normal[0])[lesion].mean() > 0


def test_difficulty_lowers_lesion_contrast(rng):
    gaps = []
    for _ in range(6):
        seed = _seed(rng)
        label = int(torch.randint(1, 5, (1,), generator=rng))
        per_d = []
        for d in (0.0, 1.0):
            normal = render_chest(np.random.default_rng(seed), 79, 0, d)[0]
            image, _, lesion, _ = render_chest(np.random.default_rng(seed), 79, label, d)
            per_d.append((image - normal)[lesion].mean())
        gaps.append(per_d[0] - per_d[1])
    assert np.mean(gaps) > 0.02


@pytest.mark.parametrize("n", [5, 13, 17, 123])
def test_classes_are_balanced(rng, n):
    labels = load_synthetic(n, 0, 0, 32, _seed(rng)).train.labels
    counts = np.bincount(labels, minlength=5)
    assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_confounder_off_by_default(rng):
    splits = load_synthetic(10, 5, 10, 64, _seed(rng))
    for s in (splits.train, splits.val, splits.test):
        assert not s.marker_masks.any()


def test_confounder_rate_slot_and_nothing_else_changes(rng):
    seed = _seed(rng)
    rate = float(torch.rand(1, generator=rng)) * 0.8 + 0.1
    plain = load_synthetic(0, 0, 37, 64, seed).test
    tagged = load_synthetic(0, 0, 37, 64, seed, confounder=rate).test
    has = tagged.marker_masks.any(axis=(1, 2))
    for c in range(5):
        members = tagged.labels == c
        assert has[members].sum() == round(rate * members.sum())
    a, b = plain.images().numpy()[:, 0], tagged.images().numpy()[:, 0]
    assert np.array_equal(a[~tagged.marker_masks], b[~tagged.marker_masks])
    u = (2 * np.arange(64) + 1) / 64 - 1
    for i in np.flatnonzero(has):
        m = tagged.marker_masks[i]
        cu, cv = MARKER_SLOTS[tagged.labels[i]]
        rows, cols = np.nonzero(m)
        assert abs(u[cols].mean() - cu) < 0.02 and abs(u[rows].mean() - cv) < 0.02
        assert b[i][m].mean() > 0.7 and b[i][m].mean() > a[i][m].mean() + 0.2
        assert not (m & tagged.lesion_masks[i]).any()


def test_mean_intensity_does_not_give_the_class_away(rng):
    splits = load_synthetic(300, 0, 200, 48, _seed(rng))

    def stats(s):
        x = s.images().numpy()[:, 0]
        return np.c_[x.mean(axis=(1, 2)), x.std(axis=(1, 2))]

    clf = LogisticRegression(max_iter=2000).fit(stats(splits.train), splits.train.labels)
    acc = (clf.predict(stats(splits.test)) == splits.test.labels).mean()
    assert acc < 0.4, f"mean/std alone separates the classes ({acc:.2f})"


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    (dict(size=31), ValueError, "size"),
    (dict(size=64.0), TypeError, "size"),
    (dict(n_train=-1), ValueError, "n_train"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(difficulty=1.5), ValueError, "difficulty"),
    (dict(confounder=-0.1), ValueError, "confounder"),
    (dict(confounder="high"), TypeError, "confounder"),
])
def test_bad_arguments_are_named(kwargs, exc, word):
    args = dict(n_train=2, n_val=1, n_test=1, size=64, seed=0) | kwargs
    with pytest.raises(exc, match=word):
        load_synthetic(**args)
