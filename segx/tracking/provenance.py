"""What produced a run: segx version, git commit (and whether the tree was dirty), package
versions and the command line. No heavy imports."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import segx

REPO = Path(__file__).resolve().parents[2]  # segx/tracking/provenance.py -> the repository
PACKAGES = (
    "tensorflow",
    "tf-keras",
    "segmentation-models",
    "hydra-core",
    "omegaconf",
    "mlflow",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "pandas",
    "scipy",
)


def git_sha() -> tuple[str, bool]:
    """(commit SHA or 'unknown', tree dirty?)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "segx": segx.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]])


def job_overrides(job: str | None = None) -> list[str] | None:
    """This job's own overrides as Hydra recorded them (one job of a sweep: its values, not the
    whole sweep line); None outside a Hydra app (a library call), or when the running Hydra job
    is not ``job`` (``segx.ensemble`` training a member: its overrides are not the member's)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        runtime = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not inside a Hydra job
        return None
    if job is not None and runtime.job.name != job:
        return None
    return [str(o) for o in runtime.overrides.task]


def reproduce_command(module: str, overrides: Sequence[str]) -> str:
    return shlex.join(["python", "-m", module, *overrides])


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def member_reproduce(overrides: Sequence[str]) -> str:
    """The ``segx.train`` command that composes this member's config again (``--cfg job`` shows
    it): its overrides without ``resume=``, which continues a run rather than rebuilding one."""
    return reproduce_command("segx.train", [o for o in overrides if _key(o) != "resume"])


# What picks an ensemble's members; a reproduce command names the runs themselves instead.
MEMBER_SELECTION = (
    "ensemble.members",
    "ensemble.run_ids",
    "ensemble.select",
    "ensemble.train_missing",
    "ensemble.train_overrides",
    "ensemble.data_fingerprint",
)


def ensemble_reproduce(overrides: Sequence[str], member_run_ids: Sequence[str]) -> str:
    """The ``segx.ensemble`` command that searches the same members again: its own overrides,
    with the member selection replaced by the member runs' IDs."""
    kept = [o for o in overrides if _key(o) not in MEMBER_SELECTION]
    return reproduce_command("segx.ensemble", [*kept, f"ensemble.run_ids=[{','.join(member_run_ids)}]"])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def provenance_tags() -> dict[str, str]:
    sha, dirty = git_sha()
    tags = {"segx.git_sha": sha, "segx.git_dirty": str(dirty).lower(), "segx.version": segx.__version__}
    tags.update({f"segx.pkg.{k}": v for k, v in package_versions().items()})
    tags["segx.host"] = socket.gethostname()
    if os.environ.get("SLURM_JOB_ID"):  # which cluster job trained it: sacct/scontrol look-ups
        tags["segx.slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            tags["segx.slurm_array_task"] = (
                f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
            )
    return tags
