"""What a member may use where it runs: CPU threads per job, and the checks on a sweep's launcher
(joblib, submitit, SLURM) made before any job is submitted. No TensorFlow here: the submitting
process of a SLURM sweep may run on a login node without it.

Thread counts follow the launcher, so that jobs x threads match the cores a user has:

* under SLURM, the CPUs SLURM gave the job (``SLURM_CPUS_PER_TASK``);
* under ``hydra/launcher=joblib``, the cores divided by ``n_jobs``;
* under ``hydra/launcher=submitit_local``, ``cpus_per_task``;
* otherwise every core (TensorFlow's default).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from segx.errors import SegxError

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def cpu_cores() -> int:
    """The cores this process may run on (a container's or SLURM's cpuset, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def joblib_jobs(n_jobs: int, cores: int) -> int:
    """Jobs joblib runs at once for ``n_jobs`` (-1 = one per core, -2 = all but one, ...)."""
    return n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)


MAX_THREADS_PER_CORE = 4


def job_threads(setting: Any, launcher: Mapping[str, Any] | None, env: Mapping[str, str], cores: int) -> int | None:
    """TensorFlow's intra-op threads for one job, or None for TensorFlow's default (every core).

    ``setting``: ``trainer.threads`` ("auto" or a number); ``launcher``: the job's
    ``hydra.launcher`` config (None outside a multirun); ``env``: the job's environment."""
    if setting not in (None, "auto"):
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise SegxError(f"trainer.threads={setting!r} must be auto or a whole number >= 1; e.g. trainer.threads=4")
        # Each thread has its own stacks and buffers (trainer.threads=100000 took 18.7 GB): more
        # than a few per core only slows TensorFlow down.
        if setting > MAX_THREADS_PER_CORE * cores:
            raise SegxError(
                f"trainer.threads={setting} is over {MAX_THREADS_PER_CORE} per core ({cores} cores here); "
                f"use trainer.threads={cores} or auto"
            )
        return int(setting)
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(env["SLURM_CPUS_PER_TASK"])
    target = (launcher or {}).get("_target_")
    if target == JOBLIB:
        return max(1, cores // joblib_jobs(int(launcher.get("n_jobs") or -1), cores))
    if target == SUBMITIT_LOCAL and launcher.get("cpus_per_task"):
        return int(launcher["cpus_per_task"])
    return None


def check_launcher(
    launcher: Mapping[str, Any], choice: str, n_jobs_in_sweep: int, cores: int, trainer: Mapping[str, Any]
) -> None:
    """One line naming the key and the fix for a launcher that cannot run this sweep here,
    before anything is submitted. ``choice``: the ``hydra/launcher`` option given."""
    target = launcher.get("_target_")
    threads = trainer.get("threads")
    if target == JOBLIB:
        jobs = joblib_jobs(int(launcher.get("n_jobs") or -1), cores)
        if jobs > cores:
            raise SegxError(
                f"hydra.launcher.n_jobs={launcher.get('n_jobs')} runs more jobs than the {cores} CPU cores "
                f"here (each trains a network); use hydra.launcher.n_jobs={cores} or fewer"
            )
        if threads not in (None, "auto") and int(threads) * min(jobs, n_jobs_in_sweep) > cores:
            raise SegxError(
                f"trainer.threads={threads} x hydra.launcher.n_jobs={jobs} oversubscribes the {cores} "
                f"CPU cores; use trainer.threads=auto (= {max(1, cores // jobs)} each)"
            )
    elif target == SUBMITIT_LOCAL:
        per_job = int(launcher.get("cpus_per_task") or 1)
        if per_job * n_jobs_in_sweep > cores:  # the local executor starts every job at once
            raise SegxError(
                f"hydra/launcher=submitit_local starts all {n_jobs_in_sweep} jobs at once with "
                f"hydra.launcher.cpus_per_task={per_job}: more than the {cores} CPU cores here; "
                f"sweep fewer members per command, or use hydra/launcher=joblib (queues them)"
            )
        if int(launcher.get("gpus_per_node") or 0) > 0:
            check_gpus_visible(f"hydra.launcher.gpus_per_node={launcher.get('gpus_per_node')}")
    elif target == SUBMITIT_SLURM:
        check_slurm(launcher.get("partition"), choice, int(launcher.get("gpus_per_node") or 0))
    if trainer.get("accelerator") == "gpu" and target != SUBMITIT_SLURM:
        check_gpus_visible("trainer.accelerator=gpu")  # on SLURM the job's node is checked, in the job


def check_slurm(partition: str | None, choice: str, gpus_per_node: int = 0) -> None:
    if shutil.which("sbatch") is None:
        raise SegxError(
            f"hydra/launcher={choice} needs SLURM's sbatch, which is not on this machine's PATH; "
            "run the sweep on the cluster's login node, or use hydra/launcher=joblib here "
            "(scripts/slurm-local.sh starts a one-node SLURM for trying it)"
        )
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SegxError(f"hydra/launcher={choice}: sinfo did not answer ({exc}); is slurmctld running?") from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no message"])[0]
        raise SegxError(
            f"hydra/launcher={choice}: SLURM does not answer (sinfo: {reason}); check slurmctld "
            "(scripts/slurm-local.sh status on a one-node set-up)"
        )
    names = [p.strip().rstrip("*") for p in out.stdout.split()]
    if partition is not None and str(partition) not in names:
        from segx.errors import suggest

        hint = suggest(str(partition), names) or f" the partitions are: {', '.join(names) or 'none'}"
        raise SegxError(f"hydra.launcher.partition={partition}: no such SLURM partition;{hint}")
    if gpus_per_node > 0:
        where = ["-p", str(partition)] if partition is not None else []
        gres = subprocess.run(["sinfo", "-h", "-o", "%G", *where], capture_output=True, text=True, timeout=20).stdout
        if "gpu" not in gres:
            name = f"partition {partition}" if partition is not None else "the default partition"
            raise SegxError(
                f"hydra.launcher.gpus_per_node={gpus_per_node}, but {name} has no GPUs (sinfo "
                f"gres: {gres.split()[0] if gres.split() else 'none'}); choose a GPU partition with "
                "hydra.launcher.partition=..., or train on CPUs with hydra.launcher.gpus_per_node=0"
            )


def check_gpus_visible(key: str) -> None:
    """Refuse a GPU request where TensorFlow sees no GPU (imports TensorFlow: GPU requests only)."""
    from segx.backend import tf

    if not tf.config.list_physical_devices("GPU"):
        raise SegxError(
            f"{key} asks for GPUs, but TensorFlow sees none on this machine (no GPU, no driver, or "
            "a CPU-only TensorFlow build); set trainer.accelerator=auto or cpu, and "
            "hydra.launcher.gpus_per_node=0"
        )


def batch_per_device(batch_size: int, replicas: int, key: str = "trainer.batch_size") -> int:
    """The per-device batch of a data-parallel member: the global batch split evenly."""
    if batch_size % replicas:
        lower = max(replicas, batch_size - batch_size % replicas)
        raise SegxError(
            f"{key}={batch_size} does not split over {replicas} devices (trainer.strategy=mirrored "
            f"splits the batch); use {key}={lower} or {lower + replicas}"
        )
    return batch_size // replicas
