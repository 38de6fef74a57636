"""Build, evaluate and record an ensemble of trained members.

    python -m segx.ensemble                            # members by backbone (conf/ensemble.yaml)
    python -m segx.ensemble ensemble.search=grid ensemble.run_ids='[id1,id2,id3]'

Reads only the members' cached probabilities (never reruns a network), searches weights and
threshold on validation Dice, chooses post-processing on validation, reports on the test split
no search saw, and logs one MLflow run whose ``ensemble.json`` rebuilds the exact ensemble.
This module and everything it imports for the search are free of TensorFlow.

The work is :func:`segx.workflows.ensemble.build_ensemble`; this module is the command.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from segx import cli
from segx.config import CONF_PATH
from segx.workflows.ensemble import build_ensemble


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="ensemble")
@cli.task
def _hydra_main(cfg: DictConfig) -> float:
    """The ensemble's validation Dice, for sweepers."""
    return float(build_ensemble(cfg).val_dice)


def main() -> None:
    cli.run(_hydra_main, "ensemble")


if __name__ == "__main__":
    main()
