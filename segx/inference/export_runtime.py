"""Loading and running an ensemble's export (what :mod:`segx.inference.export_graph` wrote):
onnxruntime for an ONNX export, so ``backend=onnx`` runs without TensorFlow; TensorFlow only to
run a SavedModel. :class:`ExportedPredictor` predicts through it exactly as
:class:`~segx.inference.predictor.EnsemblePredictor` (see :mod:`segx.inference.export_plan`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segx.data.ragged import Ragged
from segx.ensembling.probs import fold_mean, quantize
from segx.ensembling.record import EnsembleRecord
from segx.ensembling.task import task_for
from segx.errors import SegxError
from segx.inference.export_plan import INPUT, MANIFEST, MEMBERS_OUTPUT, GraphPlan, graph_plans, read_manifest
from segx.inference.predictor import EnsemblePredictor
from segx.inference.view import predict_cases


class ExportedGraph:
    """One exported graph with its runtime: ``run(images)`` takes uint8 (B, S, S, 3) and returns
    the outputs of its signature as numpy arrays. A wrong dtype, shape or channel count is one
    line naming what the graph takes. ``graph``: its plan, as the manifest holds it."""

    def __init__(self, graph: GraphPlan, runner, runtime: str):
        self.graph, self.runtime, self._runner = graph, runtime, runner
        self.size = graph.view.size
        self.outputs = list(graph.outputs or {})

    def check(self, images: Any) -> np.ndarray:
        images = np.asarray(images)
        want = f"uint8 images of shape (B, {self.size}, {self.size}, 3)"
        if images.dtype != np.uint8:
            raise SegxError(f"{self.graph.name}: dtype {images.dtype}; the exported model takes {want}")
        if images.ndim != 4 or images.shape[1:3] != (self.size, self.size) or images.shape[0] < 1:
            raise SegxError(
                f"{self.graph.name}: shape {images.shape}; the exported model takes {want} "
                "(segx.predict resizes or tiles images of any size)"
            )
        if images.shape[3] != 3:
            raise SegxError(f"{self.graph.name}: {images.shape[3]} channels; the exported model takes {want}")
        return np.ascontiguousarray(images)

    def run(self, images: Any, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self._runner(self.check(images), list(outputs or self.outputs))


def _savedmodel_runner(folder: Path, name: str):
    from segx.backend import tf

    loaded = tf.saved_model.load(str(folder / "saved_model"))
    try:
        function = loaded.signatures[name]
    except KeyError:
        raise SegxError(f"{folder}/saved_model has no signature '{name}'; export the ensemble again") from None

    def run(batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        result = function(**{INPUT: tf.constant(batch)})
        return {k: result[k].numpy() for k in outputs}

    run.keep = loaded  # the functions need their module alive
    return run


def _onnx_runner(path: Path, threads: int | None = None):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # tf2onnx's resize attributes draw one warning per node at load
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Worker threads that spin while waiting lose their cores to each other when the machine is
    # shared (experiments/export: 27 -> 39 img/s for the network part on 2 busy cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise SegxError(f"{path}: onnxruntime cannot load it ({str(exc)[:600]}); export the ensemble again") from None

    def run(batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, {INPUT: batch}), strict=True))

    return run


def load_graph(
    folder: str | os.PathLike, manifest: dict, graph: GraphPlan, threads: int | None = None
) -> ExportedGraph:
    folder = Path(folder)
    if manifest["runtime"] == "onnx":
        path = folder / str(graph.file)
        if not path.is_file():
            raise SegxError(f"{path} is missing; export the ensemble again")
        return ExportedGraph(graph, _onnx_runner(path, threads), "onnx")
    if not (folder / "saved_model").is_dir():
        raise SegxError(f"{folder}/saved_model is missing; export the ensemble again")
    return ExportedGraph(graph, _savedmodel_runner(folder, graph.name), "savedmodel")


class ExportedPredictor(EnsemblePredictor):
    """The ensemble through its export: the same ``predict`` (and ``score``) as
    :class:`EnsemblePredictor`, whose arithmetic it inherits; only the member probabilities come
    from the exported graphs, through segx's resize or sliding-window loop."""

    def __init__(self, folder: str | os.PathLike, tta: str | None = None, threads: int | None = None):
        folder = Path(folder)
        manifest = read_manifest(folder)
        self.manifest = manifest
        try:
            written = json.loads((folder / "ensemble.json").read_text())
        except (OSError, ValueError):
            raise SegxError(f"{folder}/ensemble.json is missing or not JSON; export the ensemble again") from None
        self.record = record = EnsembleRecord.from_json(written, f"{folder}/ensemble.json")
        self.members = record.members
        self.views = record.views
        self.weights = record.weights
        self.labels = record.labels
        self.task = task_for(record.labels)
        self.swap = None  # flip TTA (and its class swap) runs inside the exported graph
        self.threshold = self.task.prediction_threshold(record, None)
        self.tta = manifest["tta"]
        if tta not in (None, self.tta):
            raise SegxError(
                f"this export runs tta={self.tta} inside its graph; export again with tta={tta} "
                "(python -m segx.export ... tta=...) or drop the tta override"
            )
        self.models = None
        plans = graph_plans(manifest, folder / MANIFEST)
        self.graphs = [load_graph(folder, manifest, g, threads) for g in plans]

    def member_probs(self, images: Sequence[np.ndarray]) -> list[Ragged | None]:
        images = list(images)
        per_network: dict[tuple[int, int | None], Ragged] = {}
        for graph in self.graphs:
            names = [f"n{j}" for j in range(len(graph.graph.networks))]

            k = self.task.n_outputs

            def predict(batch: np.ndarray, graph=graph, names=names, k=k) -> dict[str, np.ndarray]:
                probs = graph.run(batch, [MEMBERS_OUTPUT])[MEMBERS_OUTPUT]
                if k == 1:
                    return {name: probs[..., j] for j, name in enumerate(names)}
                return {name: probs[..., j * k : (j + 1) * k] for j, name in enumerate(names)}

            maps: dict[str, list[np.ndarray]] = {name: [] for name in names}
            for case in predict_cases(images, graph.graph.view, predict):
                for name in names:
                    maps[name].append(quantize(case[name]))
            for name, net in zip(names, graph.graph.networks, strict=True):
                per_network[(net.member, net.fold)] = Ragged.from_list(maps[name], np.uint8)
        out: list[Ragged | None] = []
        for i, member in enumerate(self.members):
            if self.weights.counts[i] == 0:
                out.append(None)
            elif member.folds:
                out.append(fold_mean([per_network[(i, k)] for k in range(len(member.folds))]))
            else:
                out.append(per_network[(i, None)])
        return out


def load_exported(folder: str | os.PathLike, tta: str | None = None, threads: int | None = None) -> ExportedPredictor:
    """An :class:`ExportedPredictor` for an export folder (as written by
    :func:`segx.inference.export_graph.export_ensemble`)."""
    return ExportedPredictor(folder, tta, threads)
