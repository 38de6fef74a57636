"""The prediction workflow: inputs checked before any model is fetched, the ensemble rebuilt
from its run (or its export), a folder of masks written safely (:mod:`segx.inference.folder`).
Usage: :mod:`segx.predict` (``python -m segx.predict``)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segx.config import TTA_MODES, require_int
from segx.data.io import shown
from segx.errors import SegxError
from segx.inference.folder import (
    Batching,
    PredictOutputs,
    check_inputs,
    check_output_dir,
    planned_files,
    predict_folder,
)

BACKENDS = ("keras", "savedmodel", "onnx")


def _require_bool(cfg: DictConfig, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise SegxError(f"{key}={value!r} must be true or false")
    return value


def run_predict(cfg: DictConfig) -> int:
    for key in ("ensemble_run_id", "input_dir", "output_dir"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise SegxError(f"{key} is not set; pass {key}=...")
    batch_size = require_int(cfg, "batch_size", 1)
    max_pixels = require_int(cfg, "max_pixels", 1)
    batch_pixels = require_int(cfg, "batch_pixels", 1)
    outputs = PredictOutputs(
        **{key: _require_bool(cfg, key) for key in ("overlays", "uncertainty", "save_probabilities", "overwrite")}
    )
    if cfg.tta is not None and cfg.tta not in TTA_MODES:
        raise SegxError(f"tta={cfg.tta} is not valid; use one of {', '.join(TTA_MODES)} (or null: as recorded)")
    backend = cfg.get("backend", "keras")
    if backend not in BACKENDS:
        raise SegxError(
            f"backend={backend} is not valid; use one of {', '.join(BACKENDS)} (keras: the members "
            "in TensorFlow; savedmodel, onnx: the ensemble's export, made by python -m segx.export)"
        )
    threshold = cfg.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise SegxError(f"threshold={threshold!r} must be a number in [0, 1], or null for the recorded one")
        if backend != "keras":
            raise SegxError(f"threshold={threshold} overrides the ensemble's threshold with backend=keras only")
    input_dir, output_dir = Path(str(cfg.input_dir)), Path(str(cfg.output_dir))
    from segx.inference.volume_folder import is_volume_folder

    if is_volume_folder(input_dir):
        return _predict_volumes(cfg, input_dir, output_dir, outputs, batch_size, backend)
    # Everything that can be checked without the models, before any is downloaded or loaded.
    files = check_inputs(input_dir, output_dir, max_pixels)
    check_output_dir(input_dir, output_dir, outputs.overwrite, planned_files(files, outputs))
    from segx import tracking
    from segx.workflows.predict import load_ensemble

    client = tracking.connect(str(cfg.mlflow.tracking_uri), create=False)  # reads only: never creates a store
    workdir = Path(cfg.paths.output_dir) / "cache" / "ensembles" / str(cfg.ensemble_run_id)
    if backend == "keras":
        record, predictor = load_ensemble(client, str(cfg.ensemble_run_id), workdir, cfg.tta, threshold)
    else:  # the exported model, with the same resize or sliding-window loop and arithmetic around it
        from segx.workflows.export import export_predictor

        record, predictor = export_predictor(client, str(cfg.ensemble_run_id), backend, workdir, cfg.tta)
    n = predict_folder(
        predictor,
        input_dir,
        output_dir,
        outputs,
        Batching(batch_size, batch_pixels, max_pixels),
        files,
        record={
            **record.to_json(),
            "predict_tta": predictor.tta,
            "run_id": str(cfg.ensemble_run_id),
            "backend": backend,
        },
    )
    what = "label maps" if getattr(predictor, "labels", None) is not None else "masks"
    print(f"segx: wrote {n} {what} to {shown(output_dir / 'masks')}", flush=True)
    return n


def _predict_volumes(cfg: DictConfig, input_dir: Path, output_dir: Path, outputs: PredictOutputs, batch_size: int,
                     backend: str) -> int:  # fmt: skip
    """A folder of CT/MR volumes (or DICOM series): one label volume per case on the scan's grid."""
    from segx import tracking
    from segx.inference.folder import check_output_location
    from segx.inference.volume_folder import predict_volume_folder, volumes_json

    if backend != "keras":
        raise SegxError(f"backend={backend}: volumes are predicted with backend=keras (the members) for now")
    check_output_location(input_dir, output_dir)
    client = tracking.connect(str(cfg.mlflow.tracking_uri), create=False)
    workdir = Path(cfg.paths.output_dir) / "cache" / "ensembles" / str(cfg.ensemble_run_id)
    record, predictor = load_ensemble(client, str(cfg.ensemble_run_id), workdir, cfg.tta, cfg.get("threshold"))
    from segx.tracking.ensembles import fetch_ensemble

    _, model_paths = fetch_ensemble(client, str(cfg.ensemble_run_id), workdir)
    max_voxels = int(cfg.get("max_voxels") or 512 * 512 * 1024)
    n = predict_volume_folder(
        predictor, volumes_json(model_paths), input_dir, output_dir, outputs, batch_size, max_voxels,
        record={**record.to_json(), "predict_tta": predictor.tta, "run_id": str(cfg.ensemble_run_id), "backend": backend},
    )  # fmt: skip
    print(f"segx: wrote {n} label volumes to {shown(output_dir / 'masks')}", flush=True)
    return n


def load_ensemble(client, run_id: str, workdir: Path, tta: str | None = None, threshold: float | None = None):
    """(record, EnsemblePredictor) for an ensemble run, with its weighted members downloaded
    (members of weight 0 cannot change a mask and are neither fetched nor loaded)."""
    from segx.inference.predictor import EnsemblePredictor
    from segx.inference.tta import check_record_tta
    from segx.tracking.ensembles import fetch_ensemble

    record, model_paths = fetch_ensemble(client, run_id, workdir)
    # Refused where flip TTA would be wrong, a warning where it is only untuned (as segx.ensemble
    # and segx.export decide), before any network is loaded.
    warning = check_record_tta(record, tta, model_paths)
    if warning:
        print(f"segx: warning: ensemble {run_id}: {warning}", file=sys.stderr, flush=True)
    return record, EnsemblePredictor(record, model_paths, tta, threshold=threshold)
