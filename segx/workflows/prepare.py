"""From a ``data`` config to loaded cases, the shared split and its fingerprint.

Used by every entry point that reads data (train, check, bench) so they agree exactly.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from segx.config import require_choice, require_float, require_int
from segx.data.decoded import DecodedCase, decode_cases
from segx.data.folder import Dataset, check_disjoint, discover_cases, to_model_size
from segx.data.labels import Labels, Threshold, mask_rule
from segx.data.split import (
    CV_TAGS,
    FINGERPRINT_TAGS,
    SplitSettings,
    cv_fingerprint,
    default_split_path,
    fingerprint_parts,
    fold_split,
    load_or_create_folds,
    load_or_create_split,
    unlisted_cases,
)
from segx.data.synthetic import generate
from segx.data.synthetic_volumes import generate_volumes
from segx.data.volume_dataset import is_volume_dataset, read_volume_dataset
from segx.data.volume_prep import case_of
from segx.data.volume_slices import SlicedDataset, VolumeSettings, slice_dataset
from segx.errors import SegxError


@dataclass
class Prepared:
    dataset: Dataset  # every case; images and masks at model size in resize mode only
    split: dict[str, list[str]]  # stems per role
    fingerprint: str  # segx.data.split.fingerprint: split + file contents + settings
    split_path: Path
    fingerprint_parts: dict[str, str] = field(default_factory=dict)
    decoded: dict[str, DecodedCase] = field(default_factory=dict)  # every case at its own size, on disk
    cv_tags: dict[str, str] = field(default_factory=dict)  # cross-validation: layout fingerprint, fold, folds
    rule: Labels | Threshold = Threshold()  # how masks are read: several classes (data.labels), or one structure
    volumes: SlicedDataset | None = None  # a volume dataset: its slice plan and each case's grid

    @property
    def labels(self) -> Labels | None:
        """The classes (data.labels); None: one structure."""
        return self.rule.labels

    @property
    def n_classes(self) -> int:
        """Output channels of a member: 1 (a sigmoid) for one structure, K (a softmax) for K classes,
        R (sigmoids) for R regions."""
        return self.rule.n_outputs

    def part(self, role: str) -> Dataset:
        return self.dataset.subset(self.split[role])

    def cases(self, role: str, scale: float = 1.0) -> list[DecodedCase]:
        """The role's cases in the on-disk cache (memory-mapped), rescaled by ``scale``."""
        return [self.decoded[s].scaled(scale) for s in self.split[role]]

    @property
    def fingerprint_tags(self) -> dict[str, str]:
        """MLflow tags of a member: the fingerprint and its parts, so mismatches can be explained."""
        parts = self.fingerprint_parts or {"data": self.fingerprint}
        return {**{FINGERPRINT_TAGS[k]: v for k, v in parts.items()}, **self.cv_tags}


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
    require_choice(data, "kind", ["synthetic", "folder", "synthetic_volumes"], prefix="data.")
    resolve_volume_labels(data)
    require_choice(data, "mode", ["resize", "patch"], prefix="data.")
    require_int(data, "image_size", 32, 4096, prefix="data.")
    if data.mode == "patch":
        require_int(data, "patch_size", 32, 4096, prefix="data.")
        require_float(data, "scale", 0.01, 16.0, high_open=False, prefix="data.")
        # The sliding window's cost grows as 1 / (1 - overlap)^2: 0.9 is 25x the windows of 0.5.
        require_float(data, "overlap", 0.0, MAX_OVERLAP, high_open=False, prefix="data.")
        require_float(data, "foreground_fraction", 0.0, 1.0, high_open=False, prefix="data.")
        if not isinstance(data.pad, bool):
            raise SegxError(f"data.pad={data.pad!r} must be true or false")
        if data.samples_per_epoch is not None:
            require_int(data, "samples_per_epoch", 1, prefix="data.")
    _check_spacing(data.get("pixel_spacing"))
    require_float(data, "val_fraction", 0.0, 1.0, prefix="data.")
    require_float(data, "test_fraction", 0.0, 1.0, prefix="data.")
    require_choice(data, "resize_mode", ["resize", "pad"], prefix="data.")
    require_int(data, "max_pixels", 1, prefix="data.")
    if data.get("limit_cases") is not None:
        require_int(data, "limit_cases", 1, prefix="data.")
    require_int(data, "split_seed", 0, prefix="data.")
    require_float(data, "mask_threshold", 0.0, 65535.0, high_open=False, prefix="data.")
    labels_of(data)
    if data.kind == "synthetic_volumes":
        require_int(data, "n_cases", 4, prefix="data.")
        require_int(data, "source_size", 16, 1024, prefix="data.")
        require_int(data, "depth", 2, 1024, prefix="data.")
    if data.get("nsd_tolerance_mm") is not None:
        require_float(data, "nsd_tolerance_mm", 0.0, 1000.0, prefix="data.")
    if data.kind == "synthetic":
        require_int(data, "n_images", 4, prefix="data.")
        require_int(data, "source_size", 16, 4096, prefix="data.")
        require_int(data, "generator_seed", 0, prefix="data.")


def is_volume_data(data: DictConfig) -> bool:
    """Whether ``data`` names volumes (an nnU-Net/Decathlon folder, or synthetic volumes)."""
    return data.kind == "synthetic_volumes" or (data.kind == "folder" and is_volume_dataset(str(data.root)))


def volume_settings(data: DictConfig) -> VolumeSettings:
    def plain(key):
        value = data.get(key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    context = data.get("context_slices", 0)
    if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= 1:
        raise SegxError(f"data.context_slices={context!r} must be 0 or 1 (1: the slices either side as channels)")
    return VolumeSettings(
        plain("slice_axis"), plain("spacing"), int(context), int(data.get("max_voxels", 512 * 512 * 1024)),
        int(data.max_pixels), float(data.get("nsd_tolerance_mm") or 1.0),
    )  # fmt: skip


def resolve_volume_labels(data: DictConfig) -> None:
    """A volume dataset's classes come from its dataset.json: set data.labels, data.regions and
    data.ignore from it, or refuse a data.labels that disagrees (one line naming both)."""
    if data.kind == "synthetic_volumes":
        from segx.data.synthetic_volumes import LABELS

        table, regions, ignore = dict(LABELS), None, None
    elif data.kind == "folder" and is_volume_dataset(str(data.root)):
        dataset = read_volume_dataset(str(data.root))
        table, regions, ignore = dataset.labels, dataset.regions, dataset.ignore
    else:
        return
    given = data.get("labels")
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else given
    if given is not None and {str(k): int(v) for k, v in given.items()} != table:
        raise SegxError(
            f"data.labels={given} disagrees with {data.root}/dataset.json's labels {table}; drop data.labels "
            "(the dataset names its classes) or fix dataset.json"
        )
    with open_dict(data):
        data.labels, data.regions, data.ignore = table, regions, ignore


def labels_of(data: DictConfig) -> Labels | None:
    """``data.labels``, ``data.palette`` and ``data.ignore`` checked (one line naming the key), or
    None for one structure."""

    def plain(key):
        value = data.get(key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    return Labels.from_config(plain("labels"), plain("palette"), plain("ignore"), plain("regions"))


MIRRORING = ("HorizontalFlip", "D4", "SquareSymmetry")  # transforms that may flip an image horizontally


def flip_swap_of(data: DictConfig, labels: Labels | None, transforms=(), tta: str | None = None):
    """The class permutation of ``data.flip_swap`` (None without pairs), after refusing, in one
    line naming the key, a mirroring (augmentation ``transforms`` or flip TTA) of classes whose
    names say left or right when no swap is declared: it would teach the wrong side."""
    pairs = data.get("flip_swap")
    pairs = OmegaConf.to_container(pairs, resolve=True) if OmegaConf.is_config(pairs) else pairs
    rule = mask_rule(labels)
    table = rule.swap_table(pairs)
    sided = rule.sided()
    if table is None and sided:
        names = [str(t.get("_target_", "")).rsplit(".", 1)[-1] for t in transforms or ()]
        mirror = next((n for n in names if n in MIRRORING), None)
        if mirror or tta == "flip":
            what = f"augment has {mirror}" if mirror else "ensemble.tta=flip mirrors the images"
            raise SegxError(
                f"{what}, and classes {', '.join(sided)} name a side: a mirrored image shows each on the other side; "
                f"set data.flip_swap (e.g. data.flip_swap='[[{sided[0]},{sided[-1]}]]') or use augment=none"
            )
    return table


def check_classes(labels: Labels, decoded: list[DecodedCase], train: list[str], root: Path) -> dict[str, list[int]]:
    """Every class of ``labels`` appears in some training case (a class never seen cannot be
    learned, and its score would be noise); returns, per class, [pixels, cases] over every case
    with a mask (for ``segx.data.check``)."""
    k = labels.n_classes
    pixels, cases, in_train = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k, bool)
    train = set(train)
    for case in decoded:
        if not case.has_mask:
            continue
        counts = np.bincount(np.asarray(case.mask()).ravel(), minlength=256)
        present = counts[:k] > 0
        pixels += counts[:k]
        cases += present
        if case.stem in train:
            in_train |= present
    require_trained_classes(labels, in_train, root)
    return {name: [int(pixels[c]), int(cases[c])] for c, name in enumerate(labels.names)}


def require_trained_classes(labels: Labels, in_train: np.ndarray, root: Path) -> None:
    """Every foreground class in some training case (``in_train``: bool (K,)); ``segx.train`` and
    ``segx.data.check`` apply this one rule."""
    missing = [labels.names[c] for c in range(1, labels.n_classes) if not in_train[c]]
    if missing:
        raise SegxError(
            f"class {missing[0]} (data.labels.{missing[0]}={labels.values[labels.index(missing[0])]}) appears in no "
            f"training case of {root}; check its mask value, or drop it from data.labels"
        )


def training_stems(
    data: DictConfig, output_dir: str, stems: list[str], test_stems: list[str] | None
) -> list[list[str]]:
    """The training cases ``segx.train`` would use (one list; with ``data.folds``, one per fold),
    from the split file where it exists, else as it would be made; writes nothing."""
    from segx.data.split import make_folds, make_split

    groups = read_groups(data.stratify_csv, data.stratify_column) if data.stratify_csv else None
    path = split_file_path(data, output_dir, stems, test_stems, groups)
    folds = data.get("folds")
    args = (float(data.test_fraction), int(data.split_seed), test_stems, groups)
    if folds:
        layout = (
            load_or_create_folds(path, stems, int(folds), *args)
            if path.exists()
            else make_folds(stems, int(folds), *args)
        )
        sets = [fold_split(layout, i)["train"] for i in range(int(folds))]
    else:
        val = float(data.val_fraction)
        split = load_or_create_split(path, stems, val, *args) if path.exists() else make_split(stems, val, *args)
        sets = [split["train"]]
    return [s[: int(data.limit_cases)] for s in sets] if data.get("limit_cases") else sets


def split_file_path(data: DictConfig, output_dir: str, stems: list[str], test_stems: list[str] | None, groups) -> Path:
    """``data.split_file``, or the split file named after what the split is made from."""
    if data.split_file:
        return Path(data.split_file)
    folds = data.get("folds")
    name = str(data.name).strip("/").replace("/", "_").replace("\\", "_") or "data"
    return default_split_path(
        Path(output_dir) / "splits",
        f"{name}-cv{folds}" if folds else name,
        stems,
        test_stems,
        SplitSettings(
            -float(folds) if folds else float(data.val_fraction),  # a fold layout never shares a plain split's name
            float(data.test_fraction),
            int(data.split_seed),
            data.stratify_column if groups else None,
        ),
    )


def _check_spacing(spacing) -> None:
    if spacing is None:
        return
    values = list(spacing) if OmegaConf.is_list(spacing) or isinstance(spacing, (list, tuple)) else [spacing]
    ok = len(values) in (1, 2) and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < float("inf") for v in values
    )
    if not ok:
        raise SegxError(
            f"data.pixel_spacing={spacing!r} must be null, one positive number or [row, column] pixel "
            "sizes (e.g. data.pixel_spacing=0.5 for 0.5 um pixels)"
        )


def pixel_spacing(data: DictConfig):
    """``data.pixel_spacing`` as None, a float or a (row, column) tuple (HD95 in those units)."""
    spacing = data.get("pixel_spacing")
    if spacing is None:
        return None
    if OmegaConf.is_list(spacing):
        values = [float(v) for v in spacing]
        return values[0] if len(values) == 1 else (values[0], values[1])
    return float(spacing)


def check_view(data: DictConfig, decoded: list[DecodedCase]) -> None:
    """Patch mode against the images' sizes, once they are known (headers were read, no model
    is built yet): a patch larger than every image without padding, a scale that leaves almost
    nothing of an image."""
    if data.mode != "patch":
        return
    scale, patch = float(data.scale), int(data.patch_size)
    smallest = min(decoded, key=lambda c: min(c.shape))
    side = min(smallest.shape) * scale
    if side < 8:
        raise SegxError(
            f"data.scale={scale:g} shrinks {smallest.stem} ({smallest.shape[1]}x{smallest.shape[0]}) to "
            f"{side:.1f} px; use data.scale >= {8 / min(smallest.shape):.3g} or remove the image"
        )
    if not data.pad:
        small = [c for c in decoded if min(c.shape) * scale < patch]
        if small:
            largest = max(max(c.shape) for c in decoded)
            hint = (
                f"use data.patch_size <= {int(min(small[0].shape) * scale) // 32 * 32 or 32}"
                if len(small) < len(decoded)
                else f"every image is smaller (largest side {largest} px); use a smaller data.patch_size"
            )
            raise SegxError(
                f"data.pad=false but {small[0].stem} ({small[0].shape[1]}x{small[0].shape[0]} px at scale "
                f"{scale:g}) is smaller than data.patch_size={patch} ({len(small)} such images); {hint}, "
                "or set data.pad=true"
            )


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


MAX_FOLDS = 100  # cross-validation folds: more cost as many trainings, and teach nothing more
MAX_OVERLAP = 0.9  # sliding-window overlap: 0.9 already runs 25x the windows of the default 0.5


def check_fold(data: DictConfig, fold) -> None:
    """``fold`` against ``data.folds``, before anything is read."""
    folds = data.get("folds")
    if folds is None:
        if fold is not None:
            raise SegxError(
                f"fold={fold} but data.folds is null; set data.folds=K (e.g. 5) to cross-validate, or drop fold"
            )
        return
    require_int(data, "folds", 2, MAX_FOLDS, prefix="data.")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise SegxError(
            f"fold={fold!r} is not one of 0..{folds - 1} (data.folds={folds}); train one with fold=0 or "
            f"all with -m fold={','.join(map(str, range(folds)))}"
        )


def prepare(
    data: DictConfig, output_dir: str, progress: Callable | None = None, fold: int | None = None, images: bool = True
) -> Prepared:
    """``images=False``: the split and fingerprint only (``segx.ensemble`` naming its data); no
    case is held in memory at the model's size."""
    validate_data_config(data)
    check_fold(data, fold)
    root = Path(str(data.root))
    if data.kind == "synthetic":
        generate(
            root, int(data.n_images), int(data.source_size), int(data.generator_seed), str(data.get("scene", "nuclei"))
        )
    volumes = _sliced_volumes(data, output_dir, progress) if is_volume_data(data) else None
    if volumes is not None:  # from here on a volume dataset is its folder of slices
        root = volumes.folder
    cases = discover_cases(root)
    test_cases = []
    if (root / "test_images").is_dir():
        test_cases = discover_cases(root, "test_images", "test_masks")
        check_disjoint(root, cases, test_cases)
    all_cases = cases + test_cases
    cache_root = Path(str(data.cache_dir)) if data.get("cache_dir") else Path(output_dir) / "cache" / "decoded"
    rule = mask_rule(labels_of(data), float(data.mask_threshold))
    decoded = decode_cases(all_cases, cache_root, rule.decoding, int(data.max_pixels), progress)
    if not any(c.foreground_pixels for c in decoded[: len(cases)]):
        raise SegxError(f"no mask in {root}/train_masks has any foreground; check the masks or {rule.config_key}")
    check_view(data, decoded)
    dataset = _model_size_dataset(decoded, data, images)
    stems = [c.stem for c in cases]
    test_stems = [c.stem for c in test_cases] or None
    slices = None
    if volumes is not None:  # splits and folds are by case (patient), never by slice
        slices = stems + (test_stems or [])
        stems = sorted({case_of(s) for s in stems})
        test_stems = sorted({case_of(s) for s in test_stems}) if test_stems else None
    groups = read_groups(data.stratify_csv, data.stratify_column) if data.stratify_csv else None
    folds = data.get("folds")
    split_path = split_file_path(data, output_dir, stems, test_stems, groups)
    layout = None
    if folds:
        layout = load_or_create_folds(
            split_path, stems, int(folds), float(data.test_fraction), int(data.split_seed), test_stems, groups
        )
        split = fold_split(layout, int(fold))
    else:
        split = load_or_create_split(
            split_path,
            stems,
            float(data.val_fraction),
            float(data.test_fraction),
            int(data.split_seed),
            test_stems,
            groups,
        )
    warn_unlisted(split_path, root, unlisted_cases(split, stems + (test_stems or [])))
    if data.get("limit_cases"):  # a quick run (debug=default): the first cases of each role
        split = {role: stems_[: int(data.limit_cases)] for role, stems_ in split.items()}
    if slices is not None:
        split = {role: [s for s in slices if case_of(s) in set(ids)] for role, ids in split.items()}
    # How a member sees the images (size, mode, scale) is not part of the data: members are
    # scored at each image's own size, so members that see the data differently still combine.
    if rule.per_class:
        check_classes(rule, decoded, split["train"], root)
    digests = dict(zip(dataset.stems, dataset.digests, strict=True))
    parts = fingerprint_parts(split, None, digests, None, **rule.fingerprint_settings)
    cv = {}
    if layout is not None:
        cv = {CV_TAGS["cv"]: cv_fingerprint(layout, parts), CV_TAGS["fold"]: str(fold), CV_TAGS["folds"]: str(folds)}
    return Prepared(dataset, split, parts["data"], split_path, parts, {c.stem: c for c in decoded}, cv, rule, volumes)


def _sliced_volumes(data: DictConfig, output_dir: str, progress) -> SlicedDataset:
    """The volume dataset's slice folder (written once, beside the decoded cache)."""
    root = Path(str(data.root))
    if data.kind == "synthetic_volumes":
        generate_volumes(
            root, int(data.n_cases), int(data.source_size), int(data.depth), int(data.generator_seed),
            tuple(float(v) for v in data.spacing_mm),
        )  # fmt: skip
    cache = Path(str(data.cache_dir)) if data.get("cache_dir") else Path(output_dir) / "cache" / "decoded"
    return slice_dataset(read_volume_dataset(root), volume_settings(data), cache.parent / "slices", progress)


def _model_size_dataset(decoded: list[DecodedCase], data: DictConfig, images: bool = True) -> Dataset:
    """Resize mode trains on every case at the model's input size, held in memory (small: N x S x S);
    patch mode reads patches from the on-disk cache instead and holds no images."""
    stems = [c.stem for c in decoded]
    sizes = [tuple(c.shape) for c in decoded]
    digests = [c.digests for c in decoded]
    if data.mode == "patch" or not images:
        return Dataset(stems, None, None, sizes, digests)
    size, how = int(data.image_size), str(data.resize_mode)
    images = np.zeros((len(decoded), size, size, 3), np.uint8)
    masks = np.zeros((len(decoded), size, size), np.uint8)
    for i, case in enumerate(decoded):
        images[i] = to_model_size(np.asarray(case.image()), size, how, is_mask=False)
        if case.has_mask:
            masks[i] = to_model_size(np.asarray(case.mask()), size, how, is_mask=True)
    return Dataset(stems, images, masks, sizes, digests)


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
