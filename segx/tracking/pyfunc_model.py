"""The ensemble as an MLflow pyfunc model ("models from code": nothing is pickled).

    model = mlflow.pyfunc.load_model("runs:/<ensemble_run_id>/pyfunc")
    masks = model.predict(images)   # uint8 (N, H, W, 3) or a list of images -> uint8 masks {0, 1}

MLflow runs this file to get the model; TensorFlow is imported only when it is loaded.
"""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# MLflow warns at class creation, through its own 'once' filter, that predict() has no type
# hints. Untyped is deliberate (typed inputs get converted; segx checks images itself), so the
# warning display is muted for that moment only.
_show_warning = warnings.showwarning
warnings.showwarning = lambda *args, **kwargs: None
try:

    class SegxEnsembleModel(PythonModel):
        def load_context(self, context):
            from segx.inference.predictor import EnsemblePredictor

            with open(context.artifacts["record"]) as fh:
                record = json.load(fh)
            paths = [
                [context.artifacts[f"member{i}_fold{k}"] for k in range(len(m["folds"]))] if m.get("folds")
                else context.artifacts[f"member{i}"]
                for i, m in enumerate(record["members"])
            ]  # fmt: skip
            self.predictor = EnsemblePredictor(record, paths)

        def predict(self, context, model_input, params=None):
            """Masks as uint8 {0, 1}: an array (N, H, W) for an array input (N, H, W[, C]),
            a list for a list of images of any sizes, a dict for a dict of named images (what
            the server makes of JSON ``{"inputs": {"a": image, "b": image}}``). Pixel values are
            integers 0..255 with 1, 3 or 4 channels; anything else is refused with the reason
            (HTTP 400 from ``mlflow models serve``), before any network runs."""
            from segx.errors import SegxError
            from segx.inference.exported import check_request_images, names_of

            try:
                images = check_request_images(model_input)
            except SegxError as exc:
                from mlflow.exceptions import MlflowException
                from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

                raise MlflowException(f"segx: bad request: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
            masks = [p.mask.astype(np.uint8) for p in self.predictor.predict(images)]
            names = names_of(model_input)
            if names is not None:
                return dict(zip(names, masks, strict=True))
            return np.stack(masks) if isinstance(model_input, np.ndarray) and model_input.dtype != object else masks

finally:
    warnings.showwarning = _show_warning

mlflow.models.set_model(SegxEnsembleModel())


def log_pyfunc(client, run_id: str, record: dict, register_name: str | None = None) -> str:
    """Log the ensemble under ``pyfunc/`` of ``run_id`` (and register it if a name is given)."""
    import tempfile
    from pathlib import Path

    from segx import tracking
    from segx.tracking.provenance import package_versions

    # The members are downloaded next to the record, copied into the store by log_model, and
    # the copies removed: an ensemble can be hundreds of MB, and /tmp is not ours to fill.
    with tempfile.TemporaryDirectory(prefix="segx-pyfunc-") as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "ensemble.json").write_text(json.dumps(record, indent=2))
        artifacts = {"record": str(tmp / "ensemble.json")}
        for i, member in enumerate(record["members"]):
            artifact = member.get("model_artifact", "model")
            if member.get("folds"):  # a cross-validated member travels as all its fold models
                for k, fold_run in enumerate(member["folds"]):
                    artifacts[f"member{i}_fold{k}"] = str(tracking.download_member_model(client, fold_run, tmp / f"m{i}" / f"fold{k}", artifact))
            else:
                artifacts[f"member{i}"] = str(tracking.download_member_model(client, member["run_id"], tmp / f"m{i}", artifact))
        versions = package_versions()
        requirements = [f"{name}=={versions[name]}" for name in (
            "tensorflow", "tf-keras", "segmentation-models", "mlflow", "numpy", "opencv-python-headless",
            "albumentations", "omegaconf", "hydra-core", "pandas", "scipy",
        ) if versions.get(name, "missing") != "missing"]  # fmt: skip
        package_dir = Path(__file__).resolve().parents[1]  # the whole segx package travels with the model
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="pyfunc",
                python_model=str(Path(__file__).resolve()),
                artifacts=artifacts,
                code_paths=[str(package_dir)],
                # No signature: MLflow's schema enforcement would refuse a list of images of different
                # sizes, which predict() takes (its docstring says what goes in and out).
                pip_requirements=requirements,
                registered_model_name=register_name or None,
            )
    tracking.set_tags(client, run_id, {"segx.pyfunc_uri": info.model_uri})
    return info.model_uri
