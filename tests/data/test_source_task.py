"""The synthetic source (pretraining) task."""

import hashlib

import numpy as np
import pytest
import torch

from drift.data import SOURCE_CLASSES, make_source


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def test_deterministic_and_seed_dependent(rng):
    seed = _seed(rng)
    a, b, c = make_source(23, 37, seed), make_source(23, 37, seed), make_source(23, 37, seed + 1)
    assert torch.equal(a.images(), b.images()) and np.array_equal(a.labels, b.labels)
    assert hashlib.sha256(a.images().numpy().tobytes()).digest() != hashlib.sha256(
        c.images().numpy().tobytes()).digest()
    assert a.ids == [f"src-{seed}-{i:05d}" for i in range(23)]


@pytest.mark.parametrize(("n", "size"), [(17, 33), (123, 16)])
def test_shapes_balance_and_range(rng, n, size):
    s = make_source(n, size, _seed(rng))
    assert s.class_names == SOURCE_CLASSES and len(s) == n
    counts = np.bincount(s.labels, minlength=len(SOURCE_CLASSES))
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    x = s.images()
    assert x.shape == (n, 1, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert s.lung_masks is None and s.lesion_masks is None and s.patient_ids is None


def test_every_class_draws_structure(rng):
    # Each image must carry a pattern: more variance than its pixel noise alone, measured as the variance that
    # survives a 3 x 3 box filter (noise shrinks by 9, structure much less).
    s = make_source(50, 65, _seed(rng))
    x = s.images()
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1)
    assert (smooth.flatten(1).std(1) > 0.01).all()


def test_classes_are_separable_by_texture_statistics(rng):
    # A nearest-centroid rule on log power spectra, fitted on one draw and scored on another, must beat chance
    # (0.1) by far: the classes carry distinct oriented and periodic structure, not only labels.
    seed = _seed(rng)
    train, test = make_source(300, 32, seed), make_source(200, 32, seed + 1)

    def spectrum(s):
        x = s.images()[:, 0]
        f = torch.fft.fft2(x - x.mean((1, 2), keepdim=True)).abs().log1p()
        return f.flatten(1) / f.flatten(1).norm(dim=1, keepdim=True)

    ftr, fte = spectrum(train), spectrum(test)
    centroids = torch.stack([ftr[torch.from_numpy(train.labels == c)].mean(0) for c in range(len(SOURCE_CLASSES))])
    pred = torch.cdist(fte, centroids).argmin(1).numpy()
    assert (pred == test.labels).mean() > 0.35


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    (dict(n=-1), ValueError, "n"),
    (dict(size=8), ValueError, "size"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_bad_arguments_are_named(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        make_source(**(dict(n=3, size=32, seed=0) | kwargs))
