"""Choosing the ensemble on validation: run the search, compare it with every member and equal
weights (the simplest within the tolerance wins), pick post-processing, and check that the
prediction path scores the choice exactly as the search did. numpy only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from segx.ensembling.members import Member


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
    from segx.ensembling.members import unique_labels
    from segx.ensembling.task import task_of_record
    from segx.progress import stage
    from segx.scoring.postprocess import PostProcess

    e = settings
    task = task_of_record(members[0].labels)
    probs = [m.val.probs for m in members]
    truth = members[0].val.masks
    t0 = time.perf_counter()
    stage(task.search_stage(e.method, len(members), len(truth)))
    data = task.compact(probs, truth, list(e.thresholds))
    run = {
        "grid": lambda: search.search_grid(data, e.grid_step),
        "greedy": lambda: search.search_greedy(data, e.greedy_steps, e.greedy_patience, e.greedy_min_gain),
        "optimize": lambda: search.search_optimize(data, max_evals=e.optimize_evals, tolerance=e.tolerance),
    }
    result = run[e.method]()
    base = search.baselines(data)
    for b, label in zip(base, unique_labels(members), strict=False):
        b.name = f"member:{label}"
    decisions = task.rescore(probs, truth, [*base, result.best], data, list(e.thresholds))
    seconds = time.perf_counter() - t0
    chosen = search.choose([*base, result.best], e.tolerance)
    finish = task.finish(probs, truth, chosen, decisions.get(id(chosen)), e)
    # The search scored the candidate in prediction's arithmetic; the prediction path itself
    # must give the same number to the last bit.
    _same(chosen.val_dice, finish.val_dice)
    return SearchOutcome(
        chosen=chosen,
        searched=result,
        baselines=base,
        weights=chosen.weights,  # segx.ensembling.probs.Weights: exact counts, what the record stores
        val_dice=finish.val_dice,
        postprocess=finish.postprocess or PostProcess(),
        postprocess_results=finish.postprocess_results,
        majority_val_dice=finish.majority_val_dice,
        search_seconds=seconds,
        kept_fraction=data.kept_fraction,
        class_postprocess=finish.class_postprocess,
        class_postprocess_results=finish.class_postprocess_results,
        region_thresholds=finish.region_thresholds,
    )


def _same(searched: float, predicted: float) -> None:
    if predicted != searched:
        raise RuntimeError(f"internal: search scored {searched!r}, prediction gives {predicted!r}; please report")
