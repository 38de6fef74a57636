"""An ensemble exported as one deployable model (TensorFlow SavedModel or ONNX), and the
runtimes that predict through it exactly as :class:`~segx.inference.predictor.EnsemblePredictor`.

What is exported is the network part, at each member's recorded input (resize mode) or window
(patch mode) size: every member with a non-zero weight (a cross-validated member as its K fold
models), its encoder's input normalisation and, where the record asks for it, flip TTA, in one
graph that takes uint8 images ``images`` (B, S, S, 3) and returns

- ``member_probabilities``: float32 (B, S, S, F), each network's probability (F networks);
- ``probability``: float32 (B, S, S), the ensemble score of those maps in segx's arithmetic
  (each map quantised to uint8, fold means rounded in integers, integer weights), / (255 D);
- ``mask``: uint8 (B, S, S), 1 where the score reaches the record's threshold (no
  post-processing). Several classes: the label map in the data's own mask values (data.labels:
  a region's class of value 4 is 4, as ``segx.predict`` writes it; uint16 where a value needs it;
  with a palette, too, the values of data.labels).

``probability`` and ``mask`` answer for an image that already is S x S (a serving system that
resizes itself). Images of any size go through :class:`segx.inference.export_runtime.ExportedPredictor`, which runs segx's own
resize or sliding-window loop (:func:`segx.inference.view.predict_cases`) around the exported
model on ``member_probabilities`` and then the predictor's own quantisation, fold mean, weights,
threshold and post-processing: the masks of ``segx.predict`` wherever the runtime reproduces
TensorFlow's network outputs (see :func:`segx.inference.export_graph.export_ensemble` for how closely each one does).

Members that see images differently (resize and patch members, other sizes or scales) are one
graph per view (``view0``, ``view1``, ...; only a single-view export has ``probability`` and
``mask``), because each view feeds its network different pixels.

The parts: this module plans the graphs, checks the settings and requests and reads and guards
the export folder (no TensorFlow); :mod:`segx.inference.export_graph` builds the graphs and saves
them (TensorFlow); :mod:`segx.inference.export_runtime` loads and runs them (onnxruntime for an
ONNX export, so ``backend=onnx`` runs without TensorFlow; TensorFlow only to run a SavedModel).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segx.data.view import View
from segx.ensembling.record import EnsembleRecord
from segx.ensembling.task import task_for
from segx.errors import SegxError
from segx.inference import owned

FORMATS = ("savedmodel", "onnx")
MANIFEST = "export.json"
EXPORT_FORMAT = "segx-export"
EXPORT_VERSION = 1
INPUT = "images"
MEMBERS_OUTPUT = "member_probabilities"
# The ONNX opsets segx exports: Round needs 11, the resize ops of the decoders are exported by
# tf2onnx with opset-13 semantics, and tf2onnx 1.17 writes at most 18 (the newest it knows).
MIN_OPSET = 13
DEFAULT_OPSET = 17
PARTIAL_PREFIX = ".segx-partial-export-"


@dataclass(frozen=True)
class ExportSettings:
    """How to export: ``fmt`` (one of :data:`FORMATS`), the ONNX ``opset``, ``tta`` (None: as
    recorded) and whether an earlier export may be replaced (``overwrite``)."""

    fmt: str
    opset: int = DEFAULT_OPSET
    tta: str | None = None
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------
# What goes into the graph (no TensorFlow)


_FIX = "export the ensemble again"


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class PlannedNetwork:
    """One network of an exported graph: member ``member`` of the record (its fold ``fold``;
    None for a member trained once), its encoder and its run (a fold's own run for a fold).
    ``path``, its model folder, is the plan's only: the manifest does not keep it."""

    member: int
    fold: int | None
    backbone: str
    run_id: str
    path: str | None = None

    def to_json(self) -> dict:
        """The network as the manifest holds it."""
        return {"member": self.member, "fold": self.fold, "backbone": self.backbone, "run_id": self.run_id}

    @classmethod
    def from_json(cls, data: Any, where: str) -> PlannedNetwork:
        """A network entry of a manifest, validated: a problem is one line naming it and the fix."""
        if not isinstance(data, Mapping):
            raise SegxError(f"{where} holds {type(data).__name__}, not a network (a JSON object); {_FIX}")
        member, fold = data.get("member"), data.get("fold")
        if not _index(member):
            raise SegxError(f"{where}: member={member!r} must be a member index; {_FIX}")
        if fold is not None and not _index(fold):
            raise SegxError(f"{where}: fold={fold!r} must be a fold index or null; {_FIX}")
        for key in ("backbone", "run_id"):
            if not isinstance(data.get(key), str):
                raise SegxError(f"{where}: {key}={data.get(key)!r} must be a name; {_FIX}")
        return cls(member, fold, data["backbone"], data["run_id"])


@dataclass(frozen=True)
class GraphPlan:
    """One exported graph: its name (``serving_default`` for a single view, ``view0``,
    ``view1``, ... otherwise), the view its networks see, and the networks in the order of the
    graph's ``member_probabilities`` channels. :func:`plan_graphs` plans it; the export adds its
    ``file`` and its signature (``inputs``, ``outputs``: name -> {dtype, shape},
    :func:`signature`) and writes it into the manifest with :meth:`to_json`; the runtime reads it
    back with :meth:`from_json`."""

    name: str
    view: View
    networks: tuple[PlannedNetwork, ...]
    file: str | None = None  # the model the graph is in: its .onnx file, or the saved_model folder
    inputs: Mapping[str, Mapping] | None = None
    outputs: Mapping[str, Mapping] | None = None

    def to_json(self) -> dict:
        """The graph as the manifest's ``graphs`` holds it, key for key in its order."""
        out: dict[str, Any] = {"name": self.name}
        if self.file is not None:
            out["file"] = self.file
        out["view"] = self.view.to_dict()
        out["networks"] = [n.to_json() for n in self.networks]
        if self.inputs is not None:
            out["inputs"] = dict(self.inputs)
        if self.outputs is not None:
            out["outputs"] = dict(self.outputs)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> GraphPlan:
        """A graph entry of a manifest (``where``: the manifest and the entry), validated once:
        a problem is one line naming the field and the fix."""
        if not isinstance(data, Mapping):
            raise SegxError(f"{where} holds {type(data).__name__}, not a graph (a JSON object); {_FIX}")
        for key in ("name", "file"):
            if not isinstance(data.get(key), str) or not data.get(key):
                raise SegxError(f"{where}: {key}={data.get(key)!r} must be a name; {_FIX}")
        try:
            View.validate(data.get("view"), f"{where}: view")
        except SegxError as exc:  # its fix is a record's; a manifest's is a new export
            raise SegxError(f"{str(exc).split('; ')[0]}; {_FIX}") from None
        networks = data.get("networks")
        if not isinstance(networks, list) or not networks:
            raise SegxError(f"{where}: networks={networks!r} must be a list of networks; {_FIX}")
        for key in ("inputs", "outputs"):
            tensors = data.get(key)
            if not isinstance(tensors, Mapping) or not all(
                isinstance(t, Mapping) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
                for t in tensors.values()
            ):
                raise SegxError(f"{where}: {key}={tensors!r} must map names to {{dtype, shape}}; {_FIX}")
        if MEMBERS_OUTPUT not in data["outputs"]:
            raise SegxError(f"{where}: outputs has no {MEMBERS_OUTPUT}; {_FIX}")
        return cls(
            name=data["name"],
            view=View.from_dict(data["view"]),
            networks=tuple(PlannedNetwork.from_json(n, f"{where}: networks[{j}]") for j, n in enumerate(networks)),
            file=data["file"],
            inputs=dict(data["inputs"]),
            outputs=dict(data["outputs"]),
        )


def plan_graphs(record: EnsembleRecord, model_paths: Sequence) -> list[GraphPlan]:
    """The networks of a validated record grouped by view: one graph per distinct view, in the
    order members first appear. Weight-0 members are left out (they cannot change a pixel).
    Each graph's networks carry their model folder (``path``)."""
    groups: dict[View, list[PlannedNetwork]] = {}
    for i, (member, path, count) in enumerate(zip(record.members, model_paths, record.weights.counts, strict=True)):
        if count == 0:
            continue
        networks = groups.setdefault(member.view, [])
        folds = member.folds
        paths = list(path) if folds else [path]
        if folds and len(paths) != len(folds):
            raise ValueError(f"member {i}: {len(folds)} folds but {len(paths)} model folders")
        for k, p in enumerate(paths):
            networks.append(
                PlannedNetwork(
                    member=i,
                    fold=k if folds else None,
                    backbone=member.backbone,
                    run_id=str(folds[k] if folds else member.run_id),
                    path=str(p),
                )
            )
    return [
        GraphPlan("serving_default" if len(groups) == 1 else f"view{g}", view, tuple(networks))
        for g, (view, networks) in enumerate(groups.items())
    ]


def graph_plans(manifest: Mapping, path: str | os.PathLike) -> list[GraphPlan]:
    """The graphs of a manifest read by :func:`read_manifest` from ``path``, validated (one line
    naming the manifest, the entry and the fix)."""
    graphs = manifest.get("graphs")
    if not isinstance(graphs, list) or not graphs:
        raise SegxError(f"{path}: graphs={graphs!r} must be a list of graphs; {_FIX}")
    return [GraphPlan.from_json(g, f"{path}: graphs[{i}]") for i, g in enumerate(graphs)]


def n_classes(record: EnsembleRecord) -> int:
    """Output channels per network: 1 (a sigmoid) for one structure, K for K classes, R for R regions."""
    return record.n_outputs


def mask_dtype(record: EnsembleRecord) -> str:
    """The ``mask`` output's dtype: uint8 (0/1, or label values up to 255), uint16 for larger values."""
    values = task_for(record.labels).graph_decision(record).values or (0,)
    return "uint8" if max(int(v) for v in values) <= 255 else "uint16"


def signature(graph: GraphPlan, single: bool, classes: int = 1, mask: str = "uint8") -> dict:
    """Input and outputs of one graph: name -> {dtype, shape} (-1: any batch size). Several
    classes: each network's K probabilities side by side (network j: channels jK..jK+K-1), the
    ensemble's class probabilities, and the label map in data.labels' values as ``mask``
    (``mask``: its dtype, :func:`mask_dtype`)."""
    size, n = graph.view.size, len(graph.networks)
    outputs = {MEMBERS_OUTPUT: {"dtype": "float32", "shape": [-1, size, size, n * classes]}}
    if single:
        tail = [] if classes == 1 else [classes]
        outputs["probability"] = {"dtype": "float32", "shape": [-1, size, size, *tail]}
        outputs["mask"] = {"dtype": mask, "shape": [-1, size, size]}
    return {"inputs": {INPUT: {"dtype": "uint8", "shape": [-1, size, size, 3]}}, "outputs": outputs}


def check_format(fmt: Any) -> str:
    if fmt not in FORMATS:
        raise SegxError(f"format={fmt} is not an export format; use format=savedmodel or format=onnx")
    return str(fmt)


def opset_range() -> tuple[int, int]:
    """The ONNX opsets segx can export with the installed tf2onnx: (lowest, highest)."""
    import importlib

    importlib.import_module("segx.backend")  # TensorFlow configured before tf2onnx imports it
    from tf2onnx import constants

    return MIN_OPSET, max(constants.OPSET_TO_IR_VERSION)


def check_opset(opset: Any) -> int:
    """An opset tf2onnx can write, or one line saying which it can."""
    import tf2onnx

    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise SegxError(
            f"opset={opset!r}: tf2onnx {tf2onnx.__version__} cannot produce it for segx's graphs "
            f"(it writes opsets {low}..{high}); use opset={DEFAULT_OPSET}"
        )
    return opset


# ---------------------------------------------------------------------------------------------
# Request checks (numpy only): the served pyfunc model and the exported runtimes


def check_request_images(model_input: Any, max_pixels: int | None = None) -> list[np.ndarray]:
    """The images of a prediction request as uint8 (H, W) or (H, W, 3|4) arrays, or one line
    saying what is wrong. Accepted: an array (N, H, W) or (N, H, W, C), a list of images, or a
    dict of named images (what MLflow's server makes of JSON ``{"inputs": ...}``), with integer
    pixel values 0..255 (JSON carries no uint8) and 1, 3 or 4 channels."""
    from segx.data.io import DEFAULT_MAX_PIXELS

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if model_input is None or (isinstance(model_input, np.ndarray) and model_input.ndim == 0):
        raise SegxError(
            "images: the request holds a single value (null?), not images; send uint8 images "
            "(N, H, W, 3), a list or a dict of images"
        )
    if isinstance(model_input, Mapping):
        items = list(model_input.items())
    elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim not in (3, 4):
            raise SegxError(
                f"images: an array of shape {model_input.shape}; send (N, H, W) or (N, H, W, 3) "
                "uint8 images, or a list of images"
            )
        items = [(str(i), im) for i, im in enumerate(model_input)]
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        items = [(str(i), im) for i, im in enumerate(model_input)]
    else:
        raise SegxError(
            f"images: got {type(model_input).__name__}; send uint8 images (N, H, W, 3), a list or a dict of images"
        )
    if not items:
        raise SegxError("images: the request holds no image; send at least one")
    images = []
    for name, image in items:
        try:
            image = np.asarray(image)
        except ValueError:
            raise SegxError(f"image {name}: rows of different lengths; send a rectangular (H, W, 3) image") from None
        if image.dtype == bool or image.dtype.kind not in "ui":
            raise SegxError(
                f"image {name}: dtype {image.dtype}; send uint8 pixel values 0..255 (integers, not floats in [0, 1])"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            channels = f"{image.shape[2]} channels" if image.ndim == 3 else f"{image.ndim} dimensions"
            raise SegxError(
                f"image {name}: shape {image.shape} ({channels}); send (H, W) grayscale, "
                "(H, W, 3) RGB or (H, W, 4) RGBA"
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise SegxError(f"image {name}: shape {image.shape} is empty; send an image of at least 1 x 1 px")
        if image.shape[0] * image.shape[1] > limit:
            raise SegxError(
                f"image {name}: {image.shape[0]} x {image.shape[1]} px is over the {limit} px limit; "
                "send a smaller image or tile it"
            )
        if image.dtype != np.uint8:
            if image.size and (image.min() < 0 or image.max() > 255):
                raise SegxError(f"image {name}: values {image.min()}..{image.max()} outside 0..255; send uint8 pixels")
            image = image.astype(np.uint8)
        images.append(image)
    return images


def names_of(model_input: Any) -> list[str] | None:
    """The names of a dict request (the answer keeps them), None otherwise."""
    return [str(k) for k in model_input] if isinstance(model_input, Mapping) else None


# ---------------------------------------------------------------------------------------------
# The export folder: its manifest, and what overwrite=true may replace


def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise SegxError(f"{folder} is not a segx export (no {MANIFEST}); export with python -m segx.export")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise SegxError(f"{path} is not valid JSON; export the ensemble again") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != EXPORT_FORMAT
        or manifest.get("runtime") not in FORMATS
    ):
        raise SegxError(f"{path} is not a segx export manifest; export the ensemble again")
    if manifest.get("version") != EXPORT_VERSION:
        raise SegxError(
            f"{path}: export version {manifest.get('version')!r}; this segx reads {EXPORT_VERSION}: export again"
        )
    return manifest


# The names segx writes at the top of an export folder (a hand-edited or foreign manifest cannot
# make overwrite=true delete anything else): the model, the record, the manifest.
_OWN_TOP = re.compile(r"saved_model|ensemble\.json|model(?:-view\d+)?\.onnx(?:\.data)?")


def _export_path(parts: list[str]) -> bool:
    """A path whose first part is one of segx's names (:data:`_OWN_TOP`), below ``saved_model/`` only."""
    return _OWN_TOP.fullmatch(parts[0]) is not None and (len(parts) == 1 or parts[0] == "saved_model")


LAYOUT = owned.Layout(MANIFEST, PARTIAL_PREFIX, _export_path)


def _owned(manifest: dict) -> owned.Owned:
    """What an earlier export's manifest says segx wrote: (files -> bytes, folders, folders whose
    whole tree is segx's). A manifest with ``contents`` lists every file and folder; an older one
    only the top-level names (``files``, ``ensemble.json`` and, for an ONNX model too large for
    one file, the ``.data`` file segx writes beside it), anything deeper accepted only inside
    its ``saved_model`` folder."""
    contents = manifest.get("contents")
    if contents is None:
        names = [f for f in manifest.get("files") or [] if isinstance(f, str)]
        names += [f"{f}.data" for f in names if f.endswith(".onnx")] + ["ensemble.json"]
        names = [f for f in names if LAYOUT.owns(f)]
        trees = {"saved_model"} & set(names)
        return owned.Owned({f: None for f in names if f not in trees}, set(), trees)
    if not isinstance(contents, list) or not all(isinstance(c, dict) for c in contents):
        raise ValueError("contents is not a list of entries")
    files: dict[str, int | None] = {}
    folders: set[str] = set()
    for entry in contents:
        rel, size = entry.get("path"), entry.get("bytes")
        if not LAYOUT.owns(rel):
            continue  # not a name segx writes: whatever lies there is refused as foreign
        if entry.get("folder") is True:
            folders.add(rel)
        elif isinstance(size, int) and not isinstance(size, bool):
            files[rel] = size
    return owned.Owned(files, folders, set())


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """An export folder is written whole or not at all; an existing one is replaced only with
    ``overwrite=true`` and only if it is an earlier segx export holding nothing but what that
    export wrote: its ``export.json`` is a segx export manifest (:func:`read_manifest`) and every
    file and folder under ``output_dir`` is one the manifest lists (``contents``; an older
    manifest: its top-level names and what lies inside them). Anything else is one line naming
    one file segx did not write, so a file the user added is never deleted."""
    from segx.data.io import shown

    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise SegxError(f"output_dir={shown(output_dir)} is a file or a link, not a folder; choose a new output_dir")
    # The export is staged beside output_dir: its nearest existing parent must be a folder it can write.
    parent = next(p for p in output_dir.absolute().parents if os.path.lexists(p))
    if not parent.is_dir():
        raise SegxError(f"output_dir={shown(output_dir)} lies under {shown(parent)}, a file; choose another output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SegxError(f"cannot write into {shown(parent)} (permission denied); choose a writable output_dir")
    if not output_dir.exists():
        return
    try:
        if not any(output_dir.iterdir()):
            return
        if not overwrite:
            raise SegxError(
                f"output_dir={shown(output_dir)} is not empty; choose a new output_dir or pass "
                "overwrite=true to replace an earlier export"
            )
        path = output_dir / MANIFEST
        if path.is_symlink() or not path.is_file():
            raise SegxError(
                f"output_dir={shown(output_dir)} is not a segx export (no {MANIFEST}); overwrite=true "
                "replaces only an earlier export: choose a new or empty output_dir"
            )
        try:
            earlier = _owned(read_manifest(output_dir))
        except (SegxError, ValueError, TypeError, AttributeError):
            raise SegxError(
                f"output_dir={shown(output_dir)} is not a segx export ({shown(path)} is not a segx "
                "export manifest this segx reads); overwrite=true replaces only an earlier export: "
                "choose a new or empty output_dir"
            ) from None
        found = owned.first_foreign(output_dir, earlier, MANIFEST)
    except OSError as exc:
        raise SegxError(
            f"cannot read output_dir={shown(output_dir)} ({exc.strerror or exc}); check its "
            "permissions or choose a new output_dir"
        ) from None
    if found is not None:
        what = "folder" if found[0].endswith("/") else "file"
        raise SegxError(
            f"{shown(output_dir)}/{shown(found[0])} {found[1]} and overwrite=true would delete it; "
            f"move that {what} out or choose a new output_dir"
        )
