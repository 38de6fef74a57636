"""How a member sees an image, and the one loop that turns a whole image of any size into a
probability map at that image's own size (numpy + OpenCV; the network is a callable).

- ``resize``: the image is resized (or zero-padded to a square, then resized: ``resize_mode=pad``)
  to ``size`` x ``size``, predicted in batches, and the map is resized back to the image's size.
- ``patch``: the image is rescaled by ``scale`` (1: its own resolution) and predicted with a
  sliding window of ``size`` px, Gaussian-weighted, with ``overlap``; the map is resized back
  when ``scale`` is not 1.

Member caching (validation and test), the ensemble's test report, ``segx.predict`` and the
pyfunc model all call :func:`predict_cases`, so every path computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from segx.data.folder import from_model_size, rescale, to_model_size
from segx.data.view import MODES, View  # noqa: F401 - the view's home is the data stage
from segx.inference.window import sliding_window

# Windows (patch mode) or resized images (resize mode) per forward call.
BATCH = 8

PredictBatch = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]


def predict_cases(images: Iterable[np.ndarray], view: View, predict: PredictBatch) -> Iterator[dict[str, np.ndarray]]:
    """For each uint8 image (H, W, 3) (or (H, W)): ``{mode: float32 (H, W)}`` probabilities at
    the image's own size. ``predict`` maps uint8 (B, size, size, 3) to ``{mode: float32 (B, size, size)}``
    (one entry per TTA mode). Images are read from ``images`` lazily; resize mode batches up to
    :data:`BATCH` of them, patch mode predicts one image at a time (its windows in batches)."""
    if view.mode == "patch":
        for image in images:
            image = _rgb(image)
            height, width = image.shape[:2]
            scaled = rescale(image, view.scale, is_mask=False) if view.scale != 1 else image
            maps = sliding_window(scaled, view.size, predict, view.overlap, BATCH)
            if scaled.shape[:2] != (height, width):
                maps = {k: from_model_size(v, (height, width), "resize") for k, v in maps.items()}
            yield maps
        return
    pending: list[np.ndarray] = []
    for image in images:
        pending.append(_rgb(image))
        if len(pending) == BATCH:
            yield from _resized_batch(pending, view, predict)
            pending = []
    if pending:
        yield from _resized_batch(pending, view, predict)


def _resized_batch(images: Sequence[np.ndarray], view: View, predict: PredictBatch) -> Iterator[dict[str, np.ndarray]]:
    batch = np.stack([to_model_size(im, view.size, view.resize_mode, is_mask=False) for im in images])
    maps = predict(batch)
    for i, image in enumerate(images):
        yield {
            k: from_model_size(np.ascontiguousarray(v[i]), image.shape[:2], view.resize_mode) for k, v in maps.items()
        }
