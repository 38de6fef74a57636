"""Segmentation metrics on binary masks (numpy + OpenCV, no TensorFlow).

Conventions (stated once, used everywhere):
- Inputs are boolean or {0, 1} arrays; ``pred`` and ``true`` have the same shape.
- Dice = 2|P∩T| / (|P| + |T|); IoU = |P∩T| / |P∪T|. When both masks are empty the
  prediction is perfect: Dice = IoU = 1. When exactly one is empty: 0.
- HD95 (pixels) = max of the two directed 95th-percentile boundary distances (as MONAI's
  ``compute_hausdorff_distance(percentile=95)``). Both empty: 0. Exactly one empty: the image
  diagonal, the largest distance possible in the frame, so averages stay finite and penalise it.
"""

from __future__ import annotations

import cv2
import numpy as np


def dice_counts(tp: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray) -> np.ndarray:
    """Per-case Dice from counts (arrays of equal shape); empty-vs-empty is 1."""
    denom = pred_sum + true_sum
    out = np.ones(np.shape(denom), np.float64)
    nonzero = denom > 0
    out[nonzero] = 2.0 * tp[nonzero] / denom[nonzero]
    return out


def dice_per_case(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Dice per case for masks of shape (N, H, W) -> float64 (N,)."""
    pred = pred.astype(bool).reshape(len(pred), -1)
    true = true.astype(bool).reshape(len(true), -1)
    tp = np.count_nonzero(pred & true, axis=1)
    return dice_counts(tp, np.count_nonzero(pred, axis=1), np.count_nonzero(true, axis=1))


def iou_per_case(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU per case for masks of shape (N, H, W) -> float64 (N,); empty-vs-empty is 1."""
    pred = pred.astype(bool).reshape(len(pred), -1)
    true = true.astype(bool).reshape(len(true), -1)
    inter = np.count_nonzero(pred & true, axis=1)
    union = np.count_nonzero(pred | true, axis=1)
    out = np.ones(len(pred), np.float64)
    nonzero = union > 0
    out[nonzero] = inter[nonzero] / union[nonzero]
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~eroded.astype(bool) if mask.dtype == bool else (mask > 0) & (eroded == 0)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th-percentile Hausdorff distance in pixels between two (H, W) masks."""
    pred = pred.astype(np.uint8)
    true = true.astype(np.uint8)
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not has_pred and not has_true:
        return 0.0
    if has_pred != has_true:
        return float(np.hypot(*pred.shape))
    pred_edge = _boundary(pred)
    true_edge = _boundary(true)
    # distanceTransform measures the distance to the nearest zero pixel: zero out the edges.
    to_true = cv2.distanceTransform((~true_edge).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    to_pred = cv2.distanceTransform((~pred_edge).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    forward = np.percentile(to_true[pred_edge], 95)
    backward = np.percentile(to_pred[true_edge], 95)
    return float(max(forward, backward))


def hd95_per_case(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.array([hd95(p, t) for p, t in zip(pred, true, strict=True)], np.float64)


def case_metrics(pred: np.ndarray, true: np.ndarray, with_hd95: bool = True) -> dict[str, np.ndarray]:
    """{'dice', 'iou'[, 'hd95']} per case for (N, H, W) masks."""
    out = {"dice": dice_per_case(pred, true), "iou": iou_per_case(pred, true)}
    if with_hd95:
        out["hd95"] = hd95_per_case(pred, true)
    return out
