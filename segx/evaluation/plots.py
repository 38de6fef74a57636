"""Figures logged with runs (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _contours(image: np.ndarray, true: np.ndarray | None, pred: np.ndarray | None) -> np.ndarray:
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, image.shape[0] // 128)
    for mask, colour in ((true, (0, 255, 0)), (pred, (255, 0, 0))):
        if mask is None:
            continue
        found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, found, -1, colour, thickness)
    return out


def overlay(image: np.ndarray, pred: np.ndarray, true: np.ndarray | None = None) -> np.ndarray:
    """RGB image with the predicted contour in red (and the true one in green)."""
    return _contours(image, true, pred)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """Loss and validation metrics per epoch."""
    keys_loss = [k for k in history if k.endswith("loss")]
    keys_score = [k for k in history if k in ("val/dice", "val/iou", "train/dice", "train/iou")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, keys, title in ((axes[0], keys_loss, "loss"), (axes[1], keys_score, "score")):
        for key in keys:
            values = history[key]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
    return _save(fig, path)


def plot_cases(
    images: np.ndarray,
    true: np.ndarray,
    preds: Mapping[str, np.ndarray],
    stems: Sequence[str],
    path: str | os.PathLike,
    scores: Mapping[str, np.ndarray] | None = None,
    n: int = 4,
) -> Path:
    """Grid: one row per case, one column per prediction; true contour green, predicted red."""
    n = min(n, len(images))
    names = list(preds)
    fig, axes = plt.subplots(n, len(names), figsize=(3 * len(names), 3 * n), squeeze=False)
    for row in range(n):
        for col, name in enumerate(names):
            ax = axes[row][col]
            ax.imshow(_contours(images[row], true[row], preds[name][row]))
            title = name if row == 0 else ""
            if scores is not None and name in scores:
                title = f"{title}\nDice {scores[name][row]:.3f}".strip()
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        axes[row][0].text(-2, images[row].shape[0] // 2, stems[row], rotation=90, va="center", ha="right", fontsize=7)
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    return _save(fig, path)
