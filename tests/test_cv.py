"""Cross-validation: fold layouts, fold runs nested under a parent with its summary, ensembles of
cross-validated members searched on out-of-fold predictions, prediction as the fold mean, and
the paired bootstrap. Real Hydra multirun, real TF models, a real SQLite MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from segx.errors import SegxError
from tests.conftest import ROOT, compose_config, store_overrides
from tests.helpers import seed_store


def test_fold_layout_is_disjoint_complete_stratified_and_never_rewritten(tmp_path):
    from segx.data.split import fold_split, load_or_create_folds, make_folds

    stems = [f"c{i:03d}" for i in range(103)]
    groups = {s: ("bright" if i % 4 == 0 else "dark") for i, s in enumerate(stems)}
    layout = make_folds(stems, 5, 0.15, 0, None, groups)
    non_test = sorted(set(stems) - set(layout["test"]))
    every = [s for f in layout["folds"] for s in f]
    assert sorted(every) == non_test and len(every) == len(set(every))  # disjoint, each case once
    assert not set(every) & set(layout["test"])
    for name in ("bright", "dark"):
        counts = [sum(groups[s] == name for s in f) for f in layout["folds"]]
        assert max(counts) - min(counts) <= 1, (name, counts)  # stratified
    split = fold_split(layout, 3)
    assert split["val"] == layout["folds"][3] and not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == non_test
    path = tmp_path / "folds.json"
    first = load_or_create_folds(path, stems, 5, 0.15, 0, None, groups)
    text = path.read_text()
    again = load_or_create_folds(path, stems, 5, 0.3, 99, None, None)  # other settings: the file wins
    assert again == first and path.read_text() == text
    with pytest.raises(SegxError, match=r"holds 5 folds but data.folds=3"):
        load_or_create_folds(path, stems, 3, 0.15, 0)
    with pytest.raises(SegxError, match=r"data.folds=30 is more than the 22 non-test cases of stratum 'bright'"):
        make_folds(stems, 30, 0.15, 0, None, groups)


def test_paired_bootstrap_on_constructed_differences():
    from segx.evaluation.report import paired_bootstrap

    b = np.linspace(0.5, 0.9, 200)
    same_gain = paired_bootstrap(b + 0.02, b, 2000, 0)
    assert same_gain["diff"] == pytest.approx(0.02) and same_gain["low"] == pytest.approx(0.02)
    assert same_gain["high"] == pytest.approx(0.02) and same_gain["p_not_better"] == 0.0
    noisy = paired_bootstrap(b + np.tile([0.1, -0.1], 100), b, 2000, 0)  # mean gain exactly 0
    assert noisy["diff"] == pytest.approx(0.0, abs=1e-12) and noisy["low"] < 0 < noisy["high"]
    # Standard error of the mean of +-0.1 over 200 cases is 0.1 / sqrt(200): the interval is about +-1.96 of it.
    assert noisy["high"] == pytest.approx(1.96 * 0.1 / np.sqrt(200), rel=0.15)
    assert paired_bootstrap(b + np.tile([0.1, -0.1], 100), b, 2000, 0) == noisy  # fixed seed


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["data.folds=2", "fold=2"],
            r"fold=2 is not one of 0..1 \(data.folds=2\); train one with fold=0 or all with -m fold=0,1",
        ),
        (["fold=0"], r"fold=0 but data.folds is null; set data.folds=K"),
        (["data.folds=1", "fold=0"], r"data.folds=1 is out of range; use a value in \[2, 100\]"),
        (["data.folds=3"], r"fold=None is not one of 0..2"),
    ],
)
def test_bad_fold_settings_are_refused_before_anything_is_read(tmp_path, overrides, message):
    from segx.workflows.member import train_member

    out = tmp_path / "out"
    cfg = compose_config("train", [*store_overrides(out), f"data.root={tmp_path / 'never'}", *overrides])
    with pytest.raises(SegxError, match=message):
        train_member(cfg)
    assert not (tmp_path / "never").exists() and not (out / "mlflow.db").exists()


@pytest.fixture(scope="module")
def cv_store(tmp_path_factory):
    """`python -m segx.train -m fold=0,1 backbone=resnet18,mobilenetv2` at tiny size: a real
    Hydra multirun in a subprocess, as a user types it."""
    out = seed_store(tmp_path_factory.mktemp("cv"))  # an empty store: creating one is not what this test is about
    args = [
        sys.executable,
        "-m",
        "segx.train",
        "-m",
        "fold=0,1",
        "backbone=resnet18,mobilenetv2",
        *store_overrides(out),
        f"data.root={out / 'data'}",
        "data.n_images=16",
        "data.source_size=64",
        "data.image_size=64",
        "data.folds=2",
        "data.test_fraction=0.25",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "trainer.verbose=0",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _client(out: Path):
    from segx import tracking

    return tracking.connect(f"sqlite:///{out}/mlflow.db")


def test_fold_runs_nest_under_a_parent_with_the_cv_summary(cv_store):
    from segx import tracking

    out, stdout = cv_store
    client = _client(out)
    exp = client.get_experiment_by_name("segx").experiment_id
    parents = tracking.find_runs(client, exp, "cv")
    assert sorted(p.data.tags["segx.backbone"] for p in parents) == ["mobilenetv2", "resnet18"]
    assert "2/2 folds finished, out-of-fold Dice" in stdout
    for parent in parents:
        children = tracking.find_runs(client, exp, "member", tags={"mlflow.parentRunId": parent.info.run_id})
        assert sorted(c.data.tags["segx.fold"] for c in children) == ["0", "1"]
        assert parent.data.tags["segx.cv_complete"] == "true" and parent.data.tags["segx.cv_missing"] == ""
        assert parent.info.status == "FINISHED"
        # The out-of-fold Dice: every training case once, each from the fold model that held it out.
        n = [int(c.data.params["data.n_val"]) for c in children]
        d = [c.data.metrics["val/dice"] for c in children]
        assert parent.data.metrics["cv/oof_dice"] == pytest.approx(
            sum(a * b for a, b in zip(n, d, strict=True)) / sum(n)
        )
        assert sum(n) == 12  # 16 cases, 4 in the test set, the rest in the two folds
        assert len({c.data.tags["segx.cv_fingerprint"] for c in children}) == 1
        assert len({c.data.tags["segx.data_fingerprint"] for c in children}) == 2  # each fold its own split


def test_cv_ensemble_searches_out_of_fold_and_predicts_the_fold_mean(cv_store, tmp_path):
    from segx import tracking
    from segx.data.folder import discover_cases
    from segx.data.io import read_image
    from segx.ensembling.probs import fold_mean, load_cached
    from segx.inference.predictor import member_probs
    from segx.models import load_member
    from segx.workflows.ensemble import build_ensemble
    from segx.workflows.predict import load_ensemble

    out, _ = cv_store
    client = _client(out)
    record = build_ensemble(
        compose_config(
            "ensemble",
            [
                *store_overrides(out),
                "ensemble.members=[resnet18,mobilenetv2]",
                "ensemble.search=grid",
                "ensemble.bootstrap=500",
            ],
        )
    )
    assert all(len(m.folds) == 2 for m in record.members)
    run = client.get_run(record.run_id)
    assert {"test/gain_vs_best_member", "test/gain_ci_low", "test/gain_ci_high", "selection/optimism"} <= set(
        run.data.metrics
    )
    # Out-of-fold arrays: every training case, exactly the fold run's cached validation map.
    member = record.members[0]
    fold_caches = [
        load_cached(tracking.download(client, f, "predictions/val.npz", tmp_path / f), tmp_path / f)
        for f in member.folds
    ]
    from segx.workflows.members import load_member as load_ensemble_member

    cvm = load_ensemble_member(client, client.get_run(member.run_id), tmp_path / "cache")
    assert cvm.val.stems == sorted(s for c in fold_caches for s in c.stems) and len(cvm.val.stems) == 12
    for cache in fold_caches:
        for i, stem in enumerate(cache.stems):
            j = cvm.val.stems.index(stem)
            assert np.array_equal(cvm.val.probs[j], cache.probs[i]) and np.array_equal(cvm.val.masks[j], cache.masks[i])
    # Prediction with a cross-validated member is the mean of its fold models.
    _, predictor = load_ensemble(client, record.run_id, tmp_path / "rebuild")
    files = {c.stem: c.image for c in discover_cases(out / "data")}
    images = [read_image(files[s]) for s in cvm.test.stems]
    folds = [load_member(tracking.download_member_model(client, f, tmp_path / "m" / f)) for f in member.folds]
    view = member.view
    expected = fold_mean([member_probs(m, member.backbone, view, images, ("none",))["none"] for m in folds])
    got = predictor.member_probs(images)[0]
    if got is not None:  # weight 0 members are not run
        assert np.array_equal(got.flat, expected.flat)
    assert np.array_equal(expected.flat, cvm.test.probs.flat)  # = what the test report scored
    # The CLI predicts from the record alone.
    from segx.workflows.predict import run_predict

    (tmp_path / "in").mkdir()
    for s in cvm.test.stems[:2]:
        (tmp_path / "in" / f"{s}.png").write_bytes(files[s].read_bytes())
    cfg = compose_config(
        "predict",
        [
            *store_overrides(out),
            f"ensemble_run_id={record.run_id}",
            f"input_dir={tmp_path / 'in'}",
            f"output_dir={tmp_path / 'pred'}",
        ],
    )
    assert run_predict(cfg) == 2


def test_missing_fold_is_refused_with_the_command_unless_opted_in(cv_store, tmp_path):
    from segx import tracking
    from segx.workflows.ensemble import build_ensemble

    out, _ = cv_store
    client = _client(out)
    exp = client.get_experiment_by_name("segx").experiment_id
    parent = next(p for p in tracking.find_runs(client, exp, "cv") if p.data.tags["segx.backbone"] == "resnet18")
    fold1 = tracking.find_runs(
        client, exp, "member", tags={"mlflow.parentRunId": parent.info.run_id, "segx.fold": "1"}
    )[0]
    # A fold run named by ID stands for one fold only: refused, pointing at the parent.
    with pytest.raises(
        SegxError, match=rf"fold 1 of the cross-validated configuration {parent.info.run_id}; give the parent run ID"
    ):
        build_ensemble(compose_config("ensemble", [*store_overrides(out), f"ensemble.run_ids=[{fold1.info.run_id}]"]))
    client.delete_run(fold1.info.run_id)
    try:
        base = [*store_overrides(out), f"ensemble.run_ids=[{parent.info.run_id}]", "ensemble.postprocess=false"]
        with pytest.raises(SegxError, match=r"is missing fold\(s\) 1 .*train them: .*segx.train .*fold=1"):
            build_ensemble(compose_config("ensemble", base))
        record = build_ensemble(compose_config("ensemble", [*base, "ensemble.allow_incomplete_cv=true"]))
        assert list(record.members[0].folds) == [
            tracking.find_runs(
                client, exp, "member", tags={"mlflow.parentRunId": parent.info.run_id, "segx.fold": "0"}
            )[0].info.run_id
        ]
    finally:
        client.restore_run(fold1.info.run_id)


def test_cross_validated_and_single_split_members_do_not_mix():
    import dataclasses

    from segx.ensembling.members import check_compatible
    from tests.helpers import member

    cvm = dataclasses.replace(member("p1"), folds=["f0", "f1"])
    with pytest.raises(
        SegxError, match=r"member p1 \(resnet18-unet\) is cross-validated and r2 \(resnet18-unet\) is not"
    ):
        check_compatible([cvm, member("r2")])


def test_honest_gain_scores_the_best_member_at_its_own_validation_threshold():
    """Like for like: the ensemble at its chosen threshold against the best member at the
    threshold validation chose for that member (not at 0.5)."""
    import dataclasses

    import pandas as pd

    from segx.data.ragged import Ragged
    from segx.ensembling.probs import Cached, Weights
    from segx.ensembling.search import Candidate
    from segx.evaluation.report import honest_gain
    from tests.helpers import member

    truth = [np.zeros((4, 4), bool) for _ in range(3)]
    for t in truth:
        t[:2] = True
    # The member is sure of nothing: foreground at p = 0.4 (102/255), background at 0.1.
    probs = [np.where(t, 102, 25).astype(np.uint8) for t in truth]
    test = Cached(
        ["t0", "t1", "t2"],
        Ragged.from_list(probs),
        Ragged.from_list(truth),
        Ragged.of(np.zeros((0, 1, 1, 3), np.uint8)),
    )
    best = dataclasses.replace(member("r1"), test=test)
    # The two fields of the search's outcome that honest_gain reads.
    found = SimpleNamespace(
        baselines=[
            Candidate("member:resnet18-unet", Weights((1,), 1), 0.35, 0.95, 1),
            Candidate("equal", Weights((1,), 1), 0.5, 0.9, 2),
        ],
        val_dice=0.97,
    )
    per_case = pd.DataFrame({"method": ["ensemble"] * 3, "stem": ["t2", "t0", "t1"], "dice": [1.0, 1.0, 0.5]})
    gain = honest_gain(per_case, [best], found, resamples=200)
    assert gain.best_member_threshold == 0.35
    assert gain.best_member_test_dice == 1.0  # at 0.35 the member is perfect; at 0.5 it would score 0
    assert gain.diff == pytest.approx((1.0 + 0.5 + 1.0) / 3 - 1.0)  # stems matched, not row order
    assert gain.best_member_optimism == pytest.approx(0.95 - 1.0)


def test_config_identity_survives_keys_added_with_null_defaults():
    """A newer segx adding an option that is off (null) must not split a cross-validated
    configuration's folds between two parents, nor hide an unfinished run from resume=auto."""
    from omegaconf import OmegaConf

    from segx.workflows.member import config_identity

    cfg = compose_config("train", ["data.folds=3", "fold=1"])
    before, shared = config_identity(cfg), config_identity(cfg, ("fold",))
    OmegaConf.set_struct(cfg, False)
    cfg.data.new_option = None
    cfg.trainer.another = None
    assert config_identity(cfg) == before and config_identity(cfg, ("fold",)) == shared
    cfg.trainer.checkpoint_every_s = 5  # how often to checkpoint does not change the member
    assert config_identity(cfg) == before
    cfg.data.new_option = 3  # switched on: another configuration
    assert config_identity(cfg) != before
    cfg.data.new_option = None
    cfg.fold = 2  # another fold of the same configuration
    assert config_identity(cfg) != before and config_identity(cfg, ("fold",)) == shared
