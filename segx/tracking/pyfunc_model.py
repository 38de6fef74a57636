"""The ensemble, and each member, as an MLflow pyfunc model ("models from code": nothing is pickled).

    model = mlflow.pyfunc.load_model("runs:/<ensemble_run_id>/pyfunc")
    model = mlflow.pyfunc.load_model("models:/<member's logged model ID>")   # one member
    masks = model.predict(images)   # uint8 (N, H, W, 3) or a list of images -> uint8 masks {0, 1}
                                    # (several classes: label maps in data.labels' own mask values,
                                    # uint16 where a value needs it, or data.palette's colours (H, W, 3):
                                    # what segx.predict writes, and the export's ``mask`` values)

Both predict at each image's own size, as ``segx.predict`` does. The ensemble's model carries its
members' weights; a member's model is a one-member record whose weights stay in the member run's
``model`` artifact (not copied a second time into the store) and are fetched from the tracking
store the loader points at. MLflow runs this file to get the model; TensorFlow is imported only
when it is loaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from segx.ensembling.record import EnsembleRecord

# MLflow warns at class creation, through its own 'once' filter, that predict() has no type
# hints. Untyped is deliberate (typed inputs get converted; segx checks images itself), so the
# warning display is muted for that moment only.
_show_warning = warnings.showwarning
warnings.showwarning = lambda *args, **kwargs: None
try:

    class SegxEnsembleModel(PythonModel):
        def load_context(self, context):
            from segx.ensembling.record import EnsembleRecord
            from segx.inference.predictor import EnsemblePredictor

            _limit_served_requests()
            with open(context.artifacts["record"]) as fh:
                record = EnsembleRecord.from_json(json.load(fh))
            if "member0" not in context.artifacts and "member0_fold0" not in context.artifacts:
                context_paths = self._fetch_members(record)  # a member's model: weights from its run
            else:
                context_paths = context.artifacts
            paths = [
                [context_paths[f"member{i}_fold{k}"] for k in range(len(m.folds))]
                if m.folds
                else context_paths[f"member{i}"]
                for i, m in enumerate(record.members)
            ]
            self.predictor = EnsemblePredictor(record, paths)

        def _fetch_members(self, record) -> dict:
            """spec.json and weights.h5 of each member from its run, into a folder removed with the model."""
            import shutil
            import tempfile
            import weakref
            from pathlib import Path

            folder = Path(tempfile.mkdtemp(prefix="segx-member-model-"))
            weakref.finalize(self, shutil.rmtree, folder, True)
            paths = {}
            for i, m in enumerate(record.members):
                dst = folder / f"m{i}"
                for name in ("spec.json", "weights.h5"):
                    mlflow.artifacts.download_artifacts(
                        run_id=m.run_id, artifact_path=f"{m.model_artifact}/{name}", dst_path=str(dst)
                    )
                paths[f"member{i}"] = str(dst)  # each file lands as dst/<name>
            return paths

        def predict(self, context, model_input, params=None):
            """Masks as uint8 {0, 1} (several classes: label maps in the data's own encoding, as
            segx.predict writes them): an array (N, H, W) for an array input (N, H, W[, C]),
            a list for a list of images of any sizes, a dict for a dict of named images (what
            the server makes of JSON ``{"inputs": {"a": image, "b": image}}``). Pixel values are
            integers 0..255 with 1, 3 or 4 channels; anything else is refused with the reason
            (HTTP 400 from ``mlflow models serve``), before any network runs."""
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

            from segx.errors import SegxError
            from segx.inference.export_plan import check_request_images, names_of

            try:
                images = check_request_images(model_input)
            except SegxError as exc:
                raise MlflowException(f"segx: bad request: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
            except Exception as exc:  # noqa: BLE001 - a request no check foresaw: its reason, no trace
                raise MlflowException(
                    f"segx: bad request: {type(exc).__name__} reading the images; send uint8 images "
                    "(N, H, W, 3), a list or a dict of images",
                    error_code=INVALID_PARAMETER_VALUE,
                ) from None
            try:
                # Several classes: the user's mask values, not class indices.
                masks = [self.predictor.task.encode(p.mask) for p in self.predictor.predict(images)]
            except Exception as exc:  # noqa: BLE001 - the trace (install and artifact paths) stays in the server's log
                import logging

                logging.getLogger("segx").exception("segx: prediction failed")
                raise MlflowException(
                    f"segx: prediction failed ({type(exc).__name__}); see the server's log", error_code=INTERNAL_ERROR
                ) from None
            image_names = names_of(model_input)  # a dict of named images: the answer names them alike
            if image_names is not None:
                return dict(zip(image_names, masks, strict=True))
            return np.stack(masks) if isinstance(model_input, np.ndarray) and model_input.dtype != object else masks

finally:
    warnings.showwarning = _show_warning

MAX_REQUEST_MB = 32.0  # SEGX_SERVE_MAX_REQUEST_MB; JSON spends up to 4 bytes per pixel value (RGB: 12 per pixel)


def _limit_served_requests() -> None:
    """Behind ``mlflow models serve``: refuse a request whose body is over the limit (HTTP 413,
    one line) before it is read and decoded; a 50 MB JSON body kept a worker busy long after
    MLflow's own 504. MLflow's server loads the model and then builds its FastAPI app
    (mlflow/pyfunc/scoring_server/app.py): the next FastAPI app made in this process, that one,
    gets the check. Elsewhere (load_model in a script) this does nothing."""
    import os
    import sys

    if "mlflow.pyfunc.scoring_server.app" not in sys.modules:
        return
    import fastapi
    from fastapi.responses import JSONResponse

    limit = float(os.environ.get("SEGX_SERVE_MAX_REQUEST_MB", MAX_REQUEST_MB))
    plain = fastapi.FastAPI

    async def request_size(request, call_next):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit * 1e6:
            message = (
                f"segx: bad request: {int(size) / 1e6:.1f} MB is over the {limit:g} MB a request may hold; "
                "send fewer or smaller images per request (SEGX_SERVE_MAX_REQUEST_MB sets the limit)"
            )
            async for _ in request.stream():  # read and dropped, never decoded: the client gets its answer
                pass
            return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": message}, status_code=413)
        return await call_next(request)

    class ServingApp(plain):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fastapi.FastAPI = plain  # this app only
            self.middleware("http")(request_size)

    fastapi.FastAPI = ServingApp


mlflow.models.set_model(SegxEnsembleModel())
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole segx package travels with a model


def log_pyfunc(client, run_id: str, record: EnsembleRecord, register_name: str | None = None) -> str:
    """Log the ensemble under ``pyfunc/`` of ``run_id`` (and register it if a name is given)."""
    import tempfile

    from segx.tracking import runs as tracking  # the part it uses, not the facade (which imports this module)

    # The members are downloaded next to the record, copied into the store by log_model, and
    # the copies removed: an ensemble can be hundreds of MB, and /tmp is not ours to fill.
    with tempfile.TemporaryDirectory(prefix="segx-pyfunc-") as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "ensemble.json").write_text(json.dumps(record.to_json(), indent=2))
        artifacts = {"record": str(tmp / "ensemble.json")}
        for i, member in enumerate(record.members):
            artifact = member.model_artifact
            if member.folds:  # a cross-validated member travels as all its fold models
                for k, fold_run in enumerate(member.folds):
                    artifacts[f"member{i}_fold{k}"] = str(
                        tracking.download_member_model(client, fold_run, tmp / f"m{i}" / f"fold{k}", artifact)
                    )
            else:
                artifacts[f"member{i}"] = str(
                    tracking.download_member_model(client, member.run_id, tmp / f"m{i}", artifact)
                )
        with mlflow.start_run(run_id=run_id):
            try:
                info = mlflow.pyfunc.log_model(
                    name="pyfunc",
                    python_model=str(Path(__file__).resolve()),
                    artifacts=artifacts,
                    code_paths=[str(_PACKAGE_DIR)],
                    # No signature: MLflow's schema enforcement would refuse a list of images of different
                    # sizes, which predict() takes (its docstring says what goes in and out).
                    pip_requirements=_requirements(),
                    registered_model_name=register_name or None,
                )
            except KeyboardInterrupt as exc:
                # A signal inside one of log_model's SQLite writes leaves that connection holding the
                # lock; start_run's exit writes the run's status next, and waited for it (SQLite's 20 s
                # busy timeout) before segx could end the run KILLED. Closed first.
                tracking.release_interrupted_connections(exc)
                raise
    tracking.set_tags(client, run_id, {"segx.pyfunc_uri": info.model_uri})
    return info.model_uri


def _requirements() -> list[str]:
    from segx.tracking.provenance import package_versions

    versions = package_versions()
    return [
        f"{name}=={versions[name]}"
        for name in (
            "tensorflow",
            "tf-keras",
            "segmentation-models",
            "mlflow",
            "numpy",
            "opencv-python-headless",
            "albumentations",
            "omegaconf",
            "hydra-core",
            "pandas",
            "scipy",
        )
        if versions.get(name, "missing") != "missing"
    ]


def log_member_pyfunc(client, model_id: str, run_id: str, member: dict, signature, example_size: int) -> None:
    """Make the member's logged model ``model_id`` a pyfunc model that loads and predicts at each
    image's own size: a one-member record (weight 1, threshold 0.5, no post-processing, no TTA:
    the member's own test metrics); the weights stay in the run's ``model`` artifact.

    Saved here and uploaded as the logged model's files (not ``log_model``, which would load the
    network, TensorFlow and all, to check an input example): MLmodel with the signature and an
    input example of ``example_size`` px, the code, the record."""
    import tempfile

    import numpy as np
    from mlflow.models import Model

    from segx.ensembling.task import task_of_record

    labels = member.pop("labels", None)  # as the member's run recorded them (None: one structure)
    task = task_of_record(labels)  # one structure: version 3 at 0.5; classes: version 4, argmax
    record = {
        "format": "segx-ensemble",
        "version": task.record_version,
        "threshold": 0.5 if task.one_threshold else None,
        **({"labels": labels} if labels is not None else {}),
        "tta": "none",
        "weight_denominator": 1,
        "members": [{**member, "run_id": run_id, "weight": 1.0, "weight_count": 1}],
    }
    with tempfile.TemporaryDirectory(prefix="segx-pyfunc-") as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "member.json").write_text(json.dumps(record, indent=2))
        folder = tmp / "model"
        with warnings.catch_warnings():  # the example is added below, without loading the network
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            mlflow.pyfunc.save_model(
                str(folder),
                python_model=str(Path(__file__).resolve()),
                artifacts={"record": str(tmp / "member.json")},
                code_paths=[str(_PACKAGE_DIR)],
                pip_requirements=_requirements(),
                signature=signature,
            )
        info = Model.load(str(folder / "MLmodel"))
        info.model_id, info.run_id = model_id, run_id
        example = np.zeros((1, example_size, example_size, 3), np.uint8).tolist()
        (folder / "input_example.json").write_text(json.dumps(example))
        info.saved_input_example_info = {"artifact_path": "input_example.json", "type": "json_object"}
        info.save(str(folder / "MLmodel"))
        client.log_model_artifacts(model_id, str(folder))
