"""Each case decoded once into an on-disk cache of uint8 ``.npy`` files, read memory-mapped.

Training on patches reads a few hundred pixels of a case at a time; holding every image in
memory would make memory grow with the dataset. Instead every image and mask is decoded once
(with every check of :mod:`segx.data.io`) into ``<root>/v<CACHE_VERSION>/<key>/``, where the key
is the hash of the image file's bytes, the mask file's bytes and the mask threshold. Entries are
therefore shared by every split, config and member that reads the same files, and a changed file
gets a new entry: an entry can never be read for other data. Files are written under temporary
names and renamed, ``meta.json`` last, so an entry without ``meta.json`` is incomplete and is
rewritten; one written by another segx version or with other contents is rewritten too.

The contents are verified, not only the ``.npy`` headers: ``meta.json`` (``meta-x<scale>.json``
for a rescaled copy) records the BLAKE2b hash of every array file as it is written, and the
first time a process uses an entry it hashes the files again and checks the recorded fields
against them (shape against the headers, ``foreground_pixels`` against the mask, the foreground
sample's length and bounds). An entry that fails (a file changed, truncated or missing, an
unreadable ``meta.json`` or one that is a folder, a non-numeric field, bad foreground data) is
never read: it is rebuilt from the original files (a rescaled copy from the verified entry at
its own size) with a one-line warning naming it. Entries
written before hashes were recorded are rebuilt once, quietly, like those of another segx
version. Cost: one read of the entry, about 0.5 GB/s (measured end to end on 256-2048 px RGB
cases with their masks, one core of a busy machine, files in the page cache: 0.65 ms for
256 x 256, 8 ms for 1024 x 1024, 31 ms for 2048 x 2048; BLAKE2b itself does 0.7-1.1 GB/s; a
cold disk may be slower), once per entry per process: an entry already verified (same
``meta.json``, same inode, size and mtime of each file) costs a few stats, 15-60 us, so an
ensemble's members trained in one process share the check. Opening the cache also removes the
temporary files (``.<name>.tmp-<pid>``) that a killed writer left, those whose process no
longer runs; that lists every entry's folder (about 25 us each: 48 ms for 2,000 entries). A
cache shared by several machines can see a writer on another machine as not running: give each
machine its own ``data.cache_dir``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segx.data.folder import Case, read_case, rescale
from segx.data.io import DEFAULT_MAX_PIXELS, shown
from segx.data.labels import IGNORE_INDEX, Labels
from segx.errors import SegxError

CACHE_VERSION = 1
# Foreground locations kept per case for sampling patches that contain foreground (nnU-Net
# keeps up to 10,000 per class): enough to cover every object, small to store.
FOREGROUND_SAMPLES = 10_000
# Entries this process has verified: (folder, scale tag, meta.json text, (name, inode, size,
# mtime) of each array file). Another process rewriting the entry changes the key.
_VERIFIED: set[tuple] = set()
_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")
_CHUNK = 1 << 20


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


def _content_hash(path: Path) -> str:
    """BLAKE2b of a cache file's bytes, read in 1 MiB chunks (raises OSError)."""
    digest = hashlib.blake2b(digest_size=16)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


class _Hashing:
    """The file ``np.save`` writes through, hashing the bytes on their way (header included)."""

    def __init__(self, fh):
        self.fh, self.digest = fh, hashlib.blake2b(digest_size=16)

    def write(self, data) -> int:
        self.digest.update(data)
        return self.fh.write(data)


def _make_room(path: Path) -> None:
    """A folder where a cache file belongs (put there by hand) would stop the rename: removed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` atomically; returns the hash of the file's bytes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            out = _Hashing(fh)
            np.save(out, np.ascontiguousarray(array))
        _make_room(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.digest.hexdigest()


def _scale_tag(scale: float) -> str:
    return "" if scale == 1 else f"-x{float(scale):g}"


def _array_names(tag: str, has_mask: bool) -> list[str]:
    return [f"image{tag}.npy"] + ([f"mask{tag}.npy", f"foreground{tag}.npy"] if has_mask else [])


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
        """The same case rescaled by ``scale`` (written to the cache on first use, verified on
        the first use in each process and rebuilt when damaged)."""
        if scale == self.scale:
            return self
        if self.scale != 1:
            raise ValueError("rescale a case from its own size (scale 1)")
        base = self
        tag = _scale_tag(scale)
        meta_path = self.folder / f"meta{tag}.json"
        meta, text, problem = _read_meta(meta_path)
        if meta is not None and meta.get("scale") != scale:
            meta = None  # another scale written with the same tag: rebuilt, never read
        if meta is not None:
            problem = _verify(self.folder, tag, meta, text, self.has_mask)
        if meta is None or problem:
            if problem:
                _warn(self.folder, self.stem, f"scale {scale:g}", problem, "the case at its own size")
            image = rescale(np.asarray(base.image()), scale, is_mask=False)
            hashes = {f"image{tag}.npy": _save_npy(self.folder / f"image{tag}.npy", image)}
            count = 0
            if self.has_mask:
                mask = rescale(np.asarray(base.mask()), scale, is_mask=True)
                hashes[f"mask{tag}.npy"] = _save_npy(self.folder / f"mask{tag}.npy", mask)
                count = foreground_count(mask)
                sample = _foreground_sample(mask, self.digests[1])
                hashes[f"foreground{tag}.npy"] = _save_npy(self.folder / f"foreground{tag}.npy", sample)
            meta = {
                "version": CACHE_VERSION,
                "segx": _segx_version(),
                "scale": scale,
                "shape": list(image.shape[:2]),
                "foreground_pixels": count,
                "hashes": hashes,
            }
            _written(self.folder, tag, _write_meta(meta_path, meta), self.has_mask)
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        return DecodedCase(
            self.stem, self.folder, shape, self.digests, self.has_mask, int(meta["foreground_pixels"]), scale
        )


def foreground_count(mask: np.ndarray) -> int:
    """Pixels of any structure: non-zero and not ignored (a binary mask's ones; a label map's
    foreground classes)."""
    mask = np.asarray(mask)
    return int(np.count_nonzero(mask)) - int(np.count_nonzero(mask == IGNORE_INDEX))


def sample_rows(mask: np.ndarray, count: int) -> int:
    """How many locations :func:`_foreground_sample` keeps of a mask with ``count`` foreground
    pixels: all of them up to FOREGROUND_SAMPLES; beyond, FOREGROUND_SAMPLES for one structure,
    and for several classes each present class's pixels up to its equal share."""
    if count <= FOREGROUND_SAMPLES:
        return count
    counts = np.bincount(np.asarray(mask).ravel(), minlength=256)[1:IGNORE_INDEX]
    present = counts[counts > 0]
    if len(present) <= 1:
        return FOREGROUND_SAMPLES
    quota = FOREGROUND_SAMPLES // len(present)
    return int(np.minimum(present, quota).sum())


def _foreground_sample(mask: np.ndarray, seed_hex: str) -> np.ndarray:
    """Foreground locations (K, 2), at most FOREGROUND_SAMPLES. With several classes, each class
    present gets an equal share of the samples (all of its pixels when it has fewer), so a rare
    class is still drawn by the patch sampler (nnU-Net samples the classes uniformly)."""
    mask = np.asarray(mask)
    where = np.argwhere((mask > 0) & (mask != IGNORE_INDEX)).astype(np.int32)
    if len(where) <= FOREGROUND_SAMPLES:
        return where
    rng = np.random.default_rng(int(seed_hex[:8] or "0", 16))
    classes = mask[where[:, 0], where[:, 1]]
    present = np.unique(classes)
    if len(present) == 1:  # one structure (binary): a uniform subset, as segx always drew
        return where[np.sort(rng.choice(len(where), FOREGROUND_SAMPLES, replace=False))]
    quota = FOREGROUND_SAMPLES // len(present)
    keep = []
    for c in present:
        rows = np.flatnonzero(classes == c)
        keep.append(rows if len(rows) <= quota else rng.choice(rows, quota, replace=False))
    return where[np.sort(np.concatenate(keep))]


def _read_meta(path: Path) -> tuple[dict | None, str, str | None]:
    """(meta, its text, None) for a current entry; (None, '', None) for a missing one or one
    written by another format or segx version (rebuilt quietly); (None, '', why) for a damaged
    one (rebuilt with a warning). Never raises."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return None, "", None  # never written, or a writer stopped before its last file
    except OSError as exc:
        return None, "", f"{path.name} cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, "", f"{path.name} is not text"
    try:
        meta = json.loads(text)
    except ValueError:
        return None, "", f"{path.name} is not JSON"
    if not isinstance(meta, dict):
        return None, "", f"{path.name} is not a JSON object"
    if meta.get("version") != CACHE_VERSION or meta.get("segx") != _segx_version() or "hashes" not in meta:
        return None, "", None  # another format or segx version (or no hashes yet): rebuilt, never read
    return meta, text, None


def _write_meta(path: Path, meta: dict) -> str:
    """Write ``meta`` atomically (the entry's last file); returns the text written."""
    text = json.dumps(meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        _make_room(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return text


def _signature(folder: Path, names: list[str]) -> tuple:
    """(name, inode, size, mtime) of each file; raises OSError, or ValueError for a non-file."""
    out = []
    for name in names:
        info = os.stat(folder / name)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{name} is not a file")
        out.append((name, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(out)


def _written(folder: Path, tag: str, text: str, has_mask: bool) -> None:
    """An entry this process just wrote needs no verifying in it."""
    try:
        _VERIFIED.add((str(folder), tag, text, _signature(folder, _array_names(tag, has_mask))))
    except (OSError, ValueError):
        pass  # verified on its next use


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verify(folder: Path, tag: str, meta: dict, text: str, has_mask: bool) -> str | None:
    """Why the entry cannot be read (its meta fields, array headers, content hashes, foreground
    count and sample checked), or None; once per entry per process (see the module docstring)."""
    names = _array_names(tag, has_mask)
    meta_name = f"meta{tag}.json"
    try:
        signature = _signature(folder, names)
    except ValueError as exc:
        return str(exc)
    except OSError as exc:
        return f"{Path(exc.filename or '').name or names[0]} cannot be read ({exc.strerror or exc})"
    key = (str(folder), tag, text, signature)
    if key in _VERIFIED:
        return None
    shape, count, hashes = meta.get("shape"), meta.get("foreground_pixels"), meta.get("hashes")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_count(v) and v > 0 for v in shape)):
        return f"{meta_name} records shape {shape!r}, not two positive integers"
    height, width = shape
    if not _count(count) or count > height * width or (count and not has_mask):
        return f"{meta_name} records foreground_pixels {count!r}, not a count of the mask's pixels"
    if not isinstance(hashes, dict):
        return f"{meta_name} records hashes {hashes!r}, not a mapping"
    for name in names:
        recorded = hashes.get(name)
        if not isinstance(recorded, str):
            return f"{meta_name} records no content hash for {name}"
        try:
            actual = _content_hash(folder / name)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if actual != recorded:
            return f"{name} differs from what was written (content hash {actual[:12]}, recorded {recorded[:12]})"
    try:
        arrays = [np.load(folder / name, mmap_mode="r") for name in names]
    except (OSError, ValueError) as exc:
        return f"{names[0]} and the rest cannot be loaded ({exc})"
    if arrays[0].dtype != np.uint8 or arrays[0].shape != (height, width, 3):
        return f"{names[0]} holds {arrays[0].dtype} {arrays[0].shape}, not uint8 {(height, width, 3)}"
    if has_mask:
        mask, sample = arrays[1], arrays[2]
        if mask.dtype != np.uint8 or mask.shape != (height, width):
            return f"{names[1]} holds {mask.dtype} {mask.shape}, not uint8 {(height, width)}"
        if foreground_count(mask) != count:
            return f"{names[1]} has {foreground_count(mask)} foreground pixels, {meta_name} records {count}"
        rows = sample_rows(mask, count)
        if sample.dtype != np.int32 or sample.shape != (rows, 2):
            return f"{names[2]} holds {sample.dtype} {sample.shape}, not int32 {(rows, 2)}"
        if len(sample) and (sample.min() < 0 or sample[:, 0].max() >= height or sample[:, 1].max() >= width):
            return f"{names[2]} holds locations outside the {width}x{height} mask"
    _VERIFIED.add(key)
    return None


def _warn(folder: Path, stem: str, what: str, problem: str, source: str) -> None:
    print(
        f"segx: warning: decoded cache entry {shown(folder)} (case '{stem}', {what}) is damaged: "
        f"{problem}; rebuilding it from {source}",
        file=sys.stderr,
        flush=True,
    )


def rule_of(mask_threshold) -> str | float:
    """How masks are read, as the cache records it: the binary threshold (a number, as before)
    or the classes' key (:attr:`segx.data.labels.Labels.key`)."""
    return mask_threshold.key if isinstance(mask_threshold, Labels) else float(mask_threshold)


def entry_key(image_digest: str, mask_digest: str, mask_threshold) -> str:
    rule = rule_of(mask_threshold)
    tail = rule if isinstance(rule, str) else f"t{rule:g}"
    return f"{image_digest}-{mask_digest or 'nomask'}-{tail}"


def decode_case(case: Case, root: Path, mask_threshold, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedCase:
    """The cache entry of ``case``, decoding its files if the entry is missing, stale or damaged."""
    image_digest = _file_digest(case.image)
    mask_digest = _file_digest(case.mask) if case.mask is not None else ""
    has_mask = case.mask is not None
    folder = root / f"v{CACHE_VERSION}" / entry_key(image_digest, mask_digest, mask_threshold)
    meta, text, problem = _read_meta(folder / "meta.json")
    expected = {"image_digest": image_digest, "mask_digest": mask_digest, "mask_threshold": rule_of(mask_threshold)}
    if meta is not None:
        if not all(meta.get(k) == v for k, v in expected.items()):
            problem = "meta.json records other source files"
        else:
            problem = _verify(folder, "", meta, text, has_mask)
    if meta is not None and problem is None:
        height, width = meta["shape"]
        if height * width > max_pixels:
            raise SegxError(
                f"{shown(case.image)}: header declares {width}x{height} pixels, over the limit of "
                f"{max_pixels}; downscale the file or raise data.max_pixels"
            )
        return DecodedCase(
            case.stem,
            folder,
            (int(height), int(width)),
            (image_digest, mask_digest),
            has_mask,
            int(meta["foreground_pixels"]),
        )
    image_hash, mask_hash = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    image, mask = read_case(case, mask_threshold, max_pixels, image_hash, mask_hash)
    if image_hash.hexdigest() != image_digest or (mask is not None and mask_hash.hexdigest() != mask_digest):
        raise SegxError(
            f"{shown(case.image)}: the file changed while segx read it; rerun when nothing writes to the data"
        )
    if problem:
        _warn(
            folder,
            case.stem,
            "at its own size",
            problem,
            shown(case.image) + (f" and {shown(case.mask)}" if has_mask else ""),
        )
    if os.path.lexists(folder) and not folder.is_dir():
        folder.unlink()  # a file where the entry's folder belongs
    folder.mkdir(parents=True, exist_ok=True)
    _make_room(folder / "meta.json")
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten below
    for scaled_meta in folder.glob("meta-x*.json"):  # rescaled copies of the old contents
        _make_room(scaled_meta)
        scaled_meta.unlink(missing_ok=True)
    hashes = {"image.npy": _save_npy(folder / "image.npy", image)}
    count = 0
    if mask is not None:
        hashes["mask.npy"] = _save_npy(folder / "mask.npy", mask)
        hashes["foreground.npy"] = _save_npy(folder / "foreground.npy", _foreground_sample(mask, mask_digest))
        count = foreground_count(mask)
    meta = {
        **expected,
        "version": CACHE_VERSION,
        "segx": _segx_version(),
        "shape": list(image.shape[:2]),
        "foreground_pixels": count,
        "source": shown(case.image),
        "hashes": hashes,
    }
    _written(folder, "", _write_meta(folder / "meta.json", meta), has_mask)
    return DecodedCase(case.stem, folder, image.shape[:2], (image_digest, mask_digest), mask is not None, count)


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def remove_orphans(root: str | os.PathLike) -> int:
    """Remove the temporary files (``.<name>.tmp-<pid>``) in the cache's entries whose writer no
    longer runs (killed mid-write); returns how many. Never raises."""
    removed, alive = 0, {}
    try:
        entries = [e for e in os.scandir(Path(root) / f"v{CACHE_VERSION}") if e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for entry in entries:
        try:
            names = [e.name for e in os.scandir(entry.path) if e.name.startswith(".")]
        except OSError:
            continue
        for name in names:
            match = _TEMPORARY.fullmatch(name)
            if not match:
                continue
            pid = int(match.group(1))
            if pid not in alive:
                alive[pid] = _running(pid)
            if not alive[pid]:
                try:
                    os.unlink(os.path.join(entry.path, name))
                    removed += 1
                except OSError:
                    pass
    return removed


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def decode_cases(
    cases: Sequence[Case],
    root: str | os.PathLike,
    mask_threshold=0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable | None = None,
) -> list[DecodedCase]:
    """Cache entries for ``cases`` (decoded now where missing or damaged). Raises on the first
    bad file. ``mask_threshold``: a number (binary masks) or :class:`segx.data.labels.Labels`."""
    if not cases:
        raise SegxError("the dataset is empty; add image/mask pairs")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SegxError(f"data.cache_dir={root} is a file, not a folder; remove it or set data.cache_dir=<a folder>")
    remove_orphans(root)
    iterator = progress(cases) if progress else cases
    try:
        return [decode_case(case, root, mask_threshold, max_pixels) for case in iterator]
    except OSError as exc:  # the cache's own writes: a full disk, a read-only folder (inputs are checked by name)
        ours = str(exc.filename).startswith(str(root)) if exc.filename else exc.errno in _WRITE_ERRNOS
        if not ours:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        raise SegxError(
            f"data.cache_dir={root}: cannot write the decoded cache ({exc.strerror or exc}{where}); "
            "free space or fix its permissions, or set data.cache_dir=<a writable folder>"
        ) from None
