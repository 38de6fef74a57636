"""MLflow 3 logged models: a member (a segx pyfunc that reads its run's weights) and an exported
ensemble graph, each linked to its run."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient


def _image_signature():
    """uint8 images (N, H, W, 3) of any size in; uint8 masks {0, 1} (N, H, W) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )


def log_member_model(
    client: MlflowClient, run_id: str, experiment: str, name: str, params: Mapping[str, Any], member: Mapping[str, Any]
) -> str:
    """The member as an MLflow 3 logged model (the UI's Models tab, linked to its run as an
    output) with a signature, that ``mlflow.pyfunc.load_model("models:/<id>")`` loads and that
    predicts masks at each image's own size (segx/tracking/pyfunc_model.py). Its weights are not
    copied: the model reads the run's ``model`` artifact (tag ``segx.model_artifact``).
    ``member``: backbone, arch and view, as an ensemble record names a member."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from segx.tracking.pyfunc_model import log_member_pyfunc

    model = client.create_logged_model(
        experiment,
        name=name,
        source_run_id=run_id,
        model_type="segx-member",
        params={k: str(v) for k, v in params.items()},
        tags={"segx.model_artifact": f"runs:/{run_id}/model"},
    )
    log_member_pyfunc(client, model.model_id, run_id, dict(member), _image_signature(), int(member["view"]["size"]))
    if client.get_logged_model(model.model_id).status != LoggedModelStatus.READY:
        client.finalize_logged_model(model.model_id, "READY")
    if not any(o.model_id == model.model_id for o in (client.get_run(run_id).outputs.model_outputs or [])):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_tag(run_id, "segx.logged_model_id", model.model_id)
    return model.model_id


def link_models(client: MlflowClient, run_id: str, model_ids: Sequence[str]) -> None:
    """Name logged models as the run's inputs (the ensemble's members, in the UI)."""
    from mlflow.entities import LoggedModelInput

    ids = [m for m in model_ids if m]
    if ids:
        client.log_inputs(run_id, models=[LoggedModelInput(m) for m in ids])


@dataclass(frozen=True)
class TensorSignature:
    """A graph's named tensors: ``inputs`` and ``outputs``, each name -> {dtype, shape} (-1: any size)."""

    inputs: Mapping[str, Mapping]
    outputs: Mapping[str, Mapping]

    def to_mlflow(self):
        """The MLflow ModelSignature of these tensors."""
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        def schema(specs: Mapping[str, Mapping]) -> Schema:
            return Schema([TensorSpec(np.dtype(s["dtype"]), tuple(s["shape"]), key) for key, s in specs.items()])

        return ModelSignature(schema(self.inputs), schema(self.outputs))


def log_export_model(
    client: MlflowClient,
    run_id: str,
    experiment: str,
    name: str,
    signature: TensorSignature,
    params: Mapping[str, Any],
    artifact: str,
) -> str:
    """An exported ensemble graph (``segx.export``) as an MLflow 3 logged model of ``run_id``,
    with its tensor ``signature``; like a member's, it points at the run's ``artifact`` folder
    instead of copying the model."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    model = client.create_logged_model(
        experiment,
        name=name,
        source_run_id=run_id,
        model_type="segx-export",
        params={k: str(v) for k, v in params.items()},
        tags={"segx.model_artifact": f"runs:/{run_id}/{artifact}"},
    )
    with tempfile.TemporaryDirectory(prefix="segx-model-") as tmp:
        Model(model_id=model.model_id, run_id=run_id, signature=signature.to_mlflow()).save(str(Path(tmp) / "MLmodel"))
        (Path(tmp) / "README.txt").write_text(
            f"segx export: the model files are the artifact runs:/{run_id}/{artifact}\n"
        )
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id
