"""One TTA rule for segx.ensemble, segx.predict and segx.export; probability maps whose names cannot
collide; an output folder that a failed run leaves as it was; label values from every runtime;
region uncertainty without NaN (issue 27). Hand-made members (one small network saved as segx
saves one) in a real MLflow store: no training, real TensorFlow, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from tests.conftest import compose_config, store_overrides
from tests.helpers import run_in_process, seed_store

SMALL = {"decoder_filters": [16, 8, 8, 8, 8]}
VIEW = {"mode": "resize", "size": 32, "resize_mode": "resize"}
LUNGS = {"names": ["background", "left_lung", "right_lung"], "values": [0, 1, 2]}
REGIONS = {  # nested regions, BraTS-like values: class c (index 3) is stored as 4
    "names": ["background", "a", "b", "c"],
    "values": [0, 1, 2, 4],
    "regions": [["whole", ["a", "b", "c"]], ["core", ["b", "c"]], ["inner", ["c"]]],
}


def _member(folder: Path, labels: dict, extra: dict | None = None) -> Path:
    """A 3-output mobilenetv2 Unet at 32 px whose last layer answers the same everywhere: logits
    (+40, -40, +40), so softmax (0.5, 0, 0.5) and sigmoids (1, 0, 1), exactly (certain regions)."""
    from segx.backend import keras
    from segx.member_spec import MemberSpec
    from segx.models import Head, build_model, save_member

    keras.utils.set_random_seed(0)
    regions = bool(labels.get("regions"))
    model = build_model("unet", "mobilenetv2", 32, head=Head(3, "sigmoid" if regions else "softmax"), **SMALL)
    last = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, _ = last.get_weights()
    last.set_weights([kernel * 0, np.array([40.0, -40.0, 40.0], np.float32)])
    spec = {"arch": "unet", "backbone": "mobilenetv2", "image_size": 32, "options": SMALL, "labels": labels}
    return save_member(model, folder, MemberSpec.from_json({**spec, **(extra or {})}))


def _record(member_run: str, labels: dict, tta: str = "none") -> dict:
    regions = labels.get("regions")
    return {
        "format": "segx-ensemble",
        "version": 4,
        "tta": tta,
        "threshold": None,
        "labels": labels,
        **({"region_thresholds": {name: 0.5 for name, _ in regions}} if regions else {}),
        "postprocess": {},
        "weight_denominator": 1,
        "members": [
            {"run_id": member_run, "backbone": "mobilenetv2", "arch": "unet", "view": VIEW, "weight": 1.0,
             "weight_count": 1}
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Ensemble runs of hand-made members: left/right lungs without a flip swap, the same with
    one, two classes named so that a stem and a class make another's name, and regions whose
    members' flip cannot be undone (``no_flip_tta``, as segx.train writes it)."""
    from segx import tracking

    tmp = tmp_path_factory.mktemp("rules")
    out = seed_store(tmp / "out")  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    experiment = tracking.experiment_id(client, "segx", str(out / "mlartifacts"))

    def run(name: str, role: str, folder: Path, artifact: str | None) -> str:
        run_id = tracking.start_run(client, experiment, name, {tracking.ROLE: role})
        with tracking.run_scope(client, run_id):
            tracking.log_artifact(client, run_id, folder, artifact)
        return run_id

    def ensemble(name: str, labels: dict, spec_extra: dict | None = None) -> str:
        member = run(f"{name}-member", "member", _member(tmp / name / "model", labels, spec_extra), "model")
        record_dir = tmp / name / "record"
        record_dir.mkdir()
        (record_dir / "ensemble.json").write_text(json.dumps(_record(member, labels)))
        return run(name, "ensemble", record_dir, None)

    return {
        "out": out,
        "tmp": tmp,
        "client": client,
        "lungs": ensemble("lungs", LUNGS),
        "lungs_swapped": ensemble("lungs-swapped", {**LUNGS, "flip_swap": [0, 2, 1]}),
        "names": ensemble("names", {"names": ["background", "a_b", "b"], "values": [0, 1, 2]}),
        "regions": ensemble("regions", REGIONS, {"no_flip_tta": True}),
    }


def _inputs(folder: Path, stems=("x", "x_a")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem in stems:
        cv2.imwrite(str(folder / f"{stem}.png"), rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    return folder


def _in_process(capfd, store, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module>`` on the store, run in this process (tests/helpers.py run_in_process)."""
    return run_in_process(capfd, [module, *store_overrides(store["out"]), *args], cwd=store["tmp"])


def _snapshot(folder: Path) -> dict[str, object]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else "folder" for p in sorted(folder.rglob("*"))
    }


def _predict(store, run: str, inputs: Path, output: Path, *extra: str) -> int:
    from segx.workflows.predict import run_predict

    overrides = [*store_overrides(store["out"]), f"ensemble_run_id={run}", f"input_dir={inputs}"]
    return run_predict(compose_config("predict", [*overrides, f"output_dir={output}", *extra]))


# -- one TTA rule -----------------------------------------------------------------------------


def test_predict_and_export_refuse_flip_tta_on_sided_classes_without_a_swap(store, tmp_path, capfd):
    inputs = _inputs(tmp_path / "in")
    line = (
        "segx: error: tta=flip mirrors the images, and classes left_lung, right_lung name a side, but the "
        "members were trained without data.flip_swap"
    )
    predicted = _in_process(
        capfd, store, "segx.predict", f"ensemble_run_id={store['lungs']}", f"input_dir={inputs}",
        f"output_dir={tmp_path / 'pred'}", "tta=flip",
    )  # fmt: skip
    assert predicted.returncode == 2, predicted.stderr
    assert len(predicted.stderr.strip().splitlines()) == 1 and predicted.stderr.startswith(line), predicted.stderr
    assert not (tmp_path / "pred").exists()
    exported = _in_process(
        capfd, store, "segx.export", f"ensemble_run_id={store['lungs']}", "format=savedmodel",
        f"output_dir={tmp_path / 'export'}", "tta=flip", "log=false",
    )  # fmt: skip
    assert exported.returncode == 2, exported.stderr
    assert len(exported.stderr.strip().splitlines()) == 1 and exported.stderr.startswith(line), exported.stderr
    assert not (tmp_path / "export").exists()


def test_flip_tta_of_regions_whose_flip_cannot_be_undone_is_refused_by_predict_and_export(store, tmp_path):
    from segx.workflows.export import run_export

    message = r"tta=flip cannot be undone for this ensemble's regions \(whole, core, inner\).*use tta=none"
    with pytest.raises(SegxError, match=message):
        _predict(store, store["regions"], _inputs(tmp_path / "in"), tmp_path / "pred", "tta=flip")
    overrides = [*store_overrides(store["out"]), f"ensemble_run_id={store['regions']}", "log=false"]
    with pytest.raises(SegxError, match=message):
        run_export(compose_config("export", [*overrides, f"output_dir={tmp_path / 'export'}", "tta=flip"]))
    assert not (tmp_path / "pred").exists() and not (tmp_path / "export").exists()


def test_untuned_but_valid_flip_tta_only_warns_in_predict_and_export(store, tmp_path, capsys):
    from segx.workflows.export import run_export

    run = store["lungs_swapped"]  # searched with tta=none; the swap makes flip right, only untuned
    assert _predict(store, run, _inputs(tmp_path / "in"), tmp_path / "pred", "tta=flip") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "warning" in line] == [
        f"segx: warning: ensemble {run}: tuned for tta=none (weights, thresholds and post-processing chosen on "
        "that pipeline); running tta=flip, which its recorded scores do not describe (drop the tta override to "
        "run as tuned)"
    ]
    overrides = [*store_overrides(store["out"]), f"ensemble_run_id={run}", "log=false", "format=savedmodel"]
    manifest = run_export(compose_config("export", [*overrides, f"output_dir={tmp_path / 'export'}", "tta=flip"]))
    assert manifest["tta"] == "flip"
    assert f"segx: warning: ensemble {run}: tuned for tta=none" in capsys.readouterr().err


# -- output names and the output folder -------------------------------------------------------


def test_probability_maps_of_a_stem_and_class_that_make_another_name_are_two_files(store, tmp_path):
    """Stem x with class a_b and stem x_a with class b both gave x_a_b.png: one map was lost."""
    output = tmp_path / "pred"
    assert _predict(store, store["names"], _inputs(tmp_path / "in"), output, "save_probabilities=true") == 2
    maps = {f"probabilities/{stem}/{c}.png" for stem in ("x", "x_a") for c in ("a_b", "b")}
    assert maps <= {p.relative_to(output).as_posix() for p in output.rglob("*.png")}
    for stem in ("x", "x_a"):  # softmax (0.5, 0, 0.5) everywhere: a_b is 0, b is 128
        assert (cv2.imread(str(output / "probabilities" / stem / "a_b.png"), cv2.IMREAD_UNCHANGED) == 0).all()
        assert (cv2.imread(str(output / "probabilities" / stem / "b.png"), cv2.IMREAD_UNCHANGED) == 128).all()
    manifest = json.loads((output / "segx-manifest.json").read_text())
    assert manifest["complete"] and maps <= set(manifest["files"])
    # Replaced without maps: the case folders go with their files.
    _predict(store, store["names"], tmp_path / "in", output, "overwrite=true")
    assert not (output / "probabilities").exists()


def test_a_file_that_cannot_be_replaced_leaves_the_output_folder_as_it_was(store, tmp_path):
    """An earlier prediction's mask turned into a folder: the run is refused in one line and
    output_dir is exactly as before (it was left half-replaced, its manifest 'complete: false')."""
    inputs = _inputs(tmp_path / "in")
    output = tmp_path / "pred"
    _predict(store, store["names"], inputs, output)
    (output / "masks" / "x_a.png").unlink()
    (output / "masks" / "x_a.png").mkdir()
    (output / "masks" / "x_a.png" / "notes.txt").write_text("mine")
    before = _snapshot(output)
    with pytest.raises(SegxError, match=r"masks/x_a.png is a folder where segx writes a file; move it away"):
        _predict(store, store["names"], inputs, output, "overwrite=true", "overlays=false")
    assert _snapshot(output) == before


@pytest.mark.parametrize("earlier", [True, False])
def test_a_failure_while_moving_into_place_undoes_every_step(tmp_path, earlier):
    """The move into place fails half-way (a staged file is missing): the earlier prediction's
    files and manifest are back, the new ones and the folders made for them are gone."""
    from segx.data import staging
    from segx.inference.folder import MANIFEST, PARTIAL_PREFIX, _commit

    output = tmp_path / "pred"
    old = ["masks/a.png", "masks/b.png", "overlays/a.png", "probabilities/a/c.png"] if earlier else []
    for rel in old:
        (output / rel).parent.mkdir(parents=True, exist_ok=True)
        (output / rel).write_bytes(f"old {rel}".encode())
    if earlier:
        (output / MANIFEST).write_text(json.dumps({"format": "segx-prediction", "complete": True, "files": old}))
    before = _snapshot(output) if earlier else None
    new = ["masks/a.png", "masks/b.png", "probabilities/b/c.png", "probabilities/b/d.png", "uncertainty/a.png"]
    with pytest.raises(FileNotFoundError), staging.staged_folder(output, PARTIAL_PREFIX) as stage:
        for rel in new[:-2]:  # probabilities/b/d.png and uncertainty/a.png were never written
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(f"new {rel}".encode())
        _commit(stage, output, new, old)
    if earlier:
        assert _snapshot(output) == before
    else:
        assert not output.exists()


# -- export: an unwritable folder, label values from every runtime ---------------------------


def test_export_into_a_folder_it_cannot_write_is_one_line(store, tmp_path, capfd):
    (tmp_path / "a-file").write_text("not a folder")
    proc = _in_process(
        capfd, store, "segx.export", f"ensemble_run_id={store['lungs']}", "format=savedmodel", "log=false",
        f"output_dir={tmp_path / 'a-file' / 'export'}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"segx: error: output_dir={tmp_path / 'a-file' / 'export'} lies under {tmp_path / 'a-file'}, a file; "
        "choose another output_dir"
    ]


def test_an_export_that_cannot_make_its_staging_folder_is_one_line(tmp_path):
    """A folder the process may not write (here /sys, which root cannot write either): the
    staging folder's OSError was a traceback."""
    from segx.inference.export_graph import export_ensemble
    from segx.inference.export_plan import ExportSettings

    target = Path("/sys") / f"segx-test-{os.getpid()}" / "export"
    try:
        target.parent.mkdir()
    except OSError:
        pass
    else:
        target.parent.rmdir()
        pytest.skip("/sys is writable here")
    record = _record("m", LUNGS)
    with pytest.raises(SegxError, match=r"^(cannot write into /sys|cannot write into /sys/segx-test-\d+) \("):
        export_ensemble(
            EnsembleRecord.from_json(record), [_member(tmp_path / "m", LUNGS)], target, ExportSettings("savedmodel")
        )


def test_every_runtime_gives_label_values_not_class_indices(store, tmp_path):
    """Region c is stored as 4: segx.predict, the pyfunc model and the export's mask output all
    say 4 (the graph and the pyfunc model said 3, its class index)."""
    import mlflow

    from segx import tracking
    from segx.inference.export_plan import ExportSettings
    from segx.inference.export_runtime import load_exported
    from segx.tracking.pyfunc_model import log_pyfunc
    from segx.workflows.export import export_run

    run, client = store["regions"], store["client"]
    inputs = _inputs(tmp_path / "in", ("x",))
    _predict(store, run, inputs, tmp_path / "pred")
    written = cv2.imread(str(tmp_path / "pred" / "masks" / "x.png"), cv2.IMREAD_UNCHANGED)
    assert (written == 4).all()  # sigmoids (1, 0, 1): whole paints a, inner paints c over it
    for fmt in ("savedmodel", "onnx"):
        export_run(client, run, tmp_path / fmt, tmp_path / "work", ExportSettings(fmt), log=False)
        graph = load_exported(tmp_path / fmt).graphs[0]
        assert graph.graph.outputs["mask"]["dtype"] == "uint8"
        mask = graph.run(np.zeros((1, 32, 32, 3), np.uint8))["mask"]
        assert mask.dtype == np.uint8 and (mask == 4).all(), fmt
    record = json.loads(Path(tracking.download(client, run, "ensemble.json", tmp_path / "r")).read_text())
    uri = log_pyfunc(client, run, EnsembleRecord.from_json(record))
    image = cv2.cvtColor(cv2.imread(str(inputs / "x.png")), cv2.COLOR_BGR2RGB)
    masks = mlflow.pyfunc.load_model(uri).predict([image])
    assert np.array_equal(masks[0], written)


def test_region_uncertainty_of_certain_regions_is_zero_without_warnings(tmp_path):
    """Sigmoids of exactly 1: clip(p, 1e-12, 1 - 1e-12) in float32 is 1.0, and the entropy was
    0 * log2(0): NaN, with numpy's divide-by-zero warnings."""
    from segx.inference.predictor import EnsemblePredictor

    predictor = EnsemblePredictor(EnsembleRecord.from_json(_record("m", REGIONS)), [_member(tmp_path / "m", REGIONS)])
    image = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (prediction,) = predictor.predict([image])
    assert np.isfinite(prediction.uncertainty).all() and (prediction.uncertainty < 1e-5).all()


# -- the command line --------------------------------------------------------------------------


def test_a_group_the_command_does_not_use_is_one_line(tmp_path):
    """`segx-predict backbone=resnet18` (shell completion offers every group) was Hydra's
    multi-line error and exit status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "segx.predict", "backbone=resnet18", *store_overrides(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "segx: error: backbone=resnet18: conf/predict.yaml has no backbone group (this command does not choose "
        "one); drop backbone=resnet18"
    ]


def test_an_ensemble_with_flip_tta_of_regions_that_cannot_be_undone_says_why_not_retrain(store, tmp_path):
    # segx.train tags such a region member's labels with no_flip_tta and caches no flip TTA; the
    # ensemble's member loader says the flip cannot be undone (what is true), not "retrain it".
    from segx import tracking
    from segx.tracking import tags as tag_names
    from segx.workflows.members import member_from_run

    client = store["client"]
    experiment = tracking.experiment_id(client, "segx", str(store["out"] / "mlartifacts"))
    labels = {**REGIONS, "no_flip_tta": True}
    run_id = tracking.start_run(client, experiment, "regions-member", {tracking.ROLE: "member"})
    tracking.set_tags(client, run_id, {tag_names.LABELS: json.dumps(labels)})
    client.set_terminated(run_id, "FINISHED")
    with pytest.raises(SegxError, match=r"ensemble.tta=flip cannot be undone for this ensemble's regions") as e:
        member_from_run(client, client.get_run(run_id), tmp_path, "flip")
    assert "retrain" not in str(e.value)
