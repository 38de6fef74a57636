"""The test split scored in physical units, with the normalised surface Dice (NSD).

Volumes: a case is a patient's scan. The members predict slices; a case's slices travel as one
stacked case (:mod:`segx.scoring.stacked`), put back into a volume here and scored as one: Dice
and IoU over its voxels, HD95 in mm and the NSD at ``data.nsd_tolerance_mm`` (distances from the
voxel spacing: the slice plan's in-plane spacing and the scan's own slice spacing). 2D images
with a ``data.pixel_spacing`` get the same table, in its units. Numpy and pandas only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from segx.scoring.stacked import PlanarCases, StackedVolumes


def score_volumes(
    preds: Mapping[str, Sequence[np.ndarray]],
    truth: Sequence[np.ndarray],
    cases: Sequence[str],
    geometry: StackedVolumes | PlanarCases,
    class_names: Sequence[str],
    tolerance_mm: float,
) -> pd.DataFrame:
    """One row per method and case: per-class Dice, IoU, HD95 (mm) and NSD, and their foreground
    means (``dice``, ``iou``, ``hd95``, ``nsd``); ``preds[method][i]`` and ``truth[i]`` are case
    ``i``'s maps (a volume's: its slices stacked along rows), ``geometry`` says how to measure them."""
    from segx.scoring.volume_metrics import volume_class_metrics

    rows = []
    for method, maps in preds.items():
        for i, case in enumerate(cases):
            pred, spacing = geometry.case(i, np.asarray(maps[i]))
            scores = volume_class_metrics(
                pred.astype(np.uint8), geometry.case(i, np.asarray(truth[i]))[0].astype(np.uint8), list(class_names),
                spacing, tolerance_mm,
            )  # fmt: skip
            row = {"method": method, "case": case, "slices": int(pred.shape[0]) if pred.ndim == 3 else 1}
            row.update({k: float(np.asarray(v).ravel()[0]) for k, v in scores.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def summarise_volumes(per_volume: pd.DataFrame) -> pd.DataFrame:
    """Per method, the mean over volumes of every score (NaN skipped: a class absent from a
    volume's truth and prediction has no HD95)."""
    order = list(dict.fromkeys(per_volume["method"]))
    scores = [c for c in per_volume.columns if c not in ("method", "case", "slices")]
    table = per_volume.groupby("method", sort=False)[scores].mean()
    table.insert(0, "cases", per_volume.groupby("method", sort=False)["case"].nunique())
    return table.loc[order]
