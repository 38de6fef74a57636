"""Sliding-window inference: predict an image of any size with a network of fixed window size.

The image is covered by square windows of ``window`` px that overlap by ``overlap``; the first
and last window on each axis touch the borders, as in nnU-Net. Each window's prediction is
weighted by a Gaussian importance map (centre pixels are more reliable than window edges) and
the overlapping predictions are averaged by their summed weights, as MONAI's
``sliding_window_inference(mode="gaussian")`` does.

numpy only: the caller passes ``predict``, which runs the network on one batch of windows.
Memory is bounded by the (padded) image, one numerator map per mode, one shared weight map and
a single batch of windows; the windows are never all held at once.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterator

import numpy as np

# Lower bound of the importance map. Far from the centre the Gaussian underflows (exactly 0 in
# float32 for small sigma_scale), which would leave pixels covered only by window corners with
# a weight sum of 0. Flooring also keeps ``weight * probability`` clear of float32 denormals,
# where precision is lost. With the default sigma_scale only the outermost corner band of the
# map (values ~1e-7) is raised; their influence where windows overlap stays negligible.
MIN_IMPORTANCE = 1e-6


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _overlap(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"overlap must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"overlap must be a number in [0, 1), got {value!r}")
    return value


def window_step(window: int, overlap: float) -> int:
    """Largest distance between consecutive window starts: floor(window * (1 - overlap)), >= 1."""
    window = _positive_int(window, "window")
    overlap = _overlap(overlap)
    return max(1, math.floor(window * (1.0 - overlap)))


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis of ``length`` px.

    ``length <= window``: ``[0]`` (the caller pads the axis up to ``window``). Otherwise, as in
    nnU-Net, with ``step = max(1, floor(window * (1 - overlap)))`` there are
    ``n = ceil((length - window) / step) + 1`` windows whose starts are spread evenly from 0 to
    ``length - window`` inclusive and rounded to integers: the first window touches the
    top/left border, the last the bottom/right border, consecutive starts are at least 1 and at
    most ``step`` apart, so every pixel is covered and the actual overlap is >= ``overlap``.
    """
    length = _positive_int(length, "length")
    step = window_step(window, overlap)
    if length <= window:
        return [0]
    span = length - window
    n = math.ceil(span / step) + 1
    # n - 1 >= span / step, so the exact spacing span / (n - 1) is <= step; rounding is monotone,
    # so rounded gaps stay <= step. n - 1 <= span (step >= 1), so spacing >= 1: no duplicates.
    spacing = span / (n - 1)
    return [int(np.round(spacing * i)) for i in range(n)]


def count_windows(height: int, width: int, window: int, overlap: float) -> int:
    """How many windows ``sliding_window`` runs the network on for a ``height`` x ``width`` image."""
    return len(window_starts(height, window, overlap)) * len(window_starts(width, window, overlap))


def gaussian_importance(window: int, sigma_scale: float = 0.125) -> np.ndarray:
    """float32 ``(window, window)`` weight map for blending overlapping window predictions.

    ``w[i, j] = g(i) * g(j) / max(g)**2`` with ``g(x) = exp(-(x - c)**2 / (2 * sigma**2))``,
    ``c = (window - 1) / 2`` (the window centre) and ``sigma = sigma_scale * window``: the
    separable Gaussian normalised so its largest value is exactly 1 (at the centre pixel for odd
    ``window``, at the 4 central pixels for even ``window``). It is not normalised to sum 1:
    ``sliding_window`` divides by the summed weights, so only relative weights matter. Finally
    every value is raised to at least ``MIN_IMPORTANCE`` (1e-6) so that no pixel has weight 0
    (nnU-Net likewise replaces zeros by a small positive value).
    """
    window = _positive_int(window, "window")
    sigma_scale = float(sigma_scale)
    if not sigma_scale > 0 or not math.isfinite(sigma_scale):
        raise ValueError(f"sigma_scale must be a positive number, got {sigma_scale!r}")
    sigma = sigma_scale * window
    x = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    g /= g.max()
    importance = np.outer(g, g)
    return np.maximum(importance, MIN_IMPORTANCE).astype(np.float32)


def _check_importance(importance, window: int) -> np.ndarray:
    importance = np.asarray(importance, dtype=np.float32)
    if importance.shape != (window, window):
        raise ValueError(f"importance must have shape ({window}, {window}) to match window, got {importance.shape}")
    if not np.all(np.isfinite(importance)) or not np.all(importance > 0):
        raise ValueError("importance must be finite and > 0 everywhere (no pixel may weigh 0)")
    return importance


def _batches(
    image: np.ndarray, window: int, ys: list[int], xs: list[int], batch_size: int
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """Yield (positions, windows) in row-major order; windows is a fresh (B, w, w, C) array."""
    positions = itertools.product(ys, xs)
    while True:
        chunk = list(itertools.islice(positions, batch_size))
        if not chunk:
            return
        # A fresh array per batch (not a reused buffer): predict may keep a reference to it.
        yield chunk, np.stack([image[y : y + window, x : x + window] for y, x in chunk])


def sliding_window(
    image: np.ndarray,
    window: int,
    predict: Callable[[np.ndarray], dict[str, np.ndarray]],
    overlap: float = 0.5,
    batch_size: int = 8,
    importance: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Predict every pixel of ``image`` by Gaussian-weighted blending of overlapping windows.

    image: (H, W, C), any dtype, H, W >= 1. An axis shorter than ``window`` is zero-padded at the
    bottom/right up to ``window`` and the result is cropped back to (H, W).
    predict: maps a (B, window, window, C) batch of the image's dtype, B <= batch_size, to
    ``{mode: (B, window, window)}`` probabilities; every call must return the same modes.
    Windows are sent in row-major order (see ``window_starts``), in consecutive batches of
    ``batch_size`` (the last may be smaller): the same calls for the same input size, always.
    importance: (window, window) weights > 0, default ``gaussian_importance(window)``.

    Several classes: ``predict`` returns (B, window, window, K) and the result is (H, W, K).

    Returns ``{mode: float32 (H, W)}``: per pixel, sum(importance * p) / sum(importance) over
    the windows covering it (so a pixel covered by one window gets exactly that prediction).
    """
    window = _positive_int(window, "window")
    overlap = _overlap(overlap)
    batch_size = _positive_int(batch_size, "batch_size")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must have shape (H, W, C), got shape {image.shape}")
    height, width = image.shape[:2]
    if height < 1 or width < 1 or image.shape[2] < 1:
        raise ValueError(f"image must have H, W, C >= 1, got shape {image.shape}")
    importance = gaussian_importance(window) if importance is None else _check_importance(importance, window)

    padded_h, padded_w = max(height, window), max(width, window)
    if (padded_h, padded_w) != (height, width):
        image = np.pad(image, ((0, padded_h - height), (0, padded_w - width), (0, 0)))
    ys = window_starts(padded_h, window, overlap)
    xs = window_starts(padded_w, window, overlap)

    # The weight sum does not depend on the mode: one map shared by all modes.
    weights = np.zeros((padded_h, padded_w), np.float32)
    for y, x in itertools.product(ys, xs):
        weights[y : y + window, x : x + window] += importance

    sums: dict[str, np.ndarray] | None = None
    for positions, batch in _batches(image, window, ys, xs, batch_size):
        out = predict(batch)
        if not isinstance(out, dict) or not out:
            raise ValueError(f"predict must return a non-empty dict {{mode: array}}, got {type(out).__name__}")
        if sums is None:
            # (B, w, w): one probability per pixel; (B, w, w, K): K class probabilities. The
            # importance broadcast over the trailing channels, whatever they are.
            channels = np.shape(next(iter(out.values())))[3:]
            sums = {mode: np.zeros((padded_h, padded_w, *channels), np.float32) for mode in out}
            weight = importance.reshape(importance.shape + (1,) * len(channels))
        elif set(out) != set(sums):
            raise ValueError(f"predict returned modes {sorted(out)} but earlier batches returned {sorted(sums)}")
        expected = (len(positions), window, window, *channels)
        for mode, probs in out.items():
            probs = np.asarray(probs, dtype=np.float32)
            if probs.shape != expected:
                raise ValueError(f"predict returned shape {probs.shape} for mode '{mode}', expected {expected}")
            acc = sums[mode]
            for (y, x), p in zip(positions, probs, strict=True):
                acc[y : y + window, x : x + window] += weight * p

    assert sums is not None  # there is always at least one window
    result = {}
    for mode, acc in sums.items():
        np.divide(acc, weights[..., None] if acc.ndim == 3 else weights, out=acc)
        # Copy the crop of a padded map so the caller does not keep the padding alive.
        result[mode] = acc if acc.shape == (height, width) else acc[:height, :width].copy()
    return result
