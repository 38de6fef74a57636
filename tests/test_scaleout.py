"""Sweeps beyond one process and training beyond one device: the joblib and submitit launchers
(real Hydra multiruns in subprocesses), the checks made before a sweep is submitted, the sweep
summary and its rerun command, a run stopped by sys.exit (submitit's preemption exit) ending
KILLED, and MirroredStrategy / mixed precision on CPU devices. The real one-node SLURM sweep is
in tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segx.training.resources import cpu_cores, job_threads
from segx.workflows.sweep import job_outcomes, rerun_commands, summary_lines
from tests.conftest import ROOT, compose_config, tiny_train_overrides
from tests.helpers import run_in_process, seed_store


def run_cli(args, timeout=900, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def member_runs(out: Path):
    from segx import tracking

    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx")
    return client, tracking.find_runs(client, exp.experiment_id, "member") if exp else []


def sweep_overrides(out: Path, data: Path) -> list[str]:
    return [o for o in tiny_train_overrides(out, data) if not o.startswith("backbone=")] + [
        "mlflow.system_metrics=false"
    ]


# -- the launchers, for real ------------------------------------------------------------------


# Slow: a joblib sweep of two jobs in subprocesses; sweep summaries and reruns stay fast (test_reliability, tests below).
@pytest.mark.slow
def test_joblib_sweep_runs_members_in_parallel_processes_with_a_share_of_the_cores(tmp_path, synthetic_root):
    """Two jobs at once, each TensorFlow on cores // 2 threads; a job that fails (an image size
    the network refuses) does not stop the other, and the summary reruns exactly that job."""
    overrides = [o for o in sweep_overrides(tmp_path, synthetic_root) if not o.startswith("data.image_size=")]
    result = run_cli(
        [
            "segx.train",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "backbone=resnet18",
            "data.image_size=64,65",
            *overrides,
        ]
    )
    assert result.returncode == 1, result.stderr[-3000:]  # one job failed
    _, runs = member_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.tags["segx.threads"] == str(max(1, cpu_cores() // 2))
    out = result.stdout
    assert "1 finished, 1 failed" in out
    assert "data.image_size=65" in out and "FAILED" in out and "a multiple of 32" in out
    rerun = out.split("rerun exactly those:")[1].strip().splitlines()[0]
    assert "hydra/launcher=joblib" in rerun and "hydra.launcher.n_jobs=2" in rerun
    assert "data.image_size=65" in rerun and "data.image_size=64" not in rerun and rerun.endswith("resume=auto")
    # Each job appended its own lines, side by side, to one results file.
    (results,) = tmp_path.glob("multirun/*/segx_results.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["FAILED", "FINISHED", "STARTED", "STARTED"]
    assert {r["run_id"] for r in rows if r["status"] == "FINISHED"} == {runs[0].info.run_id}


# Slow: two trainings in submitit jobs; what a job does is the plain sweep's (test_reliability, test_cv), covered fast.
@pytest.mark.slow
def test_submitit_local_sweep_trains_each_member_in_its_own_job(tmp_path, synthetic_root):
    result = run_cli(
        [
            "segx.train",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=20",
            "backbone=resnet18,mobilenetv2",
            *sweep_overrides(tmp_path, synthetic_root),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = member_runs(tmp_path)
    assert sorted((r.data.tags["segx.backbone"], r.info.status, r.data.tags["segx.threads"]) for r in runs) == [
        ("mobilenetv2", "FINISHED", "1"),
        ("resnet18", "FINISHED", "1"),
    ]
    assert "2 finished, 0 failed" in result.stdout
    assert list(tmp_path.glob("multirun/*/.submitit/*/*_log.out"))  # submitit's own job folders


# -- checks before anything is submitted ------------------------------------------------------


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_more_joblib_jobs_than_cores_is_refused(tmp_path):
    n = cpu_cores() + 1
    line = one_line_error(
        run_cli(
            [
                "segx.train",
                "-m",
                "hydra/launcher=joblib",
                f"hydra.launcher.n_jobs={n}",
                "backbone=resnet18,mobilenetv2",
                f"paths.output_dir={tmp_path}",
            ],
            timeout=120,
        )
    )
    assert line == (
        f"segx: error: hydra.launcher.n_jobs={n} runs more jobs than the {cpu_cores()} CPU cores here "
        f"(each trains a network); use hydra.launcher.n_jobs={cpu_cores()} or fewer"
    )
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlflow.db").exists()


def test_oversubscribing_threads_is_refused(tmp_path):
    line = one_line_error(
        run_cli(
            [
                "segx.train",
                "-m",
                "hydra/launcher=joblib",
                f"hydra.launcher.n_jobs={cpu_cores()}",
                f"trainer.threads={cpu_cores()}",
                "backbone=resnet18,mobilenetv2",
                f"paths.output_dir={tmp_path}",
            ],
            timeout=120,
        )
    )
    assert "oversubscribes" in line and "trainer.threads=auto" in line


def test_slurm_launcher_without_sbatch_is_refused(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()  # a PATH with no SLURM commands on it
    line = one_line_error(
        run_cli(
            [
                "segx.train",
                "-m",
                "hydra/launcher=slurm",
                "backbone=resnet18,mobilenetv2",
                f"paths.output_dir={tmp_path}",
            ],
            timeout=120,
            env={"PATH": str(bare)},
        )
    )
    assert line.startswith(
        "segx: error: hydra/launcher=slurm needs SLURM's sbatch, which is not on this machine's PATH"
    )
    assert not (tmp_path / "multirun").exists()


needs_slurm = pytest.mark.skipif(
    shutil.which("sinfo") is None or subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0,
    reason="no SLURM answering here (start one with: bash scripts/slurm-local.sh)",
)


@needs_slurm
def test_unknown_partition_is_refused_with_the_partitions_there(tmp_path):
    line = one_line_error(
        run_cli(
            [
                "segx.train",
                "-m",
                "hydra/launcher=slurm",
                "hydra.launcher.partition=nosuch",
                "backbone=resnet18,mobilenetv2",
                f"paths.output_dir={tmp_path}",
            ],
            timeout=120,
        )
    )
    assert line.startswith("segx: error: hydra.launcher.partition=nosuch: no such SLURM partition;")


@needs_slurm
def test_gpus_on_a_partition_without_gpus_are_refused(tmp_path):
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    if "gpu" in gres:
        pytest.skip("this SLURM has GPUs")
    line = one_line_error(
        run_cli(
            [
                "segx.train",
                "-m",
                "hydra/launcher=slurm",
                "hydra.launcher.gpus_per_node=1",
                "backbone=resnet18,mobilenetv2",
                f"paths.output_dir={tmp_path}",
            ],
            timeout=120,
        )
    )
    assert "hydra.launcher.gpus_per_node=1, but the default partition has no GPUs" in line
    assert "hydra.launcher.gpus_per_node=0" in line


def test_gpu_accelerator_where_tensorflow_sees_none_is_refused(tmp_path, synthetic_root, capfd):
    from segx.backend import tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    line = one_line_error(
        run_in_process(
            capfd, ["segx.train", "trainer.accelerator=gpu", *tiny_train_overrides(tmp_path, synthetic_root)]
        )
    )
    assert line.startswith("segx: error: trainer.accelerator=gpu, but TensorFlow sees no GPU here")
    assert not (tmp_path / "mlflow.db").exists()  # before any run (or store) exists


def test_threads_follow_the_launcher():
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 3}
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "cpus_per_task": 5}
    assert job_threads("auto", joblib, {}, 12) == 4
    assert job_threads("auto", {**joblib, "n_jobs": -1}, {}, 12) == 1
    assert job_threads("auto", {**joblib, "n_jobs": 24}, {}, 12) == 1
    assert job_threads("auto", local, {}, 12) == 5
    assert job_threads("auto", None, {"SLURM_CPUS_PER_TASK": "7"}, 64) == 7  # SLURM's grant wins
    assert job_threads("auto", None, {}, 12) is None  # one job: every core
    assert job_threads(3, joblib, {"SLURM_CPUS_PER_TASK": "7"}, 12) == 3  # an explicit number wins
    from segx.errors import SegxError

    with pytest.raises(SegxError, match=r"trainer.threads=0 must be auto or a whole number >= 1"):
        job_threads(0, None, {}, 12)


# -- the summary and its rerun command --------------------------------------------------------


def test_rerun_command_is_one_grid_when_the_failed_jobs_form_one():
    base = "python -m segx.train -m hydra/launcher=slurm"
    failed = [["backbone=a", "fold=0"], ["backbone=a", "fold=1"], ["backbone=b", "fold=0"], ["backbone=b", "fold=1"]]
    assert rerun_commands(base, failed) == [f"{base} backbone=a,b fold=0,1 resume=auto"]
    # Not a grid (a,0 and b,1 only): a grid would rerun two jobs that finished; one command each.
    assert rerun_commands(base, [failed[0], failed[3]]) == [
        f"{base} backbone=a fold=0 resume=auto",
        f"{base} backbone=b fold=1 resume=auto",
    ]
    assert rerun_commands(base, []) == []


def test_summary_names_jobs_that_were_killed_lost_or_never_ran(tmp_path):
    jobs = [["backbone=a", "fold=0"], ["backbone=a", "fold=1"], ["backbone=b", "fold=0"], ["backbone=b", "fold=1"]]
    rows = [
        {"job": 0, "overrides": jobs[0], "member": "a", "status": "STARTED"},
        {"job": 0, "overrides": jobs[0], "member": "a", "status": "FINISHED", "val_dice": 0.81, "run_id": "r0"},
        {"job": 1, "overrides": jobs[1], "member": "a", "status": "STARTED"},  # SIGKILL: never reported again
        {"job": 2, "overrides": jobs[2], "member": "b", "status": "STARTED"},
        {"job": 2, "overrides": jobs[2], "member": "b", "status": "KILLED", "error": "interrupted", "run_id": "r2"},
    ]
    outcomes = job_outcomes(rows, jobs)
    assert [o["status"] for o in outcomes] == ["FINISHED", "LOST", "KILLED", "NOT RUN"]
    text = "\n".join(summary_lines(rows, jobs, "python -m segx.train -m", tmp_path))
    assert "1 finished, 3 failed" in text
    assert "backbone=a fold=1" in text and "run r2" in text
    assert "python -m segx.train -m backbone=a fold=1 resume=auto" in text
    assert "python -m segx.train -m backbone=b fold=0 resume=auto" in text
    assert "backbone=a fold=0 resume=auto" not in text


# -- stopped by sys.exit (submitit's preemption handler) --------------------------------------


def test_a_run_stopped_by_sys_exit_ends_killed_not_failed(tmp_path):
    """submitit requeues a preempted job, then calls sys.exit(-1) inside the training code."""
    from segx import tracking

    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracking.experiment_id(client, "segx", str(tmp_path / "art"))
    run_id = tracking.start_run(client, exp, "preempted", {tracking.ROLE: "member"})
    with pytest.raises(SystemExit), tracking.run_scope(client, run_id):
        sys.exit(-1)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "segx.failure" not in run.data.tags


# -- beyond one device ------------------------------------------------------------------------


def best_val_dice(out: Path) -> tuple[float, float, str]:
    client, runs = member_runs(out)
    (run,) = runs
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "curves/train_loss")[0].value
    return run.data.metrics["curves/best_val_dice"], loss, run.data.tags["segx.devices"]


# Slow: two trainings in subprocesses, one on two CPU devices; the strategy's config checks stay fast (below).
@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices_trains_like_one_device(tmp_path, synthetic_root):
    """Same data, seed and global batch: split over two logical CPU devices, the first epoch's
    loss and the validation Dice come out close to the single-device run's (BatchNorm sees
    half-batches per device, so not equal)."""
    results = {}
    for name, extra in (
        ("one", []),
        ("mirrored", ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=mirrored"]),
    ):
        out = tmp_path / name
        overrides = [*tiny_train_overrides(out, synthetic_root, epochs=2), "mlflow.system_metrics=false", *extra]
        result = run_cli(["segx.train", *overrides])
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = best_val_dice(out)
    (dice1, loss1, dev1), (dice2, loss2, dev2) = results["one"], results["mirrored"]
    assert (dev1, dev2) == ("1", "2")
    assert abs(loss2 - loss1) / loss1 < 0.1, (loss1, loss2)
    assert abs(dice2 - dice1) < 0.15, (dice1, dice2)


# A process of its own: the check comes after TensorFlow's two logical devices are set, which
# TensorFlow takes once per process.
def test_batch_that_does_not_split_over_the_devices_is_refused(tmp_path, synthetic_root):
    overrides = [
        *tiny_train_overrides(tmp_path, synthetic_root),
        "trainer.batch_size=3",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=mirrored",
    ]
    line = one_line_error(run_cli(["segx.train", *overrides], timeout=300))
    assert line == (
        "segx: error: trainer.batch_size=3 does not split over 2 devices (trainer.strategy=mirrored "
        "splits the batch); use trainer.batch_size=2 or 4"
    )


def test_devices_without_a_strategy_are_refused(tmp_path, synthetic_root, capfd):
    overrides = [*tiny_train_overrides(tmp_path, synthetic_root), "trainer.accelerator=cpu", "trainer.devices=2"]
    line = one_line_error(run_in_process(capfd, ["segx.train", *overrides]))
    assert "trainer.devices=2 trains on one device unless trainer.strategy=mirrored" in line


def test_mixed_precision_builds_trains_and_predicts_float32(tmp_path, synthetic_root):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    from segx.workflows.member import train_member

    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(tmp_path, synthetic_root),
            "trainer.precision=mixed_float16",
            "mlflow.system_metrics=false",
        ],
    )
    try:
        score = train_member(cfg).best_val_dice
    finally:
        from segx.models import set_precision

        set_precision(None)
    assert 0.0 <= score <= 1.0
    from segx import tracking
    from segx.backend import keras
    from segx.models import load_member

    assert keras.mixed_precision.global_policy().name == "float32"  # reset for the next member
    client, runs = member_runs(tmp_path)
    (run,) = runs
    folder = tracking.download_member_model(client, run.info.run_id, tmp_path / "model")
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["precision"] == "mixed_float16"
    # The member is rebuilt in float32 from its weights, and its cached probabilities were
    # computed by that same float32 network: the search scores what prediction computes.
    from segx.ensembling.probs import load_cached
    from segx.inference.predictor import member_probs
    from segx.inference.view import View

    model = load_member(folder)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    cached = load_cached(tracking.download(client, run.info.run_id, "predictions/test.npz", tmp_path), tmp_path)
    probs = member_probs(model, spec["backbone"], View.from_dict(spec["view"]), list(cached.previews), ("none",))[
        "none"
    ]
    assert len(cached.previews) and np.array_equal(probs.flat, cached.probs[: len(cached.previews)].flat)


def test_folds_on_machines_sharing_only_the_server_agree_on_one_cv_parent(tmp_path):
    """No common lock folder: with a second parent already there (another machine raced), every
    fold takes the oldest, so all folds nest under one parent."""
    from segx import tracking
    from segx.tracking import cv

    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracking.experiment_id(client, "segx", str(tmp_path / "art"))
    layout = cv.CrossValidation("h", "f", 2)
    first = cv.parent_run(client, exp, layout, "p", {}, tmp_path / "locks-machine-a")
    racer = tracking.start_run(
        client, exp, "p", {tracking.ROLE: cv.ROLE_CV, "segx.cv_config_hash": "h", "segx.cv_fingerprint": "f"}
    )
    client.set_terminated(racer, "FINISHED")
    assert cv.parent_run(client, exp, layout, "p", {}, tmp_path / "locks-machine-b") == first
    assert cv.parent_run(client, exp, layout, "p", {}, tmp_path / "locks-machine-a") == first
