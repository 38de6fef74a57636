"""A finding of this benchmark, reproduced: post-processing of a volume runs on its slices stacked
along rows, so its connected components are 2D components of the stacked image, not 3D ones.

    python experiments/volumes/stacked_postprocess.py

Since 831e37d a volume is one case, its slices stacked along rows ((n * h, w),
``Ragged.stacked``) through the search and ``EnsemblePredictor.predict_slices``, and the chosen
post-processing (``segx.scoring.postprocess.apply_one``: OpenCV connected components, 8-connected)
is applied to that stacked image. Two hand-built volumes show what that does:

1. an organ that is the same 4 x 4 square in each of 4 slices: in 3D one component of 64 voxels;
   stacked, 4 components of 16 that do not touch, so ``keep_largest`` keeps one slice of it;
2. a 6-voxel piece on the last rows of slice 0 and another on the first rows of slice 1 (opposite
   edges of the field of view, not neighbours in 3D): stacked, the two rows are adjacent and the
   pieces join into one component of 12, which ``min_size=10`` keeps, where 3D components (6 and 6)
   would both be removed.

3D components (``scipy.ndimage.label``, 26-connected) are computed beside them for reference.
Writes the ``stacked_postprocess`` section of results.json.
"""

from __future__ import annotations

import numpy as np
from common import save
from scipy import ndimage

from segx.scoring.postprocess import PostProcess, apply_one


def stacked(volume: np.ndarray, post: PostProcess) -> np.ndarray:
    n, h, w = volume.shape
    return apply_one(volume.reshape(n * h, w).astype(bool), post).reshape(n, h, w)


def in_3d(volume: np.ndarray, post: PostProcess) -> np.ndarray:
    labels, n = ndimage.label(volume, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.zeros(n + 1, bool)
    if post.keep_largest:
        keep[1 + int(np.argmax(sizes))] = True
    else:
        keep[1:] = sizes >= post.min_size
    return keep[labels]


def main() -> None:
    cases = []
    organ = np.zeros((4, 8, 8), np.uint8)
    organ[:, 2:6, 2:6] = 1
    edges = np.zeros((2, 8, 8), np.uint8)
    edges[0, 6:8, 0:3] = 1  # last rows of slice 0
    edges[1, 0:2, 0:3] = 1  # first rows of slice 1
    edges[1, 4:6, 5:7] = 1  # a 4-voxel blob inside slice 1
    for name, volume, post in (
        ("one organ in 4 slices, keep_largest", organ, PostProcess(keep_largest=True)),
        ("pieces at opposite edges of neighbouring slices, min_size=10", edges, PostProcess(min_size=10)),
    ):
        a, b = stacked(volume, post), in_3d(volume, post)
        cases.append(
            {
                "case": name,
                "voxels": int(volume.sum()),
                "kept_stacked": int(a.sum()),
                "kept_3d": int(b.sum()),
                "per_slice_stacked": a.sum(axis=(1, 2)).tolist(),
                "per_slice_3d": b.sum(axis=(1, 2)).tolist(),
            }
        )
        print(f"{name}: {int(volume.sum())} voxels; kept stacked {int(a.sum())}, in 3D {int(b.sum())}")
    save("stacked_postprocess", {"cases": cases})


if __name__ == "__main__":
    main()
