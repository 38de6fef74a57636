"""One fixed train/val/test split per dataset, written once and reused by every member."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segx.errors import SegxError

SPLITS = ("train", "val", "test")


# MLflow tags of a member run, one per part of its data fingerprint, so that ``segx.ensemble``
# can say *why* two members differ instead of only that they do.
FINGERPRINT_TAGS = {
    "data": "segx.data_fingerprint",  # all of the below: what members must share
    "split": "segx.split_fingerprint",  # case names per role
    "images": "segx.images_fingerprint",  # bytes of those cases' image files
    "masks": "segx.masks_fingerprint",  # bytes of their mask files
    "settings": "segx.data_settings",  # how files become model inputs (plain text)
}
# Cross-validation: the fold layout (test cases + every fold) and everything else but the fold,
# shared by the K fold runs of every configuration trained on that layout.
CV_TAGS = {"cv": "segx.cv_fingerprint", "fold": "segx.fold", "folds": "segx.folds"}


def _hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_parts(
    split: Mapping[str, Sequence[str]],
    image_size: int | None = None,
    digests: Mapping[str, tuple[str, str]] | None = None,
    resize_mode: str | None = None,
    mask_threshold: float | None = None,
    labels: str | None = None,
) -> dict[str, str]:
    """The data fingerprint and its parts (keys of :data:`FINGERPRINT_TAGS`).

    ``labels``: the classes' key (:attr:`segx.data.labels.Labels.key`) of a multi-class dataset:
    members that name other classes, or read masks otherwise, never share a fingerprint.

    ``digests[stem] = (image file hash, mask file hash)`` as recorded by ``load_cases``; only
    the cases the split lists count, so pairs the split does not know leave it unchanged (they
    are not used). Without ``digests`` only names are hashed (images/masks parts are empty).
    """
    stems = sorted({s for k in SPLITS for s in split[k]})
    parts = {"split": _hash({k: list(split[k]) for k in SPLITS}), "images": "", "masks": ""}
    if digests is not None:
        missing = ("", "")
        parts["images"] = _hash([[s, digests.get(s, missing)[0]] for s in stems])
        parts["masks"] = _hash([[s, digests.get(s, missing)[1]] for s in stems])
    settings = {  # each written where it is given, in this order
        "image_size": None if image_size is None else int(image_size),
        "resize_mode": resize_mode,
        "mask_threshold": None if mask_threshold is None else f"{float(mask_threshold):g}",
        "labels": labels,
    }
    parts["settings"] = " ".join(f"{key}={value}" for key, value in settings.items() if value is not None)
    parts["data"] = _hash(parts)
    return parts


def fingerprint(
    split: Mapping[str, Sequence[str]],
    image_size: int | None = None,
    digests: Mapping[str, tuple[str, str]] | None = None,
    resize_mode: str | None = None,
    mask_threshold: float | None = None,
) -> str:
    """16-hex-digit hash of the split, the bytes of its files and how they are read.

    Two members may be ensembled only when their fingerprints are equal: same cases in the
    same roles, same image and mask file contents, read and resized the same way.
    """
    return fingerprint_parts(split, image_size, digests, resize_mode, mask_threshold)["data"]


def unlisted_cases(split: Mapping[str, Sequence[str]], stems: Sequence[str]) -> list[str]:
    """Cases of the data folder that the split does not list (added after it was written)."""
    listed = {s for k in SPLITS for s in split[k]}
    return [s for s in stems if s not in listed]


def make_split(
    stems: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_stems: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Deterministic split of ``stems``; stratified by ``groups[stem]`` when given.

    With ``test_stems`` (a separate test folder), ``stems`` are split into train/val only.
    """
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise SegxError(f"{key}={value} is out of range; use a fraction in [0, 1)")
    if test_stems is None and val_fraction + test_fraction >= 1:
        raise SegxError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
            "training cases; lower them"
        )
    rng = np.random.default_rng(seed)
    strata = _strata(stems, groups)
    split: dict[str, list[str]] = {k: [] for k in SPLITS}
    for name in sorted(strata):
        members = strata[name]
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_test = 0 if test_stems is not None else int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        split["test"] += order[:n_test]
        split["val"] += order[n_test : n_test + n_val]
        split["train"] += order[n_test + n_val :]
    if test_stems is not None:
        split["test"] = list(test_stems)
    for key in SPLITS:
        split[key] = sorted(split[key])
    if not split["train"]:
        raise SegxError("the split has no training cases; add data or lower the fractions")
    if not split["val"]:
        raise SegxError(
            f"the split has no validation cases ({len(stems)} cases, "
            f"data.val_fraction={val_fraction}); add data or raise data.val_fraction"
        )
    return split


def load_or_create_split(
    path: str | os.PathLike,
    stems: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_stems: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Read the split at ``path``; create it there first if it does not exist.

    An existing file is never rewritten: it is the record every member shares. If it names a
    case the data folder lacks, that is an error, not a silent re-split; cases the folder has
    and the file does not list are left out (see :func:`unlisted_cases`; ``prepare`` warns).
    """
    path = Path(path)
    if path.exists():
        try:
            split = json.loads(path.read_text())
            split = {k: list(split[k]) for k in SPLITS}
        except (ValueError, KeyError, TypeError):
            raise SegxError(
                f"{path}: not a valid split file (needs train/val/test lists); delete it to create a new one"
            ) from None
        known = set(stems) | set(test_stems or ())
        unknown = [s for k in SPLITS for s in split[k] if s not in known]
        if unknown:
            raise SegxError(
                f"{path}: names case '{unknown[0]}' that is not in the data folder "
                f"({len(unknown)} such); point data.split_file elsewhere or delete it"
            )
        return split
    split = make_split(stems, val_fraction, test_fraction, seed, test_stems, groups)
    _write_once(path, split)
    return split


def _strata(stems: Sequence[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    """Sorted stems per group (one group '' without ``groups``)."""
    strata: dict[str, list[str]] = {}
    for stem in sorted(stems):
        strata.setdefault(groups.get(stem, "") if groups else "", []).append(stem)
    return strata


def _write_once(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # atomic: parallel members never read half a file


@dataclass(frozen=True)
class SplitSettings:
    """How a split is drawn from its cases: the validation and test fractions, the seed, and the
    column it is stratified by (None: not stratified)."""

    val_fraction: float
    test_fraction: float
    seed: int
    stratify: str | None = None


def default_split_path(
    folder: str | os.PathLike,
    name: str,
    stems: Sequence[str],
    test_stems: Sequence[str] | None,
    settings: SplitSettings,
) -> Path:
    """A split file name that changes whenever the inputs to the split change: the cases
    (``test_stems``: a separate test folder's) and the ``settings``."""
    key = json.dumps(
        [
            sorted(stems),
            sorted(test_stems or []),
            settings.val_fraction,
            settings.test_fraction,
            settings.seed,
            settings.stratify,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(folder) / f"{name}-seed{settings.seed}-{digest}.json"


def make_folds(
    stems: Sequence[str],
    folds: int,
    test_fraction: float,
    seed: int,
    test_stems: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """A fixed test set plus ``folds`` disjoint folds of the remaining cases, stratified by
    ``groups`` when given (each stratum is shuffled, its test share taken first, the rest dealt
    round-robin so every fold gets its share of every stratum, as sklearn's StratifiedKFold).

    Returns ``{"test": [...], "folds": [[...], ...]}``, each list sorted.
    """
    if not 0 <= test_fraction < 1:
        raise SegxError(f"data.test_fraction={test_fraction} is out of range; use a fraction in [0, 1)")
    if folds > len(stems):  # before a list per fold is made (data.folds=10**12 would fill memory)
        raise SegxError(
            f"data.folds={folds} is more than the {len(stems)} cases; use data.folds <= {max(2, len(stems))} or add data"
        )
    rng = np.random.default_rng(seed)
    strata = _strata(stems, groups)
    test: list[str] = []
    out: list[list[str]] = [[] for _ in range(folds)]
    start = 0
    for name in sorted(strata):
        members = strata[name]
        order = [members[i] for i in rng.permutation(len(members))]
        n_test = 0 if test_stems is not None else int(round(len(order) * test_fraction))
        test += order[:n_test]
        rest = order[n_test:]
        if len(rest) < folds:
            where = f"stratum '{name}' of data.stratify_column" if name else "the data"
            raise SegxError(
                f"data.folds={folds} is more than the {len(rest)} non-test cases of {where}; "
                f"use data.folds <= {max(2, len(rest))} or add data"
            )
        for i, stem in enumerate(rest):
            out[(start + i) % folds].append(stem)
        start = (start + len(rest)) % folds  # the next stratum continues where this one ended
    if test_stems is not None:
        test = list(test_stems)
    return {"test": sorted(test), "folds": [sorted(f) for f in out]}


def fold_split(layout: Mapping, fold: int) -> dict[str, list[str]]:
    """The train/val/test split of ``fold``: validate on fold ``fold``, train on the others."""
    folds = layout["folds"]
    train = sorted(s for i, f in enumerate(folds) if i != fold for s in f)
    return {"train": train, "val": list(folds[fold]), "test": list(layout["test"])}


def cv_fingerprint(layout: Mapping, parts: Mapping[str, str]) -> str:
    """What every fold of every configuration on one layout shares: the layout itself, the file
    contents and the reading settings (not which fold is held out)."""
    return _hash(
        {
            "test": list(layout["test"]),
            "folds": [list(f) for f in layout["folds"]],
            "images": parts.get("images", ""),
            "masks": parts.get("masks", ""),
            "settings": parts.get("settings", ""),
        }
    )


def load_or_create_folds(
    path: str | os.PathLike,
    stems: Sequence[str],
    folds: int,
    test_fraction: float,
    seed: int,
    test_stems: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """Read the fold layout at ``path``; create it first if missing. Never rewritten."""
    path = Path(path)
    if path.exists():
        try:
            layout = json.loads(path.read_text())
            layout = {"test": list(layout["test"]), "folds": [list(f) for f in layout["folds"]]}
        except (ValueError, KeyError, TypeError):
            raise SegxError(
                f"{path}: not a valid fold file (needs test and folds lists); delete it to create a new one"
            ) from None
        if len(layout["folds"]) != folds:
            raise SegxError(
                f"{path}: holds {len(layout['folds'])} folds but data.folds={folds}; set data.folds="
                f"{len(layout['folds'])} or point data.split_file elsewhere"
            )
        known = set(stems) | set(test_stems or ())
        unknown = [s for f in [layout["test"], *layout["folds"]] for s in f if s not in known]
        if unknown:
            raise SegxError(
                f"{path}: names case '{unknown[0]}' that is not in the data folder; point data.split_file elsewhere or delete it"
            )
        return layout
    layout = make_folds(stems, folds, test_fraction, seed, test_stems, groups)
    _write_once(path, layout)
    return layout
