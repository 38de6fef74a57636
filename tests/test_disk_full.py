"""A full disk during training (issue 21): one line naming the disk, the run FAILED (never
RUNNING), no partial checkpoint or reserve file left, and resume=<id> finishes it once there is
space. Real: a tmpfs as paths.output_dir (root mounts one; skipped with the reason elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segx import tracking
from tests.conftest import ROOT


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_during_training_fails_the_run_in_one_line_and_resume_finishes_it(small_disk, synthetic_root):
    out = small_disk / "outputs"
    # resnet18's checkpoint (~57 MB) does not fit in 30 MB; the store and the data cache do.
    args = [
        sys.executable,
        "-m",
        "segx.train",
        f"paths.output_dir={out}",
        f"data.root={synthetic_root}",
        "data.n_images=16",
        "data.source_size=64",
        "data.image_size=64",
        "trainer.epochs=2",
        "trainer.batch_size=4",
        "trainer.verbose=0",
        "backbone=resnet18",
        "mlflow.system_metrics=false",
    ]
    failed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    # One line (after segx's note of runs other tests deleted from the shared store, if any).
    lines = [ln for ln in failed.stderr.strip().splitlines() if not ln.startswith("segx: skipped ")]
    assert len(lines) == 1, failed.stderr[-3000:]
    assert f"segx: error: the disk mounted on {small_disk} is full" in failed.stderr
    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    (run,) = tracking.find_runs(client, client.get_experiment_by_name("segx").experiment_id, "member", None)
    assert run.info.status == "FAILED" and run.data.tags["segx.disk_full"] == "true"
    left = [
        p for p in out.rglob("*") if "_temp" in p.name or "tempstate" in p.name or p.name.startswith(".segx-reserve")
    ]
    assert not left, left
    assert not any((out / "checkpoints").rglob("*.index")), "an incomplete checkpoint is of no use: removed"

    grown = subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    resumed = subprocess.run(
        [*args, f"resume={run.info.run_id}"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "curves/train_loss"))
    assert steps == [1, 2]  # each epoch once


def test_a_full_disk_while_logging_the_ensembles_pyfunc_model_names_the_stores_disk_and_leaves_no_partial_model(
    small_disk, member_store, tmp_path
):
    import shutil
    import sqlite3
    from contextlib import closing

    from mlflow.entities import LoggedModelStatus

    from tests.conftest import store_overrides

    # The members' store copied onto a disk with room for the ensemble's tables but not for the
    # pyfunc model (a copy of every member's weights); caches and Hydra's folder elsewhere.
    src, store = member_store[0], small_disk / "store"
    used = sum(p.stat().st_size for p in (src / "mlartifacts").rglob("*") if p.is_file()) >> 20
    subprocess.run(["mount", "-o", f"remount,size={used + 24}m", str(small_disk)], check=True)
    store.mkdir()
    shutil.copy2(src / "mlflow.db", store / "mlflow.db")
    shutil.copytree(src / "mlartifacts", store / "mlartifacts")
    with closing(sqlite3.connect(store / "mlflow.db")) as con, con:
        con.execute(
            "UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(src), str(store))
        )
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(src), str(store)))
    models_before = {p.name for p in (store / "mlartifacts" / "segx" / "models").iterdir()}
    client = tracking.connect(f"sqlite:///{store}/mlflow.db", create=False)
    experiment = client.get_experiment_by_name("segx").experiment_id
    ensembles_before = {r.info.run_id for r in tracking.find_runs(client, experiment, "ensemble", None)}
    args = [
        sys.executable,
        "-m",
        "segx.ensemble",
        *store_overrides(store),
        f"paths.output_dir={tmp_path / 'work'}",
        "ensemble.members=[resnet18,mobilenetv2]",
        "ensemble.bootstrap=100",
    ]
    failed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    # One line (after segx's note of runs other tests deleted from the shared store, if any).
    lines = [ln for ln in failed.stderr.strip().splitlines() if not ln.startswith("segx: skipped ")]
    assert len(lines) == 1, failed.stderr[-3000:]
    assert f"segx: error: the disk mounted on {small_disk} is full" in failed.stderr, failed.stderr
    assert "sqlalche.me" not in failed.stderr
    # The one ensemble run this command made (the session store holds its own ensemble).
    (run,) = [
        r for r in tracking.find_runs(client, experiment, "ensemble", None) if r.info.run_id not in ensembles_before
    ]
    assert run.info.status == "FAILED" and run.data.tags["segx.disk_full"] == "true"
    (model,) = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert model.status == LoggedModelStatus.FAILED
    models = store / "mlartifacts" / "segx" / "models"
    partial = [p for p in models.rglob("*") if p.is_file() and p.relative_to(models).parts[0] not in models_before]
    assert not partial, partial  # the failed model's files are removed: the disk gets its space back
