"""Real 1-epoch trainings at 64 px into a real SQLite MLflow store in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from segx import tracking
from segx.errors import SegxError
from segx.workflows.member import train_member
from tests.conftest import ROOT, compose_config, tiny_train_overrides
from tests.helpers import run_in_process, seed_store


def member_runs(out, status=None):
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("segx")
    if exp is None:
        return client, []
    return client, tracking.find_runs(client, exp.experiment_id, "member", status=status)


def test_member_run_records_params_metrics_tags_and_artifacts(member_store):
    out, runs = member_store
    client, finished = member_runs(out, "FINISHED")
    run = client.get_run(runs["resnet18"])
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["backbone.name"] == "resnet18" and params["trainer.epochs"] == "2"
    assert params["data.image_size"] == "64" and "trainer.optimizer._target_" in params
    assert tags["segx.role"] == "member" and tags["segx.backbone"] == "resnet18"
    assert tags["segx.arch"] == "unet" and len(tags["segx.data_fingerprint"]) == 16
    assert tags["segx.git_sha"] and tags["segx.pkg.tensorflow"].startswith("2.")
    for key in ("curves/train_loss", "curves/val_loss", "curves/val_dice", "curves/val_iou", "curves/lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key  # one point per epoch, counted from 1 as Keras prints
    best_step = max(
        client.get_metric_history(run.info.run_id, "curves/val_dice"), key=lambda m: (m.value, -m.step)
    ).step
    assert run.data.metrics["curves/best_epoch"] == best_step  # one convention for "which epoch"
    # The best epoch's weights are restored: the Dice of the cached validation probabilities
    # (what the ensemble searches on, val/dice) is the best per-epoch Dice, not the last epoch's
    # (here equal: 64 px images are the model's input size).
    curve = [m.value for m in client.get_metric_history(run.info.run_id, "curves/val_dice")]
    assert run.data.metrics["curves/best_val_dice"] == max(curve)
    assert run.data.metrics["val/dice"] == pytest.approx(max(curve), abs=1e-9)
    assert {"test/dice", "test/iou", "test/hd95", "val/iou"} <= set(run.data.metrics)
    artifacts = {
        a.path
        for top in ("", "model", "predictions", "plots", "split")
        for a in client.list_artifacts(run.info.run_id, top or None)
    }
    for path in (
        "config.yaml",
        "augmentation.json",
        "model/weights.h5",
        "model/spec.json",
        "model/model.keras",
        "predictions/val.npz",
        "predictions/test.npz",
        "plots/curves.png",
        "plots/val_cases.png",
    ):
        assert path in artifacts, path
    # Every member of the ensemble saw the same validation cases.
    fingerprints = {client.get_run(r).data.tags["segx.data_fingerprint"] for r in runs.values()}
    assert len(fingerprints) == 1


def test_logged_model_reloads_and_reproduces_cached_probabilities(member_store, tmp_path):
    import segx.backend  # noqa: F401
    from segx.ensembling.probs import load_cached
    from segx.models import load_keras_model, load_member
    from segx.training.augment import load_augmentation

    out, runs = member_store
    client, _ = member_runs(out)
    run_id = runs["resnet18"]
    folder = tracking.download_member_model(client, run_id, tmp_path / "m")
    cached = load_cached(tracking.download(client, run_id, "predictions/test.npz", tmp_path), tmp_path)
    model = load_member(folder)
    # The cache holds each test image at its own size: resized in, upsampled back, quantised.
    from segx.inference.predictor import member_probs
    from segx.member_spec import MemberSpec

    view = MemberSpec.read(folder / "spec.json").view
    probs = member_probs(model, "resnet18", view, list(cached.previews), ("none",))["none"]
    assert len(cached.previews) and np.array_equal(probs.flat, cached.probs[: len(cached.previews)].flat)
    keras_file = tracking.download(client, run_id, "model/model.keras", tmp_path / "k")
    assert load_keras_model(keras_file).count_params() == model.count_params()
    # Saved for deployment, without the optimizer's state: about the size of the weights alone.
    weights = folder / "weights.h5"
    assert keras_file.stat().st_size < 1.5 * weights.stat().st_size
    assert load_augmentation(tracking.download(client, run_id, "augmentation.json", tmp_path)).transforms


def test_early_stopping_ends_training_after_patience_epochs_without_gain(tmp_path, synthetic_root):
    """min_delta=0.99: epoch 1 beats the start (-1), and no later epoch can beat it by 0.99, so
    training stops exactly `patience` epochs after the best one, well before trainer.epochs."""
    patience, epochs = 1, 5
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(tmp_path, synthetic_root, epochs=epochs),
            "trainer.lr_schedule=null",
            f"trainer.early_stopping.patience={patience}",
            "trainer.early_stopping.min_delta=0.99",
        ],
    )
    train_member(cfg)
    client, (run,) = member_runs(tmp_path, "FINISHED")
    ran = len(client.get_metric_history(run.info.run_id, "curves/val_dice"))
    best_epoch = int(run.data.metrics["curves/best_epoch"])
    assert ran == best_epoch + patience < epochs


def test_val_every_validates_every_nth_and_the_last_epoch_and_picks_the_best_among_them(tmp_path, synthetic_root):
    """trainer.val_every=2 over 5 epochs: validation (val/* metrics, best weights) after epochs
    2, 4 and 5 only; every epoch still trains and logs its loss; the LR plateau callback (on by
    default) sees only the validated epochs."""
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(tmp_path, synthetic_root, epochs=5),
            "trainer.val_every=2",
            "trainer.early_stopping.patience=0",
        ],
    )
    train_member(cfg)
    client, (run,) = member_runs(tmp_path, "FINISHED")
    keys = ("curves/val_dice", "curves/val_loss", "curves/train_loss", "time/validation_s")
    steps = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in keys}
    assert sorted(steps["curves/val_dice"]) == sorted(steps["curves/val_loss"]) == [2, 4, 5]
    assert sorted(steps["curves/train_loss"]) == sorted(steps["time/validation_s"]) == [1, 2, 3, 4, 5]
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "curves/val_dice")}
    assert run.data.metrics["curves/best_epoch"] in curve and run.data.metrics["curves/best_val_dice"] == max(
        curve.values()
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.image_size=80", r"data.image_size=80 does not suit arch=unet: it needs a multiple of 32"),
        ("trainer.epochs=-1", r"trainer.epochs=-1 is out of range"),
        ("trainer.batch_size=abc", r"trainer.batch_size='abc' must be an integer"),
        ("data.val_fraction=1.5", r"data.val_fraction=1.5 is out of range"),
        ("data=folder", r"data.root is not set; pass data.root=PATH"),
        ("trainer.optimizer._target_=os.system", r"trainer.optimizer._target_='os.system' is not allowed"),
    ],
)
def test_bad_config_fails_before_any_run_is_created(tmp_path, synthetic_root, override, message):
    overrides = [*tiny_train_overrides(tmp_path, synthetic_root), override]
    if override == "data=folder":  # the group must come first, and without a root
        overrides = [override] + [
            o for o in overrides if not o.startswith(("data.root", "data.n_images", "data.source_size"))
        ]
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    cfg = compose_config("train", overrides)
    with pytest.raises(SegxError, match=message):
        train_member(cfg)
    _, runs = member_runs(tmp_path)
    assert runs == []  # nothing recorded, nothing left RUNNING


def run_cli(*args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_unknown_backbone_is_one_line_with_suggestion():
    result = run_cli("segx.train", "backbone=resnet43")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "segx: error: unknown backbone 'resnet43'; did you mean 'resnet34'? (see conf/backbone/)"
    ]


def test_cli_missing_data_folder_is_one_line(tmp_path, capfd):
    result = run_in_process(
        capfd, ["segx.train", "data=folder", f"data.root={tmp_path}/nope", f"paths.output_dir={tmp_path}"]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"segx: error: data folder {tmp_path}/nope does not exist; set data.root=PATH to your data"
    ]


def test_cli_missing_mask_is_one_line(tmp_path, synthetic_root, capfd):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "GENERATOR.json").unlink()
    (data / "train_masks" / "case_0003.png").unlink()
    result = run_in_process(
        capfd,
        ["segx.train", "data=folder", f"data.root={data}", "data.image_size=64", f"paths.output_dir={tmp_path}"],
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "case_0003.png: no mask" in lines[0]


# Slow: two trainings in a sweep; multiruns and their summary are covered fast (test_cv's fold sweep, test_reliability's sweeps).
@pytest.mark.slow
def test_multirun_trains_two_backbones_and_summarises(tmp_path, synthetic_root):
    overrides = [o for o in tiny_train_overrides(tmp_path, synthetic_root) if not o.startswith("backbone=")]
    result = run_cli("segx.train", "-m", "backbone=resnet18,mobilenetv2", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 finished, 0 failed" in result.stdout
    _, runs = member_runs(tmp_path, "FINISHED")
    assert sorted(r.data.tags["segx.backbone"] for r in runs) == ["mobilenetv2", "resnet18"]
