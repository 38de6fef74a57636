"""Ensemble weight and threshold search on cached validation probabilities (numpy only).

The objective is the mean per-case Dice of ``combine(probs, w) >= t * 255`` over validation
cases, for weights on the simplex and thresholds from a fixed list.

Speed comes from one exact reduction: for weights on the simplex the combined score of a
pixel lies between the smallest and the largest member probability, so a pixel on which every
member is below the lowest threshold (or above the highest) is decided for every candidate.
Those pixels are counted once; only the rest (typically 5-20 per cent, near boundaries and
where members disagree) are kept, as ``uint8 (M, K)``. Grid points, greedy bags and equal
weights are fractions k_m / D, so their scores ``sum_m k_m p_m`` are exact integers binned by a
lookup table; arbitrary weights (Nelder-Mead) use the float32 arithmetic of
:func:`segx.probs.combine`. Per-case counts per threshold come from one ``bincount`` per block of
candidates. The validation Dice recorded for the chosen ensemble is always recomputed through
:func:`segx.probs.combine`, the path prediction uses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segx.errors import SegxError
from segx.metrics import dice_counts, dice_per_case
from segx.probs import binarize, combine, threshold_value

# A float32 weighted average can exceed its largest input by a few ulps; keep a margin.
_MARGIN = 1e-3


@dataclass
class Compact:
    """Validation data reduced to the pixels a candidate can still change.

    probs: uint8 (M, K); truth: bool (K,); segment: int (K,) index into ``cases`` (sorted);
    cases: (S,) case index of each segment; fixed_tp, fixed_pp, true_sum: int64 (N,).
    """

    probs: np.ndarray
    truth: np.ndarray
    segment: np.ndarray
    cases: np.ndarray
    fixed_tp: np.ndarray
    fixed_pp: np.ndarray
    true_sum: np.ndarray
    thresholds: np.ndarray

    @property
    def n_members(self) -> int:
        return self.probs.shape[0]

    @property
    def kept_fraction(self) -> float:
        total = self.n_pixels
        return self.probs.shape[1] / total if total else 0.0

    n_pixels: int = 0
    cache: dict = field(default_factory=dict, repr=False)


def compact(
    member_probs: Sequence[np.ndarray],
    truth: np.ndarray,
    thresholds: Sequence[float],
    chunk: int = 16,
) -> Compact:
    """Reduce members' uint8 (N, H, W) maps (memory-mapped is fine) and truth (N, H, W).

    Reads ``chunk`` cases at a time, so memory stays bounded by the kept pixels.
    """
    thresholds = np.asarray(sorted(thresholds), np.float64)
    low = float(threshold_value(thresholds[0])) - _MARGIN
    high = float(threshold_value(thresholds[-1])) + _MARGIN
    n = len(truth)
    fixed_tp = np.zeros(n, np.int64)
    fixed_pp = np.zeros(n, np.int64)
    true_sum = np.zeros(n, np.int64)
    kept_probs, kept_truth, kept_case = [], [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        stack = np.stack([np.asarray(p[start:stop]).reshape(stop - start, -1) for p in member_probs])
        gt = np.asarray(truth[start:stop], bool).reshape(stop - start, -1)
        lo, hi = stack.min(axis=0), stack.max(axis=0)
        positive = lo > high  # above every threshold for every convex combination
        uncertain = (hi >= low) & ~positive
        fixed_pp[start:stop] = positive.sum(axis=1)
        fixed_tp[start:stop] = (positive & gt).sum(axis=1)
        true_sum[start:stop] = gt.sum(axis=1)
        rows, cols = np.nonzero(uncertain)
        kept_probs.append(stack[:, rows, cols])
        kept_truth.append(gt[rows, cols])
        kept_case.append(rows + start)
    probs = np.concatenate(kept_probs, axis=1) if kept_probs else np.zeros((len(member_probs), 0), np.uint8)
    case_of_pixel = np.concatenate(kept_case) if kept_case else np.zeros(0, np.int64)
    cases, segment = np.unique(case_of_pixel, return_inverse=True)
    return Compact(
        probs=probs,
        truth=np.concatenate(kept_truth) if kept_truth else np.zeros(0, bool),
        segment=segment.astype(np.int64),
        cases=cases,
        fixed_tp=fixed_tp,
        fixed_pp=fixed_pp,
        true_sum=true_sum,
        thresholds=thresholds,
        n_pixels=int(np.prod(np.shape(truth))),
    )


def _histogram_base(data: Compact) -> np.ndarray:
    """Per pixel (segment, truth) part of the histogram index, bins leave room between."""
    n_thr = len(data.thresholds)
    return (data.segment.astype(np.int64) * (n_thr + 1)) * 2 + data.truth.astype(np.int64)


def _offsets(data: Compact, c: int) -> np.ndarray:
    """(c, K) int64 histogram index without the bins: pixel base plus a block per candidate.

    Cached on ``data``: the greedy search reuses it at every step.
    """
    key = ("offsets", c)
    if key not in data.cache:
        size = len(data.cases) * (len(data.thresholds) + 1) * 2
        data.cache.clear()
        data.cache[key] = _histogram_base(data)[None, :] + (np.arange(c, dtype=np.int64) * size)[:, None]
    return data.cache[key]


def _dice_from_bins(data: Compact, bins2: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """Mean per-case Dice (C, T) from per-pixel threshold bins (times 2), shape (C, K)."""
    c = len(bins2)
    n_thr, n_seg = len(data.thresholds), len(data.cases)
    size = n_seg * (n_thr + 1) * 2
    index = _offsets(data, c) + bins2
    hist = np.bincount(index.ravel(), minlength=c * size).reshape(c, n_seg, n_thr + 1, 2)
    # Pixels reaching threshold j are those in bins above j: reverse cumulative sums.
    reach = np.cumsum(hist[:, :, ::-1, :], axis=2)[:, :, ::-1, :][:, :, 1:, :]
    total_tp = np.broadcast_to(data.fixed_tp[None, :, None], (c, len(data.fixed_tp), n_thr)).copy()
    total_pp = np.broadcast_to(data.fixed_pp[None, :, None], total_tp.shape).copy()
    total_tp[:, data.cases, :] += reach[..., 1]
    total_pp[:, data.cases, :] += reach.sum(axis=3)
    dice = dice_counts(total_tp, total_pp, np.broadcast_to(data.true_sum[None, :, None], total_tp.shape))
    return dice.mean(axis=1)


def _int_lut(data: Compact, denominator: int) -> np.ndarray:
    """Threshold bin (times 2) for every integer score 0..255*D of a D-denominator weighting."""
    cuts = np.asarray(data.thresholds, np.float64) * 255.0 * denominator
    return (np.searchsorted(cuts, np.arange(255 * denominator + 1), side="right") * 2).astype(np.uint8)


def evaluate(data: Compact, weights: np.ndarray, denominator: int | None = None) -> np.ndarray:
    """Mean per-case Dice for each candidate and threshold: float64 (C, T).

    weights: (C, M) rows on the simplex. With ``denominator`` D, every weight times D must be a
    whole number (grid points, greedy bags, equal weights): scores are then exact integers
    ``sum_m k_m p_m`` and a lookup table turns them into threshold bins, several times faster
    than the float path used for arbitrary weights (which mirrors :func:`segx.probs.combine`).
    """
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    counts = None
    if denominator is not None:
        counts = np.rint(weights * denominator)
        if not np.allclose(counts, weights * denominator, atol=1e-6):
            raise ValueError("weights are not multiples of 1/denominator")
        counts = counts.astype(np.int32)
    k = data.probs.shape[1]
    block = max(1, int(8_000_000 // max(1, k)))
    out = np.empty((len(weights), len(data.thresholds)))
    lut = _int_lut(data, denominator) if counts is not None else None
    cuts32 = threshold_value(data.thresholds).astype(np.float32)
    for start in range(0, len(weights), block):
        stop = min(len(weights), start + block)
        if counts is not None:
            score = np.zeros((stop - start, k), np.int32)
            for m in range(data.n_members):
                for row in np.flatnonzero(counts[start:stop, m]):
                    score[row] += counts[start + row, m] * data.probs[m].astype(np.int32)
            bins2 = lut[score]
        else:
            w = weights[start:stop].astype(np.float32)
            score = np.zeros((stop - start, k), np.float32)
            for m in range(data.n_members):  # same order and precision as probs.combine
                if np.any(w[:, m]):
                    score += w[:, m : m + 1] * data.probs[m].astype(np.float32)[None, :]
            bins2 = np.searchsorted(cuts32, score, side="right") * 2
        out[start:stop] = _dice_from_bins(data, bins2)
    return out


def evaluate_additions(data: Compact, bag: np.ndarray) -> np.ndarray:
    """Dice (M, T) of the bag (member counts) plus one more copy of each member in turn.

    The greedy step: the bag's integer sum is computed once and each candidate adds one
    member's probabilities to it, so a step costs about one pass per member.
    """
    bag = np.asarray(bag, np.int64)
    denominator = int(bag.sum()) + 1
    base_sum = np.zeros(data.probs.shape[1], np.uint16 if 255 * denominator < 65536 else np.int32)
    for m in np.flatnonzero(bag):
        base_sum += (int(bag[m]) * data.probs[m].astype(base_sum.dtype))
    lut = _int_lut(data, denominator)
    bins2 = np.stack([lut[base_sum + data.probs[m]] for m in range(data.n_members)])
    return _dice_from_bins(data, bins2)


@dataclass
class Candidate:
    name: str
    weights: np.ndarray
    threshold: float
    val_dice: float
    complexity: int  # smaller is simpler: members used, with 'equal weights' simpler than searched


@dataclass
class SearchResult:
    best: Candidate
    history: list[dict] = field(default_factory=list)  # one row per evaluated step


def _best(data: Compact, weights: np.ndarray, denominator: int | None = None) -> tuple[int, int, np.ndarray]:
    scores = evaluate(data, weights, denominator)
    flat = int(np.argmax(scores))
    return flat // scores.shape[1], flat % scores.shape[1], scores


def simplex_grid(n_members: int, step: float) -> np.ndarray:
    """All weight vectors with entries in multiples of ``step`` that sum to one."""
    parts = round(1 / step)
    if not math.isclose(parts * step, 1.0, abs_tol=1e-9):
        raise SegxError(f"ensemble.grid_step={step} must divide 1 (e.g. 0.1, 0.05, 0.25)")
    count = math.comb(parts + n_members - 1, n_members - 1)
    if count > 200_000:
        raise SegxError(
            f"ensemble.grid_step={step} with {n_members} members gives {count} candidates; use a "
            "larger step or ensemble.search=greedy"
        )
    rows = []
    for cuts in itertools.combinations(range(parts + n_members - 1), n_members - 1):
        edges = (-1, *cuts, parts + n_members - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_members)])
    return np.asarray(rows, np.float64) / parts


def search_grid(data: Compact, step: float = 0.1) -> SearchResult:
    grid = simplex_grid(data.n_members, step)
    c, t, scores = _best(data, grid, round(1 / step))
    history = [
        {"step": i, "val_dice": float(scores[i].max()), "weights": grid[i].tolist()}
        for i in range(len(grid))
    ]
    return SearchResult(
        Candidate("grid", grid[c].astype(np.float64), float(data.thresholds[t]), float(scores[c, t]), 3),
        history,
    )


def search_greedy(data: Compact, max_steps: int = 25, patience: int = 5, min_gain: float = 1e-4) -> SearchResult:
    """Caruana et al. (2004) forward selection with replacement, from the best single member.

    Weights are how often each member was picked; a member that never helps keeps weight 0.
    Stops after ``patience`` picks in a row that do not beat the best bag by more than
    ``min_gain`` (default a tenth of the ensemble's simplicity tolerance: later picks only
    fine-tune weights by amounts the selection would ignore anyway).
    """
    m = data.n_members
    counts = np.zeros(m)
    singles = np.eye(m)
    c, t, scores = _best(data, singles, 1)
    counts[c] = 1
    best_counts, best_score, best_t = counts.copy(), float(scores[c, t]), t
    history = [{"step": 0, "val_dice": best_score, "weights": (counts / counts.sum()).tolist()}]
    stale = 0
    for step in range(1, max_steps + 1):
        scores = evaluate_additions(data, counts)
        flat = int(np.argmax(scores))
        c, t = flat // scores.shape[1], flat % scores.shape[1]
        counts[c] += 1
        score = float(scores[c, t])
        history.append({"step": step, "val_dice": score, "weights": (counts / counts.sum()).tolist()})
        if score > best_score + min_gain:
            best_counts, best_score, best_t, stale = counts.copy(), score, t, 0
        else:
            if score > best_score:  # keep the best bag, but a gain this small buys no patience
                best_counts, best_score, best_t = counts.copy(), score, t
            stale += 1
            if stale >= patience:
                break
    weights = best_counts / best_counts.sum()
    return SearchResult(
        Candidate("greedy", weights, float(data.thresholds[best_t]), best_score, 3), history
    )


def search_optimize(data: Compact, max_evals: int = 300, tolerance: float = 1e-3) -> SearchResult:
    """Greedy selection, then Nelder-Mead (scipy) refines the weights of the members it kept.

    Selection decides who is in (a member greedy never picks keeps weight 0: continuous
    optimisers otherwise keep a sliver of a useless member that fits validation noise);
    Nelder-Mead then moves the weights continuously, on w = |z| / sum|z|. The objective is
    piecewise constant, so the simplex starts wide (0.25) and the best point seen is kept;
    it replaces the greedy weights only if it gains more than ``tolerance``.
    """
    from scipy.optimize import minimize

    greedy = search_greedy(data)
    active = np.flatnonzero(greedy.best.weights > 0)
    history: list[dict] = [dict(h, phase="greedy") for h in greedy.history]
    best = {"score": greedy.best.val_dice, "w": greedy.best.weights, "t": int(np.argmin(np.abs(data.thresholds - greedy.best.threshold)))}
    if len(active) < 2:
        return SearchResult(Candidate("optimize", best["w"], greedy.best.threshold, best["score"], 3), history)
    refined = {"score": -1.0, "w": best["w"], "t": 0}

    def to_weights(z: np.ndarray) -> np.ndarray:
        z = np.abs(z)
        full = np.zeros(data.n_members)
        full[active] = z / z.sum() if z.sum() > 0 else 1.0 / len(active)
        return full

    def objective(z: np.ndarray) -> float:
        w = to_weights(z)
        scores = evaluate(data, w[None, :].astype(np.float32))[0]
        t = int(np.argmax(scores))
        history.append({"step": len(history), "val_dice": float(scores[t]), "weights": w.tolist(), "phase": "nelder-mead"})
        if scores[t] > refined["score"]:
            refined.update(score=float(scores[t]), w=w, t=t)
        return -float(scores[t])

    z0 = greedy.best.weights[active]
    simplex = np.vstack([z0] + [z0 + 0.25 * np.eye(len(active))[i] for i in range(len(active))])
    minimize(objective, z0, method="Nelder-Mead",
             options={"initial_simplex": simplex, "maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-6})  # fmt: skip
    if refined["score"] > best["score"] + tolerance:
        best = refined
    return SearchResult(Candidate("optimize", best["w"], float(data.thresholds[best["t"]]), best["score"], 3), history)


def baselines(data: Compact) -> list[Candidate]:
    """Each single member and equal weights, each at its best threshold."""
    m = data.n_members
    rows = np.vstack([np.eye(m), np.full((1, m), 1.0 / m)])
    scores = np.vstack([evaluate(data, rows[:m], 1), evaluate(data, rows[m:], m)])
    out = []
    for i in range(m + 1):
        t = int(np.argmax(scores[i]))
        name = f"member{i}" if i < m else "equal"
        out.append(Candidate(name, rows[i].astype(np.float64), float(data.thresholds[t]), float(scores[i, t]), 1 if i < m else 2))
    return out


def choose(candidates: Sequence[Candidate], tolerance: float) -> Candidate:
    """The simplest candidate within ``tolerance`` of the best validation Dice (as nnU-Net)."""
    top = max(c.val_dice for c in candidates)
    eligible = [c for c in candidates if c.val_dice >= top - tolerance]
    return min(eligible, key=lambda c: (c.complexity, -c.val_dice))


def exact_dice(member_probs: Sequence[np.ndarray], truth: np.ndarray, weights, threshold: float, chunk: int = 32) -> np.ndarray:
    """Per-case Dice of one weighting through :func:`segx.probs.combine` (the predict path)."""
    out = []
    for start in range(0, len(truth), chunk):
        score = combine([np.asarray(p[start : start + chunk]) for p in member_probs], weights)
        out.append(dice_per_case(binarize(score, threshold), np.asarray(truth[start : start + chunk])))
    return np.concatenate(out)


def majority_vote(member_probs: Sequence[np.ndarray], start: int = 0, stop: int | None = None) -> np.ndarray:
    """Strict majority of members binarised at 0.5 (ties are background): bool (n, H, W)."""
    votes = sum((np.asarray(p[start:stop]) >= 128).astype(np.int16) for p in member_probs)
    return votes * 2 > len(member_probs)


SEARCHES = {"grid": search_grid, "greedy": search_greedy, "optimize": search_optimize}
