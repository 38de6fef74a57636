"""A real SLURM sweep on one machine standing in for the cluster: 2 backbones x 2 folds submitted
through hydra-submitit-launcher (hydra/launcher=slurm) to a one-node SLURM, every job logging to
a shared MLflow server (PostgreSQL, proxied artifacts), one job preempted mid-training (submitit's
USR2: checkpoint, requeue, sys.exit) and continued in the same MLflow run after SLURM requeues
it, then an ensemble built from the server alone.

Needs SLURM answering here (``make slurm-local`` starts one, as root); skipped with that reason
otherwise. Run it with ``make test-slurm``; its last output is kept in experiments/scaleout/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("sinfo") is None
        or subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0,
        reason="no SLURM answering here: start a one-node SLURM with `make slurm-local` (root), then `make test-slurm`",
    ),
]


def _member_runs(uri: str, status: str | None = "FINISHED"):
    from segx import tracking

    client = tracking.connect(uri, create=False)
    exp = client.get_experiment_by_name("segx")
    return client, (tracking.find_runs(client, exp.experiment_id, "member", status) if exp else [])


def _preempt_first_job_after_its_first_epoch(uri: str, sweep: subprocess.Popen, deadline: float) -> tuple[str, str]:
    """Send submitit's preemption signal (USR2) to the first job that has logged an epoch."""
    while time.monotonic() < deadline and sweep.poll() is None:
        try:
            client, runs = _member_runs(uri, "RUNNING")
        except Exception:  # noqa: BLE001 - the experiment is not created yet
            runs = []
        for run in runs:
            job = run.data.tags.get("segx.slurm_job_id")
            if run.info.status == "RUNNING" and job and client.get_metric_history(run.info.run_id, "curves/val_dice"):
                # scancel keeps retrying ("job can not be altered now") once submitit has requeued
                # the job on the first delivery: the signal is out by then, stop waiting for it.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(["scancel", "--signal=USR2", job], timeout=10)
                return run.info.run_id, job
        time.sleep(0.5)
    raise AssertionError("no job logged an epoch in time")


def test_slurm_sweep_with_preemption_logs_to_the_server_and_ensembles(tmp_path, synthetic_root):
    from segx.tracking.server import ServerSettings, free_port, tracking_server

    log_dir = ROOT / "experiments" / "scaleout"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Outside pytest's temp root: a pytest session starting meanwhile resets that root to 0700,
    # and PostgreSQL runs as nobody (it refuses root).
    server_dir = Path(tempfile.mkdtemp(prefix="segx-slurm-server-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, server_dir, True)
        uri = stack.enter_context(tracking_server(server_dir, ServerSettings(port=free_port())))
        out = tmp_path / "out"
        common = [
            f"paths.output_dir={out}",
            f"mlflow.tracking_uri={uri}",
            f"data.root={synthetic_root}",
            "data.n_images=16",
            "data.source_size=64",
            "data.image_size=64",
            "data.test_fraction=0.25",
            "data.folds=2",
            "trainer.batch_size=4",
            "trainer.verbose=2",
            "mlflow.system_metrics=false",
        ]
        sweep_args = [
            sys.executable,
            "-m",
            "segx.train",
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=30",
            "backbone=resnet18,mobilenetv2",
            "fold=0,1",
            "trainer.epochs=6",
            "trainer.early_stopping.patience=0",
            "trainer.checkpoint_every_s=0",
            *common,
        ]
        started = time.monotonic()
        with open(tmp_path / "sweep.log", "w") as log:
            sweep = subprocess.Popen(sweep_args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
            try:
                preempted, job = _preempt_first_job_after_its_first_epoch(uri, sweep, time.monotonic() + 600)
                rc = sweep.wait(timeout=1200)
            finally:
                if sweep.poll() is None:
                    sweep.kill()
                subprocess.run(["scancel", "--name=train"], timeout=30)  # nothing of ours left queued
        sweep_seconds = time.monotonic() - started
        text = (tmp_path / "sweep.log").read_text()
        shutil.copy(tmp_path / "sweep.log", log_dir / "slurm_sweep.log")
        assert rc == 0, text[-4000:]
        assert "4 finished, 0 failed" in text

        client, runs = _member_runs(uri)
        assert sorted((r.data.tags["segx.backbone"], r.info.status) for r in runs) == [
            ("mobilenetv2", "FINISHED"),
            ("mobilenetv2", "FINISHED"),
            ("resnet18", "FINISHED"),
            ("resnet18", "FINISHED"),
        ]
        # The preempted job was requeued by SLURM and continued its own run: one run, every
        # epoch once, the same SLURM job ID, marked resumed.
        run = client.get_run(preempted)
        assert run.data.tags.get("segx.resumed") == "true" and run.data.tags["segx.slurm_job_id"] == job
        steps = sorted(m.step for m in client.get_metric_history(preempted, "curves/val_dice"))
        assert steps == list(range(1, 7)), steps
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)  # proxied, not a local path
        (results,) = out.glob("multirun/*/segx_results.jsonl")
        events = [json.loads(line) for line in results.read_text().splitlines()]
        assert [e["status"] for e in events if e.get("run_id") == preempted] == ["KILLED", "FINISHED"]

        # The ensemble is built from the server alone (members' models and caches come through it).
        ens = subprocess.run(
            [
                sys.executable,
                "-m",
                "segx.ensemble",
                f"paths.output_dir={tmp_path / 'ens'}",
                f"mlflow.tracking_uri={uri}",
                "ensemble.members=[resnet18,mobilenetv2]",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert ens.returncode == 0, ens.stderr[-3000:]
        (log_dir / "slurm_ensemble.log").write_text(ens.stdout)
        from segx import tracking

        ensembles = tracking.find_runs(client, client.get_experiment_by_name("segx").experiment_id, "ensemble")
        assert [e.info.status for e in ensembles] == ["FINISHED"]
        (log_dir / "slurm_test.json").write_text(
            json.dumps(
                {
                    "sweep_seconds": round(sweep_seconds, 1),
                    "jobs": 4,
                    "preempted_run": preempted,
                    "preempted_job": job,
                    "val_dice_steps_of_preempted_run": steps,
                    "ensemble_run": ensembles[0].info.run_id,
                },
                indent=1,
            )
        )
