"""segx.export: the ensemble as one SavedModel or ONNX model, predicting what segx predicts.

Real TF members, real tf2onnx/onnxruntime, a real MLflow SQLite store, real subprocesses and a
real ``mlflow models serve`` on a loopback port. What is checked:

- the exported graph's arithmetic (preprocessing lookup, flip TTA, cross-validated fold means,
  integer weights, threshold) against :class:`EnsemblePredictor` on images of odd sizes, for
  both formats, and its in-graph ``probability``/``mask`` on images at the network's size;
- ``segx.export`` + ``segx.predict backend=...`` against ``backend=keras`` for a resize member
  and a patch (sliding-window) member, with the export logged as a child run with signatures;
- one-line errors before anything is written, and no partial folder left when interrupted;
- ``overwrite=true`` replacing only a folder that holds nothing but an earlier export's own files
  (``export.json`` lists them), refusing before any work and leaving anything else intact;
- the ensemble's pyfunc model behind ``mlflow models serve``: masks back, and a 400 with the
  reason for a wrong dtype, shape or channel count.

SavedModel reproduces TensorFlow's network outputs bit for bit, so its masks are segx.predict's
exactly. ONNX Runtime's kernels differ from TensorFlow's by ~1e-5, so a member's uint8
probability may move by one step; its masks must then equal segx's wherever the ensemble score
is not within that step of the threshold, and its probabilities be within 1/255.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from tests.conftest import CONF, ROOT, SMALL_DECODER, compose_config, store_overrides
from tests.helpers import copy_store, ensemble_run, run_in_process

FORMATS = ("savedmodel", "onnx")


# ---------------------------------------------------------------------------------------------
# helpers


SMALL = {"decoder_filters": SMALL_DECODER}  # small networks: tf2onnx needs 60-70x their weights


def _member_folder(folder: Path, backbone: str, size: int, seed: int, arch: str = "unet", options=None) -> Path:
    """A member saved as segx saves one, its last layer rescaled so that the logits on random
    images have mean 0 and standard deviation 1.5: probabilities spread over (0, 1), neither
    saturated nor all at 0.5 (what random initialisation gives), as a trained member's do."""
    from segx.backend import keras
    from segx.member_spec import MemberSpec
    from segx.models import build_model, predict_probs, save_member

    options = dict(options or {})
    keras.utils.set_random_seed(seed)
    model = build_model(arch, backbone, size, **options)
    last = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, bias = last.get_weights()
    probe = np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    p = np.clip(predict_probs(model, probe, backbone).astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p / (1 - p))
    scale = 1.5 / max(float(logits.std()), 1e-6)
    last.set_weights([kernel * scale, (bias - float(logits.mean())) * scale])
    spec = MemberSpec.from_json({"arch": arch, "backbone": backbone, "image_size": size, "options": options})
    return save_member(model, folder, spec)


def _record(members: list[dict], counts: list[int], tta: str, threshold: float) -> dict:
    return {
        "format": "segx-ensemble",
        "version": 3,
        "tta": tta,
        "threshold": threshold,
        "postprocess": {},
        "weight_denominator": sum(counts),
        "members": [
            {**m, "arch": "unet", "weight": k / sum(counts), "weight_count": k}
            for m, k in zip(members, counts, strict=True)
        ],
    }


def _compare(reference, exported, fmt: str, score_ref=None, score_exp=None, denominator: int = 1) -> int:
    """Masks equal (SavedModel: everywhere; ONNX: wherever the reference score is not within
    one quantisation step of every member of the threshold) and probabilities within 1/255.
    Returns how many mask pixels differ."""
    differ = 0
    for i, (a, b) in enumerate(zip(reference, exported, strict=True)):
        assert a.mask.shape == b.mask.shape
        assert np.abs(a.probability - b.probability).max() <= 1 / 255 + 1e-7, i
        diff = a.mask != b.mask
        differ += int(diff.sum())
        if fmt == "savedmodel":
            assert not diff.any(), f"image {i}: {int(diff.sum())} mask pixels differ"
            assert np.array_equal(a.probability, b.probability), i
            assert np.array_equal(a.uncertainty, b.uncertainty), i
        elif diff.any():
            # The score moved by at most one uint8 step per member (<= denominator in all).
            moved = np.abs(score_ref.values[i].astype(np.int64) - score_exp.values[i].astype(np.int64))
            assert moved.max() <= denominator, i
            assert np.all(moved[diff] > 0), f"image {i}: a mask pixel differs where the score did not move"
    return differ


def _images(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in [(32, 32, 3), (50, 90, 3), (71, 40, 3), (20, 33, 3)]]


# ---------------------------------------------------------------------------------------------
# request checks (numpy only)


def test_request_images_are_checked_with_the_reason():
    from segx.inference.export_plan import check_request_images, names_of

    ok = check_request_images(np.zeros((2, 5, 7, 3), np.int64))  # what JSON integers become
    assert [im.dtype for im in ok] == [np.uint8, np.uint8] and ok[0].shape == (5, 7, 3)
    assert check_request_images([np.zeros((4, 4, 1), np.uint8)])[0].shape == (4, 4)  # one channel: grayscale
    named = {"a": np.zeros((3, 3, 4), np.int32), "b": np.zeros((6, 2), np.uint8)}
    assert [im.shape for im in check_request_images(named)] == [(3, 3, 4), (6, 2)] and names_of(named) == ["a", "b"]
    for bad, reason in [
        (np.zeros((1, 4, 4, 3), np.float64), "dtype float64"),
        (np.zeros((1, 4, 4, 2), np.uint8), "2 channels"),
        (np.zeros((4, 4), np.uint8), "shape (4, 4)"),
        (np.zeros((1, 4, 4, 3, 1), np.uint8), "shape (1, 4, 4, 3, 1)"),
        (np.full((1, 2, 2, 3), 300), "outside 0..255"),
        (np.zeros((1, 0, 4, 3), np.uint8), "empty"),
        ([], "no image"),
        ("pixels", "got str"),
        (np.zeros((1, 2, 2, 3), bool), "dtype bool"),
    ]:
        with pytest.raises(SegxError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            check_request_images(bad)


def test_a_written_manifest_reads_as_graph_plans_and_writes_back_byte_for_byte(tmp_path):
    """``fixtures/export_v1_two_views.json``: the ``export.json`` segx wrote (before the plan was
    typed) for a savedmodel export of two views, a resize member as two fold models and a patch
    member (a weight-0 member left out). Its graphs read as GraphPlans and, written back, give
    the manifest byte for byte; a malformed graph entry is one line naming the manifest, the
    entry and the fix, from graph_plans and from the runtime that loads the export."""
    from segx.data.view import View
    from segx.inference.export_plan import MANIFEST, GraphPlan, PlannedNetwork, graph_plans, read_manifest
    from segx.inference.export_runtime import load_exported

    text = (Path(__file__).parent / "fixtures" / "export_v1_two_views.json").read_text()
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / MANIFEST).write_text(text)
    manifest = read_manifest(folder)
    plans = graph_plans(manifest, folder / MANIFEST)
    assert [(g.name, g.file, g.view) for g in plans] == [
        ("view0", "saved_model", View("resize", 32, "pad")),
        ("view1", "saved_model", View("patch", 32, "resize", 0.5, 0.25)),
    ]
    assert plans[0].networks[1] == PlannedNetwork(member=0, fold=1, backbone="mobilenetv2", run_id="f1")
    assert [(n.member, n.fold) for g in plans for n in g.networks] == [(0, 0), (0, 1), (1, None)]
    assert json.dumps({**manifest, "graphs": [g.to_json() for g in plans]}, indent=2) == text
    assert [GraphPlan.from_json(g.to_json(), "again") for g in plans] == plans

    member = {"backbone": "mobilenetv2", "view": {"mode": "resize", "size": 32, "resize_mode": "pad"}}
    patch = {"mode": "patch", "size": 32, "scale": 0.5, "overlap": 0.25}
    record = _record(
        [{**member, "run_id": "cv", "folds": ["f0", "f1"]}, {**member, "run_id": "p", "view": patch}],
        [2, 1],
        "none",
        0.5,
    )
    (folder / "ensemble.json").write_text(json.dumps(EnsembleRecord.from_json(record).to_json()))

    def malformed(graph: dict) -> None:
        graph["view"]["size"] = "32"

    def bad_fold(graph: dict) -> None:
        graph["networks"][1]["fold"] = -1

    def no_file(graph: dict) -> None:
        del graph["file"]

    def no_member_output(graph: dict) -> None:
        graph["outputs"] = {}

    for change, reason in [
        (malformed, "graphs[1]: view.size='32' must be a whole number of pixels"),
        (bad_fold, "graphs[1]: networks[1]: fold=-1 must be a fold index or null"),
        (no_file, "graphs[1]: file=None must be a name"),
        (no_member_output, "graphs[1]: outputs has no member_probabilities"),
    ]:
        broken = json.loads(text)
        broken["graphs"][1]["networks"].append(dict(broken["graphs"][1]["networks"][0], run_id="q"))
        change(broken["graphs"][1])
        (folder / MANIFEST).write_text(json.dumps(broken, indent=2))
        for read in (lambda: graph_plans(read_manifest(folder), folder / MANIFEST), lambda: load_exported(folder)):
            with pytest.raises(SegxError) as info:
                read()
            assert str(info.value) == f"{folder / MANIFEST}: {reason}; export the ensemble again"
    (folder / MANIFEST).write_text(json.dumps({**manifest, "graphs": [[]]}))
    with pytest.raises(SegxError, match=r"graphs\[0\] holds list, not a graph \(a JSON object\); export the"):
        load_exported(folder)


def test_every_export_option_is_checked_before_models_load(tmp_path):
    from segx.inference.export_plan import check_format, check_opset, check_output_dir

    with pytest.raises(SegxError, match="format=tflite is not an export format"):
        check_format("tflite")
    for opset in (12, 19, 30, "17", True):
        with pytest.raises(SegxError, match=r"tf2onnx 1\.\d+\.\d+ cannot produce it .*opsets 13\.\.18"):
            check_opset(opset)
    assert check_opset(17) == 17
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(SegxError, match="not empty; choose a new output_dir or pass overwrite=true"):
        check_output_dir(tmp_path / "taken", False)
    with pytest.raises(SegxError, match="not a segx export"):
        check_output_dir(tmp_path / "taken", True)  # overwrite replaces only an earlier export


# ---------------------------------------------------------------------------------------------
# the graph's arithmetic, without MLflow


# Slow: three networks converted to both formats; both formats predicting what segx predicts (a
# resize and a patch member, through segx.export and segx.predict) stay fast below.
@pytest.mark.slow
def test_exports_reproduce_the_predictor_with_folds_flip_tta_and_exact_weights(tmp_path):
    """A cross-validated mobilenetv2 member (two fold models: the integer-rounded fold mean; its
    preprocessing x/127.5 - 1 as a lookup) weighted 2/3 and an efficientnetb0 member (ImageNet
    mean/std as a lookup) weighted 1/3, flip TTA, threshold 0.45, on images of odd sizes resized
    to 32 px: both exports predict what EnsemblePredictor does; on 32 px images the in-graph
    probability and mask are its score and mask."""
    from segx.ensembling.probs import binarize
    from segx.inference.export_graph import export_ensemble
    from segx.inference.export_plan import ExportSettings, GraphPlan, read_manifest
    from segx.inference.export_runtime import load_exported
    from segx.inference.predictor import EnsemblePredictor

    folds = [_member_folder(tmp_path / f"fold{k}", "mobilenetv2", 32, k, options=SMALL) for k in range(2)]
    other = _member_folder(tmp_path / "effb0", "efficientnetb0", 32, 5, options=SMALL)
    view = {"mode": "resize", "size": 32, "resize_mode": "resize"}
    record = _record(
        [
            {"run_id": "cv", "backbone": "mobilenetv2", "view": view, "folds": ["f0", "f1"]},
            {"run_id": "m", "backbone": "efficientnetb0", "view": view},
        ],
        [2, 1],
        "flip",
        0.45,
    )
    paths = [folds, other]
    images = _images()
    record = EnsembleRecord.from_json(record)
    reference = EnsemblePredictor(record, paths)
    expected = reference.predict(images)
    score_ref, _ = reference.score(images)
    assert 0 < sum(int(p.mask.sum()) for p in expected) < sum(p.mask.size for p in expected)  # not trivial
    square = [im for im in images if im.shape[:2] == (32, 32)]
    for fmt in FORMATS:
        manifest = export_ensemble(record, paths, tmp_path / fmt, ExportSettings(fmt))
        assert read_manifest(tmp_path / fmt) == manifest
        # The typed plan reads the manifest's graphs and writes them back key for key, in order.
        written = [GraphPlan.from_json(g, "export.json").to_json() for g in manifest["graphs"]]
        assert json.dumps(written, indent=2) == json.dumps(manifest["graphs"], indent=2)
        assert manifest["tta"] == "flip" and [g["name"] for g in manifest["graphs"]] == ["serving_default"]
        assert [(n["member"], n["fold"]) for n in manifest["graphs"][0]["networks"]] == [(0, 0), (0, 1), (1, None)]
        assert manifest["graphs"][0]["inputs"] == {"images": {"dtype": "uint8", "shape": [-1, 32, 32, 3]}}
        assert manifest["graphs"][0]["outputs"]["member_probabilities"]["shape"] == [-1, 32, 32, 3]
        assert not list(tmp_path.glob(".segx-partial-export-*"))
        predictor = load_exported(tmp_path / fmt)
        got = predictor.predict(images)
        score_exp, _ = predictor.score(images)
        _compare(expected, got, fmt, score_ref, score_exp, 3)
        # The in-graph ensemble on an image already at the network's size.
        outputs = predictor.graphs[0].run(np.stack(square))
        ref_mask = binarize(reference.score(square)[0], record.threshold)
        exp_mask = binarize(predictor.score(square)[0], record.threshold)
        assert np.array_equal(outputs["mask"][0].astype(bool), exp_mask[0])  # the graph = segx's arithmetic
        assert np.array_equal(outputs["probability"][0], predictor.score(square)[0].probability()[0])
        if fmt == "savedmodel":
            assert np.array_equal(outputs["mask"][0].astype(bool), ref_mask[0])
        with pytest.raises(
            SegxError, match=r"shape \(1, 33, 32, 3\); the exported model takes uint8 images of shape \(B, 32, 32, 3\)"
        ):
            predictor.graphs[0].run(np.zeros((1, 33, 32, 3), np.uint8))
        with pytest.raises(SegxError, match="dtype float32"):
            predictor.graphs[0].run(np.zeros((1, 32, 32, 3), np.float32))
        with pytest.raises(SegxError, match="runs tta=flip inside its graph"):
            load_exported(tmp_path / fmt, tta="none")


# ---------------------------------------------------------------------------------------------
# segx.export and segx.predict backend=... on a real store


@pytest.fixture
def export_store(native_store, tmp_path):
    """A private copy of the session's native store (tests/conftest.py: a patch member and a
    resize member, their searched ensemble with its pyfunc model, and an equal-weight ensemble
    run of both): every test here writes (exports logged as child runs, ensemble runs)."""
    from segx import tracking

    out = copy_store(native_store["out"], tmp_path / "store")
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    return {**native_store, "out": out, "client": client}


def _inputs(store, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((store["root"] / "train_images").glob("*.png"))[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_export_logs_a_child_run_and_predict_backends_write_segx_masks(export_store, tmp_path):
    from mlflow.models import get_model_info

    from segx import tracking
    from segx.inference.export_plan import GraphPlan
    from segx.info import describe
    from segx.workflows.export import run_export
    from segx.workflows.predict import run_predict

    s = export_store
    base = [*store_overrides(s["out"]), f"ensemble_run_id={s['equal']}"]
    inputs = _inputs(s, tmp_path / "scans")
    run_predict(
        compose_config(
            "predict", [*base, f"input_dir={inputs}", f"output_dir={tmp_path / 'keras'}", "save_probabilities=true"]
        )
    )
    client = s["client"]
    # What a killed export leaves (its process is gone): the next export beside it removes it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = s["out"] / "exports" / s["equal"] / f".segx-partial-export-{dead.pid}-x"
    stale.mkdir(parents=True)
    for fmt in FORMATS:
        manifest = run_export(compose_config("export", [*base, f"format={fmt}"]))
        assert not stale.exists()
        folder = s["out"] / "exports" / s["equal"] / fmt
        assert (folder / "export.json").is_file() and (folder / "ensemble.json").is_file()
        assert [g["view"]["mode"] for g in manifest["graphs"]] == ["patch", "resize"]  # one graph per view
        assert [g["name"] for g in manifest["graphs"]] == ["view0", "view1"]
        assert "mask" not in manifest["graphs"][0]["outputs"]  # views differ: no in-graph ensemble
        # The typed plan reads the written graphs and writes them back key for key, in order.
        written = [GraphPlan.from_json(g, "export.json").to_json() for g in manifest["graphs"]]
        assert json.dumps(written, indent=2) == json.dumps(manifest["graphs"], indent=2)
        # Logged: a child run of the ensemble, its files, one logged model per graph with the signature.
        ensemble = client.get_run(s["equal"])
        child = ensemble.data.tags[f"segx.export.{fmt}"]
        run = client.get_run(child)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == s["equal"]
        assert run.data.tags["segx.role"] == "export" and run.data.params["format"] == fmt
        listed = {a.path for a in client.list_artifacts(child, "export")}
        assert {"export/export.json", "export/ensemble.json"} <= listed
        models = client.search_logged_models(
            experiment_ids=[s["experiment"]], filter_string=f"source_run_id = '{child}'"
        )
        assert sorted(m.name for m in models) == [f"export-{fmt}-view0", f"export-{fmt}-view1"]
        for model in models:
            assert model.model_type == "segx-export" and model.tags["segx.model_artifact"] == f"runs:/{child}/export"
            graph = next(g for g in manifest["graphs"] if model.name.endswith(g["name"]))
            signature = get_model_info(f"models:/{model.model_id}").signature
            assert [(i.name, i.type, i.shape) for i in signature.inputs.inputs] == [
                ("images", np.dtype(np.uint8), tuple(graph["inputs"]["images"]["shape"]))
            ]
            assert [o.name for o in signature.outputs.inputs] == ["member_probabilities"]
        info = describe(client, s["equal"])
        assert f"export {fmt}: run {child} (FINISHED" in info
        # segx.predict through the export: the same files, the same masks.
        out = tmp_path / fmt
        run_predict(
            compose_config(
                "predict",
                [*base, f"input_dir={inputs}", f"output_dir={out}", f"backend={fmt}", "save_probabilities=true"],
            )
        )
        assert json.loads((out / "ensemble.json").read_text())["backend"] == fmt
        differ = 0
        for path in sorted((tmp_path / "keras" / "masks").glob("*.png")):
            keras_mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            mask = cv2.imread(str(out / "masks" / path.name), cv2.IMREAD_GRAYSCALE)
            keras_prob = cv2.imread(str(tmp_path / "keras" / "probabilities" / path.name), cv2.IMREAD_GRAYSCALE)
            prob = cv2.imread(str(out / "probabilities" / path.name), cv2.IMREAD_GRAYSCALE)
            assert np.abs(keras_prob.astype(int) - prob.astype(int)).max() <= 1, path.name
            if fmt == "savedmodel":
                assert np.array_equal(keras_mask, mask), path.name
            differ += int((keras_mask != mask).sum())
        print(f"{fmt}: {differ} mask pixels differ from backend=keras")
        assert differ <= 0.001 * sum(
            cv2.imread(str(p)).shape[0] * cv2.imread(str(p)).shape[1] for p in inputs.glob("*.png")
        )
    assert tracking.get_run(client, s["equal"]).data.tags.keys() >= {"segx.export.onnx", "segx.export.savedmodel"}


def test_export_and_predict_refuse_in_one_line_and_leave_nothing(export_store, tmp_path, capfd):
    """A run without a record, a member run deleted, a member without model files, an opset the
    converter cannot write, an export that does not exist: one line each, nothing written."""
    from segx import tracking
    from segx.workflows.export import run_export
    from segx.workflows.predict import run_predict

    s = export_store
    client = s["client"]
    searched_record = json.loads(
        Path(tracking.download(client, s["searched"], "ensemble.json", tmp_path / "r")).read_text()
    )
    no_record = ensemble_run(client, s["experiment"], None, "no-record")
    ghost = ensemble_run(
        client,
        s["experiment"],
        {
            **searched_record,
            "members": [{**searched_record["members"][0], "run_id": "0" * 32}, searched_record["members"][1]],
        },
        "ghost-member",
    )
    # A FINISHED run without a model artifact named as a member: the no-record ensemble run.
    no_model = ensemble_run(
        client,
        s["experiment"],
        {
            **searched_record,
            "members": [{**searched_record["members"][0], "run_id": no_record}, searched_record["members"][1]],
        },
        "no-model",
    )
    cases = [
        (no_record, [], f"ensemble run '{no_record}' has no ensemble.json record"),
        (ghost, [], f"needs member run {'0' * 32} .*does not exist"),
        (no_model, [], f"member run {no_record} has no model files"),
        (s["equal"], ["opset=19"], "cannot produce it"),
        (s["members"][0], [], "is not a segx ensemble"),
    ]
    for run_id, extra, message in cases:
        output = tmp_path / f"out-{run_id[:6]}"
        cfg = compose_config(
            "export", [*store_overrides(s["out"]), f"ensemble_run_id={run_id}", f"output_dir={output}", *extra]
        )
        with pytest.raises(SegxError, match=message):
            run_export(cfg)
        assert not output.exists() and not list(tmp_path.glob(".segx-partial-export-*"))
    runs_before = len(client.search_runs([s["experiment"]]))
    with pytest.raises(
        SegxError, match=f"ensemble '{s['searched']}' has no onnx export; make one with python -m segx.export"
    ):
        run_predict(
            compose_config(
                "predict",
                [
                    *store_overrides(s["out"]),
                    f"ensemble_run_id={s['searched']}",
                    "backend=onnx",
                    f"input_dir={_inputs(s, tmp_path / 'in')}",
                    f"output_dir={tmp_path / 'o'}",
                ],
            )
        )
    assert not (tmp_path / "o").exists() and len(client.search_runs([s["experiment"]])) == runs_before
    # The command line: one line, exit status 2.
    proc = run_in_process(
        capfd, ["segx.export", f"ensemble_run_id={no_record}", *store_overrides(s["out"]), "format=savedmodel"]
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"segx: error: ensemble run '{no_record}' has no ensemble.json record "
        "(it ended before logging it); rebuild the ensemble with python -m segx.ensemble"
    ]


def test_interrupted_export_leaves_no_partial_folder(export_store, tmp_path):
    s = export_store
    output = tmp_path / "exports" / "onnx"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segx.export",
            f"ensemble_run_id={s['equal']}",
            *store_overrides(s["out"]),
            f"output_dir={output}",
            "log=false",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "exports").glob(".segx-partial-export-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "segx: interrupted by SIGINT" in err
    # Nothing left: no partial folder, no export, not even the parent folder this export made.
    assert not (tmp_path / "exports").exists()


def _tree(folder: Path) -> dict[str, object]:
    """Every path under ``folder``: a file's bytes, a link's target, or "folder"."""
    out: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else "folder" if path.is_dir() else path.read_bytes()
    return out


def _not_fetched(*args, **kwargs):
    raise AssertionError("the ensemble was fetched: output_dir should have been refused before any work")


def test_overwrite_refuses_a_folder_whose_export_json_is_not_segx_and_leaves_it_intact(export_store, tmp_path, capfd):
    """Issue 21: another tool's output folder that happens to hold an export.json (and the user's
    annotations) is refused in one line, exit status 2, before anything is downloaded or loaded."""
    from segx import tracking

    s = export_store
    record = json.loads(Path(tracking.download(s["client"], s["equal"], "ensemble.json", tmp_path / "r")).read_text())
    fresh = ensemble_run(s["client"], s["experiment"], record, "ensemble-overwrite-foreign")  # never fetched before
    folder = tmp_path / "L"
    (folder / "annotations").mkdir(parents=True)
    (folder / "export.json").write_text('{"tool":"x"}\n')
    (folder / "annotations" / "a.json").write_text("work\n")
    before = _tree(folder)
    proc = run_in_process(
        capfd,
        [
            "segx.export",
            f"ensemble_run_id={fresh}",
            *store_overrides(s["out"]),
            f"output_dir={folder}",
            "overwrite=true",
        ],
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"segx: error: output_dir={folder} is not a segx export ({folder}/export.json is not a segx export manifest "
        "this segx reads); overwrite=true replaces only an earlier export: choose a new or empty output_dir"
    ]
    assert _tree(folder) == before  # byte for byte
    assert not (s["out"] / "cache" / "ensembles" / fresh).exists()  # refused before the ensemble was fetched
    assert not list(tmp_path.glob(".segx-partial-export-*"))


# Slow: four SavedModel exports; overwrite=true refusing a folder that is not its own export stays fast (above).
@pytest.mark.slow
def test_overwrite_replaces_only_an_export_holding_nothing_but_its_own_files(export_store, tmp_path, monkeypatch):
    """export.json lists every file and folder the export wrote (with sizes); overwrite=true
    refuses, naming it, a file the user added at the top or inside saved_model/ (also when it
    appears while the new export is being built), and replaces a clean earlier export."""
    import segx.workflows.export
    from segx.inference import export_graph
    from segx.inference.export_plan import check_output_dir, read_manifest
    from segx.workflows.export import run_export

    s = export_store
    folder = tmp_path / "E"
    base = [
        *store_overrides(s["out"]),
        f"ensemble_run_id={s['equal']}",
        "format=savedmodel",
        f"output_dir={folder}",
        "log=false",
    ]
    first = run_export(compose_config("export", base))
    listed = {c["path"]: c.get("bytes", "folder") for c in first["contents"]}
    on_disk = {rel: len(v) if isinstance(v, bytes) else v for rel, v in _tree(folder).items() if rel != "export.json"}
    assert listed == on_disk and "saved_model/saved_model.pb" in listed and "ensemble.json" in listed
    assert read_manifest(folder) == first

    again = [*base, "overwrite=true"]
    monkeypatch.setattr(segx.workflows.export, "fetch_ensemble", _not_fetched)
    for added in ("notes.txt", "saved_model/variables/notes.txt"):
        (folder / added).write_text("the user's\n")
        before = _tree(folder)
        with pytest.raises(SegxError) as err:
            run_export(compose_config("export", again))
        assert str(err.value) == (
            f"{folder}/{added} was not written by segx (export.json does not list it) and "
            "overwrite=true would delete it; move that file out or choose a new output_dir"
        )
        assert _tree(folder) == before
        (folder / added).unlink()

    # An export.json from before `contents`: its top-level names, and anything inside saved_model/.
    manifest_bytes = (folder / "export.json").read_bytes()
    old = {k: v for k, v in first.items() if k != "contents"}
    (folder / "export.json").write_text(json.dumps(old))
    (folder / "saved_model" / "assets" / "vocab.txt").write_text("inside what segx wrote\n")
    check_output_dir(folder, True)
    (folder / "notes.txt").write_text("the user's\n")
    with pytest.raises(SegxError, match=f"{folder}/notes.txt was not written by segx"):
        check_output_dir(folder, True)
    (folder / "notes.txt").unlink()
    (folder / "saved_model" / "assets" / "vocab.txt").unlink()
    (folder / "export.json").write_bytes(manifest_bytes)
    monkeypatch.undo()

    # A file written while the new export is being built: the check just before the move refuses it.
    check = export_graph._check_export

    def check_and_intrude(stage, manifest, functions):
        (folder / "late.txt").write_text("written meanwhile\n")
        return check(stage, manifest, functions)

    monkeypatch.setattr(export_graph, "_check_export", check_and_intrude)
    with pytest.raises(SegxError, match=f"{folder}/late.txt was not written by segx"):
        run_export(compose_config("export", again))
    assert (folder / "late.txt").is_file() and (folder / "export.json").read_bytes() == manifest_bytes
    assert not list(tmp_path.glob(".segx-partial-export-*"))
    (folder / "late.txt").unlink()
    monkeypatch.undo()

    # A clean earlier export is replaced.
    second = run_export(compose_config("export", again))
    assert read_manifest(folder) == second and (folder / "export.json").read_bytes() != manifest_bytes
    assert {c["path"] for c in second["contents"]} == set(_tree(folder)) - {"export.json"}
    assert not list(tmp_path.glob(".segx-partial-export-*"))


# ---------------------------------------------------------------------------------------------
# mlflow models serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_pyfunc_answers_masks_and_400_with_the_reason(export_store, tmp_path):
    from segx.workflows.predict import load_ensemble

    s = export_store
    client = s["client"]
    uri = client.get_run(s["searched"]).data.tags["segx.pyfunc_uri"]
    port = _free_port()
    # The server starts `uvicorn` by name: the venv's bin folder must be on PATH (as when activated).
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{s['out']}/mlflow.db",
        PYTHONUNBUFFERED="1",
        SEGX_SERVE_MAX_REQUEST_MB="2",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not answer /ping in 300 s"
            time.sleep(1)
        images = [
            cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
            for p in sorted((s["root"] / "train_images").glob("*.png"))[:3]
        ]
        _, predictor = load_ensemble(client, s["searched"], tmp_path / "rebuild")
        expected = [p.mask.astype(np.uint8) for p in predictor.predict(images)]
        # A batch of one size as an array, and images of different sizes by name.
        status, body = _post(port, {"inputs": np.stack([images[0], images[0]]).tolist()})
        assert status == 200, body
        assert np.array_equal(np.asarray(body["predictions"], np.uint8), np.stack([expected[0], expected[0]]))
        status, body = _post(port, {"inputs": {"a": images[1].tolist(), "b": images[2].tolist()}})
        assert status == 200, body
        assert np.array_equal(np.asarray(body["predictions"]["a"], np.uint8), expected[1])
        assert np.array_equal(np.asarray(body["predictions"]["b"], np.uint8), expected[2])
        for bad, reason in [
            ((images[0] / 255.0)[None].tolist(), "dtype float64"),
            (images[0][None, :, :, :2].tolist(), "2 channels"),
            (images[0][:, :, 0].tolist(), "an array of shape"),
            (None, "a single value (null?)"),
        ]:
            status, body = _post(port, {"inputs": bad})
            assert status == 400, body
            assert "segx: bad request" in body["message"] and reason in body["message"], body["message"][-500:]
            text = json.dumps(body)  # no install or artifact paths, no trace
            assert "stack_trace" not in body and "site-packages" not in text and str(ROOT) not in text, text[-1000:]
        # Over the stated size (2 MB here): refused before the body is read, in one line.
        started = time.monotonic()
        status, body = _post(port, {"inputs": np.zeros((1, 700, 700, 3), np.uint8).tolist()})
        assert status == 413 and "is over the 2 MB a request may hold" in body["message"], body
        assert time.monotonic() - started < 30
    finally:  # the server and its uvicorn worker: the whole process group this test started
        _stop_group(server, port)
        log.close()
    with pytest.raises(OSError):  # stopped: the port no longer answers
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)


def _stop_group(server: subprocess.Popen, port: int) -> None:
    """SIGTERM to the server's process group (mlflow and the uvicorn worker it runs), wait until
    the port is closed, SIGKILL what is left after 30 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0 and server.poll() is not None:
                return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# every backbone converts (slow)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone,arch",
    [
        *((p.stem, "unet") for p in sorted((CONF / "backbone").glob("*.yaml"))),
        ("resnet18", "fpn"),
        ("resnet18", "linknet"),
        ("resnet18", "pspnet"),
    ],
)
def test_every_backbone_converts_to_onnx(backbone, arch, tmp_path):
    """Each encoder of conf/backbone/ as a Unet (and resnet18 with every other decoder) converts
    with tf2onnx at the default opset, passes onnx.checker, and ONNX Runtime's output matches
    TensorFlow's on a check batch and through the predictor."""
    import yaml

    from segx.inference.export_graph import _release_memory, export_ensemble
    from segx.inference.export_plan import ExportSettings
    from segx.inference.export_runtime import load_exported
    from segx.inference.predictor import EnsemblePredictor
    from segx.models import clear_session

    clear_session()  # the previous case's networks and graphs (13 cases in one process)
    _release_memory()
    name = yaml.safe_load((CONF / "backbone" / f"{backbone}.yaml").read_text())["name"]
    size = 96 if name.startswith("inception") or arch == "pspnet" else 64
    folder = _member_folder(tmp_path / "m", name, size, 0, arch)
    view = {"mode": "resize", "size": size, "resize_mode": "resize"}
    record = _record([{"run_id": "r", "backbone": name, "view": view}], [1], "none", 0.5)
    record["members"][0]["arch"] = arch
    record = EnsembleRecord.from_json(record)
    manifest = export_ensemble(record, [folder], tmp_path / "onnx", ExportSettings("onnx"))
    assert manifest["check"]["member_probabilities_max_abs_diff"] < 1e-3
    images = _images()[:2]
    reference = EnsemblePredictor(record, [folder])
    exported = load_exported(tmp_path / "onnx")
    _compare(
        reference.predict(images),
        exported.predict(images),
        "onnx",
        reference.score(images)[0],
        exported.score(images)[0],
        1,
    )
