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

    def __init__(self, pipeline: A.Compose):
        self._spec = A.to_dict(pipeline)
        self._local = threading.local()
        self.is_identity = len(pipeline.transforms) == 0

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
        out = pipeline(image=image, mask=mask)
        return out["image"], out["mask"]
