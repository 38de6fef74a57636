"""Building an ensemble's export and saving it (TensorFlow): the graphs that
:mod:`segx.inference.export_plan` plans, as one SavedModel or one ONNX model per view, written
whole into the export folder or not at all. What the graphs hold: :mod:`segx.inference.export_plan`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from segx.backend import tf
from segx.data import staging
from segx.ensembling.probs import MAX_DENOMINATOR
from segx.ensembling.record import EnsembleRecord
from segx.ensembling.task import task_for
from segx.errors import SegxError
from segx.inference import owned
from segx.inference.export_plan import (
    DEFAULT_OPSET,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    INPUT,
    MANIFEST,
    MEMBERS_OUTPUT,
    PARTIAL_PREFIX,
    ExportSettings,
    GraphPlan,
    PlannedNetwork,
    check_format,
    check_opset,
    check_output_dir,
    graph_plans,
    mask_dtype,
    n_classes,
    plan_graphs,
    signature,
)
from segx.inference.export_runtime import load_graph


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


def _build_functions(graphs: list[GraphPlan], models: list, tables: dict, record: EnsembleRecord, tta: str):
    """Per graph: the whole graph as one ``tf.function`` (what the SavedModel signs, bit for bit
    segx's network calls), and for ONNX one ``tf.function`` per network (uint8 images ->
    (B, S, S, 1)) and the ensemble tail (member probabilities -> probability, mask), which are
    converted one at a time and joined (:func:`_save_onnx`)."""
    weights = record.weights
    k = n_classes(record)
    decision = task_for(record.labels).graph_decision(record)
    threshold_cut, regions = decision.threshold_cut, decision.region_cuts
    # Several classes: the mask output in data.labels' values.
    values = None if decision.values is None else (list(decision.values), mask_dtype(record))
    swap = None if record.flip_swap is None else list(record.flip_swap)  # flip TTA's mirrored pass, several classes
    single = len(graphs) == 1
    functions = {}
    index = 0
    for graph in graphs:
        size = graph.view.size
        nets = [(models[index + j], tables[net.backbone]) for j, net in enumerate(graph.networks)]
        index += len(nets)
        image_spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)
        probs_spec = tf.TensorSpec([None, size, size, len(nets) * k], tf.float32, name=MEMBERS_OUTPUT)
        tail = _tail(graph.networks, weights, threshold_cut, k, regions, values) if single else None
        functions[graph.name] = {
            "whole": tf.function(_whole(nets, tta, tail, k, swap), input_signature=[image_spec], autograph=False),
            "networks": [
                tf.function(_one(model, table, tta, k, swap), input_signature=[image_spec], autograph=False)
                for model, table in nets
            ],
            "tail": None if tail is None else tf.function(tail, input_signature=[probs_spec], autograph=False),
        }
    return functions


# Closures, not default arguments: tf.function would turn numpy defaults into tensors.


def _network_probs(model, table, tta: str, images, batched: bool = False, classes: int = 1, swap=None):
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


def _one(model, table, tta: str, classes: int = 1, swap=None):
    def network(images):
        p = _network_probs(model, table, tta, images, batched=True, classes=classes, swap=swap)
        return {"p": p[..., None] if classes == 1 else p}

    return network


def _whole(nets: list, tta: str, tail, classes: int = 1, swap=None):
    def whole(images):
        each = [_network_probs(model, table, tta, images, classes=classes, swap=swap) for model, table in nets]
        probs = tf.stack(each, axis=-1) if classes == 1 else tf.concat(each, axis=-1)
        return {MEMBERS_OUTPUT: probs, **(tail(probs) if tail is not None else {})}

    return whole


def _tail(
    networks: Sequence[PlannedNetwork], weights, threshold_cut: int | None, classes: int = 1, regions=None, values=None
):
    def tail(probs):
        if classes == 1:
            each = [probs[..., j] for j in range(len(networks))]
        else:
            each = [probs[..., j * classes : (j + 1) * classes] for j in range(len(networks))]
        out = _ensemble_outputs(each, networks, weights, threshold_cut, regions)
        if values is not None:  # several classes: class indices -> the data's own mask values
            table, dtype = values
            index = tf.cast(out["mask"], tf.int32)
            out["mask"] = tf.gather(tf.constant(table, tf.int32), index)
            out["mask"] = tf.cast(out["mask"], tf.uint16 if dtype == "uint16" else tf.uint8)
        return out

    return tail


def _ensemble_outputs(
    probs: list, nets: Sequence[PlannedNetwork], weights, threshold_cut: int | None, regions=None
) -> dict:
    """segx's arithmetic on the network grid: quantize (round half to even, as numpy's rint),
    integer fold means, the integer weighted score, the exact threshold (several classes,
    ``threshold_cut`` None: the label of the highest class score, ties to the lowest index,
    written out so that no runtime's argmax tie rule is relied on)."""
    quantized = [tf.cast(tf.clip_by_value(tf.round(p * 255.0), 0.0, 255.0), tf.int32) for p in probs]
    by_member: dict[int, list] = {}
    for q, net in zip(quantized, nets, strict=True):
        by_member.setdefault(net.member, []).append(q)
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
    signatures = {name: fns["whole"].get_concrete_function() for name, fns in functions.items()}
    tf.saved_model.save(module, str(folder / "saved_model"), signatures=signatures)
    return ["saved_model"]


def _save_onnx(
    functions: dict, graphs: list[GraphPlan], folder: Path, opset: int, classes: int = 1, mask: str = "uint8"
) -> list[str]:
    """Each network, then the ensemble tail, converted on its own and joined into one ONNX graph
    per view: tf2onnx needs some 60-70 times a network's weights in memory while it converts it
    (peak 3.9 GB for a resnet18 Unet, 9.5 GB for a resnet50 one, measured here), so converting the
    whole ensemble at once needed the sum over networks (7.5 GB for resnet18 + mobilenetv2 +
    efficientnetb0; 4.5 GB one at a time) and would not fit a cross-validated ensemble at all."""
    import tf2onnx

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
        name = "model.onnx" if graph.name == "serving_default" else f"model-{graph.name}.onnx"
        size, n = graph.view.size, len(graph.networks)
        k = classes
        image_spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)
        parts = []
        for j, (function, net) in enumerate(zip(functions[graph.name]["networks"], graph.networks, strict=True)):
            what = f"backbone {net.backbone} (member {net.member}" + (
                f", fold {net.fold})" if net.fold is not None else ")"
            )
            parts.append(onnx.compose.add_prefix(convert(function, image_spec, what), f"n{j}/"))
        tail = functions[graph.name]["tail"]
        if tail is not None:
            probs_spec = tf.TensorSpec([None, size, size, n * k], tf.float32, name=MEMBERS_OUTPUT)
            parts.append(onnx.compose.add_prefix(convert(tail, probs_spec, "the ensemble arithmetic"), "tail/"))
        model = _join(parts, n, tail is not None, size, k, mask)
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


def _join(parts: list, n: int, has_tail: bool, size: int, classes: int = 1, mask: str = "uint8"):
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


def export_ensemble(
    record: EnsembleRecord,
    model_paths: Sequence,
    output_dir: str | os.PathLike,
    settings: ExportSettings,
    source: Mapping[str, Any] | None = None,
) -> dict:
    """Export the ensemble of ``record`` (members' model folders ``model_paths``, a list per
    cross-validated member, as :class:`~segx.inference.predictor.EnsemblePredictor` takes them)
    into ``output_dir``, as ``settings`` say.

    Written into a partial folder beside ``output_dir`` and renamed into place when complete, so a
    failure leaves ``output_dir`` as it was. Before the rename the export is loaded back with its
    runtime and run on a random batch against the TensorFlow graph it came from: the largest
    difference of ``member_probabilities`` is recorded in ``export.json`` (``check``). Returns the
    manifest (``export.json``: record, graphs with their signatures, files, sizes, versions)."""
    fmt = check_format(settings.fmt)
    tta = settings.tta or record.tta
    opset, overwrite = settings.opset, settings.overwrite
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
    tables = {b: preprocessing_table(b) for b in {n.backbone for g in graphs for n in g.networks}}

    from segx.models import load_member

    models = [load_member(n.path) for g in graphs for n in g.networks]
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
            manifest["contents"] = owned.contents(stage, MANIFEST)  # what overwrite=true may replace, and nothing else
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
            check_output_dir(output_dir, overwrite)  # someone may have written there meanwhile
            owned.replace_folder(stage, output_dir, PARTIAL_PREFIX)
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
    graphs: list[GraphPlan],
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
            replace(
                g,
                file=files[i] if fmt == "onnx" else files[0],
                **signature(g, single, n_classes(record), mask_dtype(record)),
            ).to_json()
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
    rng = np.random.default_rng(0)
    worst = 0.0
    for graph in graph_plans(manifest, folder / MANIFEST):
        size = graph.view.size
        batch = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        expected = functions[graph.name]["whole"](tf.constant(batch))[MEMBERS_OUTPUT].numpy()
        got = load_graph(folder, manifest, graph).run(batch)[MEMBERS_OUTPUT]
        worst = max(worst, float(np.abs(got - expected).max()))
    return {"member_probabilities_max_abs_diff": worst, "batch": "2 random uint8 images per graph"}
