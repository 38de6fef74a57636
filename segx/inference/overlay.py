"""Masks drawn over images (contours, not fills: the tissue under them stays visible) and the small
thumbnails of cases that members cache for figures. OpenCV only: no plotting library."""

from __future__ import annotations

import cv2
import numpy as np


def contours(image: np.ndarray, true: np.ndarray | None, pred: np.ndarray | None) -> np.ndarray:
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, image.shape[0] // 128)
    for mask, colour in ((true, (0, 255, 0)), (pred, (255, 0, 0))):
        if mask is None:
            continue
        found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, found, -1, colour, thickness)
    return out


PREVIEW_SIDE = 128  # thumbnails that members cache of every case, for figures


def thumbnail(image: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """uint8 (h, w, 3) copy of an RGB image with its longer side at most ``side`` pixels."""
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return np.ascontiguousarray(image, np.uint8)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(np.asarray(image, np.uint8), size, interpolation=cv2.INTER_AREA)


def at(mask: np.ndarray | None, shape) -> np.ndarray | None:
    """A mask drawn over a thumbnail: nearest-neighbour to the thumbnail's size."""
    if mask is None or mask.shape[:2] == tuple(shape[:2]):
        return mask
    return cv2.resize(
        np.asarray(mask, np.uint8), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_NEAREST
    ).astype(bool)


def overlay(image: np.ndarray, pred: np.ndarray, true: np.ndarray | None = None) -> np.ndarray:
    """RGB image with the predicted contour in red (and the true one in green)."""
    return contours(image, true, pred)
