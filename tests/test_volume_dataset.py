"""Volume datasets as nnU-Net v2 and the Decathlon lay them out (segx/data/volume_dataset.py), the
2D slice folder written from them once (segx/data/volume_slices.py) and the synthetic CT-like set
(segx/data/synthetic_volumes.py), issue 29: dataset.json's labels, regions and ignore become segx's
classes, every bad folder is one line naming the file, and the slice folder is reused until a
source file or setting changes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segx.data.labels import Labels
from segx.data.synthetic_volumes import LABELS as SYNTHETIC_LABELS
from segx.data.synthetic_volumes import generate_volumes
from segx.data.volume_dataset import read_volume_dataset
from segx.data.volume_io import read_label_volume, read_volume
from segx.data.volume_slices import VolumeSettings, read_case, slice_dataset
from segx.errors import SegxError

SHAPE = (5, 12, 8)  # numpy (z, y, x)
SPACING = (0.7, 0.8, 2.5)  # ITK (x, y, z)
ORGAN = {"background": 0, "organ": 1}


def write_volume(path: Path, array: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((4.0, -8.0, 12.0))
    sitk.WriteImage(image, str(path))
    return path


def scan(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(CT-like int16 image, uint8 label) with an organ box of value 1."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[1:4, 3:9, 2:6] = 1
    image = np.full(SHAPE, -1000, np.int16) + rng.integers(0, 30, SHAPE).astype(np.int16)
    image[label == 1] = 60 + rng.integers(-20, 20, int(label.sum()))
    return image, label


def nnunet_dataset(root: Path, cases=("c1", "c2"), channels=("CT",), labels=None, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    written = {"channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": labels or ORGAN,
               "numTraining": len(cases), "file_ending": ".nii.gz", **extra}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(written))
    for i, case in enumerate(cases):
        image, label = scan(i)
        for c in range(len(channels)):
            write_volume(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", image + 10 * c)
        write_volume(root / "labelsTr" / f"{case}.nii.gz", label)
    return root


def edit_json(root: Path, **changes) -> None:
    written = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**written, **changes}))


# -- dataset.json ------------------------------------------------------------------------------


def test_an_nnunet_dataset_reads_with_its_channels_labels_and_cases(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset001", channels=("CT", "T1"), labels={"background": 0, "liver": 1})
    dataset = read_volume_dataset(root)
    assert dataset.layout == "nnunet"
    assert dataset.channel_names == ("CT", "T1") and dataset.is_ct == (True, False)
    assert dataset.labels == {"background": 0, "liver": 1} and dataset.regions is None and dataset.ignore is None
    assert [c.case_id for c in dataset.train] == ["c1", "c2"] and dataset.test == ()
    case = dataset.train[0]
    assert [p.name for p in case.channels] == ["c1_0000.nii.gz", "c1_0001.nii.gz"]
    assert case.label == root / "labelsTr" / "c1.nii.gz" and not case.four_d
    volume, label = read_case(case, VolumeSettings())
    assert volume.array.shape == (2, *SHAPE)
    np.testing.assert_array_equal(volume.array[1] - volume.array[0], 10)
    np.testing.assert_array_equal(label, scan(0)[1])


def test_nnunet_regions_become_classes_and_regions(tmp_path):
    brats = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
    root = nnunet_dataset(tmp_path / "Dataset137", labels=brats, regions_class_order=[1, 2, 3])
    dataset = read_volume_dataset(root)
    assert dataset.labels == {"background": 0, "whole_tumor": 1, "tumor_core": 2, "enhancing_tumor": 3}
    assert dataset.regions == {
        "whole_tumor": ["whole_tumor", "tumor_core", "enhancing_tumor"],
        "tumor_core": ["tumor_core", "enhancing_tumor"],
        "enhancing_tumor": ["enhancing_tumor"],
    }
    labels = Labels.from_config(dataset.labels, regions=dataset.regions)  # what segx's members read
    assert labels.regions == (("whole_tumor", (1, 2, 3)), ("tumor_core", (2, 3)), ("enhancing_tumor", (3,)))
    edit_json(root, regions_class_order=[1, 2])
    with pytest.raises(SegxError, match=r"dataset\.json: labels hold regions, so regions_class_order must list one"):
        read_volume_dataset(root)


def test_an_ignore_label_is_kept_apart_from_the_classes(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset002", labels={"background": 0, "organ": 1, "ignore": 2})
    dataset = read_volume_dataset(root)
    assert dataset.labels == ORGAN and dataset.ignore == 2
    edit_json(root, labels={"background": 0, "organ": 1, "ignore": "2"})
    with pytest.raises(SegxError, match=r"labels\.ignore='2' must be one integer value"):
        read_volume_dataset(root)


def test_a_decathlon_dataset_reads_its_4d_cases_as_channels(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    decathlon = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w"}, "numTraining": 1,
                 "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor"},
                 "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(decathlon))
    image, label = scan(0)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    four_d = np.stack([image, image * 2], axis=-1).transpose(2, 1, 0, 3)  # nibabel (x, y, z, channel)
    nib.save(nib.Nifti1Image(four_d, affine), str(root / "imagesTr" / "BRATS_001.nii.gz"))
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), str(root / "labelsTr" / "BRATS_001.nii.gz"))
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")  # the Decathlon's tar has them
    dataset = read_volume_dataset(root)
    assert dataset.layout == "decathlon" and dataset.channel_names == ("FLAIR", "T1w")
    assert dataset.labels == {"background": 0, "edema": 1, "non_enhancing_tumor": 2}
    (case,) = dataset.train
    assert case.case_id == "BRATS_001" and case.four_d and len(case.channels) == 1
    volume, read_label = read_case(case, VolumeSettings())
    assert volume.array.shape == (2, *SHAPE)
    np.testing.assert_array_equal(volume.array[0], image)
    np.testing.assert_array_equal(volume.array[1], image * 2)
    np.testing.assert_array_equal(read_label, label)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("{'labels': {'background': 0}}", r"dataset\.json: not valid JSON \("),
        ("[1, 2]", r"dataset\.json: must hold a JSON object"),
        ('{"labels": {"background": 0, "a": 1}}', r"dataset\.json: no channel_names \(nnU-Net\) or modality"),
        ('{"channel_names": {"0": "CT"}}', r"dataset\.json: no labels"),
        ('{"channel_names": {"0": "CT"}, "labels": {"liver": 1, "kidney": 2}}', r"labels need a background of value 0"),
        ('{"channel_names": {"1": "CT"}, "labels": {"background": 0, "a": 1}}', r"channels must be numbered 0\.\.0"),
        ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1.5}}', r"labels\.a=1\.5 must be an integer"),
    ],
    ids=["not-json", "not-object", "no-channels", "no-labels", "no-background", "channel-numbers", "float-label"],
)
def test_a_bad_dataset_json_is_refused_in_one_line(tmp_path, text, shown):
    root = nnunet_dataset(tmp_path / "Dataset003")
    (root / "dataset.json").write_text(text)
    with pytest.raises(SegxError, match=shown) as info:
        read_volume_dataset(root)
    assert "\n" not in str(info.value)


def test_a_missing_dataset_json_is_refused(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset004")
    (root / "dataset.json").unlink()
    with pytest.raises(SegxError, match=r"dataset\.json is missing; a volume dataset"):
        read_volume_dataset(root)


# -- the folders --------------------------------------------------------------------------------


def test_a_case_missing_a_channel_is_refused_naming_it(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset005", channels=("T1", "T2"))
    (root / "imagesTr" / "c2_0001.nii.gz").unlink()
    with pytest.raises(SegxError, match=r"imagesTr: case c2 lacks channel 1 \(c2_0001\); dataset\.json names 2"):
        read_volume_dataset(root)


def test_a_channel_dataset_json_does_not_name_is_refused(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset006")
    write_volume(root / "imagesTr" / "c1_0001.nii.gz", scan(0)[0])
    with pytest.raises(SegxError, match=r"c1_0001\.nii\.gz: channel 1 but dataset\.json names 1"):
        read_volume_dataset(root)


def test_a_label_without_an_image_is_refused(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset007")
    write_volume(root / "labelsTr" / "c3.nii.gz", scan(0)[1])
    with pytest.raises(SegxError, match=r"labelsTr/c3\.nii\.gz: a label without an image in .*imagesTr"):
        read_volume_dataset(root)


def test_an_image_without_a_label_is_refused(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset008")
    (root / "labelsTr" / "c2.nii.gz").unlink()
    with pytest.raises(SegxError, match=r"c2_0000\.nii\.gz: no label .*labelsTr/c2\.nii\.gz"):
        read_volume_dataset(root)


def test_a_test_case_also_in_training_is_refused(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset009")
    write_volume(root / "imagesTs" / "c1_0000.nii.gz", scan(5)[0])
    with pytest.raises(SegxError, match=r"Dataset009: case 'c1' is in both imagesTr/ and imagesTs/"):
        read_volume_dataset(root)


def test_a_labelled_test_set_is_read_and_an_unlabelled_one_is_not_a_test_set(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset010")
    write_volume(root / "imagesTs" / "t1_0000.nii.gz", scan(5)[0])
    assert read_volume_dataset(root).test == ()  # images to predict, not to test on
    write_volume(root / "labelsTs" / "t1.nii.gz", scan(5)[1])
    (case,) = read_volume_dataset(root).test
    assert case.case_id == "t1" and case.label == root / "labelsTs" / "t1.nii.gz"


def test_channels_of_one_case_on_different_grids_are_refused(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset011", channels=("T1", "T2"))
    write_volume(root / "imagesTr" / "c1_0001.nii.gz", scan(0)[0], spacing=(0.7, 0.8, 3.0))
    with pytest.raises(SegxError, match=r"c1_0001\.nii\.gz: channel lies on another grid than .*c1_0000\.nii\.gz"):
        read_case(read_volume_dataset(root).train[0], VolumeSettings())


def test_a_case_too_large_for_max_voxels_or_max_pixels_is_refused(tmp_path):
    case = read_volume_dataset(nnunet_dataset(tmp_path / "Dataset012")).train[0]
    with pytest.raises(SegxError, match=r"c1_0000\.nii\.gz: 480 voxels \(8 x 12 x 5\) is over data\.max_voxels=400"):
        read_case(case, VolumeSettings(max_voxels=400))
    with pytest.raises(SegxError, match=r"c1_0000\.nii\.gz: a slice of 96 pixels is over data\.max_pixels=95"):
        read_case(case, VolumeSettings(max_pixels=95))
    assert read_case(case, VolumeSettings(max_voxels=480, max_pixels=96))[0].array.size == 480


# -- the slice folder ---------------------------------------------------------------------------


def test_slice_dataset_writes_each_slice_and_its_mask(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset020")
    sliced = slice_dataset(read_volume_dataset(root), VolumeSettings(), tmp_path / "slices")
    assert sliced.plan.slice_axis == 0  # z (2.5 mm) is the coarsest
    assert sliced.plan.spacing == pytest.approx((0.8, 0.7))  # the median in-plane spacing (NIfTI: float32)
    assert sliced.plan.norms[0].kind == "ct"
    names = sorted(p.name for p in (sliced.folder / "train_masks").iterdir())
    assert names == [f"{c}__s{i:04d}.png" for c in ("c1", "c2") for i in range(SHAPE[0])]
    assert sorted(p.name for p in (sliced.folder / "train_images").iterdir()) == names
    label = scan(0)[1]
    for i in range(SHAPE[0]):
        np.testing.assert_array_equal(
            cv2.imread(str(sliced.folder / "train_masks" / f"c1__s{i:04d}.png"), -1), label[i]
        )
        assert cv2.imread(str(sliced.folder / "train_images" / f"c1__s{i:04d}.png")).shape == (12, 8, 3)
    assert sliced.cases["c1"]["slices"] == 5 and sliced.cases["c1"]["plane_shape"] == [12, 8]
    assert sliced.cases["c1"]["geometry"]["spacing"] == pytest.approx(list(SPACING))
    assert [p.name for p in (tmp_path / "slices").iterdir()] == [sliced.folder.name]  # no temporary folder left


def test_slice_dataset_reuses_its_folder_and_writes_a_new_one_for_changed_sources(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset021")
    slices = tmp_path / "slices"
    first = slice_dataset(read_volume_dataset(root), VolumeSettings(), slices)
    png = first.folder / "train_images" / "c1__s0002.png"
    before = (png.stat().st_ino, png.stat().st_mtime_ns, (first.folder / "cases.json").stat().st_mtime_ns)
    again = slice_dataset(read_volume_dataset(root), VolumeSettings(), slices)
    assert again.folder == first.folder and again.plan == first.plan and again.cases == first.cases
    assert (png.stat().st_ino, png.stat().st_mtime_ns, (first.folder / "cases.json").stat().st_mtime_ns) == before
    assert len(list(slices.iterdir())) == 1

    image, _ = scan(1)
    image[2, 5, 5] += 7  # one voxel of one source file
    write_volume(root / "imagesTr" / "c2_0000.nii.gz", image)
    changed = slice_dataset(read_volume_dataset(root), VolumeSettings(), slices)
    assert changed.folder != first.folder and len(list(slices.iterdir())) == 2
    other = slice_dataset(read_volume_dataset(root), VolumeSettings(context_slices=1), slices)
    assert other.folder not in (first.folder, changed.folder) and other.plan.context == 1


def test_slice_dataset_writes_a_new_folder_when_dataset_json_changes_the_plan(tmp_path):
    # The same files named MR instead of CT are normalised per volume (z-score), not with the CT statistics.
    root = nnunet_dataset(tmp_path / "Dataset022")
    slices = tmp_path / "slices"
    ct = slice_dataset(read_volume_dataset(root), VolumeSettings(), slices)
    edit_json(root, channel_names={"0": "MR"})
    mr = slice_dataset(read_volume_dataset(root), VolumeSettings(), slices)
    assert ct.plan.norms[0].kind == "ct" and mr.plan.norms[0].kind == "zscore"
    assert mr.folder != ct.folder


def test_slice_dataset_refuses_label_values_dataset_json_does_not_name(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset023")
    _, label = scan(1)
    label[0, 0, 0] = 3
    write_volume(root / "labelsTr" / "c2.nii.gz", label)
    with pytest.raises(SegxError, match=r"labelsTr/c2\.nii\.gz: label value 3 is not in dataset\.json's labels "
                       r"\(background=0, organ=1\)"):  # fmt: skip
        slice_dataset(read_volume_dataset(root), VolumeSettings(), tmp_path / "slices")
    assert not (tmp_path / "slices").exists() or not any((tmp_path / "slices").iterdir())  # no half folder


def test_slice_dataset_accepts_the_ignore_value(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset024", labels={"background": 0, "organ": 1, "ignore": 9})
    _, label = scan(1)
    label[0] = 9
    write_volume(root / "labelsTr" / "c2.nii.gz", label)
    sliced = slice_dataset(read_volume_dataset(root), VolumeSettings(), tmp_path / "slices")
    assert set(np.unique(cv2.imread(str(sliced.folder / "train_masks" / "c2__s0000.png"), -1))) == {9}


def test_slice_dataset_refuses_a_label_that_is_not_integers(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset025")
    label = scan(1)[1].astype(np.float32)
    label[2, 4, 4] = 0.25
    write_volume(root / "labelsTr" / "c2.nii.gz", label)
    with pytest.raises(SegxError, match=r"labelsTr/c2\.nii\.gz: label values are not integers \(e\.g\. 0\.25\)"):
        slice_dataset(read_volume_dataset(root), VolumeSettings(), tmp_path / "slices")


def test_slice_dataset_refuses_a_case_too_large(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset026")
    with pytest.raises(SegxError, match=r"c1_0000\.nii\.gz: 480 voxels .* over data\.max_voxels=100"):
        slice_dataset(read_volume_dataset(root), VolumeSettings(max_voxels=100), tmp_path / "slices")


# -- the synthetic set --------------------------------------------------------------------------


def test_synthetic_volumes_read_as_a_dataset_with_the_left_kidney_on_the_patients_left(tmp_path):
    root = generate_volumes(tmp_path / "synthetic", n_cases=2, size=24, depth=6)
    dataset = read_volume_dataset(root)
    assert dataset.labels == SYNTHETIC_LABELS and dataset.channel_names == ("CT",)
    assert [c.case_id for c in dataset.train] == ["case_000", "case_001"]
    for case in dataset.train:
        volume, label = read_case(case, VolumeSettings())
        assert volume.array.shape == (1, 6, 24, 24)
        np.testing.assert_allclose(volume.geometry.spacing, (0.8, 0.8, 3.0), atol=1e-6)
        assert set(np.unique(label)) == {0, 1, 2, 3}
        image = volume.geometry.apply(sitk.GetImageFromArray(label))
        # ITK's world is LPS: +x is the patient's left. The left kidney lies at the larger x.
        left, right = (
            image.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.argwhere(label == value).mean(0)[::-1]])
            for value in (SYNTHETIC_LABELS["kidney_left"], SYNTHETIC_LABELS["kidney_right"])
        )
        assert left[0] > right[0] + 5
        # The same as any NIfTI viewer sees it: the label file's RAS affine puts it at negative x (left).
        nifti = nib.load(str(case.label))
        assert nib.aff2axcodes(nifti.affine) == ("L", "P", "S")
        ijk = np.argwhere(np.asarray(nifti.dataobj) == SYNTHETIC_LABELS["kidney_left"]).mean(0)
        ras = nifti.affine @ [*ijk, 1]
        assert ras[0] < 0 and np.isclose(ras[0], -left[0], atol=1e-3)
    label_image = read_label_volume(dataset.train[0].label, read_volume(dataset.train[0].channels[0], 10**6), 10**6)
    assert label_image.dtype == np.uint8


def test_synthetic_volumes_are_written_once_and_other_settings_are_refused(tmp_path):
    root = generate_volumes(tmp_path / "synthetic", n_cases=1, size=16, depth=4)
    image = root / "imagesTr" / "case_000_0000.nii.gz"
    mtime = image.stat().st_mtime_ns
    assert generate_volumes(root, n_cases=1, size=16, depth=4) == root and image.stat().st_mtime_ns == mtime
    with pytest.raises(SegxError, match=r"synthetic holds synthetic volumes made with other settings"):
        generate_volumes(root, n_cases=2, size=16, depth=4)
