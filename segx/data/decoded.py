"""Each case decoded once into an on-disk cache of uint8 ``.npy`` files, read memory-mapped.

Training on patches reads a few hundred pixels of a case at a time; holding every image in
memory would make memory grow with the dataset. Instead every image and mask is decoded once
(with every check of :mod:`segx.data.io`) into ``<root>/v<CACHE_VERSION>/<key>/``, where the key
is the hash of the image file's bytes, the mask file's bytes and the mask threshold. Entries are
therefore shared by every split, config and member that reads the same files, and a changed file
gets a new entry: an entry can never be read for other data. Files are written under temporary
names and renamed, ``meta.json`` last, so an entry without ``meta.json`` is incomplete and is
rewritten; one written by another segx version or with other contents is rewritten too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segx.data.folder import Case, read_case, rescale
from segx.data.io import DEFAULT_MAX_PIXELS, shown
from segx.errors import SegxError

CACHE_VERSION = 1
# Foreground locations kept per case for sampling patches that contain foreground (nnU-Net
# keeps up to 10,000 per class): enough to cover every object, small to store.
FOREGROUND_SAMPLES = 10_000


def _segx_version() -> str:
    from segx import __version__

    return str(__version__)


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    try:
        digest.update(np.fromfile(path, dtype=np.uint8))
    except OSError as exc:
        raise SegxError(f"{shown(path)}: cannot read it ({exc.strerror}); check the file and its permissions") from None
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _scale_tag(scale: float) -> str:
    return "" if scale == 1 else f"-x{float(scale):g}"


@dataclass(frozen=True)
class DecodedCase:
    """One case in the cache: ``image()`` uint8 (H, W, 3) and ``mask()`` uint8 (H, W) in {0, 1},
    memory-mapped; ``shape`` is (H, W) at ``scale`` (1: the file's own size)."""

    stem: str
    folder: Path
    shape: tuple[int, int]
    digests: tuple[str, str]
    has_mask: bool
    foreground_pixels: int
    scale: float = 1.0

    def image(self) -> np.ndarray:
        return np.load(self.folder / f"image{_scale_tag(self.scale)}.npy", mmap_mode="r")

    def mask(self) -> np.ndarray:
        if not self.has_mask:
            raise SegxError(f"case '{self.stem}' has no mask; give one in the masks folder")
        return np.load(self.folder / f"mask{_scale_tag(self.scale)}.npy", mmap_mode="r")

    def foreground(self) -> np.ndarray:
        """int32 (K, 2) (row, column) foreground locations, at most FOREGROUND_SAMPLES, a fixed
        random subset (seeded by the file contents) when there are more."""
        return np.load(self.folder / f"foreground{_scale_tag(self.scale)}.npy")

    def scaled(self, scale: float) -> DecodedCase:
        """The same case rescaled by ``scale`` (written to the cache on first use)."""
        if scale == self.scale:
            return self
        if self.scale != 1:
            raise ValueError("rescale a case from its own size (scale 1)")
        base = self
        tag = _scale_tag(scale)
        meta_path = self.folder / f"meta{tag}.json"
        meta = _read_meta(meta_path)
        if meta is None or meta.get("scale") != scale:
            image = rescale(np.asarray(base.image()), scale, is_mask=False)
            _save_npy(self.folder / f"image{tag}.npy", image)
            count = 0
            if self.has_mask:
                mask = rescale(np.asarray(base.mask()), scale, is_mask=True)
                _save_npy(self.folder / f"mask{tag}.npy", mask)
                count = int(np.count_nonzero(mask))
                _save_npy(self.folder / f"foreground{tag}.npy", _foreground_sample(mask, self.digests[1]))
            meta = {"version": CACHE_VERSION, "segx": _segx_version(), "scale": scale,
                    "shape": list(image.shape[:2]), "foreground_pixels": count}  # fmt: skip
            _write_meta(meta_path, meta)
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        return DecodedCase(self.stem, self.folder, shape, self.digests, self.has_mask, int(meta["foreground_pixels"]), scale)


def _foreground_sample(mask: np.ndarray, seed_hex: str) -> np.ndarray:
    where = np.argwhere(mask > 0).astype(np.int32)
    if len(where) > FOREGROUND_SAMPLES:
        rng = np.random.default_rng(int(seed_hex[:8] or "0", 16))
        where = where[np.sort(rng.choice(len(where), FOREGROUND_SAMPLES, replace=False))]
    return where


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("segx") != _segx_version():
        return None  # another format or segx version: rebuilt, never read
    return meta


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def entry_key(image_digest: str, mask_digest: str, mask_threshold: float) -> str:
    return f"{image_digest}-{mask_digest or 'nomask'}-t{float(mask_threshold):g}"


def decode_case(case: Case, root: Path, mask_threshold: float, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedCase:
    """The cache entry of ``case``, decoding its files if the entry is missing or stale."""
    image_digest = _file_digest(case.image)
    mask_digest = _file_digest(case.mask) if case.mask is not None else ""
    folder = root / f"v{CACHE_VERSION}" / entry_key(image_digest, mask_digest, mask_threshold)
    meta = _read_meta(folder / "meta.json")
    expected = {"image_digest": image_digest, "mask_digest": mask_digest, "mask_threshold": float(mask_threshold)}
    if meta is not None and all(meta.get(k) == v for k, v in expected.items()) and _complete(folder, meta, case.mask is not None):
        height, width = meta["shape"]
        if height * width > max_pixels:
            raise SegxError(
                f"{shown(case.image)}: header declares {width}x{height} pixels, over the limit of "
                f"{max_pixels}; downscale the file or raise data.max_pixels"
            )
        return DecodedCase(case.stem, folder, (int(height), int(width)), (image_digest, mask_digest),
                           case.mask is not None, int(meta["foreground_pixels"]))  # fmt: skip
    image_hash, mask_hash = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    image, mask = read_case(case, mask_threshold, max_pixels, image_hash, mask_hash)
    if image_hash.hexdigest() != image_digest or (mask is not None and mask_hash.hexdigest() != mask_digest):
        raise SegxError(f"{shown(case.image)}: the file changed while segx read it; rerun when nothing writes to the data")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten below
    _save_npy(folder / "image.npy", image)
    count = 0
    if mask is not None:
        _save_npy(folder / "mask.npy", mask)
        _save_npy(folder / "foreground.npy", _foreground_sample(mask, mask_digest))
        count = int(np.count_nonzero(mask))
    meta = {**expected, "version": CACHE_VERSION, "segx": _segx_version(), "shape": list(image.shape[:2]),
            "foreground_pixels": count, "source": shown(case.image)}  # fmt: skip
    _write_meta(folder / "meta.json", meta)
    return DecodedCase(case.stem, folder, image.shape[:2], (image_digest, mask_digest), mask is not None, count)


def _complete(folder: Path, meta: dict, has_mask: bool) -> bool:
    """Every file of the entry is there, with the recorded shape (headers only)."""
    names = ["image.npy"] + (["mask.npy", "foreground.npy"] if has_mask else [])
    try:
        shapes = [np.load(folder / name, mmap_mode="r").shape for name in names]
    except (OSError, ValueError):
        return False
    height, width = meta["shape"]
    return shapes[0] == (height, width, 3) and (not has_mask or shapes[1] == (height, width))


def decode_cases(
    cases: Sequence[Case],
    root: str | os.PathLike,
    mask_threshold: float = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable | None = None,
) -> list[DecodedCase]:
    """Cache entries for ``cases`` (decoded now where missing). Raises on the first bad file."""
    if not cases:
        raise SegxError("the dataset is empty; add image/mask pairs")
    root = Path(root)
    iterator = progress(cases) if progress else cases
    return [decode_case(case, root, mask_threshold, max_pixels) for case in iterator]
