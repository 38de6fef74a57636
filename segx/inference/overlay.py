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


# One colour per class for overlays and figures (matplotlib's tab10, RGB), unless the data's own
# palette gives the classes colours; background (index 0) is never drawn.
CLASS_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def class_colours(n_classes: int, palette=None) -> list[tuple[int, int, int]]:
    """RGB colour of each class: the data's palette where it has one, else :data:`CLASS_COLOURS`
    in turn (foreground classes from the first colour on)."""
    if palette is not None:
        return [tuple(int(x) for x in c) for c in palette]
    return [(0, 0, 0)] + [CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)] for c in range(1, n_classes)]


def overlay_classes(image: np.ndarray, labels: np.ndarray, names, colours, legend: bool = True) -> np.ndarray:
    """RGB image with each foreground class's contours in its colour and (``legend``) a legend strip
    below it naming the classes; contours, not fills, so the tissue under them stays visible."""
    out = np.ascontiguousarray(np.asarray(image, np.uint8).copy())
    thickness = max(1, image.shape[0] // 128)
    for c in range(1, len(names)):
        found, _ = cv2.findContours((labels == c).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, found, -1, tuple(int(x) for x in colours[c]), thickness)
    if not legend:
        return out
    return _with_legend(out, names, colours)


def _with_legend(image: np.ndarray, names, colours) -> np.ndarray:
    """The image with a legend strip below it (one swatch and name per foreground class), so the
    legend never hides the image, whatever its size."""
    width = image.shape[1]
    scale = 0.4
    row = 14
    entries = []
    for c in range(1, len(names)):
        text_w = cv2.getTextSize(str(names[c]), cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
        entries.append((c, row + text_w + 10))
    lines, x = [[]], 0
    for c, w in entries:  # wrap to the image's width
        if lines[-1] and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append((c, x))
        x += w
    strip = np.full((row * len(lines) + 4, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        y = 2 + i * row
        for c, x0 in line:
            cv2.rectangle(strip, (x0 + 2, y + 2), (x0 + row - 4, y + row - 4), tuple(int(v) for v in colours[c]), -1)
            cv2.putText(strip, str(names[c]), (x0 + row, y + row - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)
    return np.concatenate([image, strip], axis=0)
