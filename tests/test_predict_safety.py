"""segx.predict never loses a user's file: output locations around the input folder, overwrite of
an earlier prediction, bad inputs found mid-run, names that are not UTF-8, EXIF orientation,
and the input checks that must fail before any model is loaded. Real ensemble, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from segx.errors import SegxError
from tests.conftest import ROOT, compose_config, store_overrides


def _predict(member_store, ensemble_record, inputs, output_dir, *extra, work=None):
    """run_predict on the session's tiny ensemble; ``work``: a fresh paths.output_dir, whose
    cache/ then shows whether the members were downloaded (loaded). Without one, a new folder
    in the session's temp folder: caches and Hydra's folder never go into the shared store."""
    import tempfile

    from segx.workflows.predict import run_predict

    if work is None:
        os.makedirs(os.environ["SEGX_OUTPUT_DIR"], exist_ok=True)
        work = tempfile.mkdtemp(prefix="predict-work-", dir=os.environ["SEGX_OUTPUT_DIR"])

    out, _ = member_store
    overrides = [
        *store_overrides(out),
        f"ensemble_run_id={ensemble_record.run_id}",
        f"input_dir={inputs}",
        f"output_dir={output_dir}",
        *extra,
    ]
    overrides.append(f"paths.output_dir={work}")
    return run_predict(compose_config("predict", overrides))


def _scans(folder: Path, synthetic_root: Path, n: int = 3, prefix: str = "scan") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((synthetic_root / "train_images").glob("*.png"))
    for i in range(n):
        shutil.copyfile(sources[i % len(sources)], folder / f"{prefix}{i}.png")
    return folder


def _snapshot(folder: Path) -> dict[bytes, bytes]:
    """Every file under ``folder`` (names as bytes) with its content."""
    found = {}
    for dirpath, _, names in os.walk(os.fsencode(folder)):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, os.fsencode(folder))] = fh.read()
    return found


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overwrite", ["false", "true"])
@pytest.mark.parametrize("where", ["same", "inside", "inside_new", "contains", "link_to_input", "via_linked_parent"])
def test_input_folder_survives_every_output_location(
    member_store, ensemble_record, synthetic_root, tmp_path, where, overwrite
):
    study = tmp_path / "study"
    inputs = _scans(study / "scans", synthetic_root)
    (study / "scans" / "notes.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(study / "scans")
    output = {
        "same": study / "scans",
        "inside": study / "scans",  # made below
        "inside_new": study / "scans" / "new" / "masks",  # does not exist yet
        "contains": study,  # the case: input_dir=S/masks output_dir=S overwrite=true
        "link_to_input": tmp_path / "link",
        "via_linked_parent": tmp_path / "link" / "pred",
    }[where]
    if where == "inside":
        output = study / "scans" / "pred"
        output.mkdir()
    before = _snapshot(study)
    with pytest.raises(SegxError, match=r"is the input folder|lies inside input_dir|contains input_dir"):
        _predict(member_store, ensemble_record, inputs, output, f"overwrite={overwrite}", work=tmp_path / "work")
    assert _snapshot(study) == before
    assert not (tmp_path / "work" / "cache").exists()  # refused before any model was fetched


def test_overwrite_replaces_an_earlier_prediction_as_a_whole(member_store, ensemble_record, synthetic_root, tmp_path):
    first = _scans(tmp_path / "first", synthetic_root, 3)
    pred = tmp_path / "pred"
    _predict(member_store, ensemble_record, first, pred, "save_probabilities=true")
    assert _files(pred / "masks") == {"scan0.png", "scan1.png", "scan2.png"}
    (pred / "notes.txt").write_text("mine")  # the user's own files beside segx's
    (pred / "masks" / "README.txt").write_text("mine too")

    second = _scans(tmp_path / "second", synthetic_root, 2, prefix="other")
    with pytest.raises(SegxError, match="is not empty"):
        _predict(member_store, ensemble_record, second, pred)
    assert _predict(member_store, ensemble_record, second, pred, "overwrite=true") == 2
    # Only the new prediction: no stale mask, overlay or probability map of the first run.
    assert _files(pred) == {
        "notes.txt",
        "masks/README.txt",
        "ensemble.json",
        "segx-manifest.json",
        "masks/other0.png",
        "masks/other1.png",
        "overlays/other0.png",
        "overlays/other1.png",
        "uncertainty/other0.png",
        "uncertainty/other1.png",
    }
    assert not (pred / "probabilities").exists()
    assert (pred / "notes.txt").read_text() == "mine" and (pred / "masks" / "README.txt").read_text() == "mine too"
    manifest = json.loads((pred / "segx-manifest.json").read_text())  # lists what segx wrote
    assert set(manifest["files"]) == _files(pred) - {"notes.txt", "masks/README.txt", "segx-manifest.json"}

    # A file segx did not write, where a new output would go, is refused and kept.
    (pred / "masks" / "scan0.png").write_bytes(b"the user's own mask")
    with pytest.raises(SegxError, match=r"masks/scan0\.png was not written by segx"):
        _predict(member_store, ensemble_record, first, pred, "overwrite=true")
    assert (pred / "masks" / "scan0.png").read_bytes() == b"the user's own mask"

    # A non-empty folder that is no segx prediction is refused even with overwrite=true.
    foreign = tmp_path / "foreign"
    (foreign / "masks").mkdir(parents=True)
    (foreign / "masks" / "scan0.png").write_bytes(b"ground truth")
    (foreign / "report.docx").write_bytes(b"thesis")
    before = _snapshot(foreign)
    with pytest.raises(SegxError, match="not a segx prediction folder"):
        _predict(member_store, ensemble_record, first, foreign, "overwrite=true")
    assert _snapshot(foreign) == before


def test_bad_tenth_input_leaves_no_partial_output_and_rerun_works(
    member_store, ensemble_record, synthetic_root, tmp_path
):
    inputs = _scans(tmp_path / "in", synthetic_root, 10)
    good = (inputs / "scan9.png").read_bytes()
    pred = tmp_path / "pred"

    # Truncated: found by the up-front check, before any model is loaded.
    (inputs / "scan9.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(SegxError, match=r"scan9\.png: PNG is truncated"):
        _predict(member_store, ensemble_record, inputs, pred, "batch_size=4", work=tmp_path / "work")
    assert not pred.exists() and not (tmp_path / "work" / "cache").exists()

    # Damaged inside (header and end intact): found only when decoded, after 8 masks were made.
    damaged = bytearray(good)
    start = damaged.index(b"IDAT") + 100
    damaged[start : start + 40] = bytes(40)
    (inputs / "scan9.png").write_bytes(bytes(damaged))
    with pytest.raises(SegxError, match=r"scan9\.png: image data is corrupt"):
        _predict(member_store, ensemble_record, inputs, pred, "batch_size=4")
    assert not pred.exists()  # cleanly undone: no masks, no empty folders to refuse a rerun

    # Over an earlier prediction with overwrite=true: the earlier one is left exactly as it was.
    earlier = _scans(tmp_path / "earlier", synthetic_root, 2, prefix="old")
    _predict(member_store, ensemble_record, earlier, pred)
    before = _snapshot(pred)
    with pytest.raises(SegxError, match=r"scan9\.png: image data is corrupt"):
        _predict(member_store, ensemble_record, inputs, pred, "batch_size=4", "overwrite=true")
    assert _snapshot(pred) == before

    # Leftovers of a killed run (its process is gone) do not block, and are removed.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pred / f".segx-partial-{dead.pid}-x" / "masks").mkdir(parents=True)
    (inputs / "scan9.png").write_bytes(good)
    assert _predict(member_store, ensemble_record, inputs, pred, "batch_size=4", "overwrite=true") == 10
    assert _files(pred / "masks") == {f"scan{i}.png" for i in range(10)}
    assert not [p for p in pred.iterdir() if p.name.startswith(".segx-partial")]


def test_non_utf8_file_name_round_trips_through_predict(member_store, ensemble_record, synthetic_root, tmp_path):
    inputs = _scans(tmp_path / "in", synthetic_root, 1)
    latin1 = b"caf\xe9.png"  # a Latin-1 name from an old zip archive: not valid UTF-8
    shutil.copyfile(inputs / "scan0.png", os.fsdecode(os.path.join(os.fsencode(inputs), latin1)))
    out, _ = member_store
    pred = tmp_path / "pred"
    command = [
        sys.executable,
        "-m",
        "segx.predict",
        *store_overrides(out),
        f"ensemble_run_id={ensemble_record.run_id}",
        f"input_dir={inputs}",
        f"output_dir={pred}",
        f"paths.output_dir={tmp_path / 'work'}",  # caches and Hydra's folder: not in the shared store
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"wrote 2 masks" in done.stdout
    for folder in ("masks", "overlays", "uncertainty"):
        assert set(os.listdir(os.fsencode(pred / folder))) == {latin1, b"scan0.png"}
    # Same picture, same mask.
    masks = [np.fromfile(os.path.join(os.fsencode(pred / "masks"), n), np.uint8) for n in (latin1, b"scan0.png")]
    assert np.array_equal(*(cv2.imdecode(m, cv2.IMREAD_UNCHANGED) for m in masks))


def test_exif_orientation_is_applied_to_images_masks_and_predictions(member_store, ensemble_record, tmp_path):
    from segx.data.io import read_image, read_mask, read_size

    raw = np.zeros((48, 80, 3), np.uint8)  # stored landscape, shown portrait (orientation 6)
    raw[:, :20] = 255  # a bright band on the stored left: on the displayed top
    inputs = tmp_path / "in"
    inputs.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(inputs / "photo.jpg", quality=100, exif=exif.tobytes())
    shown = np.asarray(ImageOps.exif_transpose(Image.open(inputs / "photo.jpg")))
    assert shown.shape == (80, 48, 3)
    assert np.array_equal(read_image(inputs / "photo.jpg"), shown)
    assert read_size(inputs / "photo.jpg") == (48, 80)  # (width, height) as displayed
    mask = read_mask(inputs / "photo.jpg", threshold=127)
    assert mask.shape == (80, 48) and mask[:15].all() and not mask[25:].any()

    _predict(member_store, ensemble_record, inputs, tmp_path / "pred")
    predicted = cv2.imdecode(np.fromfile(tmp_path / "pred" / "masks" / "photo.png", np.uint8), cv2.IMREAD_UNCHANGED)
    assert predicted.shape == (80, 48)


@pytest.mark.parametrize("case", ["input_is_file", "jpeg_named_png", "over_max_pixels"])
def test_bad_input_is_one_line_before_any_model_loads(member_store, ensemble_record, synthetic_root, tmp_path, case):
    inputs = _scans(tmp_path / "in", synthetic_root, 2)
    extra = []
    if case == "input_is_file":
        inputs = inputs / "scan0.png"
        message = (
            rf"input_dir=.*scan0\.png is a file, not a folder; point input_dir at the folder .*{tmp_path.name}/in\)"
        )
    elif case == "jpeg_named_png":
        cv2.imwrite(str(inputs / "scan1.jpg"), cv2.imread(str(inputs / "scan1.png")))
        (inputs / "scan1.jpg").replace(inputs / "scan1.png")
        message = r"scan1\.png: content is JPEG but the name ends \.png; rename it to scan1\.jpg"
    else:
        extra = ["max_pixels=1000"]
        message = (
            r"scan0\.png: header declares 64x64 pixels, over the limit of 1000; downscale the file or raise max_pixels$"
        )
    with pytest.raises(SegxError, match=message):
        _predict(member_store, ensemble_record, inputs, tmp_path / "pred", *extra, work=tmp_path / "work")
    assert not (tmp_path / "work" / "cache").exists() and not (tmp_path / "pred").exists()


def test_batches_are_bounded_by_input_pixels(member_store, ensemble_record, synthetic_root, tmp_path):
    from segx import tracking
    from segx.inference.folder import Batching, PredictOutputs, predict_folder
    from segx.workflows.predict import load_ensemble

    out, _ = member_store
    inputs = _scans(tmp_path / "in", synthetic_root, 5)
    big = cv2.imread(str(inputs / "scan4.png"))
    cv2.imwrite(str(inputs / "scan4.png"), cv2.resize(big, (128, 128)))  # 4 small images' pixels
    _, predictor = load_ensemble(tracking.connect(f"sqlite:///{out}/mlflow.db"), ensemble_record.run_id, tmp_path / "m")
    done = []
    n = predict_folder(
        predictor,
        inputs,
        tmp_path / "pred",
        PredictOutputs(),
        Batching(8, batch_pixels=2 * 64 * 64, on_batch=done.append),
    )
    assert n == 5 and done == [2, 4, 5]  # two 64x64 images per batch; the 128x128 one alone
    assert _files(tmp_path / "pred") == {f"masks/scan{i}.png" for i in range(5)} | {"segx-manifest.json"}
