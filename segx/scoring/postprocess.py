"""Mask post-processing chosen on validation data (OpenCV connected components)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PostProcess:
    """min_size: drop components smaller than this many pixels (0 = off);
    keep_largest: keep only the largest component; fill_holes: fill enclosed background."""

    min_size: int = 0
    keep_largest: bool = False
    fill_holes: bool = False

    @property
    def is_identity(self) -> bool:
        return self.min_size <= 0 and not self.keep_largest and not self.fill_holes

    def describe(self) -> str:
        if self.is_identity:
            return "none"
        parts = []
        if self.min_size > 0:
            parts.append(f"remove<{self.min_size}px")
        if self.keep_largest:
            parts.append("keep-largest")
        if self.fill_holes:
            parts.append("fill-holes")
        return "+".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def apply_one(mask: np.ndarray, post: PostProcess) -> np.ndarray:
    """Post-process one (H, W) boolean mask."""
    if post.is_identity or not mask.any():
        return mask
    mask = mask.astype(np.uint8)
    if post.fill_holes:
        # Background not connected to the border is a hole.
        padded = np.pad(1 - mask, 1, constant_values=1)
        n, labels = cv2.connectedComponents(padded, connectivity=4)
        outside = labels == labels[0, 0]
        mask = (~outside[1:-1, 1:-1]).astype(np.uint8) | mask
    if post.min_size > 0 or post.keep_largest:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.zeros(n, bool)
        if post.keep_largest and len(areas):
            keep[1 + int(np.argmax(areas))] = True
        else:
            keep[1:] = areas >= post.min_size
        mask = keep[labels].astype(np.uint8)
    return mask.astype(bool)


def apply(masks, post: PostProcess):
    """Post-process a batch of boolean masks: (N, H, W), or ragged cases of any sizes."""
    from segx.data.ragged import Ragged

    if isinstance(masks, Ragged):
        if post.is_identity:
            return masks.like(masks.flat.astype(bool, copy=False))
        return masks.map(lambda m: apply_one(m.astype(bool), post), bool)
    if post.is_identity:
        return masks.astype(bool)
    return np.stack([apply_one(m, post) for m in masks])


def candidates(min_sizes=(0, 10, 20, 50)) -> list[PostProcess]:
    """Post-processing options tried on validation (identity first: the simplest wins ties)."""
    out = [PostProcess()]
    out += [PostProcess(min_size=s) for s in min_sizes if s > 0]
    out += [PostProcess(fill_holes=True)]
    out += [PostProcess(min_size=s, fill_holes=True) for s in min_sizes if s > 0]
    out += [PostProcess(keep_largest=True)]
    return out
