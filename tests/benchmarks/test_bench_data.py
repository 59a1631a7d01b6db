"""Timed synthetic data generation, checked for the promised structure: shapes, ranges, class balance, masks,
unique ids and determinism (same seed, same bytes; another seed, other images)."""

import numpy as np
import torch

from drift.data import load_synthetic


def test_load_synthetic(timed, benchmark, rng):
    n_train, n_val, n_test = (int(v) for v in torch.randint(3, 12, (3,), generator=rng))
    size = int(torch.randint(40, 90, (1,), generator=rng))
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    splits = timed(load_synthetic, n_train, n_val, n_test, size, seed)
    benchmark.extra_info.update(images=n_train + n_val + n_test, size=size)

    ids = []
    for split, n in ((splits.train, n_train), (splits.val, n_val), (splits.test, n_test)):
        assert len(split) == n
        x = split.images().numpy()
        assert x.shape == (n, 1, size, size) and x.dtype == np.float32
        assert x.min() >= 0 and x.max() <= 1
        counts = np.bincount(split.labels, minlength=5)
        assert counts.max() - counts.min() <= 1, counts  # class-balanced to within one image
        for masks in (split.lung_masks, split.lesion_masks):
            assert masks.shape == (n, size, size) and masks.dtype == bool
        assert split.lung_masks.any(axis=(1, 2)).all(), "every image has lung fields"
        ids += list(split.ids)
    assert len(set(ids)) == len(ids)

    again = load_synthetic(n_train, n_val, n_test, size, seed)
    assert np.array_equal(again.test.images().numpy(), splits.test.images().numpy())
    assert np.array_equal(again.test.labels, splits.test.labels)
    other = load_synthetic(n_train, n_val, n_test, size, seed + 1)
    assert not np.array_equal(other.test.images().numpy(), splits.test.images().numpy())
