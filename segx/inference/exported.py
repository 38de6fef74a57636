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
resizes itself). Images of any size go through :class:`ExportedPredictor`, which runs segx's own
resize or sliding-window loop (:func:`segx.inference.view.predict_cases`) around the exported
model on ``member_probabilities`` and then the predictor's own quantisation, fold mean, weights,
threshold and post-processing: the masks of ``segx.predict`` wherever the runtime reproduces
TensorFlow's network outputs (see :func:`export_ensemble` for how closely each one does).

Members that see images differently (resize and patch members, other sizes or scales) are one
graph per view (``view0``, ``view1``, ...; only a single-view export has ``probability`` and
``mask``), because each view feeds its network different pixels.

TensorFlow is imported only to build a graph or to run a SavedModel; onnxruntime only here and
only to run an ONNX export, so ``backend=onnx`` runs without TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segx.data import staging
from segx.data.ragged import Ragged
from segx.ensembling.probs import MAX_DENOMINATOR, cut, fold_mean, quantize
from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from segx.inference.predictor import EnsemblePredictor, class_postprocess
from segx.inference.view import View, predict_cases

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


# ---------------------------------------------------------------------------------------------
# What goes into the graph (no TensorFlow)


def plan_graphs(record: EnsembleRecord, model_paths: Sequence) -> list[dict]:
    """The networks of a validated record grouped by view: one graph per distinct view, in the
    order members first appear. Weight-0 members are left out (they cannot change a pixel).
    Each graph: ``{"name", "view", "networks": [{"member", "fold", "backbone", "run_id", "path"}]}``."""
    graphs: list[dict] = []
    for i, (member, path, count) in enumerate(zip(record.members, model_paths, record.weights.counts, strict=True)):
        if count == 0:
            continue
        view = member.view.to_dict()
        graph = next((g for g in graphs if g["view"] == view), None)
        if graph is None:
            graph = {"view": view, "networks": []}
            graphs.append(graph)
        folds = member.folds
        paths = list(path) if folds else [path]
        if folds and len(paths) != len(folds):
            raise ValueError(f"member {i}: {len(folds)} folds but {len(paths)} model folders")
        for k, p in enumerate(paths):
            graph["networks"].append(
                {
                    "member": i,
                    "fold": k if folds else None,
                    "backbone": member.backbone,
                    "run_id": str(folds[k] if folds else member.run_id),
                    "path": str(p),
                }
            )
    for g, graph in enumerate(graphs):
        graph["name"] = "serving_default" if len(graphs) == 1 else f"view{g}"
    return graphs


def n_classes(record: EnsembleRecord) -> int:
    """Output channels per network: 1 (a sigmoid) for one structure, K for K classes, R for R regions."""
    return record.n_outputs


def mask_dtype(record: EnsembleRecord) -> str:
    """The ``mask`` output's dtype: uint8 (0/1, or label values up to 255), uint16 for larger values."""
    values = record.labels.values if record.labels is not None else (0,)
    return "uint8" if max(int(v) for v in values) <= 255 else "uint16"


def signature(graph: dict, single: bool, classes: int = 1, mask: str = "uint8") -> dict:
    """Input and outputs of one graph: name -> {dtype, shape} (-1: any batch size). Several
    classes: each network's K probabilities side by side (network j: channels jK..jK+K-1), the
    ensemble's class probabilities, and the label map in data.labels' values as ``mask``
    (``mask``: its dtype, :func:`mask_dtype`)."""
    size, n = int(graph["view"]["size"]), len(graph["networks"])
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
# Building and saving (TensorFlow)


def preprocessing_table(backbone: str) -> tuple[list[int], np.ndarray] | None:
    """The encoder's input normalisation as a lookup: ``x[..., c] = lut[c, image[..., perm[c]]]``
    ((3, 256) float32), or None when it is the identity (ResNets). Built from and checked against
    segx's own numpy preprocessing, so the network sees the same float32 values bit for bit."""
    from segx.models import preprocessing

    prep = preprocessing(backbone)
    values = np.arange(256, dtype=np.float32)
    equal = np.repeat(values[:, None], 3, axis=1)[None, None]  # every channel = v: out[c] = f_c(v)
    lut = np.asarray(prep(equal.copy()), np.float32)[0, 0].T.copy()
    base = np.asarray(prep(np.zeros((1, 1, 1, 3), np.float32)), np.float32)[0, 0, 0]
    probe = np.zeros((1, 1, 3, 3), np.float32)
    probe[0, 0, [0, 1, 2], [0, 1, 2]] = 255.0  # pixel j: channel j at 255, the others at 0
    moved = np.asarray(prep(probe), np.float32)[0, 0] != base  # moved[j, c]: channel c follows input j
    perm = [int(np.flatnonzero(moved[:, c])[0]) if moved[:, c].sum() == 1 else -1 for c in range(3)]
    rng = np.random.default_rng(0)
    sample = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    expected = np.asarray(prep(sample.astype(np.float32)), np.float32)
    exact = -1 not in perm and all(np.array_equal(lut[c][sample[..., perm[c]]], expected[..., c]) for c in range(3))
    if not exact:
        raise SegxError(
            f"backbone {backbone}: its input preprocessing is not a per-channel lookup of the pixel "
            "value, which the export needs; export an ensemble without it or use segx.predict"
        )
    if perm == [0, 1, 2] and all(np.array_equal(lut[c], values) for c in range(3)):
        return None
    return perm, lut


def _build_functions(graphs: list[dict], models: list, tables: dict, record: EnsembleRecord, tta: str):
    """Per graph: the whole graph as one ``tf.function`` (what the SavedModel signs, bit for bit
    segx's network calls), and for ONNX one ``tf.function`` per network (uint8 images ->
    (B, S, S, 1)) and the ensemble tail (member probabilities -> probability, mask), which are
    converted one at a time and joined (:func:`_save_onnx`)."""
    from segx.backend import tf

    weights = record.weights
    k = n_classes(record)
    threshold_cut = cut(float(record.threshold), weights.denominator) if k == 1 else None
    regions = None
    labels = record.labels  # several classes: the mask output in data.labels' values
    if labels is not None and labels.regions:  # regions: (exact cut, class painted) each, in order
        cuts = [cut(float(record.region_thresholds[r]), weights.denominator) for r in labels.region_names]
        regions = list(zip(cuts, labels.paints(), strict=True))
    values = None if labels is None else ([int(v) for v in labels.values], mask_dtype(record))
    swap = None if record.flip_swap is None else list(record.flip_swap)  # flip TTA's mirrored pass, several classes
    single = len(graphs) == 1
    functions = {}
    index = 0
    for graph in graphs:
        size = int(graph["view"]["size"])
        nets = [(models[index + j], tables[net["backbone"]]) for j, net in enumerate(graph["networks"])]
        index += len(nets)
        image_spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)
        probs_spec = tf.TensorSpec([None, size, size, len(nets) * k], tf.float32, name=MEMBERS_OUTPUT)
        tail = _tail(tf, graph["networks"], weights, threshold_cut, k, regions, values) if single else None
        functions[graph["name"]] = {
            "whole": tf.function(_whole(tf, nets, tta, tail, k, swap), input_signature=[image_spec], autograph=False),
            "networks": [
                tf.function(_one(tf, model, table, tta, k, swap), input_signature=[image_spec], autograph=False)
                for model, table in nets
            ],
            "tail": None if tail is None else tf.function(tail, input_signature=[probs_spec], autograph=False),
        }
    return functions


# Closures, not default arguments: tf.function would turn numpy defaults into tensors.


def _network_probs(tf, model, table, tta: str, images, batched: bool = False, classes: int = 1, swap=None):
    """One network's float32 probabilities (B, S, S) for uint8 images, as segx.models computes them
    (several classes: (B, S, S, K), the width-flipped TTA pass's classes permuted by ``swap``).

    ``batched``: the three flip-TTA passes as one network call on a batch of 3B (for ONNX: the
    converter then holds one copy of the network instead of three; ONNX Runtime computes each
    image of a batch on its own, and matches TensorFlow only to ~1e-5 either way)."""
    if table is None:
        x = tf.cast(images, tf.float32)
    else:  # a gather is exact: the float32 values segx's numpy preprocessing gives
        perm, lut = table
        idx = tf.gather(tf.cast(images, tf.int32), perm, axis=3) + tf.constant([0, 256, 512], tf.int32)
        x = tf.gather(tf.constant(lut.reshape(-1)), idx)

    def net(z):
        out = model(z, training=False)
        return out[..., 0] if classes == 1 else out

    if tta == "flip" and batched:
        b = tf.shape(x)[0]
        y = net(tf.concat([x, tf.reverse(x, [2]), tf.reverse(x, [1])], 0))
        p, fw, fh = y[:b], tf.reverse(y[b : 2 * b], [2]), tf.reverse(y[2 * b :], [1])
    else:
        p = net(x)
    if tta == "flip":  # as segx.models: (plain + width-flipped + height-flipped) / 3
        if not batched:
            fw = tf.reverse(net(tf.reverse(x, [2])), [2])
            fh = tf.reverse(net(tf.reverse(x, [1])), [1])
        if swap is not None and classes > 1:  # data.flip_swap, as segx.models does it
            fw = tf.gather(fw, [int(i) for i in swap], axis=3)
        # float32 division on TensorFlow's CPU kernels is not always correctly rounded (numpy's
        # is); in float64, rounded once to float32, it is (an innocuous double rounding).
        p = tf.cast(tf.cast(p + fw + fh, tf.float64) / tf.constant(3.0, tf.float64), tf.float32)
    return p


def _one(tf, model, table, tta: str, classes: int = 1, swap=None):
    def network(images):
        p = _network_probs(tf, model, table, tta, images, batched=True, classes=classes, swap=swap)
        return {"p": p[..., None] if classes == 1 else p}

    return network


def _whole(tf, nets: list, tta: str, tail, classes: int = 1, swap=None):
    def whole(images):
        each = [_network_probs(tf, model, table, tta, images, classes=classes, swap=swap) for model, table in nets]
        probs = tf.stack(each, axis=-1) if classes == 1 else tf.concat(each, axis=-1)
        return {MEMBERS_OUTPUT: probs, **(tail(probs) if tail is not None else {})}

    return whole


def _tail(tf, networks: list[dict], weights, threshold_cut: int | None, classes: int = 1, regions=None, values=None):
    def tail(probs):
        if classes == 1:
            each = [probs[..., j] for j in range(len(networks))]
        else:
            each = [probs[..., j * classes : (j + 1) * classes] for j in range(len(networks))]
        out = _ensemble_outputs(tf, each, networks, weights, threshold_cut, regions)
        if values is not None:  # several classes: class indices -> the data's own mask values
            table, dtype = values
            index = tf.cast(out["mask"], tf.int32)
            out["mask"] = tf.gather(tf.constant(table, tf.int32), index)
            out["mask"] = tf.cast(out["mask"], tf.uint16 if dtype == "uint16" else tf.uint8)
        return out

    return tail


def _ensemble_outputs(tf, probs: list, nets: list[dict], weights, threshold_cut: int | None, regions=None) -> dict:
    """segx's arithmetic on the network grid: quantize (round half to even, as numpy's rint),
    integer fold means, the integer weighted score, the exact threshold (several classes,
    ``threshold_cut`` None: the label of the highest class score, ties to the lowest index,
    written out so that no runtime's argmax tie rule is relied on)."""
    quantized = [tf.cast(tf.clip_by_value(tf.round(p * 255.0), 0.0, 255.0), tf.int32) for p in probs]
    by_member: dict[int, list] = {}
    for q, net in zip(quantized, nets, strict=True):
        by_member.setdefault(net["member"], []).append(q)
    terms = []
    for member, qs in by_member.items():
        k = len(qs)
        q = qs[0] if k == 1 else (_sum(qs) + k // 2) // k
        terms.append(q * weights.counts[member])
    score = _sum(terms)
    denominator = float(255 * weights.denominator)
    probability = tf.cast(tf.cast(score, tf.float64) / tf.constant(denominator, tf.float64), tf.float32)
    if regions is not None:  # each region at its exact cut, painting its class, later over earlier
        label = tf.zeros(tf.shape(score)[:-1], tf.int32)
        for r, (region_cut, paint) in enumerate(regions):
            label = tf.where(score[..., r] >= region_cut, tf.constant(paint, tf.int32), label)
        return {"probability": probability, "mask": tf.cast(label, tf.uint8)}
    if threshold_cut is None:
        k = int(score.shape[-1])
        top = tf.reduce_max(score, axis=-1, keepdims=True)
        index = tf.reshape(tf.range(k, dtype=tf.int32), [1, 1, 1, k])
        label = tf.reduce_min(tf.where(score == top, index, tf.fill(tf.shape(score), k)), axis=-1)
        return {"probability": probability, "mask": tf.cast(label, tf.uint8)}
    return {"probability": probability, "mask": tf.cast(score >= threshold_cut, tf.uint8)}


def _sum(tensors: list):
    """Integer sum by pairwise adds (ONNX's Sum, what tf.add_n becomes, takes no int32)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _save_savedmodel(module, functions: dict, folder: Path) -> list[str]:
    from segx.backend import tf

    signatures = {name: fns["whole"].get_concrete_function() for name, fns in functions.items()}
    tf.saved_model.save(module, str(folder / "saved_model"), signatures=signatures)
    return ["saved_model"]


def _save_onnx(
    functions: dict, graphs: list[dict], folder: Path, opset: int, classes: int = 1, mask: str = "uint8"
) -> list[str]:
    """Each network, then the ensemble tail, converted on its own and joined into one ONNX graph
    per view: tf2onnx needs some 60-70 times a network's weights in memory while it converts it
    (peak 3.9 GB for a resnet18 Unet, 9.5 GB for a resnet50 one, measured here), so converting the
    whole ensemble at once needed the sum over networks (7.5 GB for resnet18 + mobilenetv2 +
    efficientnetb0; 4.5 GB one at a time) and would not fit a cross-validated ensemble at all."""
    import onnx
    import tf2onnx

    from segx.backend import tf

    def convert(function, spec, what: str):
        try:
            proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)
        except Exception as exc:  # noqa: BLE001 - the converter's failure, said in one line
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SegxError(
                f"tf2onnx {tf2onnx.__version__} cannot convert {what} at opset {opset} ({text}); "
                f"try another opset (opset={DEFAULT_OPSET}) or format=savedmodel"
            ) from None
        _release_memory()  # the converter's intermediate graphs, before the next network's
        return proto

    files = []
    for graph in graphs:
        name = "model.onnx" if graph["name"] == "serving_default" else f"model-{graph['name']}.onnx"
        size, n = int(graph["view"]["size"]), len(graph["networks"])
        k = classes
        image_spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)
        parts = []
        for j, (function, net) in enumerate(zip(functions[graph["name"]]["networks"], graph["networks"], strict=True)):
            what = f"backbone {net['backbone']} (member {net['member']}" + (
                f", fold {net['fold']})" if net["fold"] is not None else ")"
            )
            parts.append(onnx.compose.add_prefix(convert(function, image_spec, what), f"n{j}/"))
        tail = functions[graph["name"]]["tail"]
        if tail is not None:
            probs_spec = tf.TensorSpec([None, size, size, n * k], tf.float32, name=MEMBERS_OUTPUT)
            parts.append(onnx.compose.add_prefix(convert(tail, probs_spec, "the ensemble arithmetic"), "tail/"))
        model = _join(onnx, parts, n, tail is not None, size, k, mask)
        path = folder / name
        if model.ByteSize() > 1_900_000_000:  # protobuf's 2 GB limit: weights beside the graph
            onnx.save_model(
                model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.data"
            )
        else:
            onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))  # by path: also for a model with external data
        files.append(name)
    return files


def _release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:  # glibc keeps freed memory in its arenas; hand it back so the next conversion can use it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _join(onnx, parts: list, n: int, has_tail: bool, size: int, classes: int = 1, mask: str = "uint8"):
    """One graph from the prefixed network models (input ``n{j}/images``, output ``n{j}/p``)
    and the tail (input ``tail/member_probabilities``): every network reads ``images``, their
    outputs are concatenated into ``member_probabilities``, which the tail reads."""
    helper = onnx.helper
    rename = {f"n{j}/{INPUT}": INPUT for j in range(n)}
    rename[f"tail/{MEMBERS_OUTPUT}"] = MEMBERS_OUTPUT
    nodes, initializers, value_info = [], [], []
    for part in parts:
        for node in part.graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            nodes.append(node)
        initializers.extend(part.graph.initializer)
        value_info.extend(part.graph.value_info)
    concat = helper.make_node("Concat", [f"n{j}/p" for j in range(n)], [MEMBERS_OUTPUT], axis=3, name="segx/stack")
    networks_end = sum(len(p.graph.node) for p in parts[:n])
    nodes.insert(networks_end, concat)  # topological order: networks, stack, tail
    t = onnx.TensorProto
    outputs = [helper.make_tensor_value_info(MEMBERS_OUTPUT, t.FLOAT, ["batch", size, size, n * classes])]
    if has_tail:
        names = {o.name.removeprefix("tail/"): o.name for o in parts[-1].graph.output}
        nodes.append(helper.make_node("Identity", [names["probability"]], ["probability"], name="segx/probability"))
        nodes.append(helper.make_node("Identity", [names["mask"]], ["mask"], name="segx/mask"))
        shape = ["batch", size, size] + ([classes] if classes > 1 else [])
        outputs += [
            helper.make_tensor_value_info("probability", t.FLOAT, shape),
            helper.make_tensor_value_info("mask", t.UINT16 if mask == "uint16" else t.UINT8, ["batch", size, size]),
        ]
    graph = helper.make_graph(
        nodes,
        "segx_ensemble",
        [helper.make_tensor_value_info(INPUT, t.UINT8, ["batch", size, size, 3])],
        outputs,
        initializer=initializers,
        value_info=value_info,
    )
    opsets: dict[str, int] = {}
    for part in parts:
        for entry in part.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], producer_name="segx (tf2onnx)"
    )
    model.ir_version = max(p.ir_version for p in parts)
    return model


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# The names segx writes at the top of an export folder (a hand-edited or foreign manifest cannot
# make overwrite=true delete anything else): the model, the record, the manifest.
_OWN_TOP = re.compile(r"saved_model|ensemble\.json|model(?:-view\d+)?\.onnx(?:\.data)?")


def _own_path(rel: object) -> bool:
    """Whether a manifest entry names a path segx may have written: a relative POSIX path whose
    first part is one of segx's names (:data:`_OWN_TOP`), below ``saved_model/`` only."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts) or _OWN_TOP.fullmatch(parts[0]) is None:
        return False
    return len(parts) == 1 or parts[0] == "saved_model"


def _contents(folder: Path, rel: str = "") -> list[dict]:
    """Every file and folder under ``folder`` but its manifest, sorted: ``{"path", "bytes"}`` for
    a file, ``{"path", "folder": true}`` for a folder (a SavedModel's ``assets/`` may be empty)."""
    out: list[dict] = []
    for entry in sorted(os.scandir(folder / rel if rel else folder), key=lambda e: e.name):
        path = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_dir(follow_symlinks=False):
            out += [{"path": path, "folder": True}, *_contents(folder, path)]
        elif path != MANIFEST:
            out.append({"path": path, "bytes": entry.stat(follow_symlinks=False).st_size})
    return out


def _owned(manifest: dict) -> tuple[dict[str, int | None], set[str], set[str]]:
    """What an earlier export's manifest says segx wrote: (files -> bytes, folders, folders whose
    whole tree is segx's). A manifest with ``contents`` lists every file and folder; an older one
    only the top-level names (``files``, ``ensemble.json`` and, for an ONNX model too large for
    one file, the ``.data`` file segx writes beside it), anything deeper accepted only inside
    its ``saved_model`` folder."""
    contents = manifest.get("contents")
    if contents is None:
        names = [f for f in manifest.get("files") or [] if isinstance(f, str)]
        names += [f"{f}.data" for f in names if f.endswith(".onnx")] + ["ensemble.json"]
        names = [f for f in names if _own_path(f)]
        trees = {"saved_model"} & set(names)
        return {f: None for f in names if f not in trees}, set(), trees
    if not isinstance(contents, list) or not all(isinstance(c, dict) for c in contents):
        raise ValueError("contents is not a list of entries")
    files: dict[str, int | None] = {}
    folders: set[str] = set()
    for entry in contents:
        rel, size = entry.get("path"), entry.get("bytes")
        if not _own_path(rel):
            continue  # not a name segx writes: whatever lies there is refused as foreign
        if entry.get("folder") is True:
            folders.add(rel)
        elif isinstance(size, int) and not isinstance(size, bool):
            files[rel] = size
    return files, folders, set()


def _foreign(output_dir: Path, files: dict, folders: set, trees: set, rel: str = "") -> tuple[str, str] | None:
    """The first path under ``output_dir`` (sorted, depth first) that the earlier export did not
    write, and why; None when every file and folder there is its own."""
    for entry in sorted(os.scandir(output_dir / rel if rel else output_dir), key=lambda e: e.name):
        path = f"{rel}/{entry.name}" if rel else entry.name
        inside = "/" in path and path.split("/")[0] in trees  # an older manifest's saved_model/...
        if entry.is_symlink():
            return path, "is a link, which segx never writes,"
        if entry.is_dir():
            if path not in folders and path not in trees and not inside:
                return f"{path}/", f"was not written by segx ({MANIFEST} does not list it)"  # a folder
            found = _foreign(output_dir, files, folders, trees, path)
            if found is not None:
                return found
        elif not entry.is_file():
            return path, "is not a file segx wrote"
        elif path == MANIFEST or inside:
            continue
        elif path not in files:
            return path, f"was not written by segx ({MANIFEST} does not list it)"
        elif files[path] is not None and entry.stat().st_size != files[path]:
            return path, (
                f"is not the file segx wrote there ({entry.stat().st_size} bytes; {MANIFEST} records {files[path]})"
            )
    return None


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
            owned = _owned(read_manifest(output_dir))
        except (SegxError, ValueError, TypeError, AttributeError):
            raise SegxError(
                f"output_dir={shown(output_dir)} is not a segx export ({shown(path)} is not a segx "
                "export manifest this segx reads); overwrite=true replaces only an earlier export: "
                "choose a new or empty output_dir"
            ) from None
        found = _foreign(output_dir, *owned)
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


def _move_into_place(stage: Path, output_dir: Path) -> None:
    """Rename the finished export over ``output_dir`` (an earlier export is moved aside first and
    removed after: a reader sees the old export or the new one, never a mixture)."""
    old = staging.set_aside(output_dir, PARTIAL_PREFIX) if output_dir.exists() else None
    try:
        os.replace(stage, output_dir)
    except BaseException:
        if old is not None:  # the earlier export goes back where it was
            os.replace(old / output_dir.name, output_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_ensemble(
    record: EnsembleRecord,
    model_paths: Sequence,
    output_dir: str | os.PathLike,
    fmt: str,
    opset: int = DEFAULT_OPSET,
    tta: str | None = None,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
) -> dict:
    """Export the ensemble of ``record`` (members' model folders ``model_paths``, a list per
    cross-validated member, as :class:`EnsemblePredictor` takes them) into ``output_dir``.

    Written into a partial folder beside ``output_dir`` and renamed into place when complete, so a
    failure leaves ``output_dir`` as it was. Before the rename the export is loaded back with its
    runtime and run on a random batch against the TensorFlow graph it came from: the largest
    difference of ``member_probabilities`` is recorded in ``export.json`` (``check``). Returns the
    manifest (``export.json``: record, graphs with their signatures, files, sizes, versions)."""
    fmt = check_format(fmt)
    tta = tta or record.tta
    if fmt == "onnx":
        opset = check_opset(opset)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    graphs = plan_graphs(record, model_paths)
    if not graphs:
        raise SegxError("every member of this ensemble has weight 0; nothing to export")
    weights = record.weights
    if weights.denominator > MAX_DENOMINATOR:
        raise SegxError(f"weight_denominator {weights.denominator} is over {MAX_DENOMINATOR}")
    started = time.perf_counter()
    tables = {b: preprocessing_table(b) for b in {n["backbone"] for g in graphs for n in g["networks"]}}

    from segx.backend import tf
    from segx.models import load_member

    models = [load_member(n["path"]) for g in graphs for n in g["networks"]]
    module = tf.Module()
    # Only the variables are tracked, not the Keras models: a model attribute makes the SavedModel
    # serialise every layer's own traced functions too (here: saving 21 s -> 4.4 s and loading
    # 8.7 s -> 0.8 s for two Unets), which the signatures never call.
    module.network_variables = [v for model in models for v in model.variables]
    functions = _build_functions(graphs, models, tables, record, tta)
    entered = False  # the staging folder exists (else output_dir's parent cannot be written at all)
    try:
        with staging.staged_folder(output_dir.parent, PARTIAL_PREFIX) as stage:
            entered = True
            files = (
                _save_savedmodel(module, functions, stage)
                if fmt == "savedmodel"
                else _save_onnx(functions, graphs, stage, opset, n_classes(record), mask_dtype(record))
            )
            (stage / "ensemble.json").write_text(json.dumps(record.to_json(), indent=2))
            manifest = _manifest(record, graphs, fmt, opset if fmt == "onnx" else None, tta, files, source)
            manifest["check"] = _check_export(stage, manifest, functions)
            manifest["sizes_bytes"] = {f: _folder_bytes(stage / f) for f in files}
            manifest["export_seconds"] = round(time.perf_counter() - started, 2)
            manifest["contents"] = _contents(stage)  # what overwrite=true may replace, and nothing else
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
            check_output_dir(output_dir, overwrite)  # someone may have written there meanwhile
            _move_into_place(stage, output_dir)
    except OSError as exc:
        if entered:
            raise  # a full disk is said in one line by the command; anything else is a bug
        from segx.data.io import shown

        raise SegxError(
            f"cannot write into {shown(output_dir.parent)} ({exc.strerror or exc}); choose a writable output_dir"
        ) from None
    return manifest


def _manifest(
    record: EnsembleRecord,
    graphs: list[dict],
    fmt: str,
    opset: int | None,
    tta: str,
    files: list[str],
    source: Mapping[str, Any] | None,
) -> dict:
    from importlib import metadata

    import segx

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    single = len(graphs) == 1
    written = record.to_json()  # the manifest repeats the record's labels and post-processing as written
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "runtime": fmt,
        "opset": opset,
        "tta": tta,
        "segx_version": segx.__version__,
        "packages": {k: version(k) for k in ("tensorflow", "tf-keras", "tf2onnx", "onnx", "onnxruntime")},
        "source": dict(source or {}),
        "threshold": record.threshold,
        **({"labels": written["labels"]} if written.get("labels") else {}),
        "postprocess": written.get("postprocess", {}),
        "weights": {"counts": list(record.weights.counts), "denominator": record.weights.denominator},
        "graphs": [
            {
                "name": g["name"],
                "file": files[i] if fmt == "onnx" else files[0],
                "view": g["view"],
                "networks": [{k: n[k] for k in ("member", "fold", "backbone", "run_id")} for n in g["networks"]],
                **signature(g, single, n_classes(record), mask_dtype(record)),
            }
            for i, g in enumerate(graphs)
        ],
        "files": files,
        "notes": "probability and mask are at the network's input size, before post-processing (several "
        "classes: mask holds data.labels' mask values, as segx.predict writes them); "
        "segx.predict backend=" + fmt + " runs the resize or sliding-window loop around the model",
    }


def _check_export(folder: Path, manifest: dict, functions: dict) -> dict:
    """Run the saved export with its own runtime on a random batch and compare with the graph it
    was made from (what the benchmark and the tests compare end to end, in miniature)."""
    from segx.backend import tf

    rng = np.random.default_rng(0)
    worst = 0.0
    for graph in manifest["graphs"]:
        size = int(graph["view"]["size"])
        batch = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        expected = functions[graph["name"]]["whole"](tf.constant(batch))[MEMBERS_OUTPUT].numpy()
        got = load_graph(folder, manifest, graph).run(batch)[MEMBERS_OUTPUT]
        worst = max(worst, float(np.abs(got - expected).max()))
    return {"member_probabilities_max_abs_diff": worst, "batch": "2 random uint8 images per graph"}


# ---------------------------------------------------------------------------------------------
# Loading and running (onnxruntime, or TensorFlow for a SavedModel)


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


class ExportedGraph:
    """One exported graph with its runtime: ``run(images)`` takes uint8 (B, S, S, 3) and returns
    the outputs of its signature as numpy arrays. A wrong dtype, shape or channel count is one
    line naming what the graph takes."""

    def __init__(self, graph: dict, runner, runtime: str):
        self.graph, self.runtime, self._runner = graph, runtime, runner
        self.size = int(graph["view"]["size"])
        self.outputs = list(graph["outputs"])

    def check(self, images: Any) -> np.ndarray:
        images = np.asarray(images)
        want = f"uint8 images of shape (B, {self.size}, {self.size}, 3)"
        if images.dtype != np.uint8:
            raise SegxError(f"{self.graph['name']}: dtype {images.dtype}; the exported model takes {want}")
        if images.ndim != 4 or images.shape[1:3] != (self.size, self.size) or images.shape[0] < 1:
            raise SegxError(
                f"{self.graph['name']}: shape {images.shape}; the exported model takes {want} "
                "(segx.predict resizes or tiles images of any size)"
            )
        if images.shape[3] != 3:
            raise SegxError(f"{self.graph['name']}: {images.shape[3]} channels; the exported model takes {want}")
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


def load_graph(folder: str | os.PathLike, manifest: dict, graph: dict, threads: int | None = None) -> ExportedGraph:
    folder = Path(folder)
    if manifest["runtime"] == "onnx":
        path = folder / graph["file"]
        if not path.is_file():
            raise SegxError(f"{path} is missing; export the ensemble again")
        return ExportedGraph(graph, _onnx_runner(path, threads), "onnx")
    if not (folder / "saved_model").is_dir():
        raise SegxError(f"{folder}/saved_model is missing; export the ensemble again")
    return ExportedGraph(graph, _savedmodel_runner(folder, graph["name"]), "savedmodel")


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
        self.swap = None  # flip TTA (and its class swap) runs inside the exported graph
        self.class_post = class_postprocess(record)
        self.threshold = None if self.labels is not None else float(record.threshold)
        regions = record.region_thresholds
        self.region_thresholds = (
            [float(regions[r]) for r in self.labels.region_names]
            if self.labels is not None and self.labels.regions
            else None
        )
        self.post = record.postprocess
        self.tta = manifest["tta"]
        if tta not in (None, self.tta):
            raise SegxError(
                f"this export runs tta={self.tta} inside its graph; export again with tta={tta} "
                "(python -m segx.export ... tta=...) or drop the tta override"
            )
        self.models = None
        self.graphs = [load_graph(folder, manifest, g, threads) for g in manifest["graphs"]]

    def member_probs(self, images: Sequence[np.ndarray]) -> list[Ragged | None]:
        images = list(images)
        per_network: dict[tuple[int, int | None], Ragged] = {}
        for graph in self.graphs:
            names = [f"n{j}" for j in range(len(graph.graph["networks"]))]

            k = 1 if self.labels is None else self.labels.n_outputs

            def predict(batch: np.ndarray, graph=graph, names=names, k=k) -> dict[str, np.ndarray]:
                probs = graph.run(batch, [MEMBERS_OUTPUT])[MEMBERS_OUTPUT]
                if k == 1:
                    return {name: probs[..., j] for j, name in enumerate(names)}
                return {name: probs[..., j * k : (j + 1) * k] for j, name in enumerate(names)}

            maps: dict[str, list[np.ndarray]] = {name: [] for name in names}
            for case in predict_cases(images, View.from_dict(graph.graph["view"]), predict):
                for name in names:
                    maps[name].append(quantize(case[name]))
            for name, net in zip(names, graph.graph["networks"], strict=True):
                per_network[(net["member"], net["fold"])] = Ragged.from_list(maps[name], np.uint8)
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
    """An :class:`ExportedPredictor` for an export folder (as written by :func:`export_ensemble`)."""
    return ExportedPredictor(folder, tta, threads)
