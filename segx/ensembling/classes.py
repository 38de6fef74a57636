"""The ensemble search for several classes (numpy only): weights chosen on validation by the
foreground-mean Dice of ``argmax(sum_m k_m p_m)``, exactly as prediction labels a pixel.

Every candidate is scored in the integer arithmetic of
:func:`segx.ensembling.probs.combine_classes` and :func:`segx.ensembling.probs.argmax_labels`
(ties to the lowest class index), and the objective is
:func:`segx.scoring.classes.mean_foreground_dice` with its empty-class rule, so every number
the search reports is the prediction path's number on the same cached probabilities.

Speed comes from one exact reduction, the multi-class form of the binary search's: where every
member's own argmax is the same class ``c``, every weighting on the simplex labels the pixel
``c`` (each member scores ``c`` at least as high as any later class and strictly higher than
any earlier one, so their positive combination does too). Those pixels are counted once;
only pixels where members disagree are kept, as ``uint8 (M, P, K)``. A candidate then costs one
integer sum, one argmax and one ``bincount`` over the kept pixels.

:class:`CompactClasses` answers ``evaluate`` and ``evaluate_additions`` like the binary
:class:`segx.ensembling.search.Compact`, with a single "threshold" slot that is NaN (argmax
needs none), so the grid, greedy and Nelder-Mead searches run on it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from segx.data.labels import IGNORE_INDEX
from segx.data.ragged import Ragged
from segx.ensembling.probs import argmax_labels, combine_classes, member_labels
from segx.ensembling.search import segments
from segx.errors import SegxError
from segx.scoring.classes import class_dice, class_means, confusion_counts, foreground_mean


@dataclass
class CompactClasses:
    """Validation data reduced to the pixels a weighting can still relabel.

    probs: uint8 (M, P, K) on the kept pixels; truth: uint8 (P,) class indices; segment: (P,)
    index into ``cases``; cases: (S,) case of each segment; fixed_tp, fixed_pp, fixed_tt: int64
    (N, K) counts of the pixels every member labels alike (ignored pixels are in no count).
    """

    probs: np.ndarray
    truth: np.ndarray
    segment: np.ndarray
    cases: np.ndarray
    fixed_tp: np.ndarray
    fixed_pp: np.ndarray
    fixed_tt: np.ndarray
    n_pixels: int = 0
    thresholds: np.ndarray = field(default_factory=lambda: np.array([np.nan]))
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_members(self) -> int:
        return self.probs.shape[0]

    @property
    def n_classes(self) -> int:
        return self.fixed_tp.shape[1]

    @property
    def kept_fraction(self) -> float:
        return self.probs.shape[1] / self.n_pixels if self.n_pixels else 0.0

    def _probs(self, dtype) -> np.ndarray:
        key = ("probs", np.dtype(dtype).str)
        if key not in self.cache:
            self.cache[key] = self.probs.astype(dtype)
        return self.cache[key]

    def _objective(self, scores: Iterable[np.ndarray]) -> np.ndarray:
        """Foreground-mean Dice (C, 1) of each integer class-score array (P, K)."""
        k, s = self.n_classes, len(self.cases)
        base = ((self.segment * k + self.truth) * k).astype(np.intp)
        out = []
        for score in scores:
            pred = np.argmax(score, axis=-1)
            table = np.bincount(base + pred, minlength=s * k * k).reshape(s, k, k)  # (segment, truth, pred)
            tp, pp, tt = self.fixed_tp.copy(), self.fixed_pp.copy(), self.fixed_tt.copy()
            tp[self.cases] += np.einsum("skk->sk", table)
            pp[self.cases] += table.sum(axis=1)
            tt[self.cases] += table.sum(axis=2)
            out.append(foreground_mean(class_means(class_dice(tp, pp, tt))))
        return np.asarray(out, np.float64).reshape(-1, 1)

    def evaluate(self, counts: np.ndarray, denominator: int) -> np.ndarray:
        """Foreground-mean Dice (C, 1) of each row of member counts over ``denominator``."""
        dtype = np.uint16 if 255 * denominator <= np.iinfo(np.uint16).max else np.int32
        probs = self._probs(dtype)

        def scores():
            for row in counts:
                total = np.zeros(probs.shape[1:], dtype)
                for m in np.flatnonzero(row):
                    total += probs[m] * dtype(row[m])
                yield total

        return self._objective(scores())

    def evaluate_additions(self, bag: np.ndarray) -> np.ndarray:
        """Dice (M, 1) of the bag plus one more copy of each member in turn (the greedy step)."""
        bag = np.asarray(bag, np.int64)
        denominator = int(bag.sum()) + 1
        dtype = np.uint16 if 255 * denominator <= np.iinfo(np.uint16).max else np.int32
        probs = self._probs(dtype)
        base = np.zeros(probs.shape[1:], dtype)
        for m in np.flatnonzero(bag):
            base += probs[m] * dtype(bag[m])
        return self._objective(base + probs[m] for m in range(self.n_members))


def compact_classes(member_probs: Sequence, truth, n_classes: int, chunk: int = 16) -> CompactClasses:
    """Reduce members' uint8 class probabilities (ragged cases whose flat part is (pixels, K),
    memory-mapped is fine) and the truth label maps, ``chunk`` cases at a time."""
    member_probs = [Ragged.of(p) for p in member_probs]
    truth = Ragged.of(truth)
    k = int(n_classes)
    for p in member_probs:
        if not p.same_shapes(truth):
            raise SegxError(
                "member probabilities and ground truth differ in case sizes; retrain the members on one split"
            )
        if p.flat.ndim != 2 or p.flat.shape[1] != k:
            raise SegxError(
                f"a member's cached probabilities hold {p.flat.shape[1:] or 1} classes, the labels {k}; "
                "retrain the members with the same data.labels"
            )
    n = len(truth)
    fixed = [np.zeros((n, k), np.int64) for _ in range(3)]
    kept_probs, kept_truth, kept_case = [], [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = slice(truth.offsets[start], truth.offsets[stop])
        local = truth.offsets[start : stop + 1] - truth.offsets[start]
        maps = [np.asarray(p.flat[rows], np.uint8) for p in member_probs]
        gt = np.asarray(truth.flat[rows], np.uint8)
        labels = [np.argmax(m, axis=-1) for m in maps]
        agree = np.ones(len(gt), bool)
        for other in labels[1:]:
            agree &= other == labels[0]
        counted = gt != IGNORE_INDEX
        decided = agree & counted
        for i in range(stop - start):
            a, b = local[i], local[i + 1]
            t, p = gt[a:b][decided[a:b]].astype(np.intp), labels[0][a:b][decided[a:b]]
            fixed[1][start + i] += np.bincount(p, minlength=k)[:k]
            fixed[2][start + i] += np.bincount(t, minlength=k)[:k]
            fixed[0][start + i] += np.bincount(t[t == p], minlength=k)[:k]
        flat = np.flatnonzero(~agree & counted)
        kept_probs.append(np.stack([m[flat] for m in maps]))
        kept_truth.append(gt[flat])
        kept_case.append(np.searchsorted(local, flat, side="right") - 1 + start)
    m = len(member_probs)
    probs = np.concatenate(kept_probs, axis=1) if kept_probs else np.zeros((m, 0, k), np.uint8)
    segment, cases = segments(kept_case)
    return CompactClasses(
        probs=probs,
        truth=np.concatenate(kept_truth) if kept_truth else np.zeros(0, np.uint8),
        segment=segment,
        cases=cases,
        fixed_tp=fixed[0],
        fixed_pp=fixed[1],
        fixed_tt=fixed[2],
        n_pixels=truth.n_pixels,
    )


def exact_labels(member_probs: Sequence, weights, start: int = 0, stop: int | None = None):
    """The ensemble's label maps (ragged uint8) for cases ``start:stop``: the prediction path."""
    part = [Ragged.of(p)[start:stop] for p in member_probs]
    return argmax_labels(combine_classes(part, weights))


def exact_class_dice(member_probs: Sequence, truth, weights, n_classes: int, chunk: int = 32) -> float:
    """The objective of one weighting through the prediction path (no compaction): for tests and
    for checking the search's number."""
    truth = Ragged.of(truth)
    counts = [np.zeros((len(truth), n_classes), np.int64) for _ in range(3)]
    for start in range(0, len(truth), chunk):
        stop = min(len(truth), start + chunk)
        got = confusion_counts(exact_labels(member_probs, weights, start, stop), truth[start:stop], n_classes)
        for total, part in zip(counts, got, strict=True):
            total[start:stop] = part
    return float(foreground_mean(class_means(class_dice(*counts))))


def majority_vote_labels(member_probs: Sequence, start: int = 0, stop: int | None = None):
    """Each pixel's most frequent member label (MONAI's ``VoteEnsemble`` on label maps); ties to
    the lowest class index. Ragged uint8."""
    part = [Ragged.of(p)[start:stop] for p in member_probs]
    k = part[0].flat.shape[-1]
    votes = np.zeros((len(part[0].flat), k), np.int16)
    rows = np.arange(len(part[0].flat))
    for p in part:
        votes[rows, member_labels(p).flat] += 1
    return part[0].like(np.argmax(votes, axis=-1).astype(np.uint8))
