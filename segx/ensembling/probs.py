"""Cached member probabilities and the one way segx combines them (numpy only).

A member's probabilities are stored at each case's own size (p * 255, rounded, uint8), as one
flat array plus the case shapes (:class:`segx.data.ragged.Ragged`), in an ``.npz`` with
``stems`` and bit-packed ground-truth ``masks`` at the same sizes. Ensemble weights are whole counts over a
denominator (:class:`Weights`), so the combined score ``sum_m k_m p_m`` is an exact integer and
a pixel is foreground iff ``score >= ceil(t * 255 * D)`` (:func:`cut`). The weight search
scores every candidate with this arithmetic and prediction uses :func:`combine` and
:func:`binarize`, so a rebuilt ensemble reproduces the searched masks bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from segx.data.ragged import Ragged
from segx.errors import SegxError

# Version 2: ragged probabilities at each case's own size. Version 1 held (N, S, S) maps at the
# network's input size, scored against resized masks; members that wrote it must be retrained.
CACHE_FORMAT = 2
# Version 3: several classes: (pixels, K) probabilities, label maps as the truth, class names.
CLASSES_FORMAT = 3


def quantize(probs: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint8 in [0, 255]."""
    return np.clip(np.rint(np.asarray(probs, np.float32) * 255.0), 0, 255).astype(np.uint8)


# Scores are int32 sums ``sum_m k_m p_m <= 255 * D``; this keeps them far from overflow.
MAX_DENOMINATOR = 1_000_000
# Float weights that are not short decimals (1/3 written as 0.3333333333333333, the greedy
# bag 2/7 written as a float) are read as the nearest fraction with at most this denominator
# when that fraction is the float's value to rounding error.
_SMALL_DENOMINATOR = 1000


def _decimal(value: float) -> Fraction:
    """The number as written: ``repr`` of the float, so 0.4 is 2/5 and not 0.400000000000000022."""
    return Fraction(repr(float(value)))


def _lcm(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


@dataclass(frozen=True)
class Weights:
    """Ensemble weights as whole counts over one denominator: ``w_m = counts[m] / denominator``.

    Every weighting segx searches is a fraction (a grid point k/D, a greedy bag of D picks,
    equal weights 1/M, Nelder-Mead rounded to thousandths), so scores are exact integers and
    search and prediction cannot disagree on a pixel whose score sits on the threshold.
    """

    counts: tuple[int, ...]
    denominator: int

    def __post_init__(self) -> None:
        counts = tuple(int(k) for k in self.counts)
        if not counts or any(k < 0 for k in counts) or any(int(k) != k for k in self.counts):
            raise ValueError(f"weight counts must be non-negative integers, got {self.counts}")
        if not 1 <= self.denominator <= MAX_DENOMINATOR or sum(counts) != self.denominator:
            raise ValueError(
                f"weight counts {counts} must sum to the denominator {self.denominator} (1..{MAX_DENOMINATOR})"
            )
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "denominator", int(self.denominator))

    @property
    def floats(self) -> list[float]:
        """The weights as floats, for display and plots (never for scoring)."""
        return [k / self.denominator for k in self.counts]

    # A sequence of float weights for display (``len``, indexing, iteration, ``np.asarray``);
    # scoring reads ``counts`` and ``denominator``.
    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i):
        return self.floats[i]

    def __iter__(self):
        return iter(self.floats)

    @classmethod
    def of(cls, weights: Weights | Sequence[float]) -> Weights:
        """``weights`` as is, or floats read by :meth:`from_floats`."""
        return weights if isinstance(weights, Weights) else cls.from_floats(weights)

    @classmethod
    def rounded(cls, weights: Sequence[float], denominator: int) -> Weights:
        """Non-negative float weights rounded to counts over ``denominator`` that sum to it
        exactly (largest remainder: floor each share, then give the leftover units to the
        largest fractional parts, ties to the lower index)."""
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
        share = w / w.sum() * denominator
        counts = np.floor(share).astype(np.int64)
        left = denominator - int(counts.sum())
        order = sorted(range(len(w)), key=lambda i: (-(share[i] - counts[i]), i))
        for i in order[:left]:
            counts[i] += 1
        return cls(tuple(int(k) for k in counts), denominator)

    @classmethod
    def from_floats(cls, weights: Sequence[float]) -> Weights:
        """Float weights (a hand-written or version-1 record, a caller's list) as counts.

        1. Each weight as the decimal it prints as (0.3 is 3/10); used when they sum to 1.
        2. Else the nearest fractions with denominators up to 1000, when each equals its float
           to rounding error and they sum to 1 (1/3, 2/7 written as floats).
        3. Else rounded to millionths (largest remainder), after dividing by their sum.
        Every weighting segx itself writes is read back exactly by step 1 or 2.
        """
        values = [float(w) for w in weights]
        if not values or any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {values}")
        for fractions in (
            [_decimal(w) for w in values],
            [Fraction(w).limit_denominator(_SMALL_DENOMINATOR) for w in values],
        ):
            close = all(abs(f - Fraction(w)) <= 1e-12 * max(1.0, w) for f, w in zip(fractions, values, strict=True))
            if close and sum(fractions) == 1:
                denominator = _lcm(f.denominator for f in fractions)
                if denominator <= MAX_DENOMINATOR:
                    return cls(tuple(int(f * denominator) for f in fractions), denominator)
        return cls.rounded(values, MAX_DENOMINATOR)


def cut(threshold: float, denominator: int) -> int:
    """Smallest integer score that is foreground: ``ceil(t * 255 * D)``, with ``t`` read as the
    decimal it prints as (0.4 means 2/5), so ``score >= cut`` is exactly ``score / D >= 255 t``."""
    t = _decimal(threshold)
    if not 0 <= t <= 1:
        raise ValueError(f"threshold {threshold} must be in [0, 1]")
    return math.ceil(t * 255 * denominator)


@dataclass
class Score:
    """Ensemble score: ``values`` int32 = sum_m k_m p_m over uint8 member probabilities, on the
    0..255 * ``denominator`` scale (exact integers); an array, or ragged cases."""

    values: np.ndarray | Ragged
    denominator: int

    def probability(self):
        """The weighted mean probability in [0, 1], float32 (for maps; masks use :func:`binarize`)."""
        if isinstance(self.values, Ragged):
            return self.values.like((self.values.flat / (255.0 * self.denominator)).astype(np.float32))
        return (self.values / (255.0 * self.denominator)).astype(np.float32)


def combine(member_probs: Sequence[np.ndarray], weights: Weights | Sequence[float]) -> Score:
    """Weighted sum of uint8 probability maps in exact integer arithmetic.

    ``weights``: :class:`Weights`, or floats read by :meth:`Weights.from_floats`. The search
    scores every candidate with this same arithmetic (:mod:`segx.ensembling.search`).
    """
    weights = Weights.of(weights)
    if len(member_probs) != len(weights):
        raise ValueError("one weight per member")
    ragged = isinstance(member_probs[0], Ragged)
    if ragged and any(not isinstance(p, Ragged) or not p.same_shapes(member_probs[0]) for p in member_probs):
        raise ValueError("members' ragged probabilities differ in case sizes")
    flats = [p.flat if ragged else np.asarray(p) for p in member_probs]
    values = np.zeros(np.shape(flats[0]), np.int32)
    for probs, count in zip(flats, weights.counts, strict=True):
        probs = np.asarray(probs)
        if probs.dtype != np.uint8:
            raise ValueError(f"member probabilities must be uint8 (quantize them), got {probs.dtype}")
        if count:
            values += np.int32(count) * probs.astype(np.int32)
    return Score(member_probs[0].like(values) if ragged else values, weights.denominator)


def binarize(score: Score, threshold: float):
    """Foreground where the weighted mean probability is at least ``threshold``, exactly."""
    if isinstance(score.values, Ragged):
        return score.values.like(score.values.flat >= cut(threshold, score.denominator))
    return score.values >= cut(threshold, score.denominator)


def fold_mean(fold_probs: Sequence[Ragged]) -> Ragged:
    """A cross-validated member's probability: the mean of its K fold models' uint8
    probabilities, rounded half up in integers (``(sum + K // 2) // K``), so the cached test maps
    and the predictor's maps are the same integers."""
    k = len(fold_probs)
    total = np.zeros(fold_probs[0].flat.shape, np.int32)
    for probs in fold_probs:
        if not probs.same_shapes(fold_probs[0]):
            raise ValueError("fold models' probabilities differ in case sizes")
        total += probs.flat
    return fold_probs[0].like(((total + k // 2) // k).astype(np.uint8))


def cache_artifact(role: str, tta: str = "none") -> str:
    """Artifact path of a member's cached ``role`` ('val' or 'test') probabilities under ``tta``:
    ``predictions/val.npz`` (no TTA), ``predictions/val_tta-flip.npz`` (flip TTA), ..."""
    return f"predictions/{role}.npz" if tta == "none" else f"predictions/{role}_tta-{tta}.npz"


def save_cached(
    path: str | os.PathLike,
    stems: Sequence[str],
    probs,
    masks,
    previews=None,
    classes: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
) -> Path:
    """Write ``stems``, uint8 ``probs`` and the ground truth (both ragged cases at each case's own
    size, or (N, H, W) arrays) and optionally the first few input images (uint8 (H, W, 3) each,
    for figures) to ``path``.

    One structure (``classes`` None): probabilities (H, W) and binary masks, bit-packed (format 2,
    as segx always wrote). Several classes: ``classes`` names them, probabilities are (H, W, K)
    and the truth is label maps of class indices (format 3); overlapping regions (``regions``
    names them): probabilities are (H, W, R), one per region, and the truth is the label maps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probs, masks = Ragged.of(probs), Ragged.of(masks)
    if not probs.same_shapes(masks) or len(probs) != len(stems):
        raise ValueError("one probability map and one mask per stem, of equal sizes")
    previews = Ragged.from_list(list(previews), np.uint8) if previews is not None and len(previews) else None
    common = dict(
        stems=np.asarray(list(stems), dtype=str),
        shapes=probs.shapes,
        probs=np.asarray(probs.flat, np.uint8),
        preview_shapes=np.zeros((0, 2), np.int64) if previews is None else previews.shapes,
        previews=np.zeros((0, 3), np.uint8) if previews is None else previews.flat,
    )
    if classes is None:
        np.savez_compressed(
            path, format=np.int64(CACHE_FORMAT), masks=np.packbits(np.asarray(masks.flat, bool)), **common
        )
    else:
        channels = _channels(classes, regions)
        if probs.flat.ndim != 2 or probs.flat.shape[1] != channels:
            raise ValueError(f"probabilities hold {probs.flat.shape[1:]} channels, {channels} are named")
        np.savez_compressed(
            path,
            format=np.int64(CLASSES_FORMAT),
            classes=np.asarray(list(classes), dtype=str),
            regions=np.asarray(list(regions or []), dtype=str),
            masks=np.asarray(masks.flat, np.uint8),
            **common,
        )
    return path


def _channels(classes: Sequence[str], regions: Sequence[str] | None) -> int:
    """Format 3's probability channels: one per region where the cache names regions, else one per class."""
    return len(regions) if regions else len(classes)


@dataclass
class Cached:
    """stems: (N,); probs: uint8 ragged cases, memory-mapped; masks: bool ragged cases of the
    same sizes; previews: uint8 (H, W, 3) ragged images of the first k cases (k may be 0)."""

    stems: list[str]
    probs: Ragged
    masks: Ragged
    previews: Ragged
    classes: tuple[str, ...] | None = None  # several classes: their names (masks are label maps)
    regions: tuple[str, ...] | None = None  # overlapping regions: their names (probs: one per region)


def content_key(path: str | os.PathLike) -> str:
    """``<size>-<sha256>`` of a file: what its extracted probabilities are keyed by (one pass)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return f"{size}-{digest.hexdigest()}"


def _extract(archive: zipfile.ZipFile, out: Path) -> None:
    """Stream ``probs.npy`` out of the zip to ``out`` (atomically: a temporary file, then a rename).

    Reading the entry to its end checks its CRC-32, so a changed byte is noticed here."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with archive.open("probs.npy") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _drop_stale(target: Path, stem: str, keep: Path) -> None:
    """Remove probabilities extracted from earlier contents of the same artifact (best effort)."""
    for old in [target / f"{stem}.probs.npy", *target.glob(f"{stem}.*.probs.npy")]:
        if old != keep:
            try:
                old.unlink(missing_ok=True)
            except OSError:
                pass


def _mapped(out: Path, shape: tuple[int, ...]):
    """The extracted probabilities memory-mapped, or None when the file is missing or not them."""
    try:
        probs = np.load(out, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    return probs if probs.dtype == np.uint8 and probs.shape == shape else None


def load_cached(
    path: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    *,
    run_id: str | None = None,
    artifact: str | None = None,
) -> Cached:
    """Read a cache written by :func:`save_cached`; ``probs`` is memory-mapped from disk.

    The array is streamed out of the zip into ``workdir`` (beside the file by default) so a
    large validation set is never held in memory at once. The extracted file is keyed by the
    ``.npz``'s content (its size and SHA-256, in the file name: ``val.<size>-<sha256>.probs.npy``),
    so probabilities extracted from an earlier, changed or re-logged artifact are never reused;
    they are extracted again and the stale file is removed. Cost: one SHA-256 pass over each
    ``.npz`` every time it is loaded (per member and role, once per ensemble build), about the
    time to read the file once more.

    A corrupt or unreadable cache (not a zip, a changed byte in a compressed stream, missing or
    inconsistent arrays) is one :class:`SegxError` line naming ``run_id``'s ``artifact`` (when
    given) and the file, and what to do.
    """
    path = Path(path)
    what = f"member run {run_id}: artifact {artifact or path.name} ({path})" if run_id else str(path)
    advice = "retrain the member or re-log its predictions" if run_id else "retrain the member"
    try:
        key = content_key(path)
        with np.load(path) as data:
            version = int(data["format"]) if "format" in data.files else 1
            if version not in (CACHE_FORMAT, CLASSES_FORMAT):
                raise SegxError(
                    f"{what}: probability cache of format {version} (segx 0.2 and later score each image at "
                    "its own size and writes format 2); retrain this member with the current segx"
                )
            stems = [str(s) for s in data["stems"]]
            shapes = data["shapes"].astype(np.int64)
            if shapes.ndim != 2 or shapes.shape[1] != 2 or len(stems) != len(shapes) or (shapes < 0).any():
                raise ValueError("stems and shapes disagree")
            n_pixels = int((shapes[:, 0] * shapes[:, 1]).sum())
            packed = data["masks"]
            classes = regions = None
            if version == CLASSES_FORMAT:
                classes = tuple(str(c) for c in data["classes"])
                regions = tuple(str(r) for r in data["regions"]) if "regions" in data.files else ()
                regions = regions or None
                if packed.dtype != np.uint8 or packed.shape != (n_pixels,) or len(classes) < 2:
                    raise ValueError("label maps do not match the shapes")
                masks = packed
                probs_shape: tuple[int, ...] = (n_pixels, _channels(classes, regions))
            else:
                if packed.dtype != np.uint8 or packed.shape != ((n_pixels + 7) // 8,):
                    raise ValueError("masks do not match the shapes")
                masks = np.unpackbits(packed, count=n_pixels).astype(bool)
                probs_shape = (n_pixels,)
            previews = Ragged(data["previews"], data["preview_shapes"])
        target = Path(workdir or path.parent)
        target.mkdir(parents=True, exist_ok=True)
        out = target / f"{path.stem}.{key}.probs.npy"
        probs = _mapped(out, probs_shape)
        if probs is None:
            with zipfile.ZipFile(path) as archive:
                _extract(archive, out)
            probs = _mapped(out, probs_shape)
            if probs is None:
                raise ValueError("probs do not match the shapes")
        _drop_stale(target, path.stem, out)
        return Cached(stems, Ragged(probs, shapes), Ragged(masks, shapes), previews, classes, regions)
    except SegxError:
        raise
    except (OSError, EOFError, KeyError, IndexError, TypeError, ValueError, zlib.error, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else ""
        kind = "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__
        raise SegxError(
            f"{what} is corrupt or not a segx probability cache ({kind}"
            + (f": {reason}" if reason else "")
            + f"); {advice}"
        ) from None


# -- several classes -------------------------------------------------------------------------
# A multi-class member caches K uint8 probabilities per pixel: a ragged array whose flat part
# is (pixels, K). The ensemble's class scores are the same exact integer sums as the binary
# case's, one per class, and the label is the class of the highest score. Ties go to the lowest
# class index (numpy's argmax keeps the first maximum), in the search and in prediction alike.


def combine_classes(member_probs: Sequence, weights: Weights | Sequence[float]) -> Score:
    """Weighted class scores ``sum_m k_m p_m[..., c]``: int32 (..., K), exact (see :func:`combine`)."""
    return combine(member_probs, weights)


def argmax_labels(score: Score):
    """Class indices ``uint8`` of the highest class score per pixel; ties to the lowest index."""
    if isinstance(score.values, Ragged):
        return score.values.like(np.argmax(score.values.flat, axis=-1).astype(np.uint8))
    return np.argmax(score.values, axis=-1).astype(np.uint8)


def member_labels(probs):
    """One member's label map (uint8) from its uint8 class probabilities, by the same tie rule."""
    if isinstance(probs, Ragged):
        return probs.like(np.argmax(probs.flat, axis=-1).astype(np.uint8))
    return np.argmax(probs, axis=-1).astype(np.uint8)
