"""CT-like volumes through every stage: an nnU-Net folder trained slice by slice, split by patient,
the ensemble scored per volume in 3D (mm), and segx.predict writing label volumes on the scan's
own grid that equal the ensemble's test labels voxel for voxel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from segx.data.volume_io import read_volume
from tests.conftest import compose_config, store_overrides

DATA = ["data=synthetic_volumes", "data.n_cases=8", "data.source_size=32", "data.depth=6", "data.image_size=32"]


def _train(out: Path, root: Path, backbone: str) -> None:
    from segx.workflows.member import train_member

    overrides = [*store_overrides(out), *DATA, f"data.root={root}", "trainer.epochs=3", "trainer.batch_size=8",
                 "trainer.verbose=0", "augment=none", f"backbone={backbone}"]  # fmt: skip
    train_member(compose_config("train", overrides))


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory):
    """Two members on eight synthetic volumes and their ensemble: (out, data root, record)."""
    from segx.workflows.ensemble import build_ensemble
    from tests.helpers import seed_store

    out = seed_store(tmp_path_factory.mktemp("volume-store"))
    root = tmp_path_factory.mktemp("volume-data") / "vol"
    for backbone in ("resnet18", "mobilenetv2"):
        _train(out, root, backbone)
    cfg = compose_config(
        "ensemble", [*store_overrides(out), *DATA, f"data.root={root}", "ensemble.members=[resnet18,mobilenetv2]"]
    )
    return out, root, build_ensemble(cfg)


def _run(out: Path, role: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segx").experiment_id
    return client, client.search_runs(experiment, f"tags.`segx.role` = '{role}'")


def test_split_by_patient_and_scores_per_volume_in_mm(volume_store, tmp_path):
    out, root, record = volume_store
    client, members = _run(out, "member")
    split = json.loads(next((out / "splits").glob("synthetic_volumes*.json")).read_text())
    cases = {c for role in ("train", "val", "test") for c in split[role]}
    assert cases == {f"case_{i:03d}" for i in range(8)}  # the split file names patients, not slices
    assert not set(split["train"]) & set(split["val"]) | set(split["train"]) & set(split["test"])
    # Each member's cached test slices are exactly the slices of the test patients, every one of them.
    local = client.download_artifacts(members[0].info.run_id, "model/volumes.json", str(tmp_path))
    volumes = json.loads(Path(local).read_text())
    assert volumes["plan"]["slice_axis"] == 0  # 3 mm slices against 0.8 mm pixels: slice along z
    assert volumes["plan"]["spacing"] == pytest.approx([0.8, 0.8])
    from segx.ensembling.probs import load_cached

    test = load_cached(
        client.download_artifacts(members[0].info.run_id, "predictions/test.npz", str(tmp_path)), tmp_path / "x"
    )
    # A case is a patient's scan: its 6 slices of 32 x 32 stacked along rows into one case.
    assert test.stems == sorted(split["test"])
    assert [tuple(shape) for shape in test.probs.shapes] == [(6 * 32, 32)] * len(split["test"])

    _, ensembles = _run(out, "ensemble")
    run = ensembles[0]
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "tables/test_per_volume.csv", str(tmp_path)))
    assert set(table["case"]) == set(split["test"])
    assert {"ensemble", "member:resnet18-unet", "member:mobilenetv2-unet"} <= set(table["method"])
    for column in ("dice/liver", "hd95/liver", "nsd/kidney_left", "dice", "nsd"):
        assert column in table.columns
    assert {"test3d/dice", "test3d/nsd", "test3d/hd95"} <= set(run.data.metrics)
    assert run.data.metrics["test3d/dice"] == pytest.approx(float(table.loc[table.method == "ensemble", "dice"].mean()))


def test_predict_writes_label_volumes_on_the_scan_grid_equal_to_the_test_labels(volume_store, tmp_path):
    """segx.predict on the test patient's scan: a NIfTI with the input's header, geometry and the
    ensemble's test labels voxel for voxel (stacked from the search's own label maps)."""
    from segx.ensembling.task import task_for
    from segx.evaluation.report import score_test_split
    from segx.workflows.ensemble import _load_members
    from segx.workflows.predict import run_predict

    out, root, record = volume_store
    split = json.loads(next((out / "splits").glob("synthetic_volumes*.json")).read_text())
    case = split["test"][0]
    inputs = tmp_path / "scans"
    inputs.mkdir()
    shutil.copy(root / "imagesTr" / f"{case}_0000.nii.gz", inputs / f"{case}_0000.nii.gz")
    cfg = compose_config(
        "predict",
        [
            *store_overrides(out),
            f"ensemble_run_id={record.run_id}",
            f"input_dir={inputs}",
            f"output_dir={tmp_path / 'pred'}",
        ],
    )
    assert run_predict(cfg) == 1
    written = tmp_path / "pred" / "masks" / f"{case}.nii.gz"
    source = inputs / f"{case}_0000.nii.gz"
    a, b = nib.load(str(source)), nib.load(str(written))
    assert np.array_equal(a.affine, b.affine) and a.shape == b.shape
    assert (int(a.header["qform_code"]), int(a.header["sform_code"])) == (
        int(b.header["qform_code"]),
        int(b.header["sform_code"]),
    )
    assert read_volume(written, 10**8).geometry == read_volume(source, 10**8).geometry

    # The ensemble's test labels of this patient, from the members' cached probabilities.
    client, _ = _run(out, "member")
    ens = compose_config(
        "ensemble", [*store_overrides(out), *DATA, f"data.root={root}", "ensemble.members=[resnet18,mobilenetv2]"]
    )
    members = _load_members(ens, client, client.get_experiment_by_name("segx").experiment_id)
    _, preds = score_test_split(members, record)
    stems = members[0].test.stems
    expected = np.asarray(preds["ensemble"][stems.index(case)]).reshape(6, 32, 32)  # the stacked case
    labels = task_for(record.labels)
    predicted = read_volume(written, 10**8).array
    values = record.labels.decode(expected.astype(np.uint8)) if labels.class_names else expected
    assert predicted.shape == values.shape
    assert np.array_equal(predicted, values)
    assert len(np.unique(predicted)) > 1  # not an empty volume agreeing with an empty one


def test_the_search_scores_volumes_in_3d_as_brute_force_does(volume_store, tmp_path):
    """The search's validation Dice of the chosen weights (before post-processing) is the mean over validation *patients* of
    the 3D foreground-mean Dice, recomputed here by brute force from the members' cached slices
    (scoring.volume_metrics, not the search's code)."""
    from segx.ensembling.probs import argmax_labels, combine_classes, load_cached
    from segx.scoring.volume_metrics import volume_class_metrics

    out, root, record = volume_store
    client, _ = _run(out, "member")
    cached = [
        load_cached(
            client.download_artifacts(m.run_id, "predictions/val.npz", str(tmp_path / f"m{i}")), tmp_path / f"x{i}"
        )
        for i, m in enumerate(record.members)
    ]
    labels = argmax_labels(combine_classes([c.probs for c in cached], record.weights))
    per_class = []  # (volumes, foreground classes) of 3D Dice, NaN where a class is in neither
    for i in range(len(cached[0].stems)):
        pred = np.asarray(labels[i]).reshape(6, 32, 32)
        truth = np.asarray(cached[0].masks[i]).reshape(6, 32, 32)
        scores = volume_class_metrics(pred, truth, record.labels.names, (3.0, 0.8, 0.8), None, False)
        per_class.append([scores[f"dice/{name}"][0] for name in record.labels.names[1:]])
    _, ensembles = _run(out, "ensemble")
    assert len(per_class) == 2  # two validation patients, each one case
    # The multi-class objective: per class the mean over the volumes that count it, then over classes.
    expected = float(np.nanmean(np.nanmean(np.array(per_class), axis=0)))
    assert ensembles[0].data.metrics["val/dice"] == pytest.approx(expected, abs=1e-12)


def test_predict_on_a_dicom_series_writes_nifti_on_its_grid_equal_to_the_nifti_prediction(volume_store, tmp_path):
    """The test patient's scan as a DICOM series (file names and InstanceNumbers shuffled), one
    sub-folder: segx.predict reads it in slice-position order, in HU, and writes masks/<series>.nii.gz
    on the series' grid, holding the labels it writes for the same scan as NIfTI."""
    import SimpleITK as sitk

    from segx.workflows.predict import run_predict
    from tests.helpers import ct_series

    out, root, record = volume_store
    split = json.loads(next((out / "splits").glob("synthetic_volumes*.json")).read_text())
    case = split["test"][0]
    scan = root / "imagesTr" / f"{case}_0000.nii.gz"
    image = sitk.ReadImage(str(scan))
    inputs = {"dicom": tmp_path / "dicom", "nifti": tmp_path / "nifti"}
    ct_series(inputs["dicom"] / case, sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
              image.GetDirection(), shuffle=5)  # fmt: skip
    inputs["nifti"].mkdir()
    shutil.copy(scan, inputs["nifti"] / scan.name)
    written = {}
    for kind, folder in inputs.items():
        cfg = compose_config(
            "predict",
            [*store_overrides(out), f"ensemble_run_id={record.run_id}", f"input_dir={folder}",
             f"output_dir={tmp_path / ('pred-' + kind)}"],
        )  # fmt: skip
        assert run_predict(cfg) == 1
        written[kind] = read_volume(tmp_path / f"pred-{kind}" / "masks" / f"{case}.nii.gz", 10**8)
    assert written["dicom"].geometry.difference(read_volume(inputs["dicom"] / case, 10**8).geometry) is None
    assert written["dicom"].geometry.difference(written["nifti"].geometry) is None
    assert np.array_equal(written["dicom"].array, written["nifti"].array)
