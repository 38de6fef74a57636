"""Cached member probabilities and the one way segx combines them (numpy only).

A member's probabilities are stored as ``uint8 (N, S, S)`` (p * 255, rounded) in an ``.npz``
with ``stems`` and bit-packed ground-truth ``masks``. The weight search and prediction both
combine members with :func:`combine` on these quantised values, so a rebuilt ensemble
reproduces the searched one bit for bit.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segx.errors import SegxError


def quantize(probs: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint8 in [0, 255]."""
    return np.clip(np.rint(np.asarray(probs, np.float32) * 255.0), 0, 255).astype(np.uint8)


def combine(member_probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted average of uint8 probability maps -> float32 score on the 0..255 scale.

    Accumulates in member order in float32; callers threshold with ``score >= t * 255``.
    """
    if len(member_probs) != len(weights):
        raise ValueError("one weight per member")
    score = np.zeros(np.shape(member_probs[0]), np.float32)
    for probs, weight in zip(member_probs, weights, strict=True):
        if weight:
            score += np.float32(weight) * np.asarray(probs, np.float32)
    return score


def threshold_value(threshold: float) -> np.float32:
    return np.float32(threshold * 255.0)


def binarize(score: np.ndarray, threshold: float) -> np.ndarray:
    return score >= threshold_value(threshold)


def save_cached(
    path: str | os.PathLike,
    stems: Sequence[str],
    probs: np.ndarray,
    masks: np.ndarray,
    previews: np.ndarray | None = None,
) -> Path:
    """Write ``stems``, uint8 ``probs`` (N, S, S), binary ``masks`` (N, S, S) and optionally
    the first few input images (uint8 (k, S, S, 3), for figures) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    masks = np.asarray(masks, bool)
    np.savez_compressed(
        path,
        stems=np.asarray(list(stems), dtype=str),
        probs=np.asarray(probs, np.uint8),
        masks=np.packbits(masks, axis=-1),
        mask_width=np.int64(masks.shape[-1]),
        previews=np.zeros((0, *masks.shape[1:], 3), np.uint8) if previews is None else previews,
    )
    return path


@dataclass
class Cached:
    """stems: (N,); probs: uint8 (N, S, S), memory-mapped; masks: bool (N, S, S);
    previews: uint8 (k, S, S, 3) images of the first k cases (k may be 0)."""

    stems: list[str]
    probs: np.ndarray
    masks: np.ndarray
    previews: np.ndarray


def load_cached(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> Cached:
    """Read a cache written by :func:`save_cached`; ``probs`` is memory-mapped from disk.

    The array is streamed out of the zip into ``workdir`` (beside the file by default) so a
    large validation set is never held in memory at once.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            target = Path(workdir or path.parent)
            target.mkdir(parents=True, exist_ok=True)
            out = target / f"{path.stem}.probs.npy"
            if not out.exists():
                tmp = out.with_suffix(f".tmp{os.getpid()}")
                with archive.open("probs.npy") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                os.replace(tmp, out)
        with np.load(path) as data:
            stems = [str(s) for s in data["stems"]]
            width = int(data["mask_width"])
            masks = np.unpackbits(data["masks"], axis=-1, count=width).astype(bool)
            previews = data["previews"] if "previews" in data.files else np.zeros((0,), np.uint8)
        probs = np.load(out, mmap_mode="r")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise SegxError(f"{path}: not a valid segx probability cache ({type(exc).__name__}); retrain the member") from None
    if probs.dtype != np.uint8 or probs.shape != masks.shape or len(stems) != len(probs):
        raise SegxError(f"{path}: probability cache has inconsistent shapes; retrain the member")
    return Cached(stems, probs, masks, previews)
