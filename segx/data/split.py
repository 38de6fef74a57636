"""One fixed train/val/test split per dataset, written once and reused by every member."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segx.errors import SegxError

SPLITS = ("train", "val", "test")


def fingerprint(split: Mapping[str, Sequence[str]], image_size: int | None = None) -> str:
    """16-hex-digit hash of the split's case lists (and the model input size, if given).

    Two members may be ensembled only when their fingerprints are equal: same cases in the
    same roles, predicted at the same size.
    """
    payload = {k: list(split[k]) for k in SPLITS}
    if image_size is not None:
        payload["image_size"] = int(image_size)
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    strata: dict[str, list[str]] = {}
    for stem in sorted(stems):
        strata.setdefault(groups.get(stem, "") if groups else "", []).append(stem)
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

    An existing file is never rewritten: it is the record every member shares. If it no longer
    matches the data folder, that is an error, not a silent re-split.
    """
    path = Path(path)
    if path.exists():
        try:
            split = json.loads(path.read_text())
            split = {k: list(split[k]) for k in SPLITS}
        except (ValueError, KeyError, TypeError):
            raise SegxError(
                f"{path}: not a valid split file (needs train/val/test lists); delete it to "
                "create a new one"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(split, indent=1))
    os.replace(tmp, path)  # atomic: parallel members never read half a file
    return split


def default_split_path(
    folder: str | os.PathLike,
    name: str,
    stems: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_stems: Sequence[str] | None,
    stratify: str | None,
) -> Path:
    """A split file name that changes whenever the inputs to the split change."""
    key = json.dumps(
        [sorted(stems), sorted(test_stems or []), val_fraction, test_fraction, seed, stratify]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(folder) / f"{name}-seed{seed}-{digest}.json"
