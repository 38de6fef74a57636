"""Choosing the ensemble on validation: run the search, compare it with every member and equal
weights (the simplest within the tolerance wins), pick post-processing, and check that the
prediction path scores the choice exactly as the search did. numpy only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from segx.ensembling.members import Member


def choose_postprocess(members, weights, threshold, min_sizes, tolerance):
    """Post-processing picked on validation only; identity unless a gain exceeds ``tolerance``."""
    from segx.ensembling.probs import Weights, binarize, combine
    from segx.scoring.metrics import dice_per_case
    from segx.scoring.postprocess import apply, candidates

    probs = [m.val.probs for m in members]
    pred = binarize(combine(probs, Weights.of(weights)), threshold)
    truth = members[0].val.masks
    results = [(p, float(dice_per_case(apply(pred, p), truth).mean())) for p in candidates([0, *min_sizes])]
    base = results[0][1]
    best = max(results, key=lambda r: r[1])
    chosen = best if best[1] > base + tolerance else results[0]
    return chosen[0], results


@dataclass(frozen=True)
class SearchSettings:
    """How to search (the ``ensemble`` config section, as plain values)."""

    method: str = "greedy"  # one of SEARCH_METHODS
    thresholds: tuple[float, ...] = (0.5,)
    grid_step: float = 0.1
    greedy_steps: int = 25
    greedy_patience: int = 5
    greedy_min_gain: float = 1e-4
    optimize_evals: int = 300
    tolerance: float = 1e-3  # the simpler candidate wins unless the gain exceeds this
    postprocess: bool = True
    postprocess_min_sizes: tuple[int, ...] = (10, 20, 50, 100)


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`run_search` chose, and what it compared the choice with: everything the
    record (:func:`segx.ensembling.record.make_record`) and the report need."""

    chosen: Any  # segx.ensembling.search.Candidate: the ensemble kept (weights, threshold, val Dice)
    searched: Any  # the search method's own best candidate (SearchResult)
    baselines: list  # each member alone and equal weights, as candidates
    weights: Any  # segx.ensembling.probs.Weights of ``chosen``: exact counts, what the record stores
    val_dice: float  # the prediction path's validation Dice of ``chosen``, equal to the search's
    postprocess: Any  # segx.scoring.postprocess.PostProcess chosen on validation (identity if none helps)
    postprocess_results: list  # (PostProcess, validation Dice) of every candidate tried
    majority_val_dice: float  # the majority vote's validation Dice (a baseline)
    search_seconds: float
    kept_fraction: float  # pixels the search kept after compaction (the rest are decided for any weights)
    # Several classes: class name -> PostProcess kept for it (nnU-Net's per-class rule), and every try
    # as (class, candidate, the class's validation Dice).
    class_postprocess: dict = field(default_factory=dict)
    class_postprocess_results: list = field(default_factory=list)
    # Regions: region name -> its threshold for the chosen weights (refined on the decoded label maps).
    region_thresholds: dict = field(default_factory=dict)


def run_search(members: Sequence[Member], settings: SearchSettings) -> SearchOutcome:
    """Weights, threshold and post-processing chosen on the members' validation probabilities."""
    from segx.ensembling import search

    e = settings
    probs = [m.val.probs for m in members]
    truth = members[0].val.masks
    from segx.progress import stage

    classes, regions = members[0].val.classes, members[0].val.regions
    labels = None
    t0 = time.perf_counter()
    if regions is not None:  # overlapping regions: one weighting, a threshold per region
        from segx.data.labels import Labels
        from segx.ensembling.regions import compact_regions

        labels = Labels.from_record(members[0].labels)
        stage(f"searching weights and a threshold per region on validation ({e.method}, {len(regions)} regions)")
        data = compact_regions(probs, truth, labels.region_members, list(e.thresholds))
    elif classes is not None:  # several classes: argmax of the weighted class probabilities, no threshold
        from segx.ensembling.classes import compact_classes

        stage(f"searching weights on validation ({e.method}, {len(members)} members, {len(classes)} classes)")
        data = compact_classes(probs, truth, len(classes))
    else:
        stage(f"searching weights and threshold on validation ({e.method}, {len(members)} members, {len(truth)} cases)")
        data = search.compact(probs, truth, list(e.thresholds))
    run = {
        "grid": lambda: search.search_grid(data, e.grid_step),
        "greedy": lambda: search.search_greedy(data, e.greedy_steps, e.greedy_patience, e.greedy_min_gain),
        "optimize": lambda: search.search_optimize(data, max_evals=e.optimize_evals, tolerance=e.tolerance),
    }
    result = run[e.method]()
    seconds = time.perf_counter() - t0
    base = search.baselines(data)
    from segx.ensembling.members import unique_labels

    for b, label in zip(base, unique_labels(members), strict=False):
        b.name = f"member:{label}"
    region_choice: dict[int, list[float]] = {}
    if regions is not None:
        # The search ranked weightings by each region's raw decision; the user gets the decoded
        # label map. Every candidate is scored on that, its thresholds refined there, before the choice.
        from segx.ensembling.regions import refine_region_thresholds

        stage("scoring the candidates on their decoded label maps (region thresholds refined there)")
        for c in [*base, result.best]:
            region_choice[id(c)], c.val_dice = refine_region_thresholds(
                probs, truth, c.weights, data.thresholds_for(c.weights), list(e.thresholds), labels
            )
        seconds = time.perf_counter() - t0
    chosen = search.choose([*base, result.best], e.tolerance)
    weights = chosen.weights  # segx.ensembling.probs.Weights: exact counts, what the record stores
    # The search scored the candidate in prediction's arithmetic; the prediction path itself
    # must give the same number to the last bit.
    from segx.scoring.postprocess import PostProcess

    post, post_results, per_class, tried, region_thresholds = PostProcess(), [], {}, [], {}
    if regions is not None:
        from segx.ensembling.regions import exact_region_dice, majority_region_decisions
        from segx.scoring.classes import mean_region_dice

        thresholds = region_choice[id(chosen)]
        region_thresholds = dict(zip(regions, thresholds, strict=True))
        val_dice = exact_region_dice(probs, truth, weights, thresholds, labels)
        _same(chosen.val_dice, val_dice)
        majority_on = majority_region_decisions(probs)
        majority = mean_region_dice(
            majority_on.like(labels.decode_regions(majority_on.flat)), truth, labels.region_members
        )
    elif classes is not None:
        from segx.ensembling.classes import exact_class_dice, exact_labels, majority_vote_labels
        from segx.scoring.classes import mean_foreground_dice
        from segx.scoring.postprocess import choose_class_postprocess

        val_dice = exact_class_dice(probs, truth, weights, len(classes))
        _same(chosen.val_dice, val_dice)
        if e.postprocess:
            stage("choosing post-processing per class on validation")
            per_class, tried = choose_class_postprocess(
                exact_labels(probs, weights), truth, len(classes), list(e.postprocess_min_sizes), e.tolerance
            )
        majority = mean_foreground_dice(majority_vote_labels(probs), truth, len(classes))
    else:
        val_dice = float(search.exact_dice(probs, truth, weights, chosen.threshold).mean())
        _same(chosen.val_dice, val_dice)
        if e.postprocess:
            stage("choosing post-processing on validation")
            post, post_results = choose_postprocess(
                members, weights, chosen.threshold, list(e.postprocess_min_sizes), e.tolerance
            )
        majority = float(search.dice_per_case(search.majority_vote(probs), truth).mean())
    return SearchOutcome(
        chosen=chosen,
        searched=result,
        baselines=base,
        weights=weights,
        val_dice=val_dice,
        postprocess=post or PostProcess(),
        postprocess_results=post_results,
        majority_val_dice=majority,
        search_seconds=seconds,
        kept_fraction=data.kept_fraction,
        class_postprocess={classes[c]: p for c, p in per_class.items()} if classes is not None else {},
        class_postprocess_results=[(classes[c], d, v) for c, d, v in tried] if classes is not None else [],
        region_thresholds=region_thresholds,
    )


def _same(searched: float, predicted: float) -> None:
    if predicted != searched:
        raise RuntimeError(f"internal: search scored {searched!r}, prediction gives {predicted!r}; please report")
