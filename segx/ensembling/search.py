"""Ensemble weight and threshold search on cached validation probabilities (numpy only).

The objective is the mean per-case Dice of ``binarize(combine(probs, w), t)`` over validation
cases, for weights on the simplex and thresholds from a fixed list. Every candidate is a
:class:`segx.ensembling.probs.Weights`: whole counts k_m over a denominator D (a grid point, a greedy bag
of D picks, equal weights, Nelder-Mead's weights rounded to thousandths). Its score
``sum_m k_m p_m`` is an exact integer and a pixel is foreground iff the score reaches
``ceil(t * 255 * D)``: the arithmetic of :func:`segx.ensembling.probs.combine` and
:func:`segx.ensembling.probs.binarize`, so every Dice the search reports is, bit for bit, the Dice of the
prediction path on the same cached probabilities.

Speed comes from one exact reduction: for weights on the simplex the score divided by D lies
between the smallest and the largest member probability, so a pixel on which every member is
below the lowest threshold (or at or above the highest) is decided for every candidate. Those
pixels are counted once; only the rest (typically 5-20 per cent, near boundaries and where
members disagree) are kept, as ``uint8 (M, K)``. A lookup table turns integer scores into
threshold bins, and one ``bincount`` per batch of candidates (2 with 9 thresholds, up to 8
with fewer) counts pixels per (case, truth, joint bins of the batch).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from segx.data.ragged import Ragged, per_case_count
from segx.ensembling.probs import Weights, binarize, combine, cut
from segx.errors import SegxError
from segx.scoring.classes import nan_mean_last
from segx.scoring.metrics import dice_counts, dice_per_case

# Nelder-Mead's continuous weights are rounded to counts over this denominator before scoring.
OPTIMIZE_DENOMINATOR = 1000


@dataclass
class Compact:
    """Validation data reduced to the pixels a candidate can still change.

    probs: uint8 (M, K); truth: bool (K,); segment: int (K,) index into ``cases`` (sorted);
    cases: (S,) case index of each segment; fixed_tp, fixed_pp, true_sum: int64 (N,);
    thresholds: sorted float64 (T,).
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
    # "one": a case where truth and prediction are both empty scores 1 (segx's binary rule);
    # "skip": it is not counted, and the mean is over the cases that count (regions, several classes).
    empty: str = "one"


def compact(
    member_probs: Sequence[np.ndarray],
    truth: np.ndarray,
    thresholds: Sequence[float],
    chunk: int = 16,
    empty: str = "one",
) -> Compact:
    """Reduce members' uint8 maps and the truth: (N, H, W) arrays or ragged cases of any sizes
    (:class:`segx.data.ragged.Ragged`, memory-mapped is fine).

    Reads ``chunk`` cases at a time, so memory stays bounded by the kept pixels. Exact: a
    candidate's score over D lies in [lo, hi] (the members' smallest and largest probability),
    so ``hi < 255 t_min`` is background and ``lo >= 255 t_max`` foreground for every candidate
    and threshold, with the thresholds read as :func:`segx.ensembling.probs.cut` reads them.
    """
    thresholds = np.asarray(sorted(float(t) for t in thresholds), np.float64)
    if not len(thresholds):
        raise SegxError("the threshold list is empty; set ensemble.thresholds or ensemble.threshold")
    low = cut(thresholds[0], 1)  # smallest uint8 probability that reaches the lowest threshold
    high = cut(thresholds[-1], 1)  # every probability at least this reaches every threshold
    member_probs = [Ragged.of(p) for p in member_probs]
    truth = Ragged.of(truth)
    for p in member_probs:
        if not p.same_shapes(truth):
            raise SegxError(
                "member probabilities and ground truth differ in case sizes; retrain the members on one split"
            )
    n = len(truth)
    fixed_tp = np.zeros(n, np.int64)
    fixed_pp = np.zeros(n, np.int64)
    true_sum = np.zeros(n, np.int64)
    kept_probs, kept_truth, kept_case = [], [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = slice(truth.offsets[start], truth.offsets[stop])
        local = truth.offsets[start : stop + 1] - truth.offsets[start]
        maps = [np.asarray(p.flat[rows], np.uint8) for p in member_probs]
        gt = np.asarray(truth.flat[rows], bool)
        lo, hi = maps[0].copy(), maps[0].copy()
        for m in maps[1:]:
            np.minimum(lo, m, out=lo)
            np.maximum(hi, m, out=hi)
        positive = lo >= high
        uncertain = (hi >= low) & (lo < high)
        fixed_pp[start:stop] = per_case_count(positive, local)
        fixed_tp[start:stop] = per_case_count(positive & gt, local)
        true_sum[start:stop] = per_case_count(gt, local)
        flat = np.flatnonzero(uncertain)
        kept_probs.append(np.stack([m[flat] for m in maps]))
        kept_truth.append(gt[flat])
        kept_case.append(np.searchsorted(local, flat, side="right") - 1 + start)
    m = len(member_probs)
    probs = np.concatenate(kept_probs, axis=1) if kept_probs else np.zeros((m, 0), np.uint8)
    segment, cases = segments(kept_case)
    return Compact(
        probs=probs,
        truth=np.concatenate(kept_truth) if kept_truth else np.zeros(0, bool),
        segment=segment,
        cases=cases,
        fixed_tp=fixed_tp,
        fixed_pp=fixed_pp,
        true_sum=true_sum,
        thresholds=thresholds,
        n_pixels=truth.n_pixels,
        empty=empty,
    )


def segments(kept_case: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(segment of each kept pixel, case of each segment) from the kept pixels' case indices, one
    array per chunk of cases. Pixels come in case order: a segment starts wherever the case changes."""
    case_of_pixel = np.concatenate(kept_case) if kept_case else np.zeros(0, np.int64)
    starts = np.ones(len(case_of_pixel), bool)
    starts[1:] = case_of_pixel[1:] != case_of_pixel[:-1]
    return (np.cumsum(starts) - 1).astype(np.int64), case_of_pixel[starts]


def bin_table(thresholds: Sequence[float], denominator: int) -> np.ndarray:
    """For every integer score 0..255*D, how many of the (sorted) thresholds it reaches."""
    cuts = [cut(t, denominator) for t in thresholds]
    dtype = np.uint8 if len(cuts) < 256 else np.uint16
    return np.searchsorted(cuts, np.arange(255 * denominator + 1), side="right").astype(dtype)


def _score_dtype(denominator: int):
    return np.uint16 if 255 * denominator <= np.iinfo(np.uint16).max else np.int32


def _member_probs(data: Compact, dtype) -> np.ndarray:
    """The kept probabilities widened to the score dtype once, not per candidate."""
    key = ("probs", np.dtype(dtype).str)
    if key not in data.cache:
        data.cache[key] = data.probs.astype(dtype)
    return data.cache[key]


def _group_base(data: Compact, width: int) -> np.ndarray:
    """Per pixel (case segment, truth) histogram offset with ``width`` bins each, as intp."""
    key = ("base", width)
    if key not in data.cache:
        data.cache[key] = ((data.segment * 2 + data.truth) * width).astype(np.intp)
    return data.cache[key]


def _pack(data: Compact) -> int:
    """How many candidates share one ``bincount``: their joint bin codes fit in a uint8 and
    the joint table (per case segment and truth) stays small enough for the cache."""
    bins = len(data.thresholds) + 1
    groups = len(data.cases) * 2
    pack = 1
    while bins ** (pack + 1) <= 256 and groups * bins ** (pack + 1) <= 1 << 20 and pack < 8:
        pack += 1
    return pack


def _histograms(data: Compact, scores: Iterable[np.ndarray], table: np.ndarray) -> np.ndarray:
    """Pixel counts (C, S, 2, T+1) per candidate, case segment, truth and threshold bin.

    ``scores``: one integer score array (K,) per candidate, consumed lazily. Several candidates
    share one ``bincount`` over their joint bin codes (2 with the default 9 thresholds, 8 with
    one), which divides the passes over the pixels.
    """
    bins = len(data.thresholds) + 1
    groups = len(data.cases) * 2
    pack = _pack(data)
    # Table i gives bin * bins**i, so a sum of lookups is the joint code (mixed radix).
    tables = [table] if pack == 1 else [(table * bins**i).astype(np.uint8) for i in range(pack)]
    out = []
    scores = iter(scores)
    while batch := list(itertools.islice(scores, pack)):
        code = np.take(tables[0], batch[0])
        for i, score in enumerate(batch[1:], start=1):
            code += np.take(tables[i], score)
        width = bins ** len(batch)
        hist = np.bincount(_group_base(data, width) + code, minlength=groups * width)
        # Joint axes (..., bin of candidate n-1, ..., bin of candidate 0): sum out the others.
        hist = hist.reshape(-1, 2, *([bins] * len(batch)))
        axes = list(range(2, 2 + len(batch)))
        for i in range(len(batch)):
            keep = 2 + len(batch) - 1 - i
            out.append(hist.sum(axis=tuple(a for a in axes if a != keep)) if len(batch) > 1 else hist)
    shape = (len(data.cases), 2, bins)
    return np.stack(out) if out else np.zeros((0, *shape), np.int64)


def _mean_dice(data: Compact, hist: np.ndarray) -> np.ndarray:
    """Mean per-case Dice (C, T) from histograms (C, S, 2, T+1).

    Per-case Dice is laid out (C, T, N) and averaged over its last, contiguous axis: numpy then
    sums each row exactly as ``dice_per_case(...).mean()`` sums a 1-D array, so the result is
    the prediction path's number to the last bit.
    """
    c, n_thr = len(hist), len(data.thresholds)
    # Pixels reaching threshold j are those in bins above j: reverse cumulative sums.
    reach = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # (C, S, 2, T)
    tp = np.empty((c, n_thr, len(data.fixed_tp)), np.int64)
    pp = np.empty_like(tp)
    tp[:] = data.fixed_tp
    pp[:] = data.fixed_pp
    tp[:, :, data.cases] += reach[:, :, 1, :].transpose(0, 2, 1)
    pp[:, :, data.cases] += reach.sum(axis=2).transpose(0, 2, 1)
    if data.empty == "skip":  # not counted where both are empty; NaN where no case counts
        denom = pp + data.true_sum
        dice = np.full(tp.shape, np.nan)
        np.divide(2.0 * tp, denom, out=dice, where=denom > 0)
        return nan_mean_last(dice)
    dice = dice_counts(tp, pp, np.broadcast_to(data.true_sum, tp.shape))
    return dice.mean(axis=-1)


def _weighted_scores(data: Compact, counts: np.ndarray, dtype) -> Iterator[np.ndarray]:
    """Integer scores ``sum_m k_m p_m`` (K,) for each row of counts, one at a time.

    Rows sharing leading counts (a grid in lexicographic order) reuse the partial sums.
    """
    probs = _member_probs(data, dtype)
    k = probs.shape[1]
    partial = [np.zeros(k, dtype)]
    previous: tuple = ()
    for row in counts:
        row = tuple(int(v) for v in row)
        same = 0
        while same < min(len(previous), len(row)) - 1 and previous[same] == row[same]:
            same += 1
        del partial[same + 1 :]
        for m in range(same, len(row) - 1):
            partial.append(partial[m] if row[m] == 0 else partial[m] + probs[m] * dtype(row[m]))
        last = row[-1]
        yield partial[-1] if last == 0 else partial[-1] + probs[-1] * dtype(last)
        previous = row


def evaluate(data: Compact, counts: np.ndarray, denominator: int) -> np.ndarray:
    """Mean per-case Dice for each candidate and threshold: float64 (C, T).

    counts: (C, M) non-negative integers, each row summing to ``denominator``: the weights
    counts / denominator, scored as :func:`segx.ensembling.probs.combine` and :func:`segx.ensembling.probs.binarize`.
    """
    counts = np.atleast_2d(np.asarray(counts))
    if counts.shape[1:] != (data.n_members,) or not np.all(counts.astype(np.int64).sum(axis=1) == denominator):
        raise ValueError(f"each row of counts must have {data.n_members} entries summing to {denominator}")
    if np.any(counts < 0) or not np.all(np.asarray(counts, np.int64) == counts):
        raise ValueError("counts must be non-negative integers")
    counts = counts.astype(np.int64)
    if not isinstance(data, Compact):  # several classes: segx.ensembling.classes.CompactClasses
        return data.evaluate(counts, denominator)
    table = bin_table(data.thresholds, denominator)
    dtype = _score_dtype(denominator)
    out = np.empty((len(counts), len(data.thresholds)))
    block = 64  # candidates per histogram batch: bounds the memory of the histograms
    for start in range(0, len(counts), block):
        rows = counts[start : start + block]
        out[start : start + len(rows)] = _mean_dice(data, _histograms(data, _weighted_scores(data, rows, dtype), table))
    return out


def evaluate_additions(data: Compact, bag: np.ndarray) -> np.ndarray:
    """Dice (M, T) of the bag (member counts) plus one more copy of each member in turn.

    The greedy step: the bag's integer sum is computed once and each candidate adds one
    member's probabilities to it, so a step costs about one pass per member.
    """
    bag = np.asarray(bag, np.int64)
    if not isinstance(data, Compact):  # several classes: segx.ensembling.classes.CompactClasses
        return data.evaluate_additions(bag)
    denominator = int(bag.sum()) + 1
    dtype = _score_dtype(denominator)
    probs = _member_probs(data, dtype)
    base = np.zeros(probs.shape[1], dtype)
    for m in np.flatnonzero(bag):
        base += probs[m] * dtype(bag[m])
    table = bin_table(data.thresholds, denominator)
    scores = (base + probs[m] for m in range(data.n_members))
    return _mean_dice(data, _histograms(data, scores, table))


@dataclass
class Candidate:
    name: str
    weights: Weights
    threshold: float
    val_dice: float
    complexity: int  # smaller is simpler: members used, with 'equal weights' simpler than searched


@dataclass
class SearchResult:
    best: Candidate
    history: list[dict] = field(default_factory=list)  # one row per evaluated candidate


def _row(step: int, weights: Weights, threshold: float, val_dice: float, **extra) -> dict:
    """One history row: enough to replay the candidate through the prediction path."""
    return {
        "step": step,
        "val_dice": val_dice,
        "threshold": threshold,
        "weights": weights.floats,
        "counts": list(weights.counts),
        "denominator": weights.denominator,
        **extra,
    }


def simplex_counts(n_members: int, parts: int) -> np.ndarray:
    """All count vectors of ``n_members`` non-negative integers summing to ``parts``, in
    lexicographic order: int64 (C, M)."""
    rows = []
    for cuts in itertools.combinations(range(parts + n_members - 1), n_members - 1):
        edges = (-1, *cuts, parts + n_members - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_members)])
    return np.asarray(rows, np.int64).reshape(-1, n_members)


def grid_parts(n_members: int, step: float) -> int:
    """The denominator of a grid at ``step`` (10 for 0.1), refusing steps that do not divide 1
    and grids too large to search."""
    parts = round(1 / step)
    if not math.isclose(parts * step, 1.0, abs_tol=1e-9):
        raise SegxError(f"ensemble.grid_step={step} must divide 1 (e.g. 0.1, 0.05, 0.25)")
    count = math.comb(parts + n_members - 1, n_members - 1)
    if count > 200_000:
        raise SegxError(
            f"ensemble.grid_step={step} with {n_members} members gives {count} candidates; use a "
            "larger step or ensemble.search=greedy"
        )
    return parts


def search_grid(data: Compact, step: float = 0.1) -> SearchResult:
    parts = grid_parts(data.n_members, step)
    grid = simplex_counts(data.n_members, parts)
    scores = evaluate(data, grid, parts)
    history = []
    for i, row in enumerate(grid):
        t = int(np.argmax(scores[i]))
        history.append(_row(i, Weights(tuple(row), parts), float(data.thresholds[t]), float(scores[i, t])))
    flat = int(np.argmax(scores))
    c, t = divmod(flat, scores.shape[1])
    best = Candidate("grid", Weights(tuple(grid[c]), parts), float(data.thresholds[t]), float(scores[c, t]), 3)
    return SearchResult(best, history)


def search_greedy(data: Compact, max_steps: int = 25, patience: int = 5, min_gain: float = 1e-4) -> SearchResult:
    """Caruana et al. (2004) forward selection with replacement, from the best single member.

    Weights are how often each member was picked; a member that never helps keeps weight 0.
    Stops after ``patience`` picks in a row that do not beat the best bag by more than
    ``min_gain`` (default a tenth of the ensemble's simplicity tolerance: later picks only
    fine-tune weights by amounts the selection would ignore anyway).
    """
    m = data.n_members
    counts = np.zeros(m, np.int64)
    scores = evaluate(data, np.eye(m, dtype=np.int64), 1)
    c, t = divmod(int(np.argmax(scores)), scores.shape[1])
    counts[c] = 1
    best_counts, best_score, best_t = counts.copy(), float(scores[c, t]), t
    history = [_row(0, Weights(tuple(counts), 1), float(data.thresholds[t]), best_score)]
    stale = 0
    from segx.progress import progress

    for step in progress(range(1, max_steps + 1), f"greedy search over {m} members", unit="picks at most"):
        scores = evaluate_additions(data, counts)
        c, t = divmod(int(np.argmax(scores)), scores.shape[1])
        counts[c] += 1
        score = float(scores[c, t])
        history.append(_row(step, Weights(tuple(counts), int(counts.sum())), float(data.thresholds[t]), score))
        if score > best_score + min_gain:
            best_counts, best_score, best_t, stale = counts.copy(), score, t, 0
        else:
            if score > best_score:  # keep the best bag, but a gain this small buys no patience
                best_counts, best_score, best_t = counts.copy(), score, t
            stale += 1
            if stale >= patience:
                break
    weights = Weights(tuple(best_counts), int(best_counts.sum()))
    return SearchResult(Candidate("greedy", weights, float(data.thresholds[best_t]), best_score, 3), history)


def search_optimize(data: Compact, max_evals: int = 300, tolerance: float = 1e-3) -> SearchResult:
    """Greedy selection, then Nelder-Mead (scipy) refines the weights of the members it kept.

    Selection decides who is in (a member greedy never picks keeps weight 0: continuous
    optimisers otherwise keep a sliver of a useless member that fits validation noise);
    Nelder-Mead then moves the weights continuously, on w = |z| / sum|z|, each point rounded to
    counts over ``OPTIMIZE_DENOMINATOR`` and scored exactly as prediction will score it. The
    objective is piecewise constant, so the simplex starts wide (0.25) and the best point seen
    is kept; it replaces the greedy weights only if it gains more than ``tolerance``.
    """
    from scipy.optimize import minimize

    greedy = search_greedy(data)
    active = np.flatnonzero(greedy.best.weights.counts)
    history: list[dict] = [dict(h, phase="greedy") for h in greedy.history]
    best = greedy.best
    if len(active) < 2:
        return SearchResult(Candidate("optimize", best.weights, best.threshold, best.val_dice, 3), history)
    refined: dict = {"score": -1.0}
    seen: dict[tuple, np.ndarray] = {}

    def to_weights(z: np.ndarray) -> Weights:
        z = np.abs(z)
        full = np.zeros(data.n_members)
        full[active] = z / z.sum() if z.sum() > 0 else 1.0 / len(active)
        return Weights.rounded(full, OPTIMIZE_DENOMINATOR)

    def objective(z: np.ndarray) -> float:
        w = to_weights(z)
        if w.counts not in seen:  # rounding maps nearby points to one candidate
            seen[w.counts] = evaluate(data, np.asarray([w.counts]), w.denominator)[0]
        scores = seen[w.counts]
        t = int(np.argmax(scores))
        history.append(_row(len(history), w, float(data.thresholds[t]), float(scores[t]), phase="nelder-mead"))
        if scores[t] > refined["score"]:
            refined.update(score=float(scores[t]), w=w, t=t)
        return -float(scores[t])

    z0 = np.asarray(greedy.best.weights.floats)[active]
    simplex = np.vstack([z0] + [z0 + 0.25 * np.eye(len(active))[i] for i in range(len(active))])
    minimize(
        objective,
        z0,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-6},
    )
    if refined["score"] > best.val_dice + tolerance:
        best = Candidate("optimize", refined["w"], float(data.thresholds[refined["t"]]), refined["score"], 3)
    return SearchResult(Candidate("optimize", best.weights, best.threshold, best.val_dice, 3), history)


def baselines(data: Compact) -> list[Candidate]:
    """Each single member and equal weights, each at its best threshold."""
    m = data.n_members
    rows = [Weights(tuple(int(i == j) for j in range(m)), 1) for i in range(m)]
    rows.append(Weights((1,) * m, m))
    scores = np.vstack([evaluate(data, np.eye(m, dtype=np.int64), 1), evaluate(data, np.ones((1, m), np.int64), m)])
    out = []
    for i, weights in enumerate(rows):
        t = int(np.argmax(scores[i]))
        name = f"member{i}" if i < m else "equal"
        out.append(Candidate(name, weights, float(data.thresholds[t]), float(scores[i, t]), 1 if i < m else 2))
    return out


def choose(candidates: Sequence[Candidate], tolerance: float) -> Candidate:
    """The simplest candidate within ``tolerance`` of the best validation Dice (as nnU-Net)."""
    top = max(c.val_dice for c in candidates)
    eligible = [c for c in candidates if c.val_dice >= top - tolerance]
    return min(eligible, key=lambda c: (c.complexity, -c.val_dice))


def exact_dice(
    member_probs: Sequence[np.ndarray], truth: np.ndarray, weights, threshold: float, chunk: int = 32
) -> np.ndarray:
    """Per-case Dice of one weighting through :func:`segx.ensembling.probs.combine` (the predict path)."""
    weights = Weights.of(weights)
    member_probs, truth = [Ragged.of(p) for p in member_probs], Ragged.of(truth)
    out = []
    for start in range(0, len(truth), chunk):
        score = combine([p[start : start + chunk] for p in member_probs], weights)
        out.append(dice_per_case(binarize(score, threshold), truth[start : start + chunk]))
    return np.concatenate(out)


def majority_vote(member_probs: Sequence[np.ndarray], start: int = 0, stop: int | None = None) -> np.ndarray:
    """Strict majority of members binarised at 0.5 (ties are background): bool, ragged cases
    (or (n, H, W) for array inputs)."""
    if isinstance(member_probs[0], Ragged):
        part = [p[start:stop] for p in member_probs]
        votes = sum((p.flat >= 128).astype(np.int16) for p in part)
        return part[0].like(votes * 2 > len(member_probs))
    votes = sum((np.asarray(p[start:stop]) >= 128).astype(np.int16) for p in member_probs)
    return votes * 2 > len(member_probs)
