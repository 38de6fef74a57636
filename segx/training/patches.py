"""Random training patches cut from cases at their own resolution (numpy only).

As nnU-Net: a patch is a ``patch`` x ``patch`` window at a random place in the (optionally
rescaled) image; images smaller than the patch are zero-padded (bottom/right, as the sliding
window pads them at prediction); and a share of every batch (the last slots, nnU-Net's
``oversample_foreground_percent``, one third by default) is forced to contain foreground: its
window is placed around a foreground pixel drawn from the case's stored foreground locations,
so sparse structures are seen. Everything is a pure function of the sample's seed, so resumed
training cuts the same patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segx.data.decoded import DecodedCase


def forced_slots(batch_size: int, foreground_fraction: float) -> int:
    """How many slots of each batch must hold foreground (the last ones): round(B * fraction),
    at least one when the fraction is positive."""
    if foreground_fraction <= 0:
        return 0
    return min(batch_size, max(1, round(batch_size * foreground_fraction)))


def cut_patch(
    image: np.ndarray,
    mask: np.ndarray,
    foreground: np.ndarray,
    patch: int,
    rng: np.random.Generator,
    force_foreground: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """A (patch, patch[, 3]) window of ``image`` and ``mask``, copied out of a memory-mapped case.

    ``foreground``: (K, 2) foreground locations of the case. With ``force_foreground`` (and K > 0)
    one of them is drawn and the window placed uniformly among those that contain it.
    """
    height, width = mask.shape
    if force_foreground and len(foreground):
        row, col = foreground[rng.integers(len(foreground))]
        top = _start_around(int(row), height, patch, rng)
        left = _start_around(int(col), width, patch, rng)
    else:
        top = int(rng.integers(0, max(height - patch, 0) + 1))
        left = int(rng.integers(0, max(width - patch, 0) + 1))
    rows, cols = slice(top, top + patch), slice(left, left + patch)
    out_image = np.zeros((patch, patch, 3), np.uint8)
    out_mask = np.zeros((patch, patch), np.uint8)
    part = np.asarray(image[rows, cols])
    out_image[: part.shape[0], : part.shape[1]] = part
    out_mask[: part.shape[0], : part.shape[1]] = np.asarray(mask[rows, cols])
    return out_image, out_mask


def _start_around(position: int, length: int, patch: int, rng: np.random.Generator) -> int:
    """A window start in [0, length - patch] whose window covers ``position`` (0 if the axis is
    shorter than the patch: it is padded)."""
    if length <= patch:
        return 0
    low = max(0, position - patch + 1)
    high = min(position, length - patch)
    return int(rng.integers(low, high + 1))


class PatchSampler:
    """Training patches from cases in the on-disk cache; ``sample(index, seed, slot, batch)``."""

    def __init__(
        self, cases: Sequence[DecodedCase], patch: int, foreground_fraction: float = 1 / 3, n_classes: int = 2
    ):
        self.cases, self.patch = list(cases), int(patch)
        self.foreground_fraction = float(foreground_fraction)
        self.n_classes = int(n_classes)

    def __len__(self) -> int:
        return len(self.cases)

    def sample(self, index: int, seed: int, slot: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        case = self.cases[index]
        force = slot >= batch_size - forced_slots(batch_size, self.foreground_fraction)
        rng = np.random.default_rng([seed, 7])  # the augmentation uses the seed on its own
        foreground = case.foreground() if force else np.zeros((0, 2))
        if force and self.n_classes > 2 and len(foreground):
            foreground = one_class(foreground, case.mask(), rng)
        return cut_patch(case.image(), case.mask(), foreground, self.patch, rng, force)


def one_class(foreground: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The stored locations of one foreground class, drawn uniformly among the classes the case
    holds (nnU-Net's class-uniform oversampling: a rare, thin class is seen as often as a large one)."""
    classes = np.asarray(mask)[foreground[:, 0], foreground[:, 1]]
    present = np.unique(classes)
    chosen = present[rng.integers(len(present))]
    return foreground[classes == chosen]


def validation_patches(cases: Sequence[DecodedCase], patch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One fixed patch per validation case, on foreground where the case has any (nnU-Net's
    'pseudo Dice' during training): uint8 (N, patch, patch, 3) and (N, patch, patch). Full
    images are predicted with the sliding window once training ends."""
    images = np.zeros((len(cases), patch, patch, 3), np.uint8)
    masks = np.zeros((len(cases), patch, patch), np.uint8)
    for i, case in enumerate(cases):
        rng = np.random.default_rng([seed, i, 11])
        images[i], masks[i] = cut_patch(case.image(), case.mask(), case.foreground(), patch, rng, True)
    return images, masks
