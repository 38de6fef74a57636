"""Per-class scores of label maps (numpy + OpenCV, no TensorFlow).

Conventions (nnU-Net's, stated once):
- Inputs are label maps of class indices ``0..K-1`` (``uint8``), 0 the background; pixels whose
  *truth* is :data:`segx.data.labels.IGNORE_INDEX` are left out of every count, so an
  unannotated pixel is neither right nor wrong, whatever is predicted there.
- A class's Dice in a case is ``2|P∩T| / (|P| + |T|)`` over its pixels. **The empty-class rule:**
  a class absent from both the truth and the prediction of a case is *not counted* for that case
  (NaN); absent from the truth but predicted, it scores 0; present in the truth but not
  predicted, 0.
- A class's score is the mean over the cases that count it; the **foreground mean** is the
  mean over foreground classes (every class but index 0) of those class scores, the number
  the ensemble search maximises and ``val/dice``, ``test/dice`` report for multi-class runs. A
  class no case counts (absent everywhere and never predicted) is left out of the mean.
- HD95 per class as :func:`segx.scoring.metrics.hd95` on the class's own mask, NaN where the
  class is absent from both.
"""

from __future__ import annotations

import warnings

import numpy as np

from segx.data.labels import IGNORE_INDEX
from segx.data.ragged import Ragged
from segx.scoring.stacked import case_hd95


def confusion_counts(pred, true, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per case and class: (true positives, predicted, true) pixel counts, int64 (N, K) each.

    ``pred``, ``true``: label maps, (N, H, W) arrays or ragged cases of any sizes."""
    pred, true = Ragged.of(pred), Ragged.of(true)
    if not pred.same_shapes(true):
        raise ValueError("prediction and truth differ in case sizes")
    n, k = len(true), int(n_classes)
    tp = np.zeros((n, k), np.int64)
    pp = np.zeros((n, k), np.int64)
    tt = np.zeros((n, k), np.int64)
    for i in range(n):
        a, b = pred.offsets[i], pred.offsets[i + 1]
        t = np.asarray(true.flat[a:b]).astype(np.intp)
        p = np.asarray(pred.flat[a:b]).astype(np.intp)
        keep = t != IGNORE_INDEX
        t, p = t[keep], p[keep]
        tt[i] = np.bincount(t, minlength=k)[:k]
        pp[i] = np.bincount(p, minlength=k)[:k]
        tp[i] = np.bincount(t[t == p], minlength=k)[:k]
    return tp, pp, tt


def class_dice(tp: np.ndarray, pp: np.ndarray, tt: np.ndarray) -> np.ndarray:
    """Dice per case and class from counts (..., K): NaN where the class is absent from both."""
    denom = (pp + tt).astype(np.float64)
    out = np.full(np.shape(denom), np.nan)
    np.divide(2.0 * tp, denom, out=out, where=denom > 0)
    return out


def class_iou(tp: np.ndarray, pp: np.ndarray, tt: np.ndarray) -> np.ndarray:
    """IoU per case and class from counts (..., K): NaN where the class is absent from both."""
    union = (pp + tt - tp).astype(np.float64)
    out = np.full(np.shape(union), np.nan)
    np.divide(tp.astype(np.float64), union, out=out, where=union > 0)
    return out


def nan_mean_last(values: np.ndarray) -> np.ndarray:
    """Mean over the last (contiguous) axis of the values that are not NaN; NaN where none is.
    Written out (zeros summed in place of NaN, then one division), so a 1-D array and the last
    axis of a larger one give the same bits."""
    values = np.ascontiguousarray(values)
    counted = ~np.isnan(values)
    total = np.where(counted, values, 0.0).sum(axis=-1)
    n = counted.sum(axis=-1)
    out = np.full(np.shape(total), np.nan)
    np.divide(total, n, out=out, where=n > 0)
    return out


def class_means(per_case: np.ndarray) -> np.ndarray:
    """Mean over cases (axis -2) of per-case, per-class scores (..., N, K), ignoring NaN (cases
    that do not count the class); NaN for a class no case counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class no case counts: NaN, on purpose
        return np.nanmean(per_case, axis=-2)


def foreground_mean(per_class: np.ndarray, empty: float = 1.0) -> np.ndarray:
    """Mean over the foreground classes (last axis, index 0 dropped) of class scores, ignoring
    classes that are not counted (NaN); ``empty`` when none is counted at all (nothing to find,
    nothing found: Dice and IoU 1, HD95 0, the binary rules for empty-vs-empty)."""
    fg = np.asarray(per_class)[..., 1:]
    counted = ~np.isnan(fg)
    total = np.where(counted, fg, 0.0).sum(axis=-1)
    n = counted.sum(axis=-1)
    return np.where(n > 0, total / np.maximum(n, 1), empty)


def mean_foreground_dice(pred, true, n_classes: int) -> float:
    """The multi-class objective: :func:`foreground_mean` of per-class mean Dice."""
    return float(foreground_mean(class_means(class_dice(*confusion_counts(pred, true, n_classes)))))


def class_metrics(pred, true, names, with_hd95: bool = True, spacing=None) -> dict[str, np.ndarray]:
    """Per-case scores of label maps: ``dice``, ``iou`` (and ``hd95``) as the case's foreground
    mean, and ``dice/<class>``, ``iou/<class>`` (``hd95/<class>``) per foreground class (NaN where
    the empty-class rule does not count it)."""
    k = len(names)
    tp, pp, tt = confusion_counts(pred, true, k)
    dice, iou = class_dice(tp, pp, tt), class_iou(tp, pp, tt)
    # Per case, the mean over its counted foreground classes: the per-case number that tables,
    # bootstrap intervals and figures use.
    out: dict[str, np.ndarray] = {"dice": foreground_mean(dice), "iou": foreground_mean(iou)}
    for c in range(1, k):
        out[f"dice/{names[c]}"] = dice[:, c]
        out[f"iou/{names[c]}"] = iou[:, c]
    if with_hd95:
        pred, true = Ragged.of(pred), Ragged.of(true)
        dist = np.full((len(true), k), np.nan)
        for i, (p, t) in enumerate(zip(pred, true, strict=True)):
            keep = t != IGNORE_INDEX
            for c in range(1, k):
                if tt[i, c] or pp[i, c]:
                    dist[i, c] = case_hd95(i, (p == c) & keep, (t == c) & keep, spacing)
        out["hd95"] = foreground_mean(dist, empty=0.0)
        for c in range(1, k):
            out[f"hd95/{names[c]}"] = dist[:, c]
    return out


# -- overlapping regions ------------------------------------------------------------------------
# Each region (data.regions) is scored as a structure of its own against "the pixel's class is one
# of the region's", with the same empty rule: a region absent from both truth and prediction in a
# case is not counted there. ``dice``/``iou``/``hd95`` are then the mean over regions (there is no
# background to leave out). As nnU-Net, a prediction's regions are read off its *decoded label map*
# (the file segx.predict writes), never off the raw per-region decisions: where the decisions
# disagree (core on, whole off) the label map decides, so the score is the score of the file.


def _region_table(regions) -> np.ndarray:
    """bool (256, R): whether class index ``c`` is in region ``r``."""
    table = np.zeros((256, len(regions)), bool)
    for j, members in enumerate(regions):
        table[list(members), j] = True
    return table


def region_counts(pred, truth, regions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per case and region (tp, predicted, true) pixel counts, int64 (N, R); ``pred``: the decoded
    label maps (class indices, :meth:`segx.data.labels.Labels.decode_regions`); ``truth``: label
    maps; ``regions``: class indices per region. Ignored pixels are left out."""
    pred, truth = Ragged.of(pred), Ragged.of(truth)
    r = len(regions)
    table = _region_table(regions)
    n = len(truth)
    tp, pp, tt = (np.zeros((n, r), np.int64) for _ in range(3))
    for i in range(n):
        a, b = truth.offsets[i], truth.offsets[i + 1]
        t = np.asarray(truth.flat[a:b])
        keep = t != IGNORE_INDEX
        want, got = table[t[keep]], table[np.asarray(pred.flat[a:b])[keep]]
        tt[i], pp[i], tp[i] = want.sum(axis=0), got.sum(axis=0), (want & got).sum(axis=0)
    return tp, pp, tt


def _with_background(per_region: np.ndarray) -> np.ndarray:
    """A NaN column in front, so the foreground helpers (which drop index 0) average every region."""
    pad = np.full((*per_region.shape[:-1], 1), np.nan)
    return np.concatenate([pad, per_region], axis=-1)


def mean_over_regions(per_region) -> np.ndarray:
    """Elementwise mean of per-region values (a list of equal-shape arrays or floats), leaving out
    NaN (a region no case counts); 1.0 where every region is NaN. Summed in region order, one
    division: the search and the prediction path get the same bits."""
    per_region = [np.asarray(v, np.float64) for v in per_region]
    total = np.zeros(np.shape(per_region[0]))
    n = np.zeros(np.shape(per_region[0]))
    for v in per_region:
        counted = ~np.isnan(v)
        total = total + np.where(counted, v, 0.0)
        n = n + counted
    return np.where(n > 0, total / np.maximum(n, 1), 1.0)


def mean_region_dice(pred, truth, regions) -> float:
    """The region objective of decoded label maps ``pred``: per region the mean over the cases that
    count it, then the mean over regions (:func:`mean_over_regions`)."""
    dice = class_dice(*region_counts(pred, truth, regions))
    return float(mean_over_regions([nan_mean_last(dice[:, j]) for j in range(dice.shape[1])]))


def region_metrics(pred, truth, names, regions, with_hd95: bool = True, spacing=None) -> dict[str, np.ndarray]:
    """Per-case scores of decoded label maps ``pred`` by region: ``dice``, ``iou`` (``hd95``) as the
    case's mean over the regions it counts, and ``dice/<region>``, ... per region (NaN where the
    region is not counted)."""
    tp, pp, tt = region_counts(pred, truth, regions)
    dice, iou = class_dice(tp, pp, tt), class_iou(tp, pp, tt)
    out: dict[str, np.ndarray] = {
        "dice": foreground_mean(_with_background(dice)),
        "iou": foreground_mean(_with_background(iou)),
    }
    for j, name in enumerate(names):
        out[f"dice/{name}"], out[f"iou/{name}"] = dice[:, j], iou[:, j]
    if with_hd95:
        pred, truth = Ragged.of(pred), Ragged.of(truth)
        table = _region_table(regions)
        dist = np.full(tp.shape, np.nan)
        for i in range(len(truth)):
            t, got = truth[i], table[pred[i]]
            keep = t != IGNORE_INDEX
            for j in range(len(regions)):
                if tt[i, j] or pp[i, j]:
                    dist[i, j] = case_hd95(i, got[..., j] & keep, table[t][..., j] & keep, spacing)
        out["hd95"] = foreground_mean(_with_background(dist), empty=0.0)
        for j, name in enumerate(names):
            out[f"hd95/{name}"] = dist[:, j]
    return out
