"""The test split scored per volume: a case is a patient's scan, not a slice.

The members predict slices; each method's label maps of one case's slices are stacked back along
the slice axis and scored as one volume: Dice and IoU over its voxels, HD95 in mm and the
normalised surface Dice at ``data.nsd_tolerance_mm`` (distances from the voxel spacing: the
slice plan's in-plane spacing and the scan's own slice spacing). Numpy and pandas only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from segx.data.volume_prep import SLICE_SEPARATOR, case_of


def slice_index(stem: str) -> int:
    return int(stem.rsplit(SLICE_SEPARATOR, 1)[1])


def stack_cases(stems: Sequence[str], maps: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Case id -> its slices' maps stacked in slice order, (n, h, w)."""
    by_case: dict[str, list[tuple[int, np.ndarray]]] = {}
    for stem, plane in zip(stems, maps, strict=True):
        by_case.setdefault(case_of(stem), []).append((slice_index(stem), np.asarray(plane)))
    stacked = {}
    for case, planes in by_case.items():
        planes.sort(key=lambda p: p[0])
        indices = [i for i, _ in planes]
        if indices != list(range(len(indices))):
            raise ValueError(f"case {case}: slices {indices} are not 0..{len(indices) - 1}")
        stacked[case] = np.stack([p for _, p in planes])
    return stacked


def volume_spacing(volumes: Mapping, case: str) -> tuple[float, float, float]:
    """(slice, row, column) spacing in mm of a case's stacked slices at the plan's in-plane spacing."""
    plan, geometry = volumes["plan"], volumes["cases"][case]["geometry"]
    spacing_zyx = tuple(reversed(geometry["spacing"]))
    return (float(spacing_zyx[int(plan["slice_axis"])]), *(float(s) for s in plan["spacing"]))


def score_volumes(
    preds: Mapping[str, Sequence[np.ndarray]],
    truth: Sequence[np.ndarray],
    stems: Sequence[str],
    volumes: Mapping,
    class_names: Sequence[str],
    tolerance_mm: float,
) -> pd.DataFrame:
    """One row per method and case: per-class Dice, IoU, HD95 (mm) and NSD, and their
    foreground means (``dice``, ``iou``, ``hd95``, ``nsd``)."""
    from segx.scoring.volume_metrics import volume_class_metrics

    truths = stack_cases(stems, truth)
    rows = []
    for method, maps in preds.items():
        for case, pred in stack_cases(stems, maps).items():
            scores = volume_class_metrics(
                pred.astype(np.uint8), truths[case].astype(np.uint8), list(class_names),
                volume_spacing(volumes, case), tolerance_mm,
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
