"""Reading one image or mask file robustly.

Conventions:
- ``read_image`` returns ``uint8 (H, W, 3)`` RGB. Grayscale is replicated to 3 channels,
  alpha is dropped, 16-bit and float images are scaled to 8 bit by their 0.5-99.5 percentile
  range (microscopy often uses a small part of the 16-bit range).
- ``read_mask`` returns ``uint8 (H, W)`` in {0, 1}: a pixel is foreground when its value is
  greater than ``threshold`` (default 0: 0 is background, anything else foreground).
  Multi-channel masks are reduced with max over channels.
- ``read_label_map`` returns class indices ``uint8 (H, W)`` of a multi-class mask through
  ``data.labels`` (:mod:`segx.data.labels`); JPEG label masks are refused (lossy).
- Both are returned as a viewer shows the file: a JPEG's EXIF orientation is applied.
- The content must match the extension (a JPEG named ``.png`` is refused: its artefacts would
  pass for mask values), and a PNG or JPEG must end with its end marker (truncation).
- Paths may hold bytes that are not UTF-8 (Python's surrogate escapes): files are read through
  ``np.fromfile``/PIL, never through OpenCV's path functions, which crash on such names.
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


# The content each extension may hold (PIL's format names; cameras write JPEGs as MPO).
_FORMATS = {".png": ("PNG",), ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".tif": ("TIFF",), ".tiff": ("TIFF",)}
_EXTENSION_FOR = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}
# The last bytes every complete file of a format holds (searched in its last KiB, since some
# writers append a few bytes): a cheap truncation test that needs no decoding.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


def shown(path: str | os.PathLike) -> str:
    """``path`` printable on any terminal: a byte that is not UTF-8 (a Latin-1 name from an old
    archive, held by Python as a surrogate escape) shows as ``\\xe9`` instead of crashing."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) viewers apply; 1 when absent or unreadable (as viewers do)."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not make a readable image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _check_header(path: Path, max_pixels: int, limit_key: str = "data.max_pixels") -> tuple[int, int, int]:
    """Validate the file's header (format matching the extension, size limit, end marker) and
    return its stored (width, height) and EXIF orientation. Reads no pixel data."""
    name = shown(path)
    try:
        if not path.exists():
            raise SegxError(f"{name}: file does not exist (broken link?); remove it or fix the link")
        if path.stat().st_size == 0:
            raise SegxError(f"{name}: file is empty (0 bytes); replace or remove it")
        with Image.open(path) as im:
            width, height = im.size
            kind = im.format or "unknown"
            orientation = _orientation(im)
    except SegxError:
        raise
    except Exception as exc:  # PIL raises many types for junk input
        raise SegxError(f"{name}: not a readable image ({type(exc).__name__}); replace or remove the file") from None
    suffix = path.suffix.lower()
    if suffix in _FORMATS and kind not in _FORMATS[suffix]:
        # A JPEG saved as .png carries JPEG artefacts (grey edges in a mask) the name hides.
        fix = f"rename it to {path.stem}{_EXTENSION_FOR[kind]}" if kind in _EXTENSION_FOR else "re-export it"
        raise SegxError(f"{name}: content is {kind} but the name ends {suffix}; {fix}")
    if width <= 0 or height <= 0:
        raise SegxError(f"{name}: header declares an empty image {width}x{height}; replace it")
    if width * height > max_pixels:
        raise SegxError(
            f"{name}: header declares {width}x{height} pixels, over the limit of {max_pixels}; "
            f"downscale the file or raise {limit_key}"
        )
    if kind in _END_MARKERS:
        # libjpeg decodes a truncated file into a partly grey image with only a warning.
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 1024))
            if _END_MARKERS[kind] not in fh.read():
                raise SegxError(f"{name}: {kind} is truncated (no end marker); re-export the file")
    return width, height, orientation


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation as viewers do (same result as PIL's ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        array = array[:, ::-1]
    elif orientation == 3:
        array = array[::-1, ::-1]
    elif orientation == 4:
        array = array[::-1]
    elif orientation == 5:
        array = array.swapaxes(0, 1)
    elif orientation == 6:
        array = np.rot90(array, -1)
    elif orientation == 7:
        array = np.rot90(array, 2).swapaxes(0, 1)
    elif orientation == 8:
        array = np.rot90(array, 1)
    else:
        return array
    return np.ascontiguousarray(array)


def _decode(path: Path, max_pixels: int, digest=None, limit_key: str = "data.max_pixels") -> np.ndarray:
    """Pixels as stored (OpenCV channel order), turned by the EXIF orientation as viewers show
    them. ``cv2.IMREAD_UNCHANGED`` ignores EXIF, so the orientation is applied here."""
    width, height, orientation = _check_header(path, max_pixels, limit_key)
    name = shown(path)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
        if digest is not None:  # hashlib object: the data fingerprint hashes the bytes decoded
            digest.update(buffer)
        array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except (cv2.error, OSError, ValueError):
        array = None
    if array is None and path.suffix.lower() in (".tif", ".tiff"):
        try:
            with Image.open(path) as im:
                array = np.asarray(im)
            if array.ndim == 3 and array.shape[2] in (3, 4):  # PIL gives RGB(A), OpenCV BGR(A)
                array = array[:, :, [2, 1, 0, 3][: array.shape[2]]]
        except Exception:
            array = None
    if array is None or array.size == 0:
        raise SegxError(f"{name}: image data is corrupt or truncated; replace or remove the file")
    if array.shape[0] != height or array.shape[1] != width:
        raise SegxError(
            f"{name}: decoded size {array.shape[1]}x{array.shape[0]} differs from the header's "
            f"{width}x{height} (corrupt file); re-export it"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise SegxError(f"{name}: unsupported layout {array.shape} (need grayscale, RGB or RGBA); convert it")
    # After the size check, which compares the stored (unturned) sizes.
    return _orient(array, orientation)


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


def read_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    digest=None,
    *,
    limit_key: str = "data.max_pixels",
) -> np.ndarray:
    """Read an image file as ``uint8 (H, W, 3)`` RGB, in its displayed orientation (EXIF
    applied); ``digest.update`` gets the file's bytes; ``limit_key`` is the setting an
    over-size error tells the user to raise."""
    path = Path(path)
    array = _decode(path, max_pixels, digest, limit_key)
    if array.ndim == 2:
        array = _to_uint8(array)
        return np.repeat(array[:, :, None], 3, axis=2)
    array = array[:, :, :3]  # drop alpha
    array = _to_uint8(array)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)  # OpenCV decodes as BGR


def read_mask(
    path: str | os.PathLike,
    threshold: float = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    digest=None,
    *,
    limit_key: str = "data.max_pixels",
) -> np.ndarray:
    """Read a mask file as ``uint8 (H, W)`` in {0, 1} (foreground where value > threshold),
    in its displayed orientation (EXIF applied, as for its image)."""
    path = Path(path)
    array = _decode(path, max_pixels, digest, limit_key)
    if array.ndim == 3:
        array = array[:, :, :3].max(axis=2)
    if array.dtype.kind == "f":
        array = np.nan_to_num(array)
    return (array > threshold).astype(np.uint8)


def read_label_map(
    path: str | os.PathLike,
    labels,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    digest=None,
    *,
    limit_key: str = "data.max_pixels",
) -> np.ndarray:
    """Read a multi-class mask as class indices ``uint8 (H, W)`` through ``labels``
    (:class:`segx.data.labels.Labels`): an 8- or 16-bit label map, or RGB colours with
    ``data.palette``. JPEG is refused: its lossy compression invents values between labels."""
    path = Path(path)
    name = shown(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise SegxError(
            f"{name}: a JPEG label mask is lossy (its compression blends neighbouring labels); "
            "save the masks as PNG or TIFF"
        )
    array = _decode(path, max_pixels, digest, limit_key)
    if labels.colours is not None:
        if array.ndim != 3:
            raise SegxError(
                f"{name}: data.palette needs RGB masks, this one is single-channel; describe label maps "
                "with data.labels alone (set data.palette=null)"
            )
        rgb = cv2.cvtColor(np.ascontiguousarray(array[:, :, :3]), cv2.COLOR_BGR2RGB)
        return labels.encode(rgb, name)
    if array.ndim == 3:
        channels = array[:, :, :3]
        if not (
            np.array_equal(channels[:, :, 0], channels[:, :, 1])
            and np.array_equal(channels[:, :, 0], channels[:, :, 2])
        ):
            raise SegxError(
                f"{name}: the mask holds colours, not label values; describe them with data.palette "
                "(class name -> [r, g, b]) or save single-channel label maps"
            )
        array = channels[:, :, 0]
    return labels.encode(array, name)


def read_size(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, limit_key: str = "data.max_pixels"
) -> tuple[int, int]:
    """Declared (width, height) of an image file as displayed (EXIF orientation applied, like
    ``read_image``), validating its header, format and end marker only (no pixel data)."""
    width, height, orientation = _check_header(Path(path), max_pixels, limit_key)
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (OpenCV channel order) as a PNG atomically: to a temporary name in the
    same folder, then renamed over ``path``, so a crash leaves the old file or the new one.
    ``cv2.imwrite`` is not used: it crashes the interpreter on a name that is not UTF-8."""
    path = Path(path)
    ok, buffer = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
        raise SegxError(f"{shown(path)}: could not encode the image as PNG")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            buffer.tofile(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
