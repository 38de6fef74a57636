"""A volume dataset written once as the 2D slices segx trains on (nnU-Net's "preprocessed" folder).

``<slices_root>/<key>/`` holds ``train_images/<case>__s0007.png`` with ``train_masks/`` (and
``test_images/``, ``test_masks/`` from ``imagesTs/`` with ``labelsTs/``), laid out like any 2D
folder, so every stage after it (the decoded cache, patches, members, the search) reads them as
it reads PNGs. ``plan.json`` holds the :class:`~segx.data.volume_prep.SlicePlan` and
``cases.json`` each case's geometry and slice count, to put predictions back on its grid. The key
hashes the plan and every source file's bytes: other data or other settings get another folder,
and a folder is written under a temporary name and renamed when complete (a killed run leaves no
half folder that a later run would read).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segx.data.io import write_png
from segx.data.volume_dataset import VolumeCase, VolumeDataset
from segx.data.volume_io import Geometry, Volume, read_label_volume, read_volume
from segx.data.volume_prep import (
    ChannelNorm,
    SlicedVolume,
    SlicePlan,
    check_channels,
    choose_slice_axis,
    ct_norm,
    foreground_sample,
    slice_stem,
    target_spacing,
)
from segx.errors import SegxError

SLICES_VERSION = 1


@dataclass(frozen=True)
class VolumeSettings:
    """The ``data`` keys that say how volumes become slices (read from the config once)."""

    slice_axis: str | None = None
    spacing: object = None
    context_slices: int = 0
    max_voxels: int = 512 * 512 * 1024
    max_pixels: int = 64_000_000
    nsd_tolerance_mm: float = 1.0


@dataclass(frozen=True)
class SlicedDataset:
    folder: Path  # a 2D folder: train_images/, train_masks/[, test_images/, test_masks/]
    plan: SlicePlan
    dataset: VolumeDataset
    cases: dict  # case id -> {"geometry", "slices", "role", "source"}
    nsd_tolerance_mm: float = 1.0  # the normalised surface Dice's tolerance (data.nsd_tolerance_mm)


def read_case(case: VolumeCase, settings: VolumeSettings, with_label: bool = True) -> tuple[Volume, np.ndarray | None]:
    """(the case's channels as one Volume of (c, z, y, x), its label or None), every file checked
    against the first channel's grid."""
    volumes = [read_volume(p, settings.max_voxels, channels=case.four_d) for p in case.channels]
    first = volumes[0]
    arrays = []
    for volume in volumes:
        difference = first.geometry.difference(volume.geometry)
        if difference is not None:
            raise SegxError(
                f"{volume.source}: channel lies on another grid than {first.source} ({difference}); "
                "resample the channels of a case onto one grid"
            )
        arrays.append(volume.array if volume.array.ndim == 4 else volume.array[None])
    channels = Volume(np.concatenate(arrays), first.geometry, first.source)
    _check_slices(channels, settings)
    label = None
    if with_label and case.label is not None:
        label = read_label_volume(case.label, first, settings.max_voxels)
    return channels, label


def _check_slices(volume: Volume, settings: VolumeSettings) -> None:
    z, y, x = volume.array.shape[1:]
    largest = max(y * x, z * x, z * y)
    if largest > settings.max_pixels:
        raise SegxError(
            f"{volume.source}: a slice of {largest:,} pixels is over data.max_pixels={settings.max_pixels:,}; "
            "crop the volume or raise data.max_pixels"
        )


def _check_values(label: np.ndarray, dataset: VolumeDataset, where) -> None:
    known = set(dataset.labels.values()) | ({dataset.ignore} if dataset.ignore is not None else set())
    present = set(np.unique(label).tolist())
    unknown = sorted(present - known)
    if unknown:
        raise SegxError(
            f"{where}: label value {unknown[0]} is not in dataset.json's labels "
            f"({', '.join(f'{k}={v}' for k, v in dataset.labels.items())}); fix the label or dataset.json"
        )


def make_plan(dataset: VolumeDataset, settings: VolumeSettings, progress: Callable | None = None) -> SlicePlan:
    """The slice plan from the training cases (imagesTr/): headers for the spacing, and the
    foreground intensities of CT channels."""
    check_channels(len(dataset.channel_names), int(settings.context_slices))
    spacings, samples = [], [[] for _ in dataset.channel_names]
    needs_voxels = any(dataset.is_ct)
    cases = progress(dataset.train) if progress else dataset.train
    for i, case in enumerate(cases):
        volume, label = read_case(case, settings, with_label=needs_voxels)
        spacings.append(volume.spacing_zyx)
        if needs_voxels:
            for c, is_ct in enumerate(dataset.is_ct):
                if is_ct:
                    samples[c].append(foreground_sample(volume.array[c], label, seed=i))
    axis = choose_slice_axis(spacings, settings.slice_axis)
    norms = tuple(
        ct_norm(samples[c], name) if is_ct else ChannelNorm("zscore")
        for c, (name, is_ct) in enumerate(zip(dataset.channel_names, dataset.is_ct, strict=True))
    )
    return SlicePlan(axis, target_spacing(spacings, axis, settings.spacing), int(settings.context_slices), norms)


def _digest(paths) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        files = sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            digest.update(file.name.encode("utf-8", "surrogateescape"))
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()


def slice_dataset(
    dataset: VolumeDataset, settings: VolumeSettings, slices_root: Path, progress: Callable | None = None
) -> SlicedDataset:
    """The dataset's 2D slice folder: reused when complete for the same files and plan, else written."""
    files = [p for case in dataset.train + dataset.test for p in (*case.channels, case.label) if p is not None]
    # The key is what the plan is made from (settings, dataset.json's channel names and labels, and
    # file bytes), so a complete folder is reused without reading a voxel; the plan is read back from it.
    how = {"axis": settings.slice_axis, "spacing": settings.spacing, "context": int(settings.context_slices),
           "channels": list(dataset.channel_names), "labels": dataset.labels, "ignore": dataset.ignore}  # fmt: skip
    key = hashlib.sha256(
        json.dumps({"v": SLICES_VERSION, "how": how, "files": _digest(files)}, default=str).encode()
    ).hexdigest()[:16]
    folder = Path(slices_root) / key
    if not (folder / "cases.json").is_file():
        _write(dataset, make_plan(dataset, settings), settings, folder, progress)
    plan = SlicePlan.from_json(json.loads((folder / "plan.json").read_text()))
    cases = json.loads((folder / "cases.json").read_text())
    return SlicedDataset(folder, plan, dataset, cases, float(settings.nsd_tolerance_mm))


def _write(dataset: VolumeDataset, plan: SlicePlan, settings: VolumeSettings, folder: Path, progress) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cases = {}
    parts = [("train", case) for case in dataset.train] + [("test", case) for case in dataset.test]
    iterator = progress(parts) if progress else parts
    try:
        for role, case in iterator:
            images = tmp / f"{role}_images"
            masks = tmp / f"{role}_masks"
            images.mkdir(parents=True, exist_ok=True)
            masks.mkdir(parents=True, exist_ok=True)
            volume, label = read_case(case, settings)
            _check_values(label, dataset, case.label)
            sliced = SlicedVolume(volume.array, label, volume.spacing_zyx, plan)
            for i in range(sliced.n):
                stem = slice_stem(case.case_id, i)
                write_png(images / f"{stem}.png", cv2.cvtColor(sliced.image(i), cv2.COLOR_RGB2BGR))
                write_png(masks / f"{stem}.png", sliced.label(i))
            cases[case.case_id] = {
                "role": role,
                "slices": sliced.n,
                "plane_shape": list(sliced.plane_shape),
                "geometry": volume.geometry.to_json(),
                "source": str(case.channels[0]),
            }
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
        (tmp / "cases.json").write_text(json.dumps(cases, indent=1))  # written last: the folder is complete
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def case_geometry(sliced: SlicedDataset, case_id: str) -> Geometry:
    return Geometry.from_json(sliced.cases[case_id]["geometry"])
