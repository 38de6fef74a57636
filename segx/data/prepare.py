"""From a ``data`` config to loaded cases, the shared split and its fingerprint.

Used by every entry point that reads data (train, check, bench) so they agree exactly.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segx.config import require_choice, require_float, require_int
from segx.data.folder import Dataset, check_foreground, discover_cases, load_cases
from segx.data.split import (
    FINGERPRINT_TAGS,
    default_split_path,
    fingerprint_parts,
    load_or_create_split,
    unlisted_cases,
)
from segx.data.synthetic import generate
from segx.errors import SegxError


@dataclass
class Prepared:
    dataset: Dataset              # every case (train folder and test folder) at model size
    split: dict[str, list[str]]   # stems per role
    fingerprint: str              # segx.data.split.fingerprint: split + file contents + settings
    split_path: Path
    fingerprint_parts: dict[str, str] = field(default_factory=dict)

    def part(self, role: str) -> Dataset:
        return self.dataset.subset(self.split[role])

    @property
    def fingerprint_tags(self) -> dict[str, str]:
        """MLflow tags of a member: the fingerprint and its parts, so mismatches can be explained."""
        parts = self.fingerprint_parts or {"data": self.fingerprint}
        return {FINGERPRINT_TAGS[k]: v for k, v in parts.items()}


def validate_data_config(data: DictConfig) -> None:
    """Types and ranges, with the key named, before anything is read."""
    if OmegaConf.is_missing(data, "root"):
        raise SegxError("data.root is not set; pass data.root=PATH (a folder with train_images/ and train_masks/)")
    if data.root is None or not str(data.root).strip():
        # Path('') is the working directory: an empty root would silently read (or generate into) it.
        raise SegxError(
            f"data.root={data.root!r} is empty; pass data.root=PATH (a folder with train_images/ and "
            "train_masks/; data.root=. for the working directory)"
        )
    require_choice(data, "kind", ["synthetic", "folder"], prefix="data.")
    require_int(data, "image_size", 32, 4096, prefix="data.")
    require_float(data, "val_fraction", 0.0, 1.0, prefix="data.")
    require_float(data, "test_fraction", 0.0, 1.0, prefix="data.")
    require_choice(data, "resize_mode", ["resize", "pad"], prefix="data.")
    require_int(data, "max_pixels", 1, prefix="data.")
    require_int(data, "split_seed", 0, prefix="data.")
    require_float(data, "mask_threshold", 0.0, 65535.0, high_open=False, prefix="data.")
    if data.kind == "synthetic":
        require_int(data, "n_images", 4, prefix="data.")
        require_int(data, "source_size", 16, 4096, prefix="data.")
        require_int(data, "generator_seed", 0, prefix="data.")


def read_groups(csv_path: str, column: str) -> dict[str, str]:
    path = Path(csv_path)
    if not path.is_file():
        raise SegxError(f"data.stratify_csv={csv_path}: no such file; fix the path or set it to null")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        for needed in ("stem", column):
            if needed not in fields:
                raise SegxError(f"{path}: no column '{needed}' (has {', '.join(fields)}); fix data.stratify_column")
        return {row["stem"]: row[column] for row in reader}


def prepare(data: DictConfig, output_dir: str, progress: Callable | None = None) -> Prepared:
    validate_data_config(data)
    root = Path(str(data.root))
    if data.kind == "synthetic":
        generate(root, int(data.n_images), int(data.source_size), int(data.generator_seed))
    cases = discover_cases(root)
    test_cases = []
    if (root / "test_images").is_dir():
        test_cases = discover_cases(root, "test_images", "test_masks")
        clash = {c.stem for c in cases} & {c.stem for c in test_cases}
        if clash:
            raise SegxError(f"{root}: stem '{sorted(clash)[0]}' is in both train_images/ and test_images/; rename one")
    dataset = load_cases(
        cases + test_cases,
        int(data.image_size),
        str(data.resize_mode),
        float(data.mask_threshold),
        int(data.max_pixels),
        progress,
    )
    check_foreground(dataset, f"{root}/train_masks")
    stems = [c.stem for c in cases]
    test_stems = [c.stem for c in test_cases] or None
    groups = read_groups(data.stratify_csv, data.stratify_column) if data.stratify_csv else None
    split_path = Path(data.split_file) if data.split_file else default_split_path(
        Path(output_dir) / "splits",
        str(data.name).strip("/").replace("/", "_").replace("\\", "_") or "data",
        stems,
        float(data.val_fraction),
        float(data.test_fraction),
        int(data.split_seed),
        test_stems,
        data.stratify_column if groups else None,
    )
    split = load_or_create_split(
        split_path, stems, float(data.val_fraction), float(data.test_fraction), int(data.split_seed), test_stems, groups
    )
    warn_unlisted(split_path, root, unlisted_cases(split, dataset.stems))
    parts = fingerprint_parts(
        split,
        int(data.image_size),
        dict(zip(dataset.stems, dataset.digests, strict=True)),
        str(data.resize_mode),
        float(data.mask_threshold),
    )
    return Prepared(dataset, split, parts["data"], split_path, parts)


def warn_unlisted(split_path: Path, root: Path, unlisted: list[str]) -> None:
    """Pairs added after the split was written are left out: say so (the file stays as it is).

    A warning, not an error: a fixed split is what lets later members ensemble with earlier
    ones (nnU-Net likewise trains on its splits_final.json as written).
    """
    if not unlisted:
        return
    print(
        f"segx: warning: {root} holds {len(unlisted)} case(s) that the split {split_path} does "
        f"not list (e.g. '{unlisted[0]}'); they are not used for training, validation or test. "
        f"To use them, set data.split_file to a new path (or delete {split_path}) to make a new "
        "split; members trained on the old split will not ensemble with the new ones",
        file=sys.stderr,
        flush=True,
    )
