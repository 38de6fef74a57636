"""Volume datasets as people already have them: nnU-Net v2 and Medical Segmentation Decathlon folders.

``ROOT/imagesTr/`` with ``ROOT/labelsTr/`` (optionally ``imagesTs/`` with ``labelsTs/``, a fixed
test set) and ``ROOT/dataset.json``:

- nnU-Net v2: one file per channel, ``<case>_0000<ending>`` (``_0001`` the next channel);
  ``dataset.json`` has ``channel_names`` ({"0": "CT"}), ``labels`` (name -> value, or -> a list
  of values for a region, with ``regions_class_order``; an ``ignore`` label) and ``file_ending``.
- Decathlon: one file per case, ``<case>.nii.gz``, a 4D image where there are several
  channels; ``dataset.json`` has ``modality`` ({"0": "MRI"}) and ``labels`` (value -> name).

The dataset's labels become segx's classes (``data.labels``, ``data.regions``, ``data.ignore``),
so no ``data.labels`` is needed on the command line; one that disagrees is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from segx.data.io import shown
from segx.data.volume_io import strip_ending, volume_ending
from segx.errors import SegxError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
CT_NAMES = ("ct",)  # channel names normalised as CT (nnU-Net: "CT" exactly; the Decathlon too)


@dataclass(frozen=True)
class VolumeCase:
    """One patient's scan: its channel files (one 4D file for the Decathlon) and its label file."""

    case_id: str
    channels: tuple[Path, ...]
    label: Path | None
    four_d: bool = False


@dataclass(frozen=True)
class VolumeDataset:
    """What ``dataset.json`` and the folders say: channels, classes and the cases of each part."""

    root: Path
    channel_names: tuple[str, ...]
    labels: dict[str, int]  # class name -> value, background 0 first
    regions: dict[str, list[str]] | None  # region -> the classes it unites, in decoding order
    ignore: int | None
    file_ending: str
    train: tuple[VolumeCase, ...]
    test: tuple[VolumeCase, ...]
    layout: str  # "nnunet" | "decathlon"

    @property
    def is_ct(self) -> tuple[bool, ...]:
        return tuple(name.strip().lower() in CT_NAMES for name in self.channel_names)


def is_volume_dataset(root: str | os.PathLike) -> bool:
    return (Path(root) / "imagesTr").is_dir()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SegxError(
            f"{shown(path)} is missing; a volume dataset (imagesTr/) needs dataset.json naming its channels and labels"
        )
    try:
        written = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SegxError(f"{shown(path)}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(written, dict):
        raise SegxError(f"{shown(path)}: must hold a JSON object with channel_names (or modality) and labels")
    return written


def _channel_names(written: dict, path: Path) -> tuple[str, ...]:
    table = written.get("channel_names", written.get("modality"))
    if not isinstance(table, dict) or not table:
        raise SegxError(f'{shown(path)}: no channel_names (nnU-Net) or modality (Decathlon); add e.g. {{"0": "CT"}}')
    try:
        order = sorted(table, key=int)
    except ValueError:
        raise SegxError(f"{shown(path)}: channel keys must be 0, 1, ...; found {sorted(table)}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise SegxError(f"{shown(path)}: channels must be numbered 0..{len(order) - 1}; found {order}")
    return tuple(str(table[k]) for k in order)


def _labels(written: dict, path: Path):
    """(class name -> value, regions or None, ignore value or None) of either layout."""
    table = written.get("labels")
    if not isinstance(table, dict) or not table:
        raise SegxError(f'{shown(path)}: no labels; add e.g. {{"background": 0, "liver": 1}}')
    if all(re.fullmatch(r"\d+", str(k)) for k in table):  # Decathlon: value -> name
        return {_name(v, path): int(k) for k, v in sorted(table.items(), key=lambda kv: int(kv[0]))}, None, None
    ignore = table.get("ignore")
    plain = {k: v for k, v in table.items() if k != "ignore"}
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise SegxError(f"{shown(path)}: labels.ignore={ignore!r} must be one integer value")
    if not any(isinstance(v, list) for v in plain.values()):
        bad = [k for k, v in plain.items() if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise SegxError(f"{shown(path)}: labels.{bad[0]}={plain[bad[0]]!r} must be an integer mask value")
        return {_name(k, path): int(v) for k, v in plain.items()}, None, ignore
    return (*_regions(plain, written.get("regions_class_order"), path), ignore)


def _regions(plain: dict, order, path: Path):
    """nnU-Net's region labels (``"whole": [1, 2, 3]``) as classes and segx regions: class value
    ``regions_class_order[i]`` is named after region i, the region that paints it."""
    regions = {k: (v if isinstance(v, list) else [v]) for k, v in plain.items() if k != "background"}
    if not isinstance(order, list) or len(order) != len(regions):
        raise SegxError(
            f"{shown(path)}: labels hold regions, so regions_class_order must list one value per region "
            f"({len(regions)}); see nnU-Net's region-based training"
        )
    names = list(regions)
    value_name = {int(value): names[i] for i, value in enumerate(order)}
    labels = {"background": int(plain.get("background", 0)), **{value_name[v]: v for v in sorted(value_name)}}
    segx_regions = {}
    for name, values in regions.items():
        missing = [v for v in values if int(v) not in value_name]
        if missing:
            raise SegxError(f"{shown(path)}: region {name} holds value {missing[0]}, which regions_class_order lacks")
        segx_regions[name] = [value_name[int(v)] for v in values]
    return labels, segx_regions


def _name(value, path: Path) -> str:
    name = re.sub(r"[^0-9A-Za-z_]+", "_", str(value).strip()).strip("_")
    if not name or not name[0].isalpha():
        raise SegxError(f"{shown(path)}: label name {value!r} must start with a letter")
    return name


def read_volume_dataset(root: str | os.PathLike) -> VolumeDataset:
    """The dataset at ``root`` with every file paired, checked before any voxel is read."""
    root = Path(root)
    path = root / "dataset.json"
    written = _read_json(path)
    channels = _channel_names(written, path)
    labels, regions, ignore = _labels(written, path)
    if labels.get("background", labels.get(next(iter(labels)))) != 0 or 0 not in labels.values():
        raise SegxError(f'{shown(path)}: labels need a background of value 0; add "background": 0')
    ending = str(written.get("file_ending", ".nii.gz"))
    layout = "nnunet" if "channel_names" in written else "decathlon"
    train = _cases(root, "imagesTr", "labelsTr", channels, ending, layout, required=True)
    test = _cases(root, "imagesTs", "labelsTs", channels, ending, layout, required=False)
    clash = {c.case_id for c in train} & {c.case_id for c in test}
    if clash:
        raise SegxError(f"{root}: case '{sorted(clash)[0]}' is in both imagesTr/ and imagesTs/; rename one")
    if test and any(c.label is None for c in test):
        test = ()  # images without labels: a set to predict, not to test on
    return VolumeDataset(root, channels, labels, regions, ignore, ending, tuple(train), tuple(test), layout)


def _cases(root: Path, images: str, labels: str, channels, ending: str, layout: str, required: bool):
    folder = root / images
    if not folder.is_dir():
        if required:
            raise SegxError(f"{folder} is missing; put the training images in imagesTr/ and their labels in labelsTr/")
        return []
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and volume_ending(p))
    if not files:
        raise SegxError(f"{folder} holds no volumes ({ending}); add them or check dataset.json's file_ending")
    by_case = _group_channels(files, folder, len(channels), layout)
    label_folder = root / labels
    cases = []
    for case_id, paths in by_case.items():
        label = None
        if label_folder.is_dir():
            label = next((label_folder / f"{case_id}{e}" for e in (ending, *_other(ending))
                          if (label_folder / f"{case_id}{e}").is_file()), None)  # fmt: skip
            if label is None and required:
                raise SegxError(
                    f"{shown(paths[0])}: no label {label_folder}/{case_id}{ending}; add it or remove the case"
                )
        elif required:
            raise SegxError(f"{label_folder} is missing; add one label volume per case of {folder}")
        cases.append(VolumeCase(case_id, tuple(paths), label, four_d=layout == "decathlon" and len(channels) > 1))
    if label_folder.is_dir():
        known = set(by_case)
        stray = [p for p in sorted(label_folder.iterdir()) if volume_ending(p) and strip_ending(p) not in known]
        if stray:
            raise SegxError(f"{shown(stray[0])}: a label without an image in {folder}; add the image or remove it")
    return cases


def _other(ending: str) -> tuple[str, ...]:
    return tuple(e for e in (".nii.gz", ".nii", ".nrrd", ".mha") if e != ending)


def _group_channels(files: list[Path], folder: Path, n_channels: int, layout: str) -> dict[str, list[Path]]:
    """Case id -> its channel files in order (nnU-Net), or -> its one file (Decathlon)."""
    stems = [strip_ending(p) for p in files]
    nnunet = layout == "nnunet" or all(_CHANNEL.match(s) for s in stems)
    if not nnunet:
        return {s: [p] for s, p in zip(stems, files, strict=True)}
    grouped: dict[str, dict[int, Path]] = {}
    for stem, path in zip(stems, files, strict=True):
        match = _CHANNEL.match(stem)
        if match is None:
            raise SegxError(
                f"{shown(path)}: nnU-Net names images <case>_0000{volume_ending(path)} (one file per channel); rename it"
            )
        grouped.setdefault(match["case"], {})[int(match["channel"])] = path
    for case_id, channels in grouped.items():
        missing = [c for c in range(n_channels) if c not in channels]
        if missing:
            raise SegxError(
                f"{folder}: case {case_id} lacks channel {missing[0]} ({case_id}_{missing[0]:04d}); dataset.json names "
                f"{n_channels} channel(s): add the file or fix channel_names"
            )
        extra = sorted(set(channels) - set(range(n_channels)))
        if extra:
            raise SegxError(
                f"{shown(channels[extra[0]])}: channel {extra[0]} but dataset.json names {n_channels}; "
                "add it to channel_names or remove the file"
            )
    return {case_id: [channels[c] for c in range(n_channels)] for case_id, channels in grouped.items()}
