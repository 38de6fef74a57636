"""What this process's Hydra job is: one run or a job of a multirun, on which launcher, and
whether SLURM requeued it. Read by the member workflow and the sweep alike."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launcher_config() -> dict | None:
    """This job's ``hydra.launcher`` settings (None outside a multirun)."""
    if not is_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return OmegaConf.to_container(HydraConfig.get().launcher, resolve=False)


def requeued() -> bool:
    """Is this job a SLURM requeue of an earlier one (preempted, or past its time limit)?"""
    return os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


def sweep_size(overrides: list[str]) -> int:
    """How many jobs the basic sweeper makes of these command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    size = 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override() and not override.is_hydra_override():
            size *= max(1, len(list(override.sweep_string_iterator())))
    return size
