"""Every Dice the weight search reports equals the prediction path's Dice, bit for bit.

The prediction path is ``segx.ensembling.probs.combine`` + ``segx.ensembling.probs.binarize`` +
``segx.scoring.metrics.dice_per_case(...).mean()`` with the weights as a record holds them. The data
are built so that many weighted sums land exactly on ``t * 255 * D`` (probabilities in
multiples of 51 = 255 / 5), where float arithmetic and exact arithmetic disagree.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from segx.data.ragged import Ragged
from segx.ensembling import search
from segx.ensembling.probs import Weights, binarize, combine, cut
from segx.ensembling.record import record_weights, validate_record, weight_fields
from segx.errors import SegxError
from segx.scoring.metrics import dice_per_case

THRESHOLDS = [0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# More than 15 thresholds: the single-candidate histogram path instead of the paired one.
MANY_THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]


def tie_data(n_members: int, seed: int = 0, n: int = 10, size: int = 16):
    """Members that see the truth through independent noise, mostly at multiples of 51."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((n, size, size), bool)
    for i in range(n - 1):  # the last case is empty (Dice 1 when nothing is predicted)
        for _ in range(2):
            y, x, r = rng.integers(3, size - 3), rng.integers(3, size - 3), rng.integers(2, 5)
            truth[i] |= (yy - y) ** 2 + (xx - x) ** 2 < r * r
    members = []
    for _ in range(n_members):
        level = np.clip(np.rint(truth * 3 + 1 + rng.normal(0, 1.3, truth.shape)), 0, 5).astype(np.int64)
        probs = (51 * level).astype(np.uint8)
        odd = rng.random(truth.shape) < 0.15  # some values off the 51-lattice too
        probs[odd] = rng.integers(0, 256, int(odd.sum()))
        members.append(probs)
    return members, truth


def predicted_dice(member_probs, truth, weights, threshold) -> float:
    """The prediction path: combine, binarize, mean per-case Dice."""
    return float(dice_per_case(binarize(combine(member_probs, weights), threshold), truth).mean())


def float32_dice(member_probs, truth, weights, threshold) -> float:
    """The old float32 arithmetic (weights as float32, threshold as float32(t * 255))."""
    score = np.zeros(truth.shape, np.float32)
    for p, w in zip(member_probs, weights, strict=True):
        score += np.float32(w) * p.astype(np.float32)
    return float(dice_per_case(score >= np.float32(threshold * 255.0), truth).mean())


def check_rows(member_probs, truth, rows) -> int:
    """Every history row replayed through the prediction path; returns how many were checked."""
    for row in rows:
        weights = Weights(tuple(row["counts"]), row["denominator"])
        assert np.allclose(weights.floats, row["weights"])
        assert predicted_dice(member_probs, truth, weights, row["threshold"]) == row["val_dice"], row
    return len(rows)


def test_issue_example_tie_is_foreground_in_search_and_prediction():
    # 0.3 * 4 + 0.7 * 144 = 102 = 0.4 * 255 exactly: foreground (float32 said 101.99999).
    probs = [np.array([[[4]]], np.uint8), np.array([[[144]]], np.uint8)]
    score = combine(probs, [0.3, 0.7])
    assert score.denominator == 10 and score.values.item() == 1020 == cut(0.4, 10)
    assert binarize(score, 0.4).item()
    data = search.compact(probs, np.ones((1, 1, 1), bool), [0.4])
    assert search.evaluate(data, [[3, 7]], 10)[0, 0] == 1.0


def test_combine_is_exact_rational_arithmetic():
    members, _ = tie_data(3, seed=3, n=3, size=8)
    for weights in ([0.3, 0.7, 0.0], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3], [2 / 7, 4 / 7, 1 / 7], [0.25, 0.25, 0.5]):
        for t in (0.2, 0.4, 0.45, 0.6, 0.8):
            mask = binarize(combine(members, weights), t)
            exact = [Fraction(repr(w)).limit_denominator(1000) for w in weights]
            oracle = sum(f * p.astype(object) for f, p in zip(exact, members, strict=True)) >= Fraction(repr(t)) * 255
            assert np.array_equal(mask, oracle.astype(bool)), (weights, t)


@pytest.mark.parametrize("n_members", [3, 4])
def test_every_grid_point_and_threshold_equals_the_prediction_path(n_members):
    members, truth = tie_data(n_members, seed=n_members)
    data = search.compact(members, truth, THRESHOLDS)
    grid = search.simplex_counts(n_members, 10)
    assert len(grid) == (66 if n_members == 3 else 286)
    scores = search.evaluate(data, grid, 10)
    float_differs = 0
    for i, counts in enumerate(grid):
        floats = [k / 10 for k in counts]  # what a record or a user writes: 0.3, 0.7, ...
        for j, t in enumerate(THRESHOLDS):
            reference = predicted_dice(members, truth, floats, t)
            assert scores[i, j] == reference, (counts, t)
            float_differs += float32_dice(members, truth, floats, t) != reference
    # The data have ties where float32 arithmetic decides differently: the test can fail.
    assert float_differs > 10
    result = search.search_grid(data, 0.1)
    assert check_rows(members, truth, result.history) == len(grid)
    best = result.best
    assert predicted_dice(members, truth, best.weights, best.threshold) == best.val_dice


@pytest.mark.parametrize(
    ("thresholds", "pack"),
    [([0.4], 8), ([0.3, 0.4, 0.5], 4), ([0.2, 0.4, 0.5, 0.6, 0.8], 3), (MANY_THRESHOLDS, 1)],
)
def test_grid_is_exact_however_many_candidates_share_a_bincount(thresholds, pack):
    members, truth = tie_data(3, seed=5)
    data = search.compact(members, truth, thresholds)  # MANY_THRESHOLDS includes 0 and 1
    assert search._pack(data) == pack
    grid = search.simplex_counts(3, 10)[::3]  # 22 candidates: full batches and a remainder
    scores = search.evaluate(data, grid, 10)
    for i, counts in enumerate(grid):
        for j, t in enumerate(sorted(thresholds)):
            assert scores[i, j] == predicted_dice(members, truth, Weights(tuple(counts), 10), t), (counts, t)


@pytest.mark.parametrize("denominator", [6, 7])
def test_greedy_bags_equal_the_prediction_path(denominator):
    members, truth = tie_data(4, seed=denominator)
    data = search.compact(members, truth, THRESHOLDS)
    rng = np.random.default_rng(denominator)
    for _ in range(3):  # a greedy step from a random bag of D - 1 picks
        bag = rng.multinomial(denominator - 1, np.full(4, 0.25))
        scores = search.evaluate_additions(data, bag)
        for m in range(4):
            counts = bag + np.eye(4, dtype=np.int64)[m]
            for j, t in enumerate(THRESHOLDS):
                assert scores[m, j] == predicted_dice(members, truth, Weights(tuple(counts), denominator), t)
    # The search itself, forced to run on to bags of D picks (no pick counts as a gain).
    result = search.search_greedy(data, max_steps=denominator - 1, patience=100, min_gain=1.0)
    assert [r["denominator"] for r in result.history] == list(range(1, denominator + 1))
    check_rows(members, truth, result.history)
    assert predicted_dice(members, truth, result.best.weights, result.best.threshold) == result.best.val_dice


def test_nelder_mead_candidates_equal_the_prediction_path():
    members, truth = tie_data(3, seed=11)
    data = search.compact(members, truth, THRESHOLDS)
    result = search.search_optimize(data, max_evals=40, tolerance=0.0)
    refined = [r for r in result.history if r.get("phase") == "nelder-mead"]
    assert refined, "greedy kept fewer than two members: the data must make averaging pay"
    assert {r["denominator"] for r in refined} == {search.OPTIMIZE_DENOMINATOR}
    check_rows(members, truth, result.history)
    best = result.best
    assert predicted_dice(members, truth, best.weights, best.threshold) == best.val_dice


def test_baselines_and_equal_weights_equal_the_prediction_path():
    members, truth = tie_data(3, seed=13)
    data = search.compact(members, truth, THRESHOLDS)
    for candidate in search.baselines(data):
        assert predicted_dice(members, truth, candidate.weights, candidate.threshold) == candidate.val_dice


def test_rounding_to_a_denominator_keeps_the_sum():
    w = Weights.rounded([0.1234, 0.4321, 0.4445], 1000)
    assert sum(w.counts) == 1000 and w.counts == (123, 432, 445)
    w = Weights.rounded([1, 1, 1], 1000)
    assert w.counts == (334, 333, 333)


def _hand_members(n_members: int, seed: int):
    from segx.ensembling.members import Member
    from segx.ensembling.probs import Cached

    members, truth = tie_data(n_members, seed=seed)
    stems = [f"case{i}" for i in range(len(truth))]
    return (
        [
            Member(
                run_id=f"run{i}",
                backbone=f"b{i}",
                arch="unet",
                fingerprint="f",
                view={"mode": "resize", "size": 16},
                val=Cached(stems, Ragged.of(p), Ragged.of(truth), Ragged.of(np.zeros((0, 1, 1, 3), np.uint8))),
                test=None,
            )
            for i, p in enumerate(members)
        ],
        members,
        truth,
    )


@pytest.mark.parametrize("method", ["grid", "greedy", "optimize"])
def test_run_search_reports_and_records_prediction_numbers(method):
    from segx.ensembling.choose import run_search
    from segx.ensembling.record import make_record
    from segx.workflows.ensemble import search_settings
    from tests.conftest import compose_config

    members, probs, truth = _hand_members(3, seed=17)
    cfg = compose_config(
        "ensemble",
        [
            f"ensemble.search={method}",
            "ensemble.postprocess=false",
            "ensemble.tolerance=0.0",
            "ensemble.optimize_evals=30",
        ],
    )
    settings = search_settings(cfg)
    found = run_search(members, settings)
    for candidate in [*found.baselines, found.searched.best, found.chosen]:
        assert predicted_dice(probs, truth, candidate.weights, candidate.threshold) == candidate.val_dice, candidate
    check_rows(probs, truth, found.searched.history)
    assert found.val_dice == found.chosen.val_dice
    # The record holds the exact counts; read back, they predict the recorded Dice.
    record = validate_record(json.loads(json.dumps(make_record(members, found, "none", settings).to_json())))
    assert record["version"] == 3
    weights, chosen = record_weights(record), found.chosen.weights
    assert [Fraction(k, weights.denominator) for k in weights.counts] == [
        Fraction(k, chosen.denominator) for k in chosen.counts
    ]
    assert predicted_dice(probs, truth, weights, record["threshold"]) == record["val_dice"]


def _record(weights: list[float], **extra) -> dict:
    return {
        "format": "segx-ensemble",
        "image_size": 16,
        "threshold": 0.4,
        **extra,
        "members": [{"run_id": f"r{i}", "backbone": "resnet18", "weight": w} for i, w in enumerate(weights)],
    }


def test_version_1_records_with_float_weights_still_load():
    cases = {
        (0.3, 0.7): Weights((3, 7), 10),
        (1 / 3, 1 / 3, 1 / 3): Weights((1, 1, 1), 3),
        (2 / 7, 5 / 7): Weights((2, 5), 7),  # a greedy bag written as floats
        (0.5, 0.5): Weights((1, 1), 2),
        (0.412345678912, 0.587654321088): Weights((412346, 587654), 1_000_000),  # Nelder-Mead
    }
    for floats, expected in cases.items():
        record = validate_record(_record(list(floats), version=1))
        assert record_weights(record) == expected, floats


def test_version_2_record_counts_are_validated():
    per_member, top = weight_fields(Weights((1, 2), 3))
    record = _record([m["weight"] for m in per_member], version=2, **top)
    for m, fields in zip(record["members"], per_member, strict=True):
        m.update(fields)
    assert record_weights(validate_record(record)) == Weights((1, 2), 3)
    bad = json.loads(json.dumps(record))
    bad["members"][0]["weight_count"] = 2
    with pytest.raises(SegxError, match="weight=0.333.* disagrees with weight_count/weight_denominator=2/3"):
        validate_record(bad)
    bad["members"][0]["weight"] = 2 / 3
    with pytest.raises(SegxError, match="weight_count values sum to 4, not weight_denominator=3"):
        validate_record(bad)
    bad = json.loads(json.dumps(record))
    del bad["weight_denominator"]
    with pytest.raises(SegxError, match="version 2 record without 'weight_denominator'"):
        validate_record(bad)
    bad["version"] = 5  # version 4 (several classes) is read since issue 23
    with pytest.raises(SegxError, match="record version 5 is not one this segx reads"):
        validate_record(bad)


def _ensemble_run(client, record: dict, folder) -> str:
    """A hand-written record logged as an ensemble run, as a user could."""
    from segx import tracking

    folder.mkdir(parents=True, exist_ok=True)
    # Its own artifact folder: with none, MLflow puts a SQLite store's artifacts in ./mlruns of
    # the working folder (the checkout).
    experiment = tracking.experiment_id(client, "hand-written", str(folder / "mlartifacts"))
    run_id = tracking.start_run(client, experiment, "hand-written", {tracking.ROLE: "ensemble"})
    (folder / "ensemble.json").write_text(json.dumps(record))
    tracking.log_artifact(client, run_id, folder / "ensemble.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _float32_flips(probs, weights: Weights, threshold: float) -> int:
    """Pixels where the old float32 arithmetic decides differently from the exact one."""
    old = sum(np.float32(w) * p.flat.astype(np.float32) for w, p in zip(weights.floats, probs, strict=True))
    return int(
        np.count_nonzero((old >= np.float32(threshold * 255.0)) != binarize(combine(probs, weights), threshold).flat)
    )


def _tie_case(probs, denominators) -> tuple[Weights, list[float]]:
    """A non-dyadic two-member weighting k/D and short-decimal thresholds on which some pixel's
    exact score lands and float32 arithmetic decides the other way (trained members' outputs
    are what they are, so the weighting is picked from the data)."""
    for d in denominators:
        for k in range(1, d):
            weights = Weights((k, d - k), d)
            if Fraction(k, d).denominator & (Fraction(k, d).denominator - 1) == 0:
                continue  # dyadic: exact in float32 too
            ties = []
            for s in np.unique(combine(probs, weights).values.flat):
                t = Fraction(int(s), 255 * d)
                if 0 < t < 1 and len(repr(float(t))) <= 6 and Fraction(repr(float(t))) == t:
                    ties.append(float(t))
            flipped = [t for t in ties if _float32_flips(probs, weights, t)]
            if flipped:
                return weights, sorted({*flipped[:4], *ties[:: max(1, len(ties) // 4)], 0.5})
    raise AssertionError("no tie where float32 errs in these members' outputs; add denominators")


@pytest.mark.parametrize("version", [1, 2])
def test_predictor_with_non_dyadic_weights_predicts_what_the_search_scored(
    version, member_store_copy, synthetic_root, tmp_path
):
    """Non-dyadic weights (version 1: decimal floats such as 0.3/0.7; version 2: counts such as
    1/3, 2/3) through a rebuilt EnsemblePredictor: its masks and Dice equal the search's scoring
    of the cached validation probabilities, on thresholds where scores tie."""
    from segx import tracking
    from segx.data.folder import discover_cases
    from segx.data.io import read_image
    from segx.ensembling.probs import load_cached
    from segx.workflows.predict import load_ensemble

    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    ids = [runs["resnet18"], runs["mobilenetv2"]]
    cached = [load_cached(tracking.download(client, r, "predictions/val.npz", tmp_path / r), tmp_path / r) for r in ids]
    probs, truth = [c.probs for c in cached], cached[0].masks
    # Version 1 records hold decimals (tenths, twentieths, hundredths); version 2 any counts.
    weights, thresholds = _tie_case(probs, (10, 20, 100) if version == 1 else (3, 7, 30, 70, 10, 20, 100))
    members = [
        {"run_id": r, "backbone": b, "arch": "unet"} for r, b in zip(ids, ["resnet18", "mobilenetv2"], strict=True)
    ]
    if version == 1:
        extra = {"version": 1}
        for m, w in zip(members, weights.floats, strict=True):
            m["weight"] = w  # a short decimal, as a person writes it: 0.3, 0.85, 0.07
    else:
        per_member, top = weight_fields(weights)
        extra = {"version": 2, **top}
        for m, fields in zip(members, per_member, strict=True):
            m.update(fields)
    record = {"format": "segx-ensemble", "image_size": 64, "threshold": thresholds[0], "members": members, **extra}
    run_id = _ensemble_run(client, record, tmp_path / "record")
    _, predictor = load_ensemble(client, run_id, tmp_path / "rebuild")
    assert [Fraction(k, predictor.weights.denominator) for k in predictor.weights.counts] == [
        Fraction(k, weights.denominator) for k in weights.counts
    ]
    stems = cached[0].stems
    files = {c.stem: c.image for c in discover_cases(synthetic_root)}
    images = [read_image(files[stem]) for stem in stems]  # each at its own size, as a user gives them
    score, member_probs = predictor.score(images)
    assert all(np.array_equal(a.flat, b.flat) for a, b in zip(member_probs, probs, strict=True))  # same inputs
    data = search.compact(probs, truth, thresholds)
    scored = search.evaluate(data, [weights.counts], weights.denominator)[0]
    flips = 0
    for j, t in enumerate(thresholds):
        masks = binarize(score, t)
        assert dice_per_case(masks, truth).mean() == scored[j], t
        flips += _float32_flips(probs, weights, t)
    # The recorded threshold through predict() itself, on one image alone.
    (first,) = predictor.predict([images[0]])
    assert np.array_equal(first.mask, binarize(score, thresholds[0])[0])
    assert flips > 0  # float32 arithmetic (the old predictor) fails these thresholds
