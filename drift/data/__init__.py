"""Data sources of the suite: the synthetic chest X-ray task, the synthetic source tasks and real image folders.

Every loader returns `ImageSet` splits whose items are ``(image (1, H, W) float32 in [0, 1], label int)``.
"""

from drift.data.base import DataError, ImageSet, Splits
from drift.data.images import decode_image, read_image
from drift.data.real import DataWarning, load_csv, load_folder
from drift.data.source import (
    LESION_SOURCE_CLASSES,
    SOURCE_CLASSES,
    SOURCE_TASKS,
    SourceTask,
    make_lesion_source,
    make_source,
)
from drift.data.splits import assign_splits
from drift.data.synthetic import (
    MARKER_SLOTS,
    OPACITY_EXTENTS,
    OPACITY_TEXTURES,
    SYNTHETIC_CLASSES,
    load_synthetic,
    render_chest,
    render_chest_opacity,
)

__all__ = [
    "LESION_SOURCE_CLASSES",
    "MARKER_SLOTS",
    "OPACITY_EXTENTS",
    "OPACITY_TEXTURES",
    "SOURCE_CLASSES",
    "SOURCE_TASKS",
    "SYNTHETIC_CLASSES",
    "DataError",
    "DataWarning",
    "ImageSet",
    "SourceTask",
    "Splits",
    "assign_splits",
    "decode_image",
    "load_csv",
    "load_folder",
    "load_synthetic",
    "make_lesion_source",
    "make_source",
    "read_image",
    "render_chest",
    "render_chest_opacity",
]
