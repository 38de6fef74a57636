"""Segmentation metrics on binary masks (numpy + OpenCV, no TensorFlow).

Conventions (stated once, used everywhere):
- Inputs are boolean or {0, 1} arrays; ``pred`` and ``true`` have the same shape.
- Dice = 2|P∩T| / (|P| + |T|); IoU = |P∩T| / |P∪T|. When both masks are empty the
  prediction is perfect: Dice = IoU = 1. When exactly one is empty: 0.
- HD95 = max of the two directed 95th-percentile boundary distances (as MONAI's
  ``compute_hausdorff_distance(percentile=95)``), in pixels, or in physical units when a pixel
  spacing (row, column) is given. Both empty: 0. Exactly one empty: the image diagonal, the
  largest distance possible in the frame, so averages stay finite and penalise it.
- Cases may differ in size: every function taking a batch accepts an (N, H, W) array or a
  :class:`segx.data.ragged.Ragged` of (H_i, W_i) cases (scoring is at each image's own size).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from segx.data.ragged import Ragged, per_case_count


def dice_counts(tp: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray) -> np.ndarray:
    """Per-case Dice from counts (arrays of equal shape); empty-vs-empty is 1."""
    denom = pred_sum + true_sum
    out = np.ones(np.shape(denom), np.float64)
    nonzero = denom > 0
    out[nonzero] = 2.0 * tp[nonzero] / denom[nonzero]
    return out


def _flat_pair(pred, true) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both batches as flat boolean arrays plus the case offsets; shapes must agree per case."""
    pred, true = Ragged.of(pred), Ragged.of(true)
    if not pred.same_shapes(true):
        raise ValueError("prediction and truth differ in case sizes")
    return pred.flat.astype(bool, copy=False), true.flat.astype(bool, copy=False), pred.offsets


def dice_per_case(pred, true) -> np.ndarray:
    """Dice per case for (N, H, W) masks or ragged cases -> float64 (N,)."""
    pred, true, offsets = _flat_pair(pred, true)
    tp = per_case_count(pred & true, offsets)
    return dice_counts(tp, per_case_count(pred, offsets), per_case_count(true, offsets))


def iou_per_case(pred, true) -> np.ndarray:
    """IoU per case for (N, H, W) masks or ragged cases -> float64 (N,); empty-vs-empty is 1."""
    pred, true, offsets = _flat_pair(pred, true)
    inter = per_case_count(pred & true, offsets)
    union = per_case_count(pred | true, offsets)
    out = np.ones(len(union), np.float64)
    nonzero = union > 0
    out[nonzero] = inter[nonzero] / union[nonzero]
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~eroded.astype(bool) if mask.dtype == bool else (mask > 0) & (eroded == 0)


def hd95(pred: np.ndarray, true: np.ndarray, spacing: float | Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance between two (H, W) masks: in pixels, or in the units
    of ``spacing`` (one number, or (row, column) pixel sizes for anisotropic pixels)."""
    pred = pred.astype(np.uint8)
    true = true.astype(np.uint8)
    rows, cols = _spacing(spacing)
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not has_pred and not has_true:
        return 0.0
    if has_pred != has_true:
        return float(np.hypot(pred.shape[0] * rows, pred.shape[1] * cols))
    pred_edge = _boundary(pred)
    true_edge = _boundary(true)
    to_true, to_pred = _distance_to(true_edge, rows, cols), _distance_to(pred_edge, rows, cols)
    forward = np.percentile(to_true[pred_edge], 95)
    backward = np.percentile(to_pred[true_edge], 95)
    return float(max(forward, backward))


def _spacing(spacing) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0
    values = [float(spacing)] * 2 if np.isscalar(spacing) else [float(v) for v in spacing]
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"pixel spacing must be one positive number or (row, column), got {spacing!r}")
    return values[0], values[1]


def _distance_to(edge: np.ndarray, rows: float, cols: float) -> np.ndarray:
    """Distance of every pixel to the nearest ``edge`` pixel, in spacing units."""
    if rows == cols:
        # distanceTransform measures the distance to the nearest zero pixel: zero out the edges.
        return cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * np.float32(rows)
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~edge, sampling=(rows, cols)).astype(np.float32)


def hd95_per_case(pred, true, spacing=None) -> np.ndarray:
    pred, true = Ragged.of(pred), Ragged.of(true)
    from segx.scoring.stacked import case_hd95

    return np.array([case_hd95(i, p, t, spacing) for i, (p, t) in enumerate(zip(pred, true, strict=True))], np.float64)


def case_metrics(pred, true, with_hd95: bool = True, spacing=None) -> dict[str, np.ndarray]:
    """{'dice', 'iou'[, 'hd95']} per case for (N, H, W) masks or ragged cases; HD95 in pixels of
    each case, or in the units of ``spacing``."""
    out = {"dice": dice_per_case(pred, true), "iou": iou_per_case(pred, true)}
    if with_hd95:
        out["hd95"] = hd95_per_case(pred, true, spacing)
    return out
