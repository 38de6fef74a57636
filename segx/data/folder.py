"""Pairing images with masks by file stem and loading them at the network's input size.

Layout: ``ROOT/train_images/<stem>.<ext>`` with ``ROOT/train_masks/<stem>.<ext>``, optional
``ROOT/test_images`` + ``ROOT/test_masks``. Hidden files and files with other extensions are
ignored; everything else must pair up exactly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from segx.data.io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, read_image, read_label_map, read_mask, shown
from segx.errors import SegxError


@dataclass(frozen=True)
class Case:
    stem: str
    image: Path
    mask: Path | None


@dataclass
class Dataset:
    """Cases loaded at model size.

    images: uint8 (N, S, S, 3) RGB; masks: uint8 (N, S, S) in {0, 1} (None in patch mode, which
    reads patches from the on-disk cache: :mod:`segx.data.decoded`);
    original_sizes: (height, width) per case before resizing;
    digests: (image file hash, mask file hash or '') per case, for the data fingerprint.
    """

    stems: list[str]
    images: np.ndarray | None
    masks: np.ndarray | None
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    digests: list[tuple[str, str]] = field(default_factory=list)

    def subset(self, stems: Sequence[str]) -> Dataset:
        index = {s: i for i, s in enumerate(self.stems)}
        missing = [s for s in stems if s not in index]
        if missing:
            raise SegxError(
                f"split names case '{missing[0]}' that is not in the data folder "
                f"({len(missing)} missing); delete the split file to create a new one"
            )
        rows = [index[s] for s in stems]
        return Dataset(
            list(stems),
            None if self.images is None else self.images[rows],
            None if self.masks is None else self.masks[rows],
            [self.original_sizes[r] for r in rows],
            [self.digests[r] for r in rows] if self.digests else [],
        )


def list_images(folder: Path) -> dict[str, Path]:
    """Image files in ``folder`` by stem; raises on duplicate stems.

    Names may hold bytes that are not UTF-8 (kept as Python's surrogate escapes, so the same
    bytes name the outputs). A pipe or device named like an image is refused: opening it would
    block for ever. A broken link is kept, so that reading it names it.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except NotADirectoryError:
        raise SegxError(f"{shown(folder)} is a file, not a folder; give the folder that holds the images") from None
    except FileNotFoundError:
        raise SegxError(f"{shown(folder)} does not exist; give a folder of images") from None
    except OSError as exc:
        raise SegxError(f"{shown(folder)}: cannot list it ({exc.strerror}); check its permissions") from None
    found: dict[str, Path] = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.is_dir():
            continue
        if path.exists() and not path.is_file():
            raise SegxError(f"{shown(path)}: not a regular file (a pipe or device); remove it")
        stem = path.stem
        if stem in found:
            raise SegxError(
                f"{shown(path)}: stem '{shown(stem)}' also used by {shown(found[stem].name)}; "
                "rename one so that each image has one mask"
            )
        found[stem] = path
    return found


def discover_cases(
    root: str | os.PathLike,
    images_dir: str = "train_images",
    masks_dir: str | None = "train_masks",
    require_masks: bool = True,
) -> list[Case]:
    """Pair ``root/images_dir`` with ``root/masks_dir`` by stem."""
    root = Path(root)
    if not root.is_dir():
        raise SegxError(f"data folder {root} does not exist; set data.root=PATH to your data")
    image_folder = root / images_dir
    if not image_folder.is_dir():
        raise SegxError(
            f"{image_folder} is missing; put images in {images_dir}/ and masks in {masks_dir}/ (same file stems)"
        )
    images = list_images(image_folder)
    if not images:
        raise SegxError(f"{image_folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some")
    if masks_dir is None:
        return [Case(stem, path, None) for stem, path in images.items()]
    mask_folder = root / masks_dir
    if not mask_folder.is_dir():
        if not require_masks:
            return [Case(stem, path, None) for stem, path in images.items()]
        raise SegxError(f"{mask_folder} is missing; add one mask per image with the same stem")
    masks = list_images(mask_folder)
    for stem, path in images.items():
        if stem not in masks:
            raise SegxError(f"{path}: no mask {mask_folder}/{stem}.png (or .jpg/.tif); add it or remove the image")
    for stem, path in masks.items():
        if stem not in images:
            raise SegxError(f"{path}: mask without an image in {image_folder}; add it or remove the mask")
    return [Case(stem, images[stem], masks[stem]) for stem in images]


def check_disjoint(root: str | os.PathLike, cases: list[Case], test_cases: list[Case]) -> None:
    """No stem in both train_images/ and test_images/: a case would be trained on and tested on
    (``segx.train`` and ``segx.data.check`` apply this one rule)."""
    clash = {c.stem for c in cases} & {c.stem for c in test_cases}
    if clash:
        raise SegxError(f"{root}: stem '{sorted(clash)[0]}' is in both train_images/ and test_images/; rename one")


def to_model_size(array: np.ndarray, size: int, mode: str, is_mask: bool) -> np.ndarray:
    """Resize (``mode='resize'``) or zero-pad to a square then resize (``'pad'``)."""
    if mode == "pad":
        height, width = array.shape[:2]
        side = max(height, width)
        pad = [(0, side - height), (0, side - width)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pad)
    elif mode != "resize":
        raise SegxError(f"unknown data.resize_mode '{mode}'; use 'resize' or 'pad'")
    if array.shape[0] == size and array.shape[1] == size:
        return array
    if is_mask:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if array.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(array, (size, size), interpolation=interpolation)


def rescale(array: np.ndarray, scale: float, is_mask: bool) -> np.ndarray:
    """Uniformly rescale an image or mask by ``scale`` (the 2D analogue of nnU-Net's target
    spacing): area averaging when shrinking, linear when enlarging, nearest for masks."""
    if scale == 1:
        return array
    height, width = array.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if is_mask:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(array, size, interpolation=interpolation)


def from_model_size(prob: np.ndarray, original: tuple[int, int], mode: str) -> np.ndarray:
    """Inverse of :func:`to_model_size` for a float map: back to (height, width) = original."""
    height, width = original
    if mode == "pad":
        side = max(height, width)
        prob = cv2.resize(prob, (side, side), interpolation=cv2.INTER_LINEAR)
        return prob[:height, :width]
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)


def load_cases(
    cases: Sequence[Case],
    image_size: int,
    resize_mode: str = "resize",
    mask_threshold: float = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable | None = None,
) -> Dataset:
    """Read, check and resize every case. Raises on the first bad file.

    Each file's bytes are hashed as they are read (not read twice), for the data fingerprint.
    """
    if not cases:
        raise SegxError("the dataset is empty; add image/mask pairs")
    n = len(cases)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    masks = np.zeros((n, image_size, image_size), np.uint8)
    sizes: list[tuple[int, int]] = []
    digests: list[tuple[str, str]] = []
    iterator = progress(cases) if progress else cases
    for i, case in enumerate(iterator):
        image_hash, mask_hash = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        image, mask = read_case(case, mask_threshold, max_pixels, image_hash, mask_hash)
        sizes.append(image.shape[:2])
        images[i] = to_model_size(image, image_size, resize_mode, is_mask=False)
        if mask is not None:
            masks[i] = to_model_size(mask, image_size, resize_mode, is_mask=True)
        digests.append((image_hash.hexdigest(), mask_hash.hexdigest() if case.mask else ""))
    return Dataset([c.stem for c in cases], images, masks, sizes, digests)


def read_case(case: Case, mask_threshold, max_pixels: int, image_hash=None, mask_hash=None):
    """(image uint8 (H, W, 3), mask uint8 (H, W) or None) of one case, checked to agree in size;
    ``mask_threshold``: a number (binary: value > it is foreground) or a
    :class:`segx.data.labels.Labels` (class indices, :func:`segx.data.io.read_label_map`);
    ``*_hash.update`` gets each file's bytes as it is read."""
    image = read_image(case.image, max_pixels, image_hash)
    if case.mask is None:
        return image, None
    mask = (
        read_mask(case.mask, mask_threshold, max_pixels, mask_hash)
        if isinstance(mask_threshold, (int, float))
        else read_label_map(case.mask, mask_threshold, max_pixels, mask_hash)
    )
    if mask.shape != image.shape[:2]:
        raise SegxError(
            f"{shown(case.mask)}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}; export both at the same size"
        )
    return image, mask


def check_foreground(dataset: Dataset, where: str) -> None:
    if dataset.masks.size and not dataset.masks.any():
        raise SegxError(f"no mask in {where} has any foreground; check the masks or data.mask_threshold")
