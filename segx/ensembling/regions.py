"""The ensemble search for overlapping regions (numpy only): one weighting of the members, and a
threshold per region, chosen on validation by the mean over regions of each region's Dice.

Two stages. The *search* ranks weightings by each region's raw decision (the thresholded
weighted sigmoid), which is separable by region and so exact and fast (below). The user's file
is the decoded label map, where each pixel takes the class of the last region that is on; that
couples the regions. So every candidate the choice compares (each member, equal weights, the
search's best) is then scored on its decoded label maps, its region thresholds refined there
(:func:`refine_region_thresholds`), and the ensemble is chosen by that score: the number the
report, ``segx.predict``, the exports and the pyfunc model all reproduce.

Each region is one sigmoid per member; for a weighting its exact integer score is thresholded
as segx's binary ensembles are (:func:`segx.ensembling.probs.binarize`), so every region is the
binary search's problem, compacted exactly as the binary search compacts it
(:func:`segx.ensembling.search.compact`). For a weighting, each region's Dice depends on its own
threshold only, so the best threshold of every region is found independently and the
objective is the mean over regions of those bests. Regions are scored with the empty rule of
several classes (:mod:`segx.scoring.classes`): a region absent from both truth and prediction
in a case is not counted there; unannotated (ignored) pixels are given probability 0 and
background truth, which adds to no region's counts.

:class:`RegionData` answers ``evaluate`` and ``evaluate_additions`` like the binary data, with
a single NaN "threshold" slot, so the grid, greedy and Nelder-Mead searches run on it unchanged;
:meth:`RegionData.thresholds_for` gives the chosen weighting's threshold per region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segx.data.labels import IGNORE_INDEX, Labels
from segx.data.ragged import Ragged
from segx.ensembling.probs import Weights, binarize, combine
from segx.ensembling.search import Compact, compact, evaluate, evaluate_additions


@dataclass
class RegionData:
    """One binary :class:`Compact` per region (empty rule: skip), and the thresholds searched."""

    regions: list[Compact]
    thresholds: np.ndarray = field(default_factory=lambda: np.array([np.nan]))

    @property
    def n_members(self) -> int:
        return self.regions[0].n_members

    @property
    def kept_fraction(self) -> float:
        return float(np.mean([r.kept_fraction for r in self.regions]))

    def _best(self, per_region: list[np.ndarray]) -> np.ndarray:
        """(C, 1): the mean over regions of each region's best threshold's Dice (regions no case
        counts are left out: :func:`segx.scoring.classes.mean_over_regions`)."""
        from segx.scoring.classes import mean_over_regions

        best = [
            np.where(np.isnan(s).all(axis=1), np.nan, np.nanmax(np.nan_to_num(s, nan=-1.0), axis=1)) for s in per_region
        ]
        return mean_over_regions(best).reshape(-1, 1)

    def evaluate(self, counts: np.ndarray, denominator: int) -> np.ndarray:
        return self._best([evaluate(r, counts, denominator) for r in self.regions])

    def evaluate_additions(self, bag: np.ndarray) -> np.ndarray:
        return self._best([evaluate_additions(r, bag) for r in self.regions])

    def thresholds_for(self, weights: Weights) -> list[float]:
        """Each region's best threshold for ``weights`` (the lowest of equals: ``argmax``)."""
        counts = np.asarray([weights.counts])
        out = []
        for r in self.regions:
            scores = np.nan_to_num(evaluate(r, counts, weights.denominator)[0], nan=-1.0)
            out.append(float(r.thresholds[int(np.argmax(scores))]))
        return out


def _region_inputs(member_probs: Sequence, truth, members: Sequence[int], r: int):
    """Region ``r``'s binary problem: each member's uint8 probabilities of it (0 where the truth
    is ignored) and its truth mask (False there)."""
    truth = Ragged.of(truth)
    flat = np.asarray(truth.flat)
    ignored = flat == IGNORE_INDEX
    mask = truth.like(np.isin(flat, members))
    probs = []
    for p in member_probs:
        p = Ragged.of(p)
        plane = np.array(p.flat[:, r], np.uint8)
        plane[ignored] = 0
        probs.append(p.like(plane))
    return probs, mask


def compact_regions(member_probs: Sequence, truth, regions: Sequence[Sequence[int]], thresholds) -> RegionData:
    """Region by region, the binary compaction of the members' probabilities (ragged, flat part
    (pixels, R)) against the label maps ``truth``."""
    out = []
    for r, members in enumerate(regions):
        probs, mask = _region_inputs(member_probs, truth, list(members), r)
        out.append(compact(probs, mask, thresholds, empty="skip"))
    return RegionData(out)


def _combined(member_probs: Sequence, weights):
    return combine([Ragged.of(p) for p in member_probs], Weights.of(weights))


def _decide(score, r: int, threshold: float) -> np.ndarray:
    """Region ``r``'s decisions of a combined score at ``threshold``: bool (pixels,)."""
    values = score.values
    plane = type(score)(values.like(np.ascontiguousarray(values.flat[:, r])), score.denominator)
    return binarize(plane, threshold).flat


def region_decisions(member_probs: Sequence, weights, thresholds: Sequence[float]):
    """The ensemble's raw region decisions, bool ragged (pixels, R), each region at its threshold
    (before decoding: :func:`region_labels` gives what prediction writes)."""
    score = _combined(member_probs, weights)
    on = np.zeros(score.values.flat.shape, bool)
    for r, t in enumerate(thresholds):
        on[:, r] = _decide(score, r, t)
    return score.values.like(on)


def region_labels(member_probs: Sequence, weights, thresholds: Sequence[float], labels: Labels):
    """The ensemble's label maps (class indices, ragged): its region decisions decoded in the
    regions' order, the prediction path (:meth:`segx.inference.predictor.Predictor.predict`)."""
    on = region_decisions(member_probs, weights, thresholds)
    return on.like(labels.decode_regions(on.flat))


def exact_region_dice(member_probs: Sequence, truth, weights, thresholds, labels: Labels) -> float:
    """The Dice the user's files get: the mean region Dice of :func:`region_labels`."""
    from segx.scoring.classes import mean_region_dice

    return mean_region_dice(region_labels(member_probs, weights, thresholds, labels), truth, labels.region_members)


def refine_region_thresholds(
    member_probs: Sequence,
    truth,
    weights,
    start: Sequence[float],
    grid: Sequence[float],
    labels: Labels,
    passes: int = 3,
) -> tuple[list[float], float]:
    """Region thresholds for one weighting, chosen on the decoded label maps, and their Dice.

    The search picks each region's threshold on its own raw decision, which is exact for that
    decision but not for the file: decoding couples the regions (an inner region's pixels count
    for the outer ones, a later region paints over an earlier one). Starting from the search's
    thresholds, coordinate ascent over ``grid`` on :func:`exact_region_dice`'s objective, one
    region at a time, keeping a change only if it scores strictly higher (so ties keep the
    search's choice); at most ``passes`` sweeps. The Dice returned equals
    :func:`exact_region_dice` for the thresholds returned, to the last bit."""
    from segx.scoring.classes import mean_region_dice

    score = _combined(member_probs, weights)
    members_of = labels.region_members
    cache: dict[tuple[int, float], np.ndarray] = {}

    def value(ts: list[float]) -> float:
        on = np.zeros(score.values.flat.shape, bool)
        for r, t in enumerate(ts):
            if (r, t) not in cache:
                cache[(r, t)] = _decide(score, r, t)
            on[:, r] = cache[(r, t)]
        return mean_region_dice(score.values.like(labels.decode_regions(on)), truth, members_of)

    best_ts = [float(t) for t in start]
    best = value(best_ts)
    grid = sorted({float(t) for t in grid})
    for _ in range(passes):
        improved = False
        for r in range(len(best_ts)):
            for t in grid:
                if t == best_ts[r]:
                    continue
                trial = [*best_ts[:r], t, *best_ts[r + 1 :]]
                v = value(trial)
                if v > best:
                    best, best_ts, improved = v, trial, True
        if not improved:
            break
    return best_ts, best


def majority_region_decisions(member_probs: Sequence, start: int = 0, stop: int | None = None):
    """Per region, a strict majority of members at 0.5 (ties are off): bool ragged (pixels, R)."""
    part = [Ragged.of(p)[start:stop] for p in member_probs]
    votes = sum((np.asarray(p.flat) >= 128).astype(np.int16) for p in part)
    return part[0].like(votes * 2 > len(part))
