"""Weight search on synthetic probabilities whose best weights are known (numpy only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from segx.ensembling import search
from segx.ensembling.probs import Weights, quantize


def disks(rng, n=30, size=48):
    truth = np.zeros((n, size, size), bool)
    yy, xx = np.ogrid[:size, :size]
    for i in range(n):
        for _ in range(4):
            y, x = rng.integers(6, size - 6, 2)
            r = rng.integers(3, 7)
            truth[i] |= (yy - y) ** 2 + (xx - x) ** 2 < r * r
    return truth


@pytest.fixture(scope="module")
def problem():
    """Two complementary good members (independent noise) and one useless random member."""
    rng = np.random.default_rng(0)
    truth = disks(rng)
    good_a = quantize(np.clip(truth * 0.7 + 0.15 + rng.normal(0, 0.22, truth.shape), 0, 1))
    good_b = quantize(np.clip(truth * 0.7 + 0.15 + rng.normal(0, 0.22, truth.shape), 0, 1))
    useless = quantize(rng.random(truth.shape))
    return [good_a, useless, good_b], truth


@pytest.mark.parametrize("method", ["grid", "greedy", "optimize"])
def test_each_method_finds_the_known_best(problem, method):
    probs, truth = problem
    data = search.compact(probs, truth, [0.4, 0.45, 0.5, 0.55, 0.6])
    result = getattr(search, f"search_{method}")(data)
    w = result.best.weights
    assert w[1] == 0.0, "the useless member must get weight 0"
    assert w[0] == pytest.approx(0.5, abs=0.1) and w[2] == pytest.approx(0.5, abs=0.1)
    singles = search.baselines(data)[:3]
    assert result.best.val_dice > max(s.val_dice for s in singles) + 0.03
    # The compact score equals the prediction path's score, to the last bit.
    exact = search.exact_dice(probs, truth, w, result.best.threshold).mean()
    assert exact == result.best.val_dice


def test_compact_evaluation_equals_brute_force(problem):
    probs, truth = problem
    thresholds = [0.3, 0.5, 0.7]
    data = search.compact(probs, truth, thresholds)
    assert 0 < data.kept_fraction < 1
    rng = np.random.default_rng(1)
    for denominator in (1, 7, 1000):
        counts = rng.multinomial(denominator, rng.dirichlet(np.ones(3)), size=5)
        scores = search.evaluate(data, counts, denominator)
        for i, row in enumerate(counts):
            for j, t in enumerate(thresholds):
                brute = search.exact_dice(probs, truth, Weights(tuple(row), denominator), t).mean()
                assert scores[i, j] == brute


def test_simplex_counts_and_bad_step():
    counts = search.simplex_counts(3, search.grid_parts(3, 0.25))
    assert counts.shape == (15, 3) and (counts.sum(axis=1) == 4).all()
    assert len({tuple(r) for r in counts}) == 15 and counts.min() == 0
    with pytest.raises(search.SegxError, match="must divide 1"):
        search.grid_parts(3, 0.3)


def test_choose_prefers_simpler_within_tolerance():
    c = search.Candidate
    single = c("single", Weights((1, 0), 1), 0.5, 0.800, 1)
    fancy = c("greedy", Weights((3, 2), 5), 0.5, 0.8005, 3)
    assert search.choose([single, fancy], tolerance=0.001) is single
    assert search.choose([single, fancy], tolerance=0.0001) is fancy


def test_search_imports_no_tensorflow():
    code = (
        "import segx.ensembling.search, segx.ensemble, segx.ensembling.probs, sys; print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
