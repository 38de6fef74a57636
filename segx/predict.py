"""Predict masks for a folder of images with an ensemble rebuilt from its MLflow record.

    python -m segx.predict ensemble_run_id=<id> input_dir=scans/ output_dir=masks/ [tta=flip] [backend=onnx]

Writes ``masks/<stem>.png`` (0/255, at each input's own size), optionally overlays, uncertainty
and probability maps, ``ensemble.json`` and ``segx-manifest.json``; never into or over the
input folder, and atomically (see :mod:`segx.inference.folder` for how files are kept safe).

The work is :func:`segx.workflows.predict.run_predict`; this module is the command.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from segx import cli
from segx.config import CONF_PATH
from segx.workflows.predict import run_predict


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="predict")
@cli.task
def _hydra_main(cfg: DictConfig) -> None:
    run_predict(cfg)


def main() -> None:
    cli.run(_hydra_main, "predict")


if __name__ == "__main__":
    sys.exit(main())
