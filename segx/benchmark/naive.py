"""The reference the search benchmarks compare segx with: a tutorial-style weight grid."""

from __future__ import annotations

import itertools

import numpy as np


def naive_grid(probs_float: np.ndarray, truth: np.ndarray, step: float = 0.1):
    """The reference the benchmarks compare :func:`search_grid` with: the tutorial way, a loop
    over weight combinations that recomputes everything each time, at threshold 0.5.

    probs_float: float (M, N, H, W) in [0, 1] with truth bool (N, H, W); or, for cases of
    different sizes, float (M, P) flat pixels with truth a :class:`segx.data.ragged.Ragged` of P
    pixels. Returns (best mean Dice, its weights, how many combinations were evaluated)."""
    from segx.data.ragged import Ragged

    if isinstance(truth, Ragged):
        starts = truth.offsets[:-1]
        flat_truth = np.asarray(truth.flat, bool)

        def case_sums(mask):
            return np.add.reduceat(mask.astype(np.int64), starts)
    else:
        flat_truth = truth

        def case_sums(mask):
            return mask.sum(axis=(1, 2))

    n_members = probs_float.shape[0]
    best_dice, best_w = -1.0, None
    values = np.round(np.arange(0, 1 + step / 2, step), 10)
    evaluated = 0
    for w in itertools.product(values, repeat=n_members):
        if abs(sum(w) - 1.0) > 1e-9:
            continue
        evaluated += 1
        avg = np.tensordot(np.array(w, np.float64), probs_float, axes=(0, 0))
        pred = avg >= 0.5
        inter = case_sums(pred & flat_truth)
        denom = case_sums(pred) + case_sums(flat_truth)
        dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0).mean()
        if dice > best_dice:
            best_dice, best_w = float(dice), w
    return best_dice, best_w, evaluated
