"""Round trip on a real store: two tiny members -> ensemble -> predict from the record alone."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from segx import tracking
from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from tests.conftest import compose_config, store_overrides


def test_ensemble_run_records_members_weights_and_reports(ensemble_record, member_store, tmp_path):
    out, runs = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(ensemble_record.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["segx.role"] == "ensemble"
    record = json.loads(tracking.download(client, run.info.run_id, "ensemble.json", tmp_path / "dl").read_text())
    assert {m["run_id"] for m in record["members"]} == set(runs.values())
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)
    assert record["data_fingerprint"] and record["git_sha"] and 0 <= record["threshold"] <= 1
    names = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert {"tables/test_per_case.csv", "tables/test_summary.csv", "tables/val_summary.csv"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {
        "plots/search.png",
        "plots/test_cases.png",
    }
    # One key per meaning, the members' keys (segx/metric_keys.py): one chart compares them all.
    member_runs = [client.get_run(r) for r in runs.values()]
    for key in ("val/dice", "test/dice", "test/iou", "test/hd95"):
        assert key in run.data.metrics and all(key in m.data.metrics for m in member_runs), key
        assert all(len(client.get_metric_history(r.info.run_id, key)) == 1 for r in [run, *member_runs]), key
    assert run.data.metrics["val/dice"] == ensemble_record.val_dice
    per_epoch = [
        k for k in member_runs[0].data.metrics if len(client.get_metric_history(member_runs[0].info.run_id, k)) > 1
    ]
    assert per_epoch and all(k.startswith(("curves/", "time/", "system/")) for k in per_epoch), per_epoch
    assert not any(
        k.startswith(("final/", "best/")) or k == "val/best_dice" for r in [run, *member_runs] for k in r.data.metrics
    )
    # The description links to each member run; each member names the ensembles that use it.
    note = run.data.tags["mlflow.note.content"]
    experiment = run.info.experiment_id
    for backbone, member_id in runs.items():
        assert f"](#/experiments/{experiment}/runs/{member_id})" in note and f"{backbone}-unet" in note
        assert run.info.run_id in client.get_run(member_id).data.tags["segx.ensembles"].split(",")
    versions = client.search_model_versions("name='segx-test-ensemble'")
    assert [v.run_id for v in versions] == [run.info.run_id]  # registered in the model registry


def test_predict_from_record_matches_search_and_pyfunc(ensemble_record, member_store_copy, synthetic_root, tmp_path):
    import mlflow

    from segx.data.folder import discover_cases
    from segx.data.io import read_image
    from segx.ensembling.probs import binarize, combine, load_cached
    from segx.workflows.predict import load_ensemble, run_predict

    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    run_id = ensemble_record.run_id
    record, predictor = load_ensemble(client, run_id, tmp_path / "rebuild")
    # Rebuilt members reproduce the cached validation probabilities used in the search, exactly.
    cached = [
        load_cached(
            tracking.download(client, m.run_id, "predictions/val.npz", tmp_path / m.run_id),
            tmp_path / m.run_id,
        )
        for m in record.members
    ]
    stems = cached[0].stems
    files = {c.stem: c.image for c in discover_cases(synthetic_root)}
    images = [read_image(files[stem]) for stem in stems]  # at their own size, as a user gives them
    score, probs = predictor.score(images)
    searched = binarize(combine([c.probs for c in cached], [m.weight for m in record.members]), record.threshold)
    assert np.array_equal(binarize(score, record.threshold).flat, searched.flat)
    # ... and so the recorded validation Dice, exactly.
    from segx.scoring.metrics import dice_per_case

    assert dice_per_case(binarize(score, record.threshold), cached[0].masks).mean() == record.val_dice

    # The CLI writes one mask per input at the input's own size, and never overwrites.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = cv2.imread(str(synthetic_root / "train_images" / "case_0000.png"))
    cv2.imwrite(str(inputs / "big.png"), cv2.resize(image, (96, 80)))
    cv2.imwrite(str(inputs / "small.png"), image)
    cfg = compose_config(
        "predict",
        [*store_overrides(out), f"ensemble_run_id={run_id}", f"input_dir={inputs}", f"output_dir={tmp_path / 'pred'}"],
    )
    assert run_predict(cfg) == 2
    mask = cv2.imread(str(tmp_path / "pred" / "masks" / "big.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255}
    assert (tmp_path / "pred" / "uncertainty" / "small.png").exists()
    with pytest.raises(SegxError, match="is not empty"):
        run_predict(cfg)

    # The pyfunc model gives the same masks without segx's CLI.
    model = mlflow.pyfunc.load_model(_pyfunc_uri(client, run_id))
    batch = np.stack([cv2.cvtColor(image, cv2.COLOR_BGR2RGB)])
    masks = model.predict(batch)
    expected = cv2.imread(str(tmp_path / "pred" / "masks" / "small.png"), cv2.IMREAD_UNCHANGED) > 0
    assert masks.shape == (1, 64, 64) and np.array_equal(masks[0].astype(bool), expected)


def test_a_member_logged_model_loads_and_predicts_at_each_images_own_size(member_store_copy, synthetic_root, tmp_path):
    """mlflow.pyfunc.load_model on a member's logged model: masks at the image's own size, the
    member's own cached test predictions (threshold 0.5), pixel for pixel."""
    import mlflow

    from segx.data.folder import discover_cases
    from segx.data.io import read_image
    from segx.ensembling.probs import load_cached

    out, runs = member_store_copy
    uri = f"sqlite:///{out}/mlflow.db"
    client = tracking.connect(uri)
    run_id = runs["resnet18"]
    model_id = client.get_run(run_id).data.tags["segx.logged_model_id"]
    logged = client.get_logged_model(model_id)
    assert logged.status.to_int() == 2 or str(logged.status).endswith("READY")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # models:/<id> is looked up in the default store
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    finally:
        mlflow.set_tracking_uri(previous)
    cached = load_cached(tracking.download(client, run_id, "predictions/test.npz", tmp_path / "c"), tmp_path / "c")
    files = {c.stem: c.image for c in discover_cases(synthetic_root)}
    images = [read_image(files[stem]) for stem in cached.stems]
    masks = model.predict(np.stack(images))  # its signature: one uint8 batch (N, H, W, 3) per call
    assert len(masks) == len(images)
    for mask, probs, image in zip(masks, cached.probs, images, strict=True):
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert np.array_equal(mask.astype(bool), probs >= 128)
    odd = cv2.resize(images[0], (70, 50))
    (mask,) = model.predict(np.stack([odd]))
    assert mask.shape == (50, 70)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_fused_networks_predict_bit_for_bit_what_each_predicts_alone(
    ensemble_record, member_store, synthetic_root, tmp_path, tta
):
    """One compiled function for every network of a view gives each network's own numbers: a
    plain member, and a member given as two fold models (the same folders twice, so its fold
    mean must equal it), on images of several sizes, in resize mode and under flip TTA."""
    from segx.inference.predictor import EnsemblePredictor

    out, _ = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    record = json.loads(tracking.download(client, ensemble_record.run_id, "ensemble.json", tmp_path / "dl").read_text())
    first, second = (
        tracking.download_member_model(client, m["run_id"], tmp_path / f"m{i}") for i, m in enumerate(record["members"])
    )
    record["weight_denominator"] = 3  # both members run (with unequal weights), whatever the search chose
    record["members"] = [dict(m, weight=k / 3, weight_count=k) for m, k in zip(record["members"], (1, 2), strict=True)]
    image = cv2.cvtColor(cv2.imread(str(synthetic_root / "train_images" / "case_0001.png")), cv2.COLOR_BGR2RGB)
    images = [
        image,
        cv2.resize(image, (96, 80)),
        cv2.resize(image, (40, 50)),
        image[:33, :61],
    ] * 3  # 12: batches of 8 + 4
    record = EnsembleRecord.from_json(record)
    fused = EnsemblePredictor(record, [first, [second, second]], tta=tta)
    alone = EnsemblePredictor(record, [first, [second, second]], tta=tta, fused=False)
    assert len(fused.groups) == 1 and len(fused.groups[fused.views[0]].models) == 3
    for a, b in zip(fused.member_probs(images), alone.member_probs(images), strict=True):
        assert np.array_equal(a.shapes, b.shapes) and np.array_equal(a.flat, b.flat)
    assert np.array_equal(fused.score(images)[0].values.flat, alone.score(images)[0].values.flat)


@pytest.mark.parametrize("case", ["empty", "corrupt", "missing"])
def test_predict_rejects_bad_input_folder_before_writing(ensemble_record, member_store, tmp_path, case):
    from segx.workflows.predict import run_predict

    out, _ = member_store
    inputs = tmp_path / "in"
    if case != "missing":
        inputs.mkdir()
    if case == "corrupt":
        (inputs / "scan.png").write_bytes(b"\x89PNG broken")
    cfg = compose_config(
        "predict",
        [
            *store_overrides(out),
            f"ensemble_run_id={ensemble_record.run_id}",
            f"input_dir={inputs}",
            f"output_dir={tmp_path / 'pred'}",
        ],
    )
    message = {"empty": "holds no images", "corrupt": r"scan\.png: not a readable image", "missing": "does not exist"}[
        case
    ]
    with pytest.raises(SegxError, match=message):
        run_predict(cfg)
    assert not (tmp_path / "pred").exists()


def test_logging_the_pyfunc_model_leaves_no_temp_folder(ensemble_record, member_store_copy, tmp_path, monkeypatch):
    """The members are downloaded to a temp folder on the way into the store; that folder must
    go (a leak here once filled a disk: hundreds of MB per ensemble)."""
    import tempfile

    from segx.tracking.pyfunc_model import log_pyfunc

    out, _ = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    record = json.loads(tracking.download(client, ensemble_record.run_id, "ensemble.json", tmp_path / "dl").read_text())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run = client.create_run(client.get_run(ensemble_record.run_id).info.experiment_id)
    uri = log_pyfunc(client, run.info.run_id, EnsembleRecord.from_json(record))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.tags["segx.pyfunc_uri"] == uri
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("segx-pyfunc-")]


def _pyfunc_uri(client, run_id):
    return client.get_run(run_id).data.tags["segx.pyfunc_uri"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["ensemble.run_ids=[doesnotexist]"], "run 'doesnotexist' does not exist"),
        (["ensemble.members=[vgg16]"], "no FINISHED member run with backbone 'vgg16'"),
        (["ensemble.members=[]"], "no members given"),
        (["ensemble.search=gird"], "ensemble.search='gird' is not valid; did you mean 'grid'"),
    ],
)
def test_ensemble_bad_input_is_one_line_and_records_nothing(member_store, overrides, message):
    from segx.workflows.ensemble import build_ensemble

    out, _ = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("segx").experiment_id
    before = len(tracking.find_runs(client, exp, "ensemble", status=None))
    cfg = compose_config("ensemble", [*store_overrides(out), *overrides])
    with pytest.raises(SegxError, match=message):
        build_ensemble(cfg)
    assert len(tracking.find_runs(client, exp, "ensemble", status=None)) == before


def test_members_on_different_splits_refuse_to_combine(member_store_copy, synthetic_root, tmp_path):
    from segx.workflows.ensemble import build_ensemble
    from segx.workflows.member import train_member
    from tests.conftest import tiny_train_overrides

    out, runs = member_store_copy
    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(out, synthetic_root, "resnet18"),
            "data.split_seed=7",
            "trainer.epochs=1",
            "mlflow.experiment_name=other",
        ],
    )
    train_member(cfg)
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    other = tracking.find_runs(client, client.get_experiment_by_name("other").experiment_id, "member")[0].info.run_id
    cfg = compose_config("ensemble", [*store_overrides(out), f"ensemble.run_ids=[{runs['mobilenetv2']},{other}]"])
    with pytest.raises(SegxError, match=f"members {runs['mobilenetv2']} .* and {other} .* different splits"):
        build_ensemble(cfg)


def test_hand_written_record_with_bad_weights_is_refused():
    from segx.ensembling.record import validate_record

    record = {
        "format": "segx-ensemble",
        "image_size": 64,
        "threshold": 0.5,
        "members": [
            {"run_id": "a", "backbone": "resnet18", "weight": 0.7},
            {"run_id": "b", "backbone": "vgg16", "weight": 0.7},
        ],
    }
    with pytest.raises(SegxError, match="weights sum to 1.400000, not 1"):
        validate_record(record)
    record["members"] = []
    with pytest.raises(SegxError, match="'members' is empty"):
        validate_record(record)


def test_select_auto_takes_every_finished_member_of_the_split(member_store_copy, ensemble_record):
    from segx.workflows.ensemble import build_ensemble

    out, runs = member_store_copy
    cfg = compose_config(
        "ensemble", [*store_overrides(out), "ensemble.select=auto", "ensemble.search=grid", "ensemble.grid_step=0.5"]
    )
    record = build_ensemble(cfg)
    assert {m.run_id for m in record.members} == set(runs.values())
    assert record.data_fingerprint == ensemble_record.data_fingerprint


def test_exact_run_ids_need_no_member_list(member_store_copy):
    from segx.workflows.ensemble import build_ensemble

    out, runs = member_store_copy
    ids = sorted(runs.values())
    cfg = compose_config(
        "ensemble",
        [
            *store_overrides(out),
            "ensemble.members=null",
            f"ensemble.run_ids=[{','.join(ids)}]",
            "ensemble.search=grid",
            "ensemble.grid_step=0.5",
        ],
    )
    record = build_ensemble(cfg)
    assert sorted(m.run_id for m in record.members) == ids


def _other_data(tmp_path):
    """Data B: the tiny synthetic set of the member store's members, generated with another seed."""
    from segx.data.synthetic import generate

    root = generate(tmp_path / "other", n_images=16, size=64, seed=1)
    return root, [
        "data=synthetic",
        f"data.root={root}",
        "data.n_images=16",
        "data.source_size=64",
        "data.generator_seed=1",
        "data.image_size=64",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    ]


def test_an_ensemble_naming_other_data_refuses_members_of_the_stores_data(tmp_path, member_store, synthetic_root):
    from tests.helpers import copy_store

    store = copy_store(member_store[0], tmp_path / "store")
    root, data = _other_data(tmp_path)
    from segx.workflows.ensemble import build_ensemble

    cfg = compose_config("ensemble", [*store_overrides(store), *data, "ensemble.members=[resnet18]"])
    client = tracking.connect(f"sqlite:///{store}/mlflow.db", create=False)
    experiment = client.get_experiment_by_name("segx").experiment_id
    before = {r.info.run_id for r in tracking.find_runs(client, experiment, "ensemble", None)}  # earlier tests'
    with pytest.raises(SegxError) as refused:
        build_ensemble(cfg)
    message = str(refused.value)
    assert "no finished resnet18 member of the data this command names" in message, message
    assert f"data.root {synthetic_root} vs {root}" in message and "data.generator_seed 0 vs 1" in message, message
    assert "ensemble.train_missing=true" in message and "\n" not in message
    assert {r.info.run_id for r in tracking.find_runs(client, experiment, "ensemble", None)} == before  # no new run


def test_an_ensemble_naming_other_data_trains_its_missing_member_on_that_data(tmp_path, member_store):
    import subprocess
    import sys

    from tests.helpers import copy_store

    store = copy_store(member_store[0], tmp_path / "store")
    _, data = _other_data(tmp_path)
    client = tracking.connect(f"sqlite:///{store}/mlflow.db", create=False)
    experiment = client.get_experiment_by_name("segx").experiment_id
    theirs = {r.info.run_id for r in tracking.find_runs(client, experiment, "member")}
    earlier = {r.info.run_id for r in tracking.find_runs(client, experiment, "ensemble")}  # other tests'
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "segx.ensemble",
            *store_overrides(store),
            *data,
            "ensemble.train_missing=true",
            "ensemble.members=[resnet18]",
            "ensemble.train_overrides=['trainer.epochs=1','trainer.batch_size=4','trainer.verbose=0','mlflow.system_metrics=false']",
            "ensemble.bootstrap=100",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "no finished runs of this data yet for resnet18" in built.stdout
    (new,) = [r for r in tracking.find_runs(client, experiment, "member") if r.info.run_id not in theirs]
    (ensemble,) = [r for r in tracking.find_runs(client, experiment, "ensemble") if r.info.run_id not in earlier]
    assert ensemble.data.tags["segx.members"] == new.info.run_id
    fingerprint = ensemble.data.tags["segx.data_fingerprint"]
    assert fingerprint == new.data.tags["segx.data_fingerprint"]
    assert all(client.get_run(r).data.tags["segx.data_fingerprint"] != fingerprint for r in theirs)
