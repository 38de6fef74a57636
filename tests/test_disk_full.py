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
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()], failed.stderr[-3000:]  # one line
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
