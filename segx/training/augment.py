"""Augmentation pipelines, saved with each run and applied per sample, reproducibly. Built from
YAML by :func:`segx.objects.build_augmentation` (the config layer)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import albumentations as A
import numpy as np


def save_augmentation(pipeline: A.Compose, path: str | os.PathLike) -> Path:
    """Serialise with ``A.save`` (JSON) so a run can be rebuilt without ``conf/``."""
    path = Path(path)
    A.save(pipeline, str(path), data_format="json")
    return path


def load_augmentation(path: str | os.PathLike) -> A.Compose:
    return A.load(str(path), data_format="json")


class SeededAugmenter:
    """Applies a pipeline with a per-sample seed, safely from many threads.

    tf.data calls the augmenter from parallel threads; a shared pipeline's random state would
    make results depend on thread timing. Each thread gets its own copy, reseeded per sample
    from (run seed, epoch, case), so a run is reproducible and resumable mid-training.
    """

    def __init__(self, pipeline: A.Compose, swap: np.ndarray | None = None):
        self._spec = A.to_dict(pipeline)
        self._local = threading.local()
        self.is_identity = len(pipeline.transforms) == 0
        # data.flip_swap: a 256-entry table of class indices (identity but for the swapped pairs),
        # applied to the label map whenever the sample's transforms mirror it (see _mirrored).
        self.swap = None if swap is None else np.asarray(swap, np.uint8)

    def _pipeline(self) -> A.Compose:
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            pipeline = self._local.pipeline = A.from_dict(self._spec)
        return pipeline

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self.is_identity:
            return image, mask
        pipeline = self._pipeline()
        pipeline.set_random_seed(int(seed))
        if self.swap is None:
            out = pipeline(image=image, mask=mask)
            return out["image"], out["mask"]
        rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]].astype(np.uint16)
        out = pipeline(image=image, mask=mask, masks=[cols, rows])
        mask = out["mask"]
        if mirrored(*out["masks"]):
            mask = self.swap[mask]
        return out["image"], mask


def mirrored(cols: np.ndarray, rows: np.ndarray) -> bool:
    """Whether a transform flipped the image horizontally, read off where each output pixel came
    from (``cols``, ``rows``: the source column and row, moved as masks are): the output's left
    comes from the source's right when the source column falls, on average, from left to right.
    Any composition counts (HorizontalFlip, a flip inside D4, an affine with a horizontal
    reflection); a vertical flip or a rotation keeps left and right, and swaps nothing."""
    return float(np.diff(cols.astype(np.float64), axis=1).mean()) < 0
