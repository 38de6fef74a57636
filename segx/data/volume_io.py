"""Reading and writing CT and MR volumes, with their geometry: SimpleITK behind this one module.

SimpleITK reads NIfTI, NRRD, MHA/MHD and DICOM series through one API and keeps each volume's
size, spacing, origin and direction (nnU-Net's default reader does the same). Rules that users
of other tools trip over, and segx applies:

- A DICOM series is ordered by position along the slice normal (GDCM's
  ``GetGDCMSeriesFileNames`` sorts by ImagePositionPatient, not by file name or
  InstanceNumber), and RescaleSlope/RescaleIntercept are applied (CT in HU).
- A folder holding several series is refused, listing them.
- A label volume must lie on its image's grid (size, spacing, origin, direction), must hold
  integers, and is read as stored (no resampling that would move a boundary).
- A written label volume takes the input's exact geometry; for a NIfTI input it takes the
  input's header too (nibabel), so its qform/sform and codes match and it overlays the scan in
  ITK-SNAP or 3D Slicer without a flip.

Arrays are numpy order: ``(z, y, x)`` for a 3D volume, ``(c, z, y, x)`` for several channels;
:class:`Geometry` keeps ITK's order (``size``, ``spacing`` and ``origin`` as (x, y, z)).
Every failure is a :class:`SegxError` of one line naming the file and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segx.data.io import shown
from segx.errors import SegxError

# File endings read as volumes (a DICOM series is a folder instead).
VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_ENDINGS = (".nii.gz", ".nii")
# Where geometry may differ by rounding only (headers store float32): 1e-4 relative (mm).
GEOMETRY_TOLERANCE = 1e-4
# A DICOM series' slice gaps may differ by rounding of ImagePositionPatient only (a missing slice is 100%).
SLICE_GAP_TOLERANCE = 0.01

sitk.ProcessObject_SetGlobalWarningDisplay(False)  # GDCM's warnings would bypass the one-line rule


def volume_ending(path: str | os.PathLike) -> str | None:
    """The volume ending of ``path`` (``.nii.gz`` before ``.gz``), or None when it is not one."""
    name = Path(path).name.lower()
    return next((e for e in VOLUME_ENDINGS if name.endswith(e)), None)


def strip_ending(path: str | os.PathLike) -> str:
    """``path``'s name without its volume ending (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    ending = volume_ending(path)
    return name[: -len(ending)] if ending else name


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie in the patient: ITK's (x, y, z) order, mm."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            tuple(int(v) for v in image.GetSize()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        """Spacing in numpy's axis order, for an array from :func:`read_volume`."""
        return tuple(reversed(self.spacing))

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def difference(self, other: Geometry) -> str | None:
        """The first field that differs beyond rounding, as 'field a vs b'; None when the same grid."""
        if self.size != other.size:
            return f"size {_shown_values(self.size)} vs {_shown_values(other.size)}"
        for field in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, field)), np.asarray(getattr(other, field))
            scale = max(1.0, float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)))
            if a.shape != b.shape or np.abs(a - b).max(initial=0) > GEOMETRY_TOLERANCE * scale:
                return f"{field} {_shown_values(a)} vs {_shown_values(b)}"
        return None

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}  # fmt: skip

    @classmethod
    def from_json(cls, written: dict) -> Geometry:
        return cls(
            tuple(int(v) for v in written["size"]),
            tuple(float(v) for v in written["spacing"]),
            tuple(float(v) for v in written["origin"]),
            tuple(float(v) for v in written["direction"]),
        )


def _shown_values(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in np.asarray(values).ravel()) + ")"


@dataclass(frozen=True)
class Volume:
    """A volume read from ``source``: ``array`` (z, y, x), or (c, z, y, x) for several channels."""

    array: np.ndarray
    geometry: Geometry
    source: Path

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return self.geometry.spacing_zyx


def dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """(series UID, its files ordered along the slice normal) of each series in ``folder``."""
    reader = sitk.ImageSeriesReader()
    found = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)) or ():
        found.append((uid, list(reader.GetGDCMSeriesFileNames(str(folder), uid))))
    return found


def _dicom_files(folder: Path) -> list[str]:
    series = dicom_series(folder)
    if not series:
        raise SegxError(f"{shown(folder)}: no DICOM series in this folder; give a folder of one series' .dcm files")
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series)
        raise SegxError(
            f"{shown(folder)} holds {len(series)} DICOM series: {listed}; put each series in its own folder"
        )
    return series[0][1]


def _check_series_grid(folder: Path, files: list[str]) -> None:
    """The slices of a series, as GDCM sorted them, lie on one grid: parallel and evenly spaced.

    ITK's series reader stacks any slices into one volume (one orientation, the mean gap as the
    spacing) with only a warning: slices turned to each other or a missing slice would put
    voxels, and a label written back, where they are not."""
    if len(files) < 2:
        return
    origins, directions = [], []
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        reader.ReadImageInformation()
        origins.append(reader.GetOrigin()[:3])
        directions.append(np.asarray(reader.GetDirection(), float).reshape(3, 3))
    for file, direction in zip(files, directions, strict=True):
        if np.abs(direction[:, :2] - directions[0][:, :2]).max() > GEOMETRY_TOLERANCE:
            raise SegxError(
                f"{shown(folder)}: slices lie in different orientations (ImageOrientationPatient "
                f"{_shown_values(directions[0][:, :2].T)} in {Path(files[0]).name} vs {_shown_values(direction[:, :2].T)} "
                f"in {Path(file).name}); a volume is a stack of parallel slices: put this series' stacks in folders of "
                "their own, or leave out a localiser"
            )
    gaps = np.diff(np.asarray(origins, float) @ directions[0][:, 2])
    typical = float(np.median(gaps))
    uneven = np.flatnonzero(
        (np.abs(gaps - typical) > SLICE_GAP_TOLERANCE * abs(typical)) | (gaps <= GEOMETRY_TOLERANCE)
    )
    if uneven.size:
        i = int(uneven[0])
        raise SegxError(
            f"{shown(folder)}: slices are not evenly spaced along their normal ({gaps[i]:.6g} mm between "
            f"{Path(files[i]).name} and {Path(files[i + 1]).name}, {typical:.6g} mm elsewhere); a slice is missing or "
            "the series holds several stacks: export it again or put each stack in a folder of its own"
        )


def _information(path: Path) -> tuple[sitk.ImageFileReader | sitk.ImageSeriesReader, tuple[int, ...], int]:
    """A reader for ``path`` with its header read: (reader, size (x, y, z[, t]), components)."""
    if path.is_dir():
        files = _dicom_files(path)
        _check_series_grid(path, files)
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        first.ReadImageInformation()
        size = tuple(first.GetSize()[:2]) + (len(files),)
        series = sitk.ImageSeriesReader()
        series.SetFileNames(files)
        return series, size, first.GetNumberOfComponents()
    if not path.is_file():
        raise SegxError(f"{shown(path)} does not exist; check the path")
    if volume_ending(path) is None:
        raise SegxError(
            f"{shown(path)}: not a volume file ({', '.join(VOLUME_ENDINGS)}) or a DICOM series folder; convert it"
        )
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise SegxError(f"{shown(path)}: cannot read it as a volume ({_first_line(exc)}); re-export the file") from None
    return reader, tuple(reader.GetSize()), reader.GetNumberOfComponents()


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "rror" in line or "annot" in line] or lines or ["unknown error"]
    return useful[-1][:200]


def read_volume(path: str | os.PathLike, max_voxels: int, channels: bool = False, what: str = "image") -> Volume:
    """Read one volume (a file, or a folder holding one DICOM series), checked before its pixels
    are decoded (dimension, size against ``max_voxels``) and after (finite values, spacing).

    ``channels=True`` accepts a 4D file (the Decathlon's channels, last axis in ITK) and returns
    (c, z, y, x); otherwise a 4D file is refused. ``what`` names the volume in messages."""
    path = Path(path)
    reader, size, components = _information(path)
    dimension = len(size)
    if dimension == 4 and size[3] == 1:
        dimension = 3  # a 4D header with one volume is a 3D volume
    if dimension == 2:
        raise SegxError(f"{shown(path)}: a 2D image where a volume is expected; use data=folder with PNG slices")
    if dimension == 4 and not channels:
        raise SegxError(
            f"{shown(path)}: a 4D volume ({size[3]} volumes) where a 3D {what} is expected; "
            "split it into one file per channel (nnU-Net: <case>_0000.nii.gz, <case>_0001.nii.gz)"
        )
    if dimension not in (3, 4):
        raise SegxError(f"{shown(path)}: {dimension}D data where a 3D {what} is expected")
    if components != 1:
        raise SegxError(f"{shown(path)}: {components} values per voxel (RGB?); a {what} volume holds one")
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > max_voxels:
        raise SegxError(
            f"{shown(path)}: {voxels:,} voxels ({' x '.join(map(str, size))}) is over data.max_voxels={max_voxels:,}; "
            "crop the volume or raise data.max_voxels"
        )
    nifti = volume_ending(path) in NIFTI_ENDINGS
    if nifti:
        _check_spacing(path, _stored_pixdim(path, min(dimension, 3)))  # SimpleITK reads 0 as 1 mm, -s as s
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise SegxError(f"{shown(path)}: cannot read it ({_first_line(exc)}); re-export the file") from None
    if dimension == 4 or image.GetDimension() == 4:
        array = sitk.GetArrayFromImage(image)  # (t, z, y, x)
        array = array if array.ndim == 4 else array[None]
        image = image[:, :, :, 0] if image.GetDimension() == 4 else image
        if dimension == 3:
            array = array[0]  # a 4D header with one volume: (z, y, x), as any 3D volume
    else:
        array = sitk.GetArrayFromImage(image)
    geometry = Geometry.of(image)
    _check_spacing(path, geometry.spacing[:3])
    bad = int(np.count_nonzero(~np.isfinite(array))) if array.dtype.kind == "f" else 0
    if nifti and not bad:
        bad = _nifti_non_finite(path)  # SimpleITK's NIfTI reader (nifticlib) reads them as 0
    if bad:
        raise SegxError(f"{shown(path)}: {bad:,} voxels are NaN or infinite; fix or mask them before training")
    return Volume(array, geometry, path)


def _check_spacing(path: Path, spacing) -> None:
    spacing = np.asarray(spacing, float)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise SegxError(
            f"{shown(path)}: voxel spacing {_shown_values(spacing)} must be positive; fix the header "
            "(pixdim in NIfTI, PixelSpacing and slice positions in DICOM)"
        )


def _stored_pixdim(path: Path, dimension: int) -> tuple[float, ...]:
    """A NIfTI file's voxel sizes as stored (pixdim[1..3]): nifticlib (in SimpleITK) and nibabel's
    loader both replace a 0 by 1 and a negative value by its magnitude (flipping that axis)."""
    import nibabel as nib

    with nib.openers.ImageOpener(str(path)) as fileobj:
        start = fileobj.read(4)
        fileobj.seek(0)
        nifti2 = 540 in (int.from_bytes(start, "little"), int.from_bytes(start, "big"))
        header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(fileobj, check=False)
    return tuple(float(v) for v in header["pixdim"][1 : 1 + dimension])


def _nifti_non_finite(path: Path) -> int:
    """NaN and infinite voxels of a NIfTI file of floats, as stored."""
    import nibabel as nib

    image = nib.load(str(path))
    if image.get_data_dtype().kind != "f":
        return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj.get_unscaled()))))


def read_label_volume(path: str | os.PathLike, image: Volume, max_voxels: int) -> np.ndarray:
    """The label volume at ``path`` as integers (z, y, x), refused unless it lies on ``image``'s grid."""
    label = read_volume(path, max_voxels, what="label")
    difference = label.geometry.difference(image.geometry)  # 'field <label's> vs <image's>', as the message says
    if difference is not None:
        raise SegxError(
            f"{shown(label.source)}: label and image {shown(image.source)} lie on different grids ({difference}, "
            "label vs image); resample the label onto its image with nearest neighbour"
        )
    array = label.array
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise SegxError(
                f"{shown(label.source)}: label values are not integers (e.g. {_non_integer(array):g}); "
                "labels hold class values: save them as integers without interpolation"
            )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise SegxError(
            f"{shown(label.source)}: label values {int(array.min())}..{int(array.max())} are outside 0..255; "
            "segx reads up to 255 classes"
        )
    return array.astype(np.uint8)


def _non_integer(array: np.ndarray) -> float:
    flat = array.ravel()
    return float(flat[np.flatnonzero(flat != np.round(flat))[0]])


def write_label_volume(labels: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write ``labels`` (z, y, x) on ``like``'s grid to ``path`` (its ending picks the format).

    A NIfTI output of a NIfTI input keeps that input's header (nibabel: same affine, qform and
    sform with their codes, only the data type changed), where SimpleITK would write its own."""
    path = Path(path)
    labels = np.ascontiguousarray(labels.astype(np.uint8))
    expected = tuple(reversed(like.geometry.size[:3]))
    if labels.shape != expected:
        raise ValueError(f"labels {labels.shape} do not match the volume's {expected}")
    if volume_ending(path) in (".nii.gz", ".nii") and volume_ending(like.source) in (".nii.gz", ".nii"):
        return _write_nifti_like(labels, like.source, path)
    image = like.geometry.apply(sitk.GetImageFromArray(labels))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _write_nifti_like(labels: np.ndarray, source: Path, path: Path) -> Path:
    import nibabel as nib

    reference = nib.load(str(source))
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    data = np.transpose(labels, (2, 1, 0))  # numpy (z, y, x) -> NIfTI's (i, j, k)
    if len(reference.shape) > 3:
        header.set_data_shape(data.shape)
    image = nib.Nifti1Image(data, reference.affine, header)
    # The constructor derives the codes from the affine; put the input's own back.
    qform, qcode = reference.header.get_qform(coded=True)
    sform, scode = reference.header.get_sform(coded=True)
    image.set_qform(qform, int(qcode))
    image.set_sform(sform, int(scode))
    nib.save(image, str(path))
    return path


def write_float_volume(values: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """A float32 volume (probabilities, uncertainty) on ``like``'s grid."""
    image = like.geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(values, np.float32)))
    sitk.WriteImage(image, str(path), useCompression=True)
    return Path(path)
