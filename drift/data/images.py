"""Reading one image file as the models see it: PNG / JPEG / TIFF / BMP (any PIL mode) or DICOM, decoded to a
float32 grayscale array in [0, 1] (:func:`decode_image`), then resized (:func:`resize_image`); a file that cannot be
decoded is an error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from drift.data.base import DataError

_PIL_TO_GRAY = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


# -- decoding ----------------------------------------------------------------------------------------------------

def _is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic at byte 128 (DICOM files often have no suffix)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _pil_to_gray(im: Image.Image, path: Path) -> np.ndarray:
    """One grayscale channel in [0, 1] from a decoded PIL image (see `decode_image`)."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / np.float32(65535.0)
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"{path}: 32-bit integer image with values in [{arr.min()}, {arr.max()}] outside the "
                            f"16-bit range [0, 65535]; convert it to 8- or 16-bit PNG")
        return arr.astype(np.float32) / np.float32(65535.0)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
            raise DataError(f"{path}: floating-point image must hold finite values in [0, 1]")
        return arr.copy()
    if mode in _PIL_TO_GRAY:
        # PIL's own luma for colour (ITU-R 601-2: L = 0.299 R + 0.587 G + 0.114 B); alpha is ignored, as PIL does.
        gray = im if mode == "L" else im.convert("L")
        return np.asarray(gray).astype(np.float32) / np.float32(255.0)
    raise DataError(f"{path}: unsupported image mode {mode!r}")


def _decode_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{path}: reading DICOM files needs pydicom; install it with "
                        f"`pip install drift-cxr[dicom]`") from None
    try:
        ds = pydicom.dcmread(str(path))
        arr = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as e:  # pydicom raises many types for broken files; name the file whatever it was
        raise DataError(f"{path}: cannot decode DICOM ({type(e).__name__}: {e})") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if arr.ndim == 3 and arr.shape[-1] == 3 and photometric.startswith(("RGB", "YBR")):
        # pixel_array is RGB for colour DICOM; reduce it with the same luma weights as for PNG and JPEG.
        arr = arr @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2:
        raise DataError(f"{path}: DICOM pixel data has shape {arr.shape}; only single-frame 2-D images are "
                        f"supported")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        raise DataError(f"{path}: DICOM image is constant or non-finite (range [{lo}, {hi}])")
    arr = (arr - lo) / (hi - lo)
    if photometric == "MONOCHROME1":  # MONOCHROME1 displays low values bright
        arr = 1.0 - arr
    return arr.astype(np.float32)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Fully decode one image file to a single grayscale channel ``(H, W)`` float32 in [0, 1], at full size.

    - 8-bit images (``L``, ``P``, ``1``): ``value / 255``.
    - 16-bit images (``I;16*``, and ``I`` holding values in [0, 65535]): ``value / 65535``.
    - colour (RGB, RGBA, LA, CMYK, ...): PIL's ``convert("L")``, i.e. ``0.299 R + 0.587 G + 0.114 B`` rounded to
      8 bit; alpha is ignored. Then ``/ 255``.
    - DICOM: ``pixel * RescaleSlope + RescaleIntercept``, then min-max scaled to [0, 1] over the image, inverted
      (``1 - x``) for MONOCHROME1.

    Args:
        path: Image file.

    Returns:
        ``(H, W)`` float32 in [0, 1].

    Raises:
        DataError: If the file is missing, not an image, corrupt or truncated, multi-frame, of an unsupported mode,
            or DICOM without pydicom installed. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    if _is_dicom(path):
        return _decode_dicom(path)
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise DataError(f"{path}: image has {im.n_frames} frames; only single-frame images are supported")
            im.load()  # full decode: truncated or corrupt data fails here, not at training time
            arr = _pil_to_gray(im, path)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (Pillow cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{path}: decoded to shape {arr.shape}, expected a non-empty 2-D image")
    return arr


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(H, W)`` to ``(size, size)`` with antialiased bilinear interpolation (a triangle filter whose support
    widens with the downscale factor, as in PIL), pixel centres aligned (``align_corners=False``).

    Non-square images are stretched, not cropped. An image already ``(size, size)`` is returned unchanged.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if image.shape == (size, size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """`decode_image` then `resize_image`: ``(size, size)`` float32 in [0, 1]."""
    return resize_image(decode_image(path), size)
