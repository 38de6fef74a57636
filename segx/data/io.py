"""Reading one image or mask file robustly.

Conventions:
- ``read_image`` returns ``uint8 (H, W, 3)`` RGB. Grayscale is replicated to 3 channels,
  alpha is dropped, 16-bit and float images are scaled to 8 bit by their 0.5-99.5 percentile
  range (microscopy often uses a small part of the 16-bit range).
- ``read_mask`` returns ``uint8 (H, W)`` in {0, 1}: a pixel is foreground when its value is
  greater than ``threshold`` (default 0: 0 is background, anything else foreground).
  Multi-channel masks are reduced with max over channels.
Every failure is a :class:`SegxError` naming the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segx.errors import SegxError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# A header may declare any size; refuse before decoding rather than exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000

cv2.setNumThreads(1)  # tf.data runs decoders in parallel already
try:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # pragma: no cover - older OpenCV builds
    pass
Image.MAX_IMAGE_PIXELS = None  # we apply our own, explicit limit below


def _check_header(path: Path, max_pixels: int) -> tuple[int, int]:
    """Validate the file's header and return its declared (width, height)."""
    try:
        if not path.exists():
            raise SegxError(f"{path}: file does not exist (broken link?); remove it or fix the link")
        if path.stat().st_size == 0:
            raise SegxError(f"{path}: file is empty (0 bytes); replace or remove it")
        with Image.open(path) as im:
            width, height = im.size
    except SegxError:
        raise
    except Exception as exc:  # PIL raises many types for junk input
        raise SegxError(
            f"{path}: not a readable image ({type(exc).__name__}); replace or remove the file"
        ) from None
    if width <= 0 or height <= 0:
        raise SegxError(f"{path}: header declares an empty image {width}x{height}; replace it")
    if width * height > max_pixels:
        raise SegxError(
            f"{path}: header declares {width}x{height} pixels, over the limit of {max_pixels}; "
            "downscale the file or raise data.max_pixels"
        )
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # libjpeg decodes a truncated file into a partly grey image with only a warning.
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 1024))
            if b"\xff\xd9" not in fh.read():
                raise SegxError(f"{path}: JPEG is truncated (no end marker); re-export the file")
    return width, height


def _decode(path: Path, max_pixels: int) -> np.ndarray:
    width, height = _check_header(path, max_pixels)
    try:
        array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except (cv2.error, OSError, ValueError):
        array = None
    if array is None and path.suffix.lower() in (".tif", ".tiff"):
        try:
            with Image.open(path) as im:
                array = np.asarray(im)
        except Exception:
            array = None
    if array is None or array.size == 0:
        raise SegxError(f"{path}: image data is corrupt or truncated; replace or remove the file")
    if array.shape[0] != height or array.shape[1] != width:
        raise SegxError(
            f"{path}: decoded size {array.shape[1]}x{array.shape[0]} differs from the header's "
            f"{width}x{height} (corrupt file); re-export it"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise SegxError(
            f"{path}: unsupported layout {array.shape} (need grayscale, RGB or RGBA); convert it"
        )
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = np.percentile(values, (0.5, 99.5))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as ``uint8 (H, W, 3)`` RGB."""
    path = Path(path)
    array = _decode(path, max_pixels)
    if array.ndim == 2:
        array = _to_uint8(array)
        return np.repeat(array[:, :, None], 3, axis=2)
    array = array[:, :, :3]  # drop alpha
    array = _to_uint8(array)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)  # OpenCV decodes as BGR


def read_mask(
    path: str | os.PathLike, threshold: float = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a mask file as ``uint8 (H, W)`` in {0, 1} (foreground where value > threshold)."""
    path = Path(path)
    array = _decode(path, max_pixels)
    if array.ndim == 3:
        array = array[:, :, :3].max(axis=2)
    if array.dtype.kind == "f":
        array = np.nan_to_num(array)
    return (array > threshold).astype(np.uint8)


def read_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Declared (width, height) of an image file, validating its header only."""
    return _check_header(Path(path), max_pixels)
