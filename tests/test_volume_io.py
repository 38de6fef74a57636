"""Volumes read and written with their geometry (segx/data/volume_io.py, issue 29): NIfTI, NRRD,
MHA and DICOM series keep size, spacing, origin and direction through a read and a label write; a
NIfTI label keeps its input's header (no mirrored mask); a DICOM series is read in slice-position
order in HU; every bad volume is one line naming the file and the values."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk

from segx.data.volume_io import Geometry, dicom_series, read_label_volume, read_volume, write_label_volume
from segx.errors import SegxError
from tests.helpers import ct_series

MAX = 10**6
SHAPE = (5, 12, 8)  # numpy (z, y, x); ITK size (8, 12, 5)
SPACING = (0.7, 0.8, 2.5)  # ITK order (x, y, z)
ORIGIN = (10.5, -20.25, 30.0)
# ITK's world is LPS: the identity direction is L-P-S, diag(-1, -1, 1) is R-A-S.
LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
_C, _S = math.cos(math.radians(30)), math.sin(math.radians(30))
OBLIQUE = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)  # 30 degrees about z
DIRECTIONS = {"LPS": LPS, "RAS": RAS, "oblique": OBLIQUE}
AXCODES = {"LPS": ("L", "P", "S"), "RAS": ("R", "A", "S")}
PYDICOM_SERIES = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


def hu_volume(seed: int = 0) -> np.ndarray:
    """int16 (z, y, x) CT-like values; each slice's first voxel holds its slice index (x 100)."""
    array = np.random.default_rng(seed).integers(-1000, 1500, SHAPE).astype(np.int16)
    array[:, 0, 0] = np.arange(SHAPE[0]) * 100
    return array


def marker_label() -> np.ndarray:
    """A label with one voxel of value 2 near a corner (flips and transposes all move it)."""
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 2:5, 1:4] = 1
    label[SHAPE[0] - 1, 1, SHAPE[2] - 2] = 2
    return label


def write_image(path: Path, array: np.ndarray, direction=LPS, spacing=SPACING, origin=ORIGIN) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def write_series(
    folder: Path,
    hu: np.ndarray,
    direction=LPS,
    uid: str = "1.2.826.0.1.3680043.2.1125.1",
    shuffle=None,
    spacing=SPACING,
) -> Path:
    return ct_series(folder, hu, spacing, ORIGIN, direction, uid, shuffle)


def assert_geometry(geometry: Geometry, direction, spacing=SPACING, origin=ORIGIN) -> None:
    assert geometry.size == SHAPE[::-1]
    np.testing.assert_allclose(geometry.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(geometry.origin, origin, atol=1e-4)
    np.testing.assert_allclose(geometry.direction, direction, atol=1e-5)


# -- geometry round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("orientation", list(DIRECTIONS))
@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_image_and_written_label_keep_the_geometry(tmp_path, ending, orientation):
    direction = DIRECTIONS[orientation]
    hu = hu_volume()
    volume = read_volume(write_image(tmp_path / f"image{ending}", hu, direction), MAX)
    np.testing.assert_array_equal(volume.array, hu)
    assert_geometry(volume.geometry, direction)
    assert volume.spacing_zyx == volume.geometry.spacing[::-1]

    label = marker_label()
    written = write_label_volume(label, volume, tmp_path / f"label{ending}")
    np.testing.assert_array_equal(read_label_volume(written, volume, MAX), label)
    assert read_volume(written, MAX).geometry.difference(volume.geometry) is None
    assert_geometry(read_volume(written, MAX).geometry, direction)


@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_a_dicom_series_and_its_written_label_keep_the_geometry(tmp_path, orientation):
    direction = DIRECTIONS[orientation]
    hu = hu_volume()
    volume = read_volume(write_series(tmp_path / "series", hu, direction), MAX)
    np.testing.assert_array_equal(volume.array, hu)
    assert_geometry(volume.geometry, direction)
    label = marker_label()
    for ending in (".nii.gz", ".nrrd"):
        written = write_label_volume(label, volume, tmp_path / f"label{ending}")
        np.testing.assert_array_equal(read_label_volume(written, volume, MAX), label)
        assert_geometry(read_volume(written, MAX).geometry, direction)


@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_a_nifti_label_takes_its_inputs_affine_and_codes(tmp_path, orientation):
    path = write_image(tmp_path / "image.nii.gz", hu_volume(), DIRECTIONS[orientation])
    written = write_label_volume(marker_label(), read_volume(path, MAX), tmp_path / "label.nii.gz")
    image, label = nib.load(str(path)), nib.load(str(written))
    np.testing.assert_array_equal(label.affine, image.affine)
    assert nib.aff2axcodes(label.affine) == nib.aff2axcodes(image.affine) == AXCODES.get(orientation, ("L", "P", "S"))
    for name in ("qform_code", "sform_code"):
        assert int(label.header[name]) == int(image.header[name])
    assert label.get_data_dtype() == np.uint8


def test_a_nifti_label_keeps_codes_simpleitk_would_not_write(tmp_path):
    # qform scanner (1), sform aligned (2): SimpleITK writes its own codes, segx copies the input's.
    affine = np.array([[-0.7, 0, 0, 40.0], [0, 0.8, 0, -12.0], [0, 0, 2.5, 7.5], [0, 0, 0, 1]])
    image = nib.Nifti1Image(hu_volume().transpose(2, 1, 0), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 2)
    nib.save(image, str(tmp_path / "image.nii.gz"))
    volume = read_volume(tmp_path / "image.nii.gz", MAX)
    label = nib.load(str(write_label_volume(marker_label(), volume, tmp_path / "label.nii.gz")))
    assert (int(label.header["qform_code"]), int(label.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(label.header.get_qform(), image.header.get_qform())
    np.testing.assert_allclose(label.header.get_sform(), affine)


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, 1), (1, -1, -1)])
def test_the_marker_of_a_written_label_lies_where_it_lay_in_the_scan(tmp_path, flip):
    # The scan written by nibabel (RAS affine, a flipped axis or two): the label's marker voxel, read
    # back by nibabel and put through its affine, lies at the same world point as in the scan.
    affine = np.diag([*(np.array(flip) * (0.7, 0.8, 2.5)), 1.0])
    affine[:3, 3] = (12.0, -30.0, 45.0)
    nib.save(nib.Nifti1Image(hu_volume().transpose(2, 1, 0), affine), str(tmp_path / "image.nii.gz"))
    volume = read_volume(tmp_path / "image.nii.gz", MAX)
    label = marker_label()
    (z, y, x) = np.argwhere(label == 2)[0]
    expected = affine @ [x, y, z, 1]  # nibabel's (i, j, k) is numpy's (x, y, z)
    written = nib.load(str(write_label_volume(label, volume, tmp_path / "label.nii.gz")))
    found = np.argwhere(np.asarray(written.dataobj) == 2)
    assert len(found) == 1
    np.testing.assert_allclose(written.affine @ [*found[0], 1], expected)
    # ITK's view of the same voxel (LPS) is the RAS point with x and y negated.
    lps = volume.geometry.apply(sitk.GetImageFromArray(label)).TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
    np.testing.assert_allclose(np.array(lps) * (-1, -1, 1), expected[:3], atol=1e-4)


def test_a_nifti_label_of_a_non_nifti_scan_lies_where_its_voxel_lay(tmp_path):
    volume = read_volume(write_image(tmp_path / "image.nrrd", hu_volume(), OBLIQUE), MAX)
    label = marker_label()
    (z, y, x) = np.argwhere(label == 2)[0]
    lps = volume.geometry.apply(sitk.GetImageFromArray(label)).TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
    written = nib.load(str(write_label_volume(label, volume, tmp_path / "label.nii.gz")))
    found = np.argwhere(np.asarray(written.dataobj) == 2)[0]
    np.testing.assert_allclose((written.affine @ [*found, 1])[:3], np.array(lps) * (-1, -1, 1), atol=1e-4)


def test_a_4d_file_of_one_volume_reads_as_a_3d_volume(tmp_path):
    hu = hu_volume()
    for ending in (".mha", ".nrrd"):
        for name, array in (("image", hu), ("label", marker_label())):
            image = sitk.GetImageFromArray(array[None], isVector=False)  # ITK size (8, 12, 5, 1)
            sitk.WriteImage(image, str(tmp_path / f"{name}{ending}"))
        volume = read_volume(tmp_path / f"image{ending}", MAX)
        np.testing.assert_array_equal(volume.array, hu)
        assert volume.geometry.size == SHAPE[::-1]
        np.testing.assert_array_equal(read_label_volume(tmp_path / f"label{ending}", volume, MAX), marker_label())


# -- DICOM series -----------------------------------------------------------------------------


def test_a_shuffled_dicom_series_reads_in_position_order_in_hu(tmp_path):
    hu = hu_volume()
    folder = write_series(tmp_path / "series", hu, shuffle=3)
    files = sorted(folder.iterdir())
    stored = {f.name: pydicom.dcmread(f) for f in files}
    by_name = [stored[f.name].ImagePositionPatient[2] for f in files]
    by_instance = [d.ImagePositionPatient[2] for d in sorted(stored.values(), key=lambda d: int(d.InstanceNumber))]
    assert by_name != sorted(by_name) and by_instance != sorted(by_instance)  # neither order is the positions'
    volume = read_volume(folder, MAX)
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_array_equal(volume.array[:, 0, 0], np.arange(SHAPE[0]) * 100)
    # What the files hold is stored = HU + 1024: segx applied RescaleSlope and RescaleIntercept.
    for d in stored.values():
        k = round((float(d.ImagePositionPatient[2]) - ORIGIN[2]) / SPACING[2])
        assert (float(d.RescaleSlope), float(d.RescaleIntercept)) == (1.0, -1024.0)
        np.testing.assert_array_equal(d.pixel_array.astype(np.int32) - 1024, volume.array[k])
    assert [Path(f).name for f in dicom_series(folder)[0][1]] == [
        f.name for f in sorted(files, key=lambda f: float(stored[f.name].ImagePositionPatient[2]))
    ]


def test_a_real_ct_series_reads_in_position_order_in_hu():
    # pydicom's CT5N: five 16x16 CT slices whose file names and InstanceNumbers run head to feet.
    folder = PYDICOM_SERIES / "98892001" / "CT5N"
    volume = read_volume(folder, MAX)
    files = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    files.sort(key=lambda d: float(d.ImagePositionPatient[2]))  # the slice normal is +z (axial, identity)
    assert volume.array.shape == (5, 16, 16)
    for k, d in enumerate(files):
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], hu)
    np.testing.assert_allclose(volume.geometry.spacing, (0.488281, 0.488281, 2.5), atol=1e-5)
    np.testing.assert_allclose(volume.geometry.origin, [float(v) for v in files[0].ImagePositionPatient], atol=1e-4)
    assert volume.array.min() < -800  # HU (air), not stored values


def test_a_folder_of_two_series_is_refused_listing_both(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder / "a", hu_volume(), uid="1.2.826.0.1.3680043.2.1125.11")
    write_series(folder / "b", hu_volume(1), uid="1.2.826.0.1.3680043.2.1125.22")
    for f in [*(folder / "a").iterdir(), *(folder / "b").iterdir()]:
        f.rename(folder / f"{f.parent.name}{f.name}")
    with pytest.raises(SegxError, match=r"mixed holds 2 DICOM series: .*\.11 \(5 files\); .*\.22 \(5 files\)") as info:
        read_volume(folder, MAX)
    assert "\n" not in str(info.value)


def test_a_real_folder_of_three_series_is_refused_listing_them():
    folder = PYDICOM_SERIES / "98892003" / "MR2"
    with pytest.raises(
        SegxError, match=r"MR2 holds 3 DICOM series: .*18148\.0\.136 \(3 files\).*18148\.0\.17 "
    ) as info:
        read_volume(folder, MAX)
    assert str(info.value).count("1.3.6.1.4.1.5962") == 3 and "\n" not in str(info.value)


def test_a_real_series_with_a_gap_between_its_slices_is_refused():
    # pydicom's CT2: slices at z = -99.48, 103.02, 104.27, 105.52; read as one volume it would be a
    # grid of 68.3 mm slices that puts every slice in the wrong place.
    with pytest.raises(SegxError, match=r"CT2: slices are not evenly spaced .*202\.5 mm.*1\.25 mm"):
        read_volume(PYDICOM_SERIES / "77654033" / "CT2", MAX)


def test_a_written_series_with_a_missing_slice_is_refused(tmp_path):
    folder = write_series(tmp_path / "series", hu_volume())
    (folder / "im0002.dcm").unlink()
    shown = (
        r"series: slices are not evenly spaced along their normal \(5 mm between im0001\.dcm and im0003\.dcm, 2\.5 mm"
    )
    with pytest.raises(SegxError, match=shown):
        read_volume(folder, MAX)


@pytest.mark.parametrize("series", ["98892003/MR700", "98892001/CT2N"])
def test_a_real_series_of_slices_in_different_orientations_is_refused(series):
    # MR700: a radial localiser (each slice turned about the axis); CT2N: a sagittal and a coronal slice.
    with pytest.raises(SegxError, match=r"slices lie in different orientations \(ImageOrientationPatient .* vs "):
        read_volume(PYDICOM_SERIES / series, MAX)


def test_a_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegxError, match=r"empty: no DICOM series in this folder"):
        read_volume(tmp_path / "empty", MAX)


# -- bad volumes, one line each -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"shape": (6, 12, 8)}, r"size \(8, 12, 6\) vs \(8, 12, 5\), label vs image"),
        ({"spacing": (0.7, 0.8, 3.0)}, r"spacing \(0\.7, 0\.8, 3\) vs \(0\.7, 0\.8, 2\.5\), label vs image"),
        ({"origin": (10.5, -20.25, 31.0)}, r"origin \(10\.5, -20\.25, 31\) vs \(10\.5, -20\.25, 30\), label vs image"),
        ({"direction": RAS}, r"direction \(-1, 0, 0, 0, -1, 0, 0, 0, 1\) vs \(1, 0, 0, 0, 1, 0, 0, 0, 1\), label vs"),
    ],
    ids=["size", "spacing", "origin", "direction"],
)
def test_a_label_on_another_grid_is_refused_naming_both_values(tmp_path, change, shown):
    volume = read_volume(write_image(tmp_path / "image.nii.gz", hu_volume()), MAX)
    shape = change.get("shape", SHAPE)
    label = write_image(
        tmp_path / "label.nii.gz",
        np.zeros(shape, np.uint8),
        change.get("direction", LPS),
        change.get("spacing", SPACING),
        change.get("origin", ORIGIN),
    )
    with pytest.raises(SegxError, match=r"label\.nii\.gz: label and image .*image\.nii\.gz lie on different grids \("):
        read_label_volume(label, volume, MAX)
    with pytest.raises(SegxError, match=shown):
        read_label_volume(label, volume, MAX)


def test_a_label_within_rounding_of_its_image_is_accepted(tmp_path):
    volume = read_volume(write_image(tmp_path / "image.nii.gz", hu_volume()), MAX)
    label = write_image(tmp_path / "label.nrrd", marker_label(), spacing=(0.70000001, 0.8, 2.5))
    np.testing.assert_array_equal(read_label_volume(label, volume, MAX), marker_label())


def test_a_4d_volume_where_3d_is_expected_is_refused(tmp_path):
    four_d = np.stack([hu_volume(), hu_volume(1)]).transpose(3, 2, 1, 0)  # nibabel (x, y, z, t)
    nib.save(nib.Nifti1Image(four_d, np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(SegxError, match=r"four\.nii\.gz: a 4D volume \(2 volumes\) where a 3D image is expected"):
        read_volume(tmp_path / "four.nii.gz", MAX)
    volume = read_volume(tmp_path / "four.nii.gz", MAX, channels=True)
    assert volume.array.shape == (2, *SHAPE)
    np.testing.assert_array_equal(volume.array[1], hu_volume(1))
    with pytest.raises(SegxError, match=r"four\.nii\.gz: a 4D volume \(2 volumes\) where a 3D label is expected"):
        read_label_volume(tmp_path / "four.nii.gz", volume, MAX)
    # A label of a 4D (Decathlon) scan: one 3D volume with the scan's affine.
    written = write_label_volume(marker_label(), volume, tmp_path / "label.nii.gz")
    np.testing.assert_array_equal(read_label_volume(written, volume, MAX), marker_label())
    assert nib.load(str(written)).shape == SHAPE[::-1]
    np.testing.assert_array_equal(nib.load(str(written)).affine, nib.load(str(tmp_path / "four.nii.gz")).affine)


def test_a_2d_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 8), np.uint8)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(SegxError, match=r"flat\.nii\.gz: a 2D image where a volume is expected"):
        read_volume(tmp_path / "flat.nii.gz", MAX)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_intensities_are_refused(tmp_path, bad, ending):
    # SimpleITK reads a NIfTI's NaN and infinities as 0 (nifticlib); an MHA's as they are.
    array = hu_volume().astype(np.float32)
    array[2, 3, 4] = bad
    array[0, 0, 1] = bad
    write_image(tmp_path / f"image{ending}", array)
    with pytest.raises(SegxError, match=rf"image{re.escape(ending)}: 2 voxels are NaN or infinite"):
        read_volume(tmp_path / f"image{ending}", MAX)


@pytest.mark.parametrize("pixdim", [0.0, -0.8])
def test_a_nifti_spacing_of_zero_or_below_is_refused(tmp_path, pixdim):
    # nibabel writes what it is given (no qform or sform: the pixdim alone places the voxels).
    # SimpleITK would read pixdim 0 as 1 mm and -0.8 as 0.8 mm with the axis flipped, silently.
    image = nib.Nifti1Image(hu_volume().transpose(2, 1, 0), None)
    image.header["pixdim"][1:4] = (0.7, pixdim, 2.5)
    nib.save(image, str(tmp_path / "image.nii.gz"))
    read = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    assert read.GetSpacing()[1] == pytest.approx(1.0 if pixdim == 0 else 0.8)  # what SimpleITK makes of it
    assert read.GetDirection()[4] == (1.0 if pixdim == 0 else -1.0)  # a negative pixdim: the axis flipped
    with pytest.raises(SegxError, match=rf"image\.nii\.gz: voxel spacing \(0\.7, {pixdim:g}, 2\.5\) must be positive"):
        read_volume(tmp_path / "image.nii.gz", MAX)


def test_a_volume_over_max_voxels_is_refused_before_it_is_read(tmp_path):
    write_image(tmp_path / "image.mha", hu_volume())
    with pytest.raises(SegxError, match=r"image\.mha: 480 voxels \(8 x 12 x 5\) is over data\.max_voxels=479"):
        read_volume(tmp_path / "image.mha", 479)
    assert read_volume(tmp_path / "image.mha", 480).array.size == 480


def test_a_label_that_is_not_integers_is_refused(tmp_path):
    volume = read_volume(write_image(tmp_path / "image.nii.gz", hu_volume()), MAX)
    label = marker_label().astype(np.float32)
    label[0, 0, 0] = 0.5
    write_image(tmp_path / "label.nii.gz", label)
    with pytest.raises(SegxError, match=r"label\.nii\.gz: label values are not integers \(e\.g\. 0\.5\)"):
        read_label_volume(tmp_path / "label.nii.gz", volume, MAX)
    write_image(tmp_path / "label.nii.gz", marker_label().astype(np.float32))  # whole numbers in floats: fine
    np.testing.assert_array_equal(read_label_volume(tmp_path / "label.nii.gz", volume, MAX), marker_label())


def test_a_label_outside_0_255_is_refused(tmp_path):
    volume = read_volume(write_image(tmp_path / "image.nii.gz", hu_volume()), MAX)
    label = marker_label().astype(np.int16)
    label[0, 0, 0] = 300
    write_image(tmp_path / "label.nii.gz", label)
    with pytest.raises(SegxError, match=r"label\.nii\.gz: label values 0\.\.300 are outside 0\.\.255"):
        read_label_volume(tmp_path / "label.nii.gz", volume, MAX)


def test_files_that_are_not_volumes_are_refused_naming_them(tmp_path):
    with pytest.raises(SegxError, match=r"gone\.nii\.gz does not exist"):
        read_volume(tmp_path / "gone.nii.gz", MAX)
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(SegxError, match=r"scan\.png: not a volume file"):
        read_volume(tmp_path / "scan.png", MAX)
    (tmp_path / "broken.nii.gz").write_bytes(os.urandom(64))
    with pytest.raises(SegxError, match=r"broken\.nii\.gz: cannot read it as a volume \(") as info:
        read_volume(tmp_path / "broken.nii.gz", MAX)
    assert "\n" not in str(info.value)
