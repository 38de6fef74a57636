"""Predicting a folder of volumes: one label volume per case, on the scan's own grid.

Inputs (``input_dir``): volume files (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``), one
per case, or nnU-Net's ``<case>_0000.nii.gz`` with one file per channel, or one sub-folder per
DICOM series. Each case is sliced exactly as the members' training data was (their
``volumes.json``: slice axis, in-plane spacing, normalisation statistics, 2.5D context), its
slices are predicted in batches (the networks' memory follows a batch of slices), decided as one
case as the search decided it (the members' uint8 probabilities of the volume are held), and the
label map is put back along the slice axis and, where the plan resampled in-plane, back to the
scan's own in-plane size (nearest neighbour on the label map). The output keeps the input's
size, spacing, origin and direction (and a NIfTI input's header): ``masks/<case><ending>`` in
the input's own format (NIfTI for a DICOM series), holding the dataset's label values. On
request ``probabilities/<case>/<class><ending>`` and ``uncertainty/<case><ending>`` (float32).

The output rules of ``segx.predict`` hold (:mod:`segx.inference.folder`): nothing already written
is changed, the run writes into a partial folder and moves its files into place at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segx.data import staging
from segx.data.io import shown
from segx.data.volume_io import Volume, dicom_series, read_volume, volume_ending
from segx.data.volume_prep import SlicedVolume, SlicePlan, back_to_grid
from segx.errors import SegxError
from segx.inference import owned
from segx.inference.folder import PARTIAL_PREFIX, RECORD, PredictOutputs, _commit, check_output_dir, safe_output_path

_CHANNEL_SUFFIX = "_0000"


@dataclass(frozen=True)
class InputVolume:
    case: str
    channels: tuple[Path, ...]  # files (or one DICOM folder) in channel order
    ending: str  # the output's ending: the input's own, NIfTI for a DICOM series


def is_volume_folder(folder: Path) -> bool:
    """Whether ``folder`` holds volumes (files with a volume ending, or DICOM series folders)."""
    if not folder.is_dir():
        return False
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return any(volume_ending(p) for p in entries if p.is_file()) or any(p.is_dir() and dicom_series(p) for p in entries)


def find_volumes(input_dir: Path, n_channels: int) -> list[InputVolume]:
    """The cases of ``input_dir``, checked before any model is loaded."""
    files = sorted(p for p in input_dir.iterdir() if not p.name.startswith(".") and p.is_file() and volume_ending(p))
    folders = sorted(p for p in input_dir.iterdir() if not p.name.startswith(".") and p.is_dir())
    cases: dict[str, InputVolume] = {}
    for folder in folders:
        if dicom_series(folder):
            cases[folder.name] = InputVolume(folder.name, (folder,), ".nii.gz")
    by_case: dict[str, dict[int, Path]] = {}
    for path in files:
        ending = volume_ending(path)
        stem = path.name[: -len(ending)]
        head, _, channel = stem.rpartition("_")
        if head and len(channel) == 4 and channel.isdigit():
            by_case.setdefault(head, {})[int(channel)] = path
        else:
            by_case.setdefault(stem, {})[0] = path
    for case, channels in by_case.items():
        missing = [c for c in range(n_channels) if c not in channels]
        if missing:
            raise SegxError(
                f"input_dir={shown(input_dir)}: case {case} lacks channel {missing[0]} ({case}_{missing[0]:04d}); "
                f"the ensemble was trained on {n_channels} channel(s)"
            )
        if case in cases:
            raise SegxError(f"input_dir={shown(input_dir)}: case {case} is both a file and a DICOM folder; keep one")
        paths = tuple(channels[c] for c in range(n_channels))
        cases[case] = InputVolume(case, paths, volume_ending(paths[0]))
    if not cases:
        raise SegxError(f"input_dir={shown(input_dir)} holds no volumes (.nii.gz, .nrrd, .mha or DICOM series folders)")
    return [cases[c] for c in sorted(cases)]


def volumes_json(model_paths) -> dict:
    """The members' slice plan (every member of an ensemble trained on the same data: the first)."""
    for path in model_paths:
        for folder in path if isinstance(path, list) else [path]:
            if folder is not None and (Path(folder) / "volumes.json").is_file():
                return json.loads((Path(folder) / "volumes.json").read_text())
    raise SegxError("the ensemble's members were not trained on volumes; predict a folder of 2D images instead")


def planned(cases: list[InputVolume], outputs: PredictOutputs, class_names, record: bool = True) -> list[str]:
    files = [f"masks/{c.case}{c.ending}" for c in cases]
    if outputs.uncertainty:
        files += [f"uncertainty/{c.case}{c.ending}" for c in cases]
    if outputs.save_probabilities:
        files += [f"probabilities/{c.case}/{name}{c.ending}" for c in cases for name in class_names]
    return files + ([RECORD] if record else [])


def read_input(case: InputVolume, max_voxels: int) -> Volume:
    volumes = [read_volume(p, max_voxels) for p in case.channels]
    for volume in volumes[1:]:
        difference = volumes[0].geometry.difference(volume.geometry)
        if difference is not None:
            raise SegxError(
                f"{shown(volume.source)}: channel lies on another grid than {volumes[0].source} ({difference})"
            )
    return Volume(np.stack([v.array for v in volumes]), volumes[0].geometry, volumes[0].source)


def predict_volume(predictor, volume: Volume, plan: SlicePlan, batch_size: int):
    """(label map of class indices (z, y, x) uint8, mean probabilities, uncertainty) on the
    volume's own grid; probabilities (z, y, x[, K]) float32."""
    sliced = SlicedVolume(volume.array, None, volume.spacing_zyx, plan)
    decided = predictor.predict_slices([sliced.image(i) for i in range(sliced.n)], batch_size)

    def planes(stacked: np.ndarray) -> np.ndarray:  # (n * h, w[, K]) -> (n, h, w[, K])
        return stacked.reshape(sliced.n, stacked.shape[0] // sliced.n, *stacked.shape[1:])

    masks = planes(decided.mask.astype(np.uint8))
    probs, uncertainty = planes(decided.probability.astype(np.float32)), planes(decided.uncertainty.astype(np.float32))
    axis = plan.slice_axis
    mask = masks
    if mask.shape[1:] != tuple(sliced.plane_shape):
        size = (sliced.plane_shape[1], sliced.plane_shape[0])
        mask = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_NEAREST_EXACT) for m in mask])
    return (
        np.moveaxis(mask, 0, axis),
        back_to_grid(probs, sliced.plane_shape, axis),
        back_to_grid(uncertainty, sliced.plane_shape, axis),
    )


def predict_volume_folder(predictor, volumes: dict, input_dir: Path, output_dir: Path, outputs: PredictOutputs,
                          batch_size: int, max_voxels: int, record: dict | None = None) -> int:  # fmt: skip
    """Write one label volume per case of ``input_dir`` (module docstring); returns the count."""
    from segx.data.volume_io import write_float_volume, write_label_volume
    from segx.progress import stage as say

    plan = SlicePlan.from_json(volumes["plan"])
    cases = find_volumes(input_dir, len(plan.norms))
    class_names = [n for _, n in (predictor.task.probability_planes or [])] or ["foreground"]
    new = planned(cases, outputs, class_names, record is not None)
    for c in cases:
        safe_output_path(output_dir, c.case, c.ending)
    old = check_output_dir(input_dir, output_dir, outputs.overwrite, new)
    with staging.staged_folder(output_dir, PARTIAL_PREFIX) as stage:
        for i, case in enumerate(cases):
            say(f"predicting volume {i + 1}/{len(cases)}: {case.case}")
            volume = read_input(case, max_voxels)
            mask, probs, uncertainty = predict_volume(predictor, volume, plan, batch_size)
            values = predictor.task.encode(mask)  # the dataset's own label values
            (stage / "masks").mkdir(exist_ok=True)
            write_label_volume(values, _grid_of(volume), stage / "masks" / f"{case.case}{case.ending}")
            if outputs.uncertainty:
                (stage / "uncertainty").mkdir(exist_ok=True)
                write_float_volume(uncertainty, volume, stage / "uncertainty" / f"{case.case}{case.ending}")
            if outputs.save_probabilities:
                folder = stage / "probabilities" / case.case
                folder.mkdir(parents=True, exist_ok=True)
                planes = predictor.task.probability_planes or [(None, "foreground")]
                for c, name in planes:
                    plane = probs if c is None else probs[..., c]
                    write_float_volume(plane, volume, folder / f"{name}{case.ending}")
        if record is not None:
            owned.write_atomic(stage / RECORD, json.dumps(record, indent=2))
        old = check_output_dir(input_dir, output_dir, outputs.overwrite, new)
        _commit(stage, output_dir, new, old)
    return len(cases)


def _grid_of(volume: Volume) -> Volume:
    """The volume as the reference of its label: a NIfTI file's header is copied from its first channel."""
    return Volume(volume.array[0], volume.geometry, volume.source)
