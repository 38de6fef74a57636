"""Scores of a volume (or an image) in physical units: Dice, IoU, HD95 and the normalised surface
Dice (NSD) of masks of any dimension, and per class of label maps. NumPy and SciPy (no
TensorFlow, no SimpleITK, no OpenCV here; ``IGNORE_INDEX`` comes from :mod:`segx.data.labels`).

Conventions (stated once, used everywhere):
- ``spacing`` is the size of a voxel along each array axis, **in the array's axis order** (a CT
  read as (z, y, x) has spacing (z, y, x) mm, e.g. (3.0, 0.8, 0.8)), one positive finite number
  per axis, or one number for isotropic voxels; anything else is refused (:func:`voxel_spacing`).
  Distances (HD95, the NSD tolerance) are in the units of ``spacing`` (mm).
- Dice and IoU count voxels over the whole array (a volume's Dice is not a mean over slices).
  Both masks empty: Dice = IoU = 1; exactly one empty: 0 (as :mod:`segx.scoring.metrics`).
- **Surface**: a voxel is on the surface of a mask when it is foreground and at least one of its
  face neighbours (2 per axis; ``connectivity=1``, as MONAI's ``get_mask_edges``, which erodes with
  SciPy's default cross) is background. **Outside the array counts as background**, as in
  :func:`segx.scoring.metrics.hd95` (OpenCV's erosion there uses a zero border): a mask touching the
  image border has a surface along it, and padding the array with background changes no score.
  ``connectivity=ndim`` counts every neighbour, edges and corners included: in 2D that is exactly
  metrics.py's 3x3 erosion, so ``hd95(p, t, spacing, connectivity=2)`` on an image is
  :func:`segx.scoring.metrics.hd95`'s number, to its float32 rounding (face neighbours give a thinner surface on
  diagonal contours, so the default can differ from it there).
- Surface distances are from each surface voxel of one mask to the nearest surface voxel of the
  other, by ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.
- HD95 = max of the two directed 95th percentiles (``np.percentile``, linear), as metrics.py and
  MONAI's ``compute_hausdorff_distance(percentile=95)``. Both empty: 0. Exactly one empty: the
  diagonal of the whole array in mm, the largest distance possible in it (metrics.py's rule, so
  averages stay finite and penalise it).
- NSD (Nikolov et al. 2021, MONAI's ``compute_surface_dice`` with ``use_subvoxels=False``): the
  fraction of the two surfaces within ``tolerance_mm`` (``<=``, up to rounding) of the other surface, with a
  surface measured as its **number of surface voxels**, not its area (DeepMind's surface-distance
  package and MONAI's ``use_subvoxels=True`` weigh each surface element by its area instead, so
  their numbers differ somewhat on anisotropic or curved surfaces). Exactly one empty: 0 (no
  surface voxel of the other is within any distance of nothing). Both empty: MONAI's NaN by
  default, see :func:`surface_dice`.
- Per class (:func:`volume_class_metrics`), segx's empty-class rule of
  :mod:`segx.scoring.classes`: a class absent from both truth and prediction is not counted
  (NaN in every score), voxels whose truth is ``IGNORE_INDEX`` count for nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from segx.data.labels import IGNORE_INDEX
from segx.errors import SegxError


def voxel_spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    """``spacing`` as ``ndim`` floats (one number is used for every axis); a SegxError in one
    line for anything but positive finite numbers, one per axis."""
    values = [spacing] * ndim if isinstance(spacing, numbers.Real) else spacing
    try:
        values = list(values)
    except TypeError:
        values = None
    ok = (
        values is not None
        and len(values) == ndim
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) for v in values)
        and all(math.isfinite(float(v)) and float(v) > 0 for v in values)
    )
    if not ok:
        shown = " ".join(repr(spacing).split())
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise SegxError(
            f"voxel spacing must be {ndim} positive finite numbers, one per array axis in the array's order "
            f"(e.g. (z, y, x) in mm), or one for isotropic voxels; got {shown}"
        )
    return tuple(float(v) for v in values)


def _tolerance(tolerance_mm) -> float:
    if (
        not isinstance(tolerance_mm, numbers.Real)
        or isinstance(tolerance_mm, bool | np.bool_)
        or not math.isfinite(float(tolerance_mm))
        or tolerance_mm < 0
    ):
        raise SegxError(f"the surface Dice tolerance must be a finite distance >= 0 in mm, got {tolerance_mm!r}")
    return float(tolerance_mm)


def _pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim == 0:
        raise SegxError(f"prediction and truth must be arrays of the same shape, got {pred.shape} and {truth.shape}")
    return pred.astype(bool, copy=False), truth.astype(bool, copy=False)


def _connectivity(connectivity, ndim: int) -> int:
    if (
        isinstance(connectivity, bool)
        or not isinstance(connectivity, numbers.Integral)
        or not 1 <= connectivity <= ndim
    ):
        raise SegxError(
            f"surface connectivity must be 1 (face neighbours) to {ndim} (every neighbour), got {connectivity!r}"
        )
    return int(connectivity)


def dice(pred, truth) -> float:
    """Dice of two boolean masks of any dimension over all their voxels; 1 when both are empty."""
    pred, truth = _pair(pred, truth)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & truth)) / total


def iou(pred, truth) -> float:
    """IoU of two boolean masks of any dimension over all their voxels; 1 when both are empty."""
    pred, truth = _pair(pred, truth)
    union = int(np.count_nonzero(pred | truth))
    return 1.0 if union == 0 else int(np.count_nonzero(pred & truth)) / union


def surface(mask, connectivity: int = 1) -> np.ndarray:
    """The surface voxels of a boolean mask (see the module's conventions): foreground with a
    background neighbour, outside the array counting as background."""
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = generate_binary_structure(mask.ndim, _connectivity(connectivity, mask.ndim))
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask grown by one voxel on every side (within the array)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def surface_distances(pred, truth, spacing, connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(distances from each surface voxel of ``pred`` to the surface of ``truth``, and from each of
    ``truth`` to ``pred``), float64 in the units of ``spacing``, in no particular order. Both
    masks must be non-empty."""
    pred, truth = _pair(pred, truth)
    spacing = voxel_spacing(spacing, pred.ndim)
    if not pred.any() or not truth.any():
        raise SegxError("surface distances need both masks non-empty; an empty mask has no surface")
    # Speed: every surface voxel and every distance asked for lies inside the bounding box of
    # pred | truth, so the erosions and distance transforms run on that box alone (one voxel of
    # background around it, where the array has it) -- a small organ in a 512x512x300 CT costs
    # the box, not the scan. Exact: the box holds both surfaces, and outside the array is
    # background either way.
    box = _box(pred | truth)
    pred, truth = pred[box], truth[box]
    pred_edge, truth_edge = surface(pred, connectivity), surface(truth, connectivity)
    to_truth = distance_transform_edt(~truth_edge, sampling=spacing)[pred_edge]
    to_pred = distance_transform_edt(~pred_edge, sampling=spacing)[truth_edge]
    return to_truth, to_pred


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _hd95(to_truth: np.ndarray, to_pred: np.ndarray) -> float:
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


# A distance equal to the tolerance is within it (MONAI's ``<=``), and "equal" allows for rounding:
# tolerances are often a lattice distance (2 voxels of 0.8 mm, 1 mm on a 0.6 x 0.8 mm diagonal),
# which the distance transform may return 1 ulp above the number typed, and a whole face of
# voxels would flip with that ulp. A relative 1e-9 is far below any physical difference.
TIE_SLACK = 1e-9


def _nsd(to_truth: np.ndarray, to_pred: np.ndarray, tolerance_mm: float) -> float:
    limit = tolerance_mm * (1.0 + TIE_SLACK)
    within = int(np.count_nonzero(to_truth <= limit)) + int(np.count_nonzero(to_pred <= limit))
    return within / (len(to_truth) + len(to_pred))


def hd95(pred, truth, spacing, connectivity: int = 1) -> float:
    """95th-percentile symmetric Hausdorff distance of two boolean masks of any dimension, in the
    units of ``spacing`` (mm). Both empty: 0; exactly one empty: the array's diagonal in mm."""
    pred, truth = _pair(pred, truth)
    spacing = voxel_spacing(spacing, pred.ndim)
    _connectivity(connectivity, pred.ndim)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if has_pred != has_truth:
        return _diagonal(pred.shape, spacing)
    return _hd95(*surface_distances(pred, truth, spacing, connectivity))


def surface_dice(
    pred, truth, spacing, tolerance_mm: float, *, both_empty: float = float("nan"), connectivity: int = 1
) -> float:
    """Normalised surface Dice of two boolean masks of any dimension: (|S_p within tolerance of S_t|
    + |S_t within tolerance of S_p|) / (|S_p| + |S_t|), surfaces counted in voxels (MONAI's
    ``compute_surface_dice`` default); a distance equal to the tolerance is within it (equal up to
    a relative :data:`TIE_SLACK` of 1e-9, so floating-point rounding of a lattice distance cannot
    flip a face of voxels; MONAI compares the rounded numbers).

    Exactly one mask empty: 0. Both empty: ``both_empty``, NaN by default as MONAI (the score is
    0/0, and a NaN keeps such a case out of means, which is what segx's empty-class rule does per
    class). Pass ``both_empty=1.0`` for the binary rule of :func:`dice` and
    :mod:`segx.scoring.metrics` (nothing to find, nothing found: perfect)."""
    pred, truth = _pair(pred, truth)
    spacing = voxel_spacing(spacing, pred.ndim)
    tolerance_mm = _tolerance(tolerance_mm)
    _connectivity(connectivity, pred.ndim)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return float(both_empty)
    if has_pred != has_truth:
        return 0.0
    return _nsd(*surface_distances(pred, truth, spacing, connectivity), tolerance_mm)


def _foreground_mean(per_class: np.ndarray, empty: float) -> float:
    """Mean of the counted (not NaN) foreground classes; ``empty`` when none is counted
    (as :func:`segx.scoring.classes.foreground_mean`)."""
    fg = per_class[1:]
    counted = ~np.isnan(fg)
    n = int(counted.sum())
    return float(np.where(counted, fg, 0.0).sum() / n) if n else float(empty)


def volume_class_metrics(
    pred_labels,
    truth_labels,
    class_names: Sequence[str],
    spacing,
    tolerance_mm: float | None,
    with_hd95: bool = True,
    connectivity: int = 1,
) -> dict[str, np.ndarray]:
    """Per-class scores of one label map (a volume or an image of class indices ``0..K-1``, uint8;
    ``K = len(class_names)``, index 0 the background), shaped as
    :func:`segx.scoring.classes.class_metrics`'s output for one case: every value an array of
    shape (1,).

    Keys: ``dice``, ``iou`` (and ``hd95`` in mm, ``nsd``) -- the foreground means over the counted
    classes -- and ``dice/<class>``, ``iou/<class>`` (``hd95/<class>``, ``nsd/<class>``) for each
    foreground class. A class absent from both truth and prediction is not counted: NaN in each of
    its scores; absent from one: Dice, IoU and NSD 0, HD95 the array's diagonal in mm. With no
    class counted at all the means are Dice = IoU = NSD = 1 and HD95 = 0 (nothing to find, nothing
    found). Voxels whose truth is ``IGNORE_INDEX`` are left out of every score (background for the
    surfaces). ``hd95`` is left out when ``with_hd95`` is false and ``nsd`` when ``tolerance_mm`` is
    None; without both no distance transform runs."""
    pred, truth = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred.shape != truth.shape or pred.ndim == 0:
        raise SegxError(
            f"prediction and truth must be label maps of the same shape, got {pred.shape} and {truth.shape}"
        )
    spacing = voxel_spacing(spacing, pred.ndim)
    tolerance = None if tolerance_mm is None else _tolerance(tolerance_mm)
    _connectivity(connectivity, pred.ndim)
    k = len(class_names)
    diagonal = _diagonal(pred.shape, spacing)  # of the whole array, before any crop
    # Speed: only foreground classes are scored, and outside the bounding box of what is predicted
    # or truly (not ignored) foreground every voxel is background in both maps, counting for no
    # class: the counts run on that box, and each class's distances on its own box within it
    # (surface_distances), so a small organ in a 512x512x300 CT costs little beyond one pass.
    present = (pred != 0) | ((truth != 0) & (truth != IGNORE_INDEX))
    box = _box(present) if present.any() else tuple(slice(0, 0) for _ in pred.shape)
    pred, truth = pred[box], truth[box]
    keep = truth != IGNORE_INDEX
    t, p = truth[keep].astype(np.intp), pred[keep].astype(np.intp)
    tt = np.bincount(t, minlength=k)[:k]
    pp = np.bincount(p, minlength=k)[:k]
    tp = np.bincount(t[t == p], minlength=k)[:k]
    scores = {name: np.full(k, np.nan) for name in ("dice", "iou", "hd95", "nsd")}
    for c in range(1, k):
        if not (tt[c] or pp[c]):
            continue  # the empty-class rule: not counted
        scores["dice"][c] = 2.0 * tp[c] / (tt[c] + pp[c])
        scores["iou"][c] = tp[c] / (tt[c] + pp[c] - tp[c])
        if not (tt[c] and pp[c]):
            scores["hd95"][c], scores["nsd"][c] = diagonal, 0.0
        elif with_hd95 or tolerance is not None:
            to_truth, to_pred = surface_distances((pred == c) & keep, (truth == c) & keep, spacing, connectivity)
            scores["hd95"][c] = _hd95(to_truth, to_pred)
            if tolerance is not None:
                scores["nsd"][c] = _nsd(to_truth, to_pred, tolerance)
    # The keys in class_metrics' order: dice, iou, then per class; hd95, then per class; nsd, then per class.
    empty = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    groups = [("dice", "iou")] + [("hd95",)] * bool(with_hd95) + [("nsd",)] * (tolerance is not None)
    out: dict[str, np.ndarray] = {}
    for keys in groups:
        out.update({key: np.array([_foreground_mean(scores[key], empty[key])]) for key in keys})
        for c in range(1, k):
            out.update({f"{key}/{class_names[c]}": scores[key][c : c + 1].copy() for key in keys})
    return out
