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


# -- several classes -------------------------------------------------------------------------
# nnU-Net's rule: each foreground class gets the clean-up that helps it on validation, kept only
# where it raises that class's mean Dice by more than the tolerance and lowers no other class's.


def apply_classes(labels, per_class: dict[int, PostProcess]):
    """Post-process label maps (ragged cases, or (N, H, W)), class by class in index order: a
    class's removed pixels become background, and a filled hole becomes the class only where
    it was background (another class's pixels are never taken). uint8 like the input."""
    from segx.data.ragged import Ragged

    steps = [(c, p) for c, p in sorted(per_class.items()) if not p.is_identity]
    if not steps:
        return labels

    def one(case: np.ndarray) -> np.ndarray:
        out = np.array(case, np.uint8, copy=True)
        for c, post in steps:
            mine = out == c
            kept = apply_one(mine, post)
            out[mine & ~kept] = 0
            out[kept & ~mine & (out == 0)] = c
        return out

    if isinstance(labels, Ragged):
        return labels.map(one, np.uint8)
    return np.stack([one(m) for m in labels])


def choose_class_postprocess(labels, truth, n_classes: int, min_sizes, tolerance: float):
    """Per foreground class, the candidate (:func:`candidates`) that raises the class's mean Dice
    on validation by more than ``tolerance`` without lowering another foreground class's, tried
    class by class on the result so far; returns ({class index: PostProcess}, rows of
    (class, candidate description, class Dice) for every try)."""
    from segx.scoring.classes import class_dice, class_means, confusion_counts

    def per_class(pred):
        return class_means(class_dice(*confusion_counts(pred, truth, n_classes)))

    chosen: dict[int, PostProcess] = {}
    current = labels
    base = per_class(current)
    rows = []
    for c in range(1, n_classes):
        best, best_scores, best_pred = None, base, current
        for post in candidates([0, *min_sizes])[1:]:
            pred = apply_classes(current, {c: post})
            scores = per_class(pred)
            rows.append((c, post.describe(), float(scores[c])))
            others = [j for j in range(1, n_classes) if j != c and not np.isnan(base[j])]
            hurts = any(scores[j] < base[j] for j in others)
            gain = scores[c] - best_scores[c] if not np.isnan(scores[c]) and not np.isnan(best_scores[c]) else 0.0
            if not hurts and gain > (tolerance if best is None else 0.0):
                best, best_scores, best_pred = post, scores, pred
        if best is not None:
            chosen[c], base, current = best, best_scores, best_pred
    return chosen, rows
