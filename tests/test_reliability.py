"""Faults: interrupted training resumes, NaN stops cleanly, one failed member does not stop a
sweep, unreachable stores fail fast, parallel writers share SQLite, runs are reproducible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segx import tracking
from segx.errors import SegxError
from tests.conftest import ROOT, compose_config, tiny_train_overrides
from tests.helpers import run_in_process, seed_store


def cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        **kwargs,
    )


def runs_in(out: Path, experiment="segx", status=None):
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else tracking.find_runs(client, exp.experiment_id, "member", status=status))


# Slow: a training killed and resumed; resume=auto continuing the run (preempted, below), resuming from a
# checkpoint to the exact weights (checkpoints test) and a store a SIGKILLed writer left (test_store_signals) stay fast.
@pytest.mark.slow
def test_killed_training_resumes_in_the_same_run(tmp_path, synthetic_root):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    overrides = [*tiny_train_overrides(tmp_path, synthetic_root, epochs=6), "trainer.checkpoint_every_s=0"]
    proc = cli(["segx.train", *overrides])
    deadline = time.time() + 300
    state = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "checkpoints").glob("*/state.json"))
        if found and json.loads(found[0].read_text())["next_epoch"] >= 1:
            state = found[0]
            break
        time.sleep(0.1)
    assert state is not None, "training never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = state.parent.name
    killed_at = json.loads(state.read_text())["next_epoch"]
    assert killed_at < 6, "training finished before it could be killed"
    client, _ = runs_in(tmp_path)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL cannot be caught

    from segx.workflows.member import train_member

    cfg = compose_config("train", [*overrides, f"resume={run_id}"])
    train_member(cfg)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["segx.resumed"] == "true"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "curves/val_dice")})
    assert steps == list(range(1, 7))  # epochs 1..6 before and after the kill, in one run
    # Killed, the checkpoint was kept (it resumed from it); finished, it is removed: the logged
    # model is the member, and checkpoints carry optimizer state several times its size.
    assert not state.parent.exists()
    names = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/weights.h5", "model/spec.json"} <= names
    _, all_runs = runs_in(tmp_path)
    assert len(all_runs) == 1  # no second run was started

    with pytest.raises(SegxError, match="already FINISHED"):
        train_member(cfg)


@pytest.mark.parametrize(
    "every_s,good_epochs",
    # Slow: (3600, 0), a NaN before the first checkpoint; no checkpoint within the interval is
    # covered fast by test_checkpoints_wait_checkpoint_every_s_..., the NaN by (0, 1).
    [(0, 1), pytest.param(3600, 0, marks=pytest.mark.slow)],
)
def test_nan_loss_ends_run_failed_and_keeps_last_good_checkpoint(tmp_path, synthetic_root, every_s, good_epochs):
    from segx.training.fit import TrainingDiverged
    from segx.workflows.member import train_member

    # A sane learning rate for epoch 1 (2 steps), then an infinite one: epoch 2 diverges.
    schedule = (
        "trainer.optimizer.learning_rate={_target_:tf_keras.optimizers.schedules.PiecewiseConstantDecay,"
        "boundaries:[2],values:[0.001,inf]}"
    )
    overrides = [
        *tiny_train_overrides(tmp_path, synthetic_root, epochs=3),
        "trainer.lr_schedule=null",
        schedule,
        f"trainer.checkpoint_every_s={every_s}",
    ]
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    cfg = compose_config("train", overrides)
    with pytest.raises(TrainingDiverged, match="loss became nan|loss became inf|outputs became NaN"):
        train_member(cfg)
    client, runs = runs_in(tmp_path, status=None)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert "TrainingDiverged" in run.data.tags["segx.failure"]
    state = json.loads((tmp_path / "checkpoints" / run.info.run_id / "state.json").read_text())
    assert state["failure"] and "epoch 2" in state["failure"]
    # What the last checkpoint holds: the good first epoch, or (none written yet within the
    # interval) nothing, so that resume starts over rather than from weights it does not have.
    assert state["next_epoch"] == good_epochs
    assert bool(list((tmp_path / "checkpoints" / run.info.run_id / "ckpt").glob("last*.index"))) == (good_epochs > 0)
    assert (state["checkpoint"] is not None) == (good_epochs > 0)


def test_one_failing_member_does_not_stop_the_sweep(tmp_path, synthetic_root):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    overrides = [o for o in tiny_train_overrides(tmp_path, synthetic_root) if not o.startswith("backbone")]
    # PSPNet cannot take 64 px inputs: that job fails, the unet job must still run.
    proc = cli(["segx.train", "-m", "arch=pspnet,unet", "backbone=resnet18", *overrides])
    out, err = proc.communicate(timeout=600)
    assert "1 finished, 1 failed" in out, out + err
    assert proc.returncode == 1  # the sweep went on, but a script must not
    assert "pspnet" in err and "multiple of 48" in err
    _, runs = runs_in(tmp_path, status="FINISHED")
    assert [r.data.tags["segx.arch"] for r in runs] == ["unet"]


def test_a_sweep_whose_jobs_all_failed_exits_1_after_its_summary(tmp_path, synthetic_root, capfd):
    overrides = [o for o in tiny_train_overrides(tmp_path, synthetic_root) if not o.startswith("backbone")]
    # PSPNet cannot take 64 px inputs: the one job is refused before any training.
    result = run_in_process(
        capfd, ["segx.train", "-m", "arch=pspnet", "backbone=mobilenetv2", *overrides], cwd=tmp_path
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 finished, 1 failed" in result.stdout and "rerun exactly those" in result.stdout
    assert (
        result.stderr.rstrip().splitlines()[-1] == "segx: 1 sweep job(s) did not finish (summary above); exit status 1"
    )


def test_unreachable_tracking_server_fails_fast_with_clear_error():
    started = time.time()
    with pytest.raises(SegxError, match=r"cannot reach MLflow at mlflow.tracking_uri=http://127.0.0.1:9"):
        tracking.connect("http://127.0.0.1:9")
    assert time.time() - started < 60  # a bound against hanging, not a speed target


# Slow: two trainings at once; another process holding the store's lock (waited for, or one line
# after the wait) stays fast in test_store_signals.
@pytest.mark.slow
def test_two_processes_write_to_one_sqlite_store(tmp_path, synthetic_root):
    procs = [
        cli(["segx.train", *tiny_train_overrides(tmp_path, synthetic_root, b)]) for b in ("resnet18", "mobilenetv2")
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    _, runs = runs_in(tmp_path, status="FINISHED")
    assert sorted(r.data.tags["segx.backbone"] for r in runs) == ["mobilenetv2", "resnet18"]


def test_same_config_and_seed_reproduce_split_and_validation_dice(tmp_path, synthetic_root):
    from segx.workflows.member import train_member

    scores, splits, curves = [], [], []
    for i in range(2):
        out = seed_store(tmp_path / f"r{i}")  # an empty store: creating one is not what this test is about
        cfg = compose_config("train", tiny_train_overrides(out, synthetic_root, epochs=2))
        scores.append(train_member(cfg))
        splits.append(sorted(p.read_text() for p in (out / "splits").glob("*.json")))
        client, runs = runs_in(out, status="FINISHED")
        curves.append(
            [
                (m.step, m.value)
                for key in ("curves/train_loss", "curves/val_dice")
                for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
            ]
        )
    assert splits[0] == splits[1]
    # trainer.deterministic=true (the default) promises the same numbers, not close ones (in two runs).
    assert scores[0].run_id != scores[1].run_id
    assert scores[0].best_val_dice == scores[1].best_val_dice and scores[0].scores == scores[1].scores
    assert {"val/dice", "test/dice"} <= set(scores[0].scores)
    assert curves[0] == curves[1] and len(curves[0]) == 4


def test_info_prints_provenance_and_reproduce_command(member_store, capfd):
    out, runs = member_store
    result = run_in_process(
        capfd, ["segx.info", f"run_id={runs['resnet18']}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"]
    )
    assert result.returncode == 0, result.stderr
    assert "git " in result.stdout and "tensorflow 2." in result.stdout
    assert "python -m segx.train data=synthetic" in result.stdout and "backbone.name=resnet18" in result.stdout


def test_data_check_reports_every_problem(tmp_path, synthetic_root):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(synthetic_root, data)
    (data / "train_masks" / "case_0001.png").unlink()
    (data / "train_images" / "case_0002.png").write_bytes(b"garbage")
    result = subprocess.run(
        [sys.executable, "-m", "segx.data.check", f"data.root={data}"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "case_0001.png: no matching mask" in result.stdout
    assert "case_0002.png: not a readable image" in result.stdout
    assert "2 problem(s)" in result.stdout


def test_output_names_cannot_escape_the_output_folder(tmp_path):
    from segx.inference.folder import safe_output_path

    assert safe_output_path(tmp_path, "case_1") == (tmp_path / "case_1.png").resolve()
    for stem in ("..", "../evil", "a/b", ""):
        with pytest.raises(SegxError, match="rename the input"):
            safe_output_path(tmp_path, stem)


def test_preempted_before_its_first_checkpoint_resume_auto_continues_the_run_without_repeating_metrics(
    tmp_path, synthetic_root
):
    """SIGTERM (a preemption) after epoch 1 was logged, before any checkpoint (an hour apart):
    resume=auto continues that KILLED run from the first epoch, and the epoch it repeats is not
    logged twice (its values would be the same: training is deterministic)."""
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    from segx.workflows.member import train_member

    overrides = [*tiny_train_overrides(tmp_path, synthetic_root, epochs=5), "trainer.checkpoint_every_s=3600"]
    proc = cli(["segx.train", *overrides])
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline and proc.poll() is None and run_id is None:
        client, runs = runs_in(tmp_path, status="RUNNING")
        run_id = next(
            (r.info.run_id for r in runs if client.get_metric_history(r.info.run_id, "curves/val_dice")), None
        )
        time.sleep(0.2)
    assert run_id, "no epoch was logged in time"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    client, runs = runs_in(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not (tmp_path / "checkpoints" / run_id / "state.json").exists()  # nothing to resume from
    train_member(compose_config("train", [*overrides, "resume=auto"]))
    _, runs = runs_in(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]  # continued, not restarted
    for key in ("curves/val_dice", "curves/train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4, 5], key


@pytest.mark.parametrize(
    "every_s,committed",
    # Slow: (3600.0, None), nothing committed within the interval; the preempted test above covers
    # that fast (checkpoint_every_s=3600: no state to resume from), and (0.0, 2) the rest.
    [pytest.param(3600.0, None, marks=pytest.mark.slow), (0.0, 2)],
)
def test_checkpoints_wait_checkpoint_every_s_and_the_last_epoch_always_writes_one(tmp_path, every_s, committed):
    """Interrupted after epoch 2 of 3: with a checkpoint at most every hour, nothing was committed
    (resume would start over); with 0, epoch 2's checkpoint was. Run to its end, training always
    leaves the last epoch's checkpoint, whatever the interval."""
    import numpy as np

    from segx.backend import keras
    from segx.models import build_model, compile_model
    from segx.objects import build_augmentation
    from segx.training.augment import SeededAugmenter
    from segx.training.fit import FitData, FitSettings, FitState, fit_member

    class InterruptAfterEpoch2(keras.callbacks.Callback):  # runs after segx's own callback
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    masks = (rng.random((8, 32, 32)) > 0.5).astype(np.uint8)

    def fit(folder, epochs, extra, model=None):
        model = model or build_model("unet", "resnet18", 32)
        compile_model(model, keras.optimizers.Adam(1e-3), {"dice": 1.0})
        data = FitData(images[:6], masks[:6], SeededAugmenter(build_augmentation([])), images[6:], masks[6:])
        settings = FitSettings(epochs=epochs, batch_size=2, seed=0, verbose=0, checkpoint_every_s=every_s)
        fit_member(model, data, "resnet18", folder, settings, extra_callbacks=extra)
        return model

    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "interrupted", 3, [InterruptAfterEpoch2()])
    deadline = time.time() + (60 if committed else 2)  # epoch 2's write goes on in the background
    while (state := FitState.load(tmp_path / "interrupted")) is None or state.next_epoch != committed:
        if time.time() > deadline:
            break
        time.sleep(0.1)
    assert (state and state.next_epoch) == committed
    trained = fit(tmp_path / "finished", 2, [])
    state = FitState.load(tmp_path / "finished")
    assert state.next_epoch == 2 and state.checkpoint.endswith("final")
    # The last checkpoint holds the weights without the optimizer's state (nothing trains after
    # it), and a resumed run that has nothing left to train gets exactly those weights.
    ckpt = tmp_path / "finished" / "ckpt"
    final_size = sum(p.stat().st_size for p in ckpt.glob("final*"))
    full_size = sum(p.stat().st_size for p in ckpt.glob("last*"))
    assert final_size and (final_size < 0.75 * full_size if every_s == 0 else not full_size)
    keras.utils.set_random_seed(123)  # other initial weights
    resumed = fit(tmp_path / "finished", 2, [], build_model("unet", "resnet18", 32))
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), resumed.get_weights(), strict=True))


# Slow: SIGINT ending training KILLED stays fast (test_store_signals, first epoch), resume=auto in the preempted test.
@pytest.mark.slow
def test_ctrl_c_ends_run_killed_and_resume_auto_continues_it(tmp_path, synthetic_root):
    overrides = [*tiny_train_overrides(tmp_path, synthetic_root, epochs=5), "trainer.checkpoint_every_s=0"]
    proc = cli(["segx.train", *overrides])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "checkpoints").glob("*/state.json")):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    client, runs = runs_in(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    run_id = runs[0].info.run_id

    from segx.workflows.member import train_member

    train_member(compose_config("train", [*overrides, "resume=auto"]))
    assert client.get_run(run_id).info.status == "FINISHED"
    _, runs = runs_in(tmp_path)
    assert len(runs) == 1  # continued, not restarted
