"""The ImageSet container: indexing, subsets, stacking and validation."""

import numpy as np
import pytest
import torch

from drift.data import ImageSet


def _random_set(rng: torch.Generator, n: int = 13, size: int = 5) -> ImageSet:
    pixels = torch.rand(n, size, size, generator=rng).numpy()
    labels = torch.randint(0, 3, (n,), generator=rng).numpy()
    masks = (torch.rand(n, size, size, generator=rng) > 0.5).numpy()
    return ImageSet(("a", "b", "c"), labels, [f"s{i}" for i in range(n)], size=size, pixels=pixels,
                    lung_masks=masks, lesion_masks=masks & ~masks, patient_ids=[f"p{i % 4}" for i in range(n)])


def test_getitem_returns_a_fresh_tensor(rng):
    s = _random_set(rng)
    image, label = s[4]
    assert image.shape == (1, 5, 5) and image.dtype == torch.float32 and label == int(s.labels[4])
    np.testing.assert_array_equal(image[0].numpy(), s.images()[4, 0].numpy())
    image.fill_(7.0)
    assert s[4][0].max() <= 1.0
    assert torch.equal(s[-1][0], s[len(s) - 1][0])
    assert s[np.int64(2)][1] == int(s.labels[2])


def test_bad_indices_raise(rng):
    s = _random_set(rng)
    with pytest.raises(IndexError, match="13"):
        s[13]
    with pytest.raises(TypeError, match="int"):
        s[1.0]
    with pytest.raises(IndexError, match="out of range"):
        s.subset([0, 99])
    with pytest.raises(IndexError, match="mask"):
        s.subset(np.ones(5, dtype=bool))
    with pytest.raises(TypeError, match="integers"):
        s.subset([0.5, 1.5])


def test_subset_by_indices_and_mask(rng):
    s = _random_set(rng, n=17)
    idx = torch.randperm(17, generator=rng)[:7].numpy()
    sub = s.subset(idx)
    assert len(sub) == 7 and sub.ids == [f"s{i}" for i in idx] and sub.class_names == s.class_names
    assert np.array_equal(sub.labels, s.labels[idx])
    assert np.array_equal(sub.lung_masks, s.lung_masks[idx])
    assert sub.patient_ids == [s.patient_ids[i] for i in idx]
    assert torch.equal(sub.images(), s.images()[torch.from_numpy(idx)])
    mask = s.labels == 1
    by_mask = s.subset(mask)
    assert by_mask.ids == [i for i, m in zip(s.ids, mask) if m]
    assert len(s.subset([])) == 0
    assert torch.equal(s.images([-1, 0]), s.images()[[16, 0]])
    # A subset owns its arrays.
    sub.lung_masks[:] = False
    assert s.lung_masks[idx].any()


def test_constructor_validation(rng):
    pixels = torch.rand(3, 5, 5, generator=rng).numpy()
    with pytest.raises(ValueError, match="labels"):
        ImageSet(("a", "b"), [0, 1, 2], ["x", "y", "z"], size=5, pixels=pixels)
    with pytest.raises(ValueError, match="ids"):
        ImageSet(("a", "b"), [0, 1, 1], ["x"], size=5, pixels=pixels)
    with pytest.raises(ValueError, match="float32"):
        ImageSet(("a", "b"), [0, 1, 1], ["x", "y", "z"], size=5, pixels=pixels.astype(np.float64))
    with pytest.raises(ValueError, match="lesion_masks"):
        ImageSet(("a", "b"), [0, 1, 1], ["x", "y", "z"], size=5, pixels=pixels,
                 lesion_masks=np.zeros((3, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="reader"):
        ImageSet(("a", "b"), [0, 1, 1], ["x", "y", "z"], size=5, paths=["a", "b", "c"])
