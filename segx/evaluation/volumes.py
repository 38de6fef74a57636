"""The test split scored per volume: a case is a patient's scan, not a slice.

The members predict slices; a case's slices travel as one stacked case
(:mod:`segx.scoring.stacked`), put back into a volume here and scored as one: Dice and IoU over its voxels, HD95 in mm and the
normalised surface Dice at ``data.nsd_tolerance_mm`` (distances from the voxel spacing: the
slice plan's in-plane spacing and the scan's own slice spacing). Numpy and pandas only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from segx.scoring.stacked import StackedVolumes


def score_volumes(
    preds: Mapping[str, Sequence[np.ndarray]],
    truth: Sequence[np.ndarray],
    cases: Sequence[str],
    stacked: StackedVolumes,
    class_names: Sequence[str],
    tolerance_mm: float,
) -> pd.DataFrame:
    """One row per method and case: per-class Dice, IoU, HD95 (mm) and NSD, and their foreground
    means (``dice``, ``iou``, ``hd95``, ``nsd``); ``preds[method][i]`` and ``truth[i]`` are case
    ``i``'s stacked maps (its slices along rows)."""
    from segx.scoring.volume_metrics import volume_class_metrics

    rows = []
    for method, maps in preds.items():
        for i, case in enumerate(cases):
            pred = stacked.volume(i, np.asarray(maps[i]))
            scores = volume_class_metrics(
                pred.astype(np.uint8), stacked.volume(i, np.asarray(truth[i])).astype(np.uint8), list(class_names),
                stacked.spacings[i], tolerance_mm,
            )  # fmt: skip
            row = {"method": method, "case": case, "slices": int(pred.shape[0])}
            row.update({k: float(np.asarray(v).ravel()[0]) for k, v in scores.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def summarise_volumes(per_volume: pd.DataFrame) -> pd.DataFrame:
    """Per method, the mean over volumes of every score (NaN skipped: a class absent from a
    volume's truth and prediction has no HD95)."""
    order = list(dict.fromkeys(per_volume["method"]))
    scores = [c for c in per_volume.columns if c not in ("method", "case", "slices")]
    table = per_volume.groupby("method", sort=False)[scores].mean()
    table.insert(0, "volumes", per_volume.groupby("method", sort=False)["case"].nunique())
    return table.loc[order]
