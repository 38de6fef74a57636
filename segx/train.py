"""Train one ensemble member and record it in MLflow.

    python -m segx.train backbone=resnet34
    python -m segx.train -m backbone=resnet34,efficientnetb0,mobilenetv2
    python -m segx.train resume=<run_id>      # continue an interrupted run

The job itself is :func:`segx.workflows.member.train_member`; this module is the command.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from segx import cli
from segx.config import CONF_PATH
from segx.workflows.hydra_job import is_multirun
from segx.workflows.member import train_member
from segx.workflows.sweep import sweep_job, unfinished_jobs


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
@cli.task
def _hydra_main(cfg: DictConfig) -> float:
    """The best validation Dice, for sweepers."""
    try:
        return sweep_job(cfg) if is_multirun() else train_member(cfg).best_val_dice
    finally:
        if "segx.backend" in sys.modules:
            from segx.models import clear_session

            clear_session()  # sweeps run jobs in one process: free the graph between members


def main() -> None:
    cli.run(_hydra_main, "train")
    unfinished = unfinished_jobs()
    if unfinished:  # after the summary and its rerun command: `segx.train -m ... && segx.ensemble` stops
        print(f"segx: {unfinished} sweep job(s) did not finish (summary above); exit status 1", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
