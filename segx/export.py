"""Export a recorded ensemble as one deployable model: a TensorFlow SavedModel or an ONNX model.

    python -m segx.export ensemble_run_id=<id> format=onnx|savedmodel [opset=17] [output_dir=DIR]

Writes ``<output_dir>/`` (default ``outputs/exports/<id>/<format>``): the model
(``saved_model/`` or ``model.onnx``), ``export.json`` (graphs, signatures, the check against
TensorFlow, sizes, versions) and ``ensemble.json``; whole or not at all. Logs it as a child run
of the ensemble run (``segx.role=export``), whose ID the ensemble run's tag
``segx.export.<format>`` names, so ``segx.predict backend=<format>`` and ``segx.info`` find it.
What the graph holds: :mod:`segx.inference.export_plan`; how it is run: :mod:`segx.inference.export_runtime`.

The work is :func:`segx.workflows.export.run_export`; this module is the command.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from segx import cli
from segx.config import CONF_PATH
from segx.workflows.export import run_export


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
@cli.task
def _hydra_main(cfg: DictConfig) -> None:
    run_export(cfg)


def main() -> None:
    cli.run(_hydra_main, "export")


if __name__ == "__main__":
    sys.exit(main())
