"""The split container shared by every data source: `ImageSet`, `Splits` and `DataError`.

An `ImageSet` holds either its pixels in memory (the synthetic tasks) or a list of files and a reader that decodes
one file to a ``(H, W)`` float32 array in [0, 1] (real data, loaded lazily in `__getitem__`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

Reader = Callable[[Path], np.ndarray]
Indices = Sequence[int] | np.ndarray | torch.Tensor | range


class DataError(ValueError):
    """Bad input data: a corrupt or missing file, an empty class, a split missing a class, a bad manifest row."""


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float, checked to be a real number in [0, 1]; errors name the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int, checked to be an integer (not a bool) in ``[low, high]``; errors name ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _as_index_array(indices: Indices, n: int, name: str = "indices") -> np.ndarray:
    """Turn an index list, integer array or boolean mask over ``n`` items into a validated int64 array."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    if isinstance(indices, range):
        indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"{name}: boolean mask has shape {arr.shape}, expected ({n},)")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected a 1-D sequence of integers or a boolean mask, got dtype {arr.dtype} "
                        f"and shape {arr.shape}")
    arr = arr.astype(np.int64)
    bad = (arr < -n) | (arr >= n)
    if bad.any():
        raise IndexError(f"{name}: index {int(arr[bad][0])} out of range for {n} items")
    return np.where(arr < 0, arr + n, arr)


class ImageSet(Dataset):
    """One split of a labelled image data set: item ``i`` is ``(image (1, H, W) float32 in [0, 1], label int)``.

    Attributes:
        class_names: Class names; label ``k`` means ``class_names[k]``.
        labels: ``(N,)`` int64 class indices.
        ids: ``N`` stable sample ids (synthetic: ``"syn-<seed>-<index>"``; real: path relative to the data root).
        lung_masks: ``(N, H, W)`` bool masks of the two lung fields, or None where not known (real data).
        lesion_masks: ``(N, H, W)`` bool masks of the pixels where pathology was drawn (all False for a
            normal image), or None where not known.
        marker_masks: ``(N, H, W)`` bool masks of the shortcut marker (synthetic task; all False when the
            confounder is off), or None where not known.
        patient_ids: ``N`` patient ids, or None where not known.
        paths: ``N`` files the images are read from (lazy sets), or None for in-memory sets.
        size: Side of the square images, in pixels.
    """

    def __init__(self, class_names: Sequence[str], labels: Sequence[int] | np.ndarray, ids: Sequence[str], *, size: int,
                 pixels: np.ndarray | None = None, paths: Sequence[Path] | None = None, reader: Reader | None = None,
                 lung_masks: np.ndarray | None = None, lesion_masks: np.ndarray | None = None,
                 marker_masks: np.ndarray | None = None, patient_ids: Sequence[str] | None = None) -> None:
        """Build a split from in-memory pixels ``(N, H, W)`` float32 or from ``N`` files and a reader.

        Args:
            class_names: Class names, one per label value.
            labels: ``(N,)`` integer labels in ``[0, len(class_names))``.
            ids: ``N`` sample ids.
            size: Side ``H = W`` of every image.
            pixels: ``(N, size, size)`` float32 in [0, 1]; exclusive with ``paths``.
            paths: ``N`` image files, decoded by ``reader`` on access; exclusive with ``pixels``.
            reader: ``reader(path) -> (size, size) float32`` in [0, 1]; required with ``paths``.
            lung_masks: Optional ``(N, size, size)`` bool.
            lesion_masks: Optional ``(N, size, size)`` bool.
            marker_masks: Optional ``(N, size, size)`` bool.
            patient_ids: Optional ``N`` patient ids.

        Raises:
            ValueError: If shapes, lengths or label values disagree.
        """
        self.class_names = tuple(str(c) for c in class_names)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.ids = [str(i) for i in ids]
        self.size = int(size)
        n = len(self.labels)
        if len(self.ids) != n:
            raise ValueError(f"ids has {len(self.ids)} entries but labels has {n}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}) for classes {self.class_names}; "
                             f"got range [{self.labels.min()}, {self.labels.max()}]")
        if (pixels is None) == (paths is None):
            raise ValueError("exactly one of pixels and paths must be given")
        if pixels is not None:
            pixels = np.asarray(pixels)
            if pixels.dtype != np.float32 or pixels.shape != (n, self.size, self.size):
                raise ValueError(f"pixels must be float32 of shape ({n}, {self.size}, {self.size}); "
                                 f"got {pixels.dtype} {pixels.shape}")
        else:
            paths = [Path(p) for p in paths]
            if len(paths) != n:
                raise ValueError(f"paths has {len(paths)} entries but labels has {n}")
            if reader is None:
                raise ValueError("reader is required when images are read from paths")
        self._pixels = pixels
        self.paths = paths
        self._reader = reader
        self.lung_masks = self._check_mask(lung_masks, "lung_masks")
        self.lesion_masks = self._check_mask(lesion_masks, "lesion_masks")
        self.marker_masks = self._check_mask(marker_masks, "marker_masks")
        if patient_ids is not None:
            patient_ids = [str(p) for p in patient_ids]
            if len(patient_ids) != n:
                raise ValueError(f"patient_ids has {len(patient_ids)} entries but labels has {n}")
        self.patient_ids = patient_ids

    def _check_mask(self, mask: np.ndarray | None, name: str) -> np.ndarray | None:
        if mask is None:
            return None
        mask = np.asarray(mask)
        expected = (len(self.labels), self.size, self.size)
        if mask.dtype != bool or mask.shape != expected:
            raise ValueError(f"{name} must be bool of shape {expected}; got {mask.dtype} {mask.shape}")
        return mask

    def __len__(self) -> int:
        """Number of samples ``N``."""
        return len(self.labels)

    def _image(self, i: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[i]
        return self._reader(self.paths[i])

    def __getitem__(self, i: int | np.integer) -> tuple[torch.Tensor, int]:
        """Sample ``i`` as ``(image (1, H, W) float32 in [0, 1], label)``; a fresh tensor, safe to modify."""
        if isinstance(i, torch.Tensor):
            i = i.item()
        if not isinstance(i, int | np.integer) or isinstance(i, bool):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for an ImageSet of {n} samples")
        i = int(i) % n
        image = torch.tensor(self._image(i), dtype=torch.float32).unsqueeze(0)
        return image, int(self.labels[i])

    def subset(self, indices: Indices) -> ImageSet:
        """A new ImageSet of the samples ``indices`` (ints, possibly negative, or an ``(N,)`` bool mask), in order.

        Arrays are copied, so the subset and this set never share mutable state.
        """
        idx = _as_index_array(indices, len(self))

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx].copy()

        return ImageSet(self.class_names, self.labels[idx], [self.ids[i] for i in idx], size=self.size,
                        pixels=take(self._pixels), paths=None if self.paths is None else [self.paths[i] for i in idx],
                        reader=self._reader, lung_masks=take(self.lung_masks), lesion_masks=take(self.lesion_masks),
                        marker_masks=take(self.marker_masks),
                        patient_ids=None if self.patient_ids is None else [self.patient_ids[i] for i in idx])

    def images(self, indices: Indices | None = None) -> torch.Tensor:
        """Stack the images of ``indices`` (default: all) into one ``(n, 1, H, W)`` float32 tensor."""
        idx = np.arange(len(self)) if indices is None else _as_index_array(indices, len(self))
        if self._pixels is not None:
            return torch.from_numpy(self._pixels[idx].copy()).unsqueeze(1)
        out = torch.empty((len(idx), 1, self.size, self.size), dtype=torch.float32)
        for k, i in enumerate(idx):
            out[k, 0] = torch.from_numpy(self._image(int(i)))
        return out

    def class_counts(self) -> np.ndarray:
        """``(C,)`` int64 number of samples per class."""
        return np.bincount(self.labels, minlength=len(self.class_names)).astype(np.int64)

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}={k}" for c, k in zip(self.class_names, self.class_counts()))
        kind = "in memory" if self._pixels is not None else "lazy"
        return f"ImageSet(n={len(self)}, size={self.size}, {kind}, {counts})"


@dataclass
class Splits:
    """The train / val / test splits of one data set, plus the inputs skipped under ``skip_bad=True``.

    Attributes:
        train: Training split.
        val: Validation split.
        test: Test split.
        skipped: ``(file, reason)`` for each input left out.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names shared by the three splits."""
        return self.train.class_names
