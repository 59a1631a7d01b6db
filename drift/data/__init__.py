"""Data sources of the suite: the synthetic chest X-ray task, the synthetic source task and real image folders.

Every loader returns `ImageSet` splits whose items are ``(image (1, H, W) float32 in [0, 1], label int)``.
"""

from drift.data.base import DataError, ImageSet, Splits
from drift.data.real import DataWarning, assign_splits, decode_image, load_csv, load_folder, read_image
from drift.data.source import SOURCE_CLASSES, make_source
from drift.data.synthetic import MARKER_SLOTS, SYNTHETIC_CLASSES, load_synthetic, render_chest

__all__ = [
    "MARKER_SLOTS",
    "SOURCE_CLASSES",
    "SYNTHETIC_CLASSES",
    "DataError",
    "DataWarning",
    "ImageSet",
    "Splits",
    "assign_splits",
    "decode_image",
    "load_csv",
    "load_folder",
    "load_synthetic",
    "make_source",
    "read_image",
    "render_chest",
]
