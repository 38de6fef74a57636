"""Cases that are volumes: how distances are measured on them (numpy only).

A volume's slices travel through the search, the caches and the tables as *one case*: its slices
stacked along rows, an (n * h, w) map (:meth:`segx.data.ragged.Ragged.stacked`). Every count
over such a case (Dice, IoU, the search's objective) is then the count over the volume, exactly.
Distances are not: HD95 and the surface Dice need the volume back, (n, h, w), with its voxel
spacing. :class:`StackedVolumes` is passed where a pixel spacing goes and says both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StackedVolumes:
    """Case i is ``depths[i]`` slices stacked along rows; ``spacings[i]`` its (slice, row, column)
    voxel spacing in mm."""

    depths: tuple[int, ...]
    spacings: tuple[tuple[float, float, float], ...]

    @classmethod
    def of(cls, volumes: dict, cases) -> StackedVolumes:
        """For ``cases`` (ids) of a volume dataset's record (``model/volumes.json``: the slice plan
        and each case's geometry): slices counted, spacing the plan's in-plane spacing with the
        scan's own spacing along the slice axis."""
        plan = volumes["plan"]
        axis, in_plane = int(plan["slice_axis"]), [float(v) for v in plan["spacing"]]
        depths, spacings = [], []
        for case in cases:
            entry = volumes["cases"][case]
            spacing_zyx = list(reversed(entry["geometry"]["spacing"]))
            depths.append(int(entry["slices"]))
            spacings.append((float(spacing_zyx[axis]), in_plane[0], in_plane[1]))
        return cls(tuple(depths), tuple(spacings))

    def volume(self, i: int, case: np.ndarray) -> np.ndarray:
        """Case ``i``'s stacked map (n * h, w[, C]) as its volume (n, h, w[, C])."""
        n = self.depths[i]
        return case.reshape(n, case.shape[0] // n, *case.shape[1:])

    def case(self, i: int, array: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
        """Case ``i`` as scored in physical units: its volume and voxel spacing."""
        return self.volume(i, array), self.spacings[i]

    words = "per volume (3D Dice/IoU per patient's scan, HD95 in mm)"
    prefix = "test3d/"  # its metrics beside the 2D ones: every score again, in 3D

    def hd95(self, i: int, pred: np.ndarray, truth: np.ndarray) -> float:
        """HD95 in mm of case ``i``'s masks, in 3D."""
        from segx.scoring.volume_metrics import hd95

        return hd95(self.volume(i, pred), self.volume(i, truth), self.spacings[i])


def case_hd95(i: int, pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """HD95 of case ``i``: in 3D for a volume (``spacing`` a :class:`StackedVolumes`), else in 2D
    in the units of the pixel spacing."""
    if isinstance(spacing, StackedVolumes):
        return spacing.hd95(i, pred, truth)
    from segx.scoring.metrics import hd95

    return hd95(pred, truth, spacing)


@dataclass(frozen=True)
class PlanarCases:
    """2D cases of one pixel spacing (``data.pixel_spacing``; row, column), for the surface Dice."""

    spacing: tuple[float, float]

    @classmethod
    def of(cls, spacing) -> PlanarCases:
        values = [float(spacing)] * 2 if np.isscalar(spacing) else [float(v) for v in spacing]
        return cls((values[0], values[-1]))

    def case(self, i: int, array: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
        return array, self.spacing

    words = "per case with the normalised surface Dice (in data.pixel_spacing units)"
    prefix = "test/"  # only the surface Dice is new beside the 2D scores
