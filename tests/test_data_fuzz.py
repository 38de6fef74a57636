"""Property-based fuzzing of the data layer: every folder either loads with correct pairing or
fails with one clear line naming a file; never a traceback from inside a library."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segx.data import discover_cases, load_cases
from segx.errors import SegxError

KINDS = [
    "png8",
    "png16",
    "gray",
    "rgba",
    "jpg",
    "tif",
    "zero",
    "junk",
    "truncated",
    "text",
    "giant",
    "symlink",
    "broken_link",
    "hidden",
    "dup_ext",
    "odd_mask_values",
    "empty_mask",
]


# Kinds whose image file cannot be read: the loader must refuse them, naming that file.
BAD_IMAGE = {"zero", "junk", "truncated", "text", "giant", "broken_link"}


def giant_png(width=100_000, height=100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def value_of(i: int) -> int:
    return 30 + 20 * i


def rows_of(i: int) -> int:
    return (i % 4) + 1  # foreground rows out of 8


def write_case(root: Path, i: int, kind: str, h: int, w: int) -> None:
    images, masks = root / "train_images", root / "train_masks"
    stem = f"c{i}"
    image = np.full((h, w, 3), value_of(i), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[: rows_of(i)] = 255
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    ipath, mpath = images / f"{stem}.png", masks / f"{stem}.png"
    if kind == "png16":
        cv2.imwrite(str(ipath), image.astype(np.uint16) * 257)
    elif kind == "gray":
        cv2.imwrite(str(ipath), image[:, :, 0])
    elif kind == "rgba":
        cv2.imwrite(str(ipath), np.dstack([image, np.full((h, w), 255, np.uint8)]))
    elif kind == "jpg":
        cv2.imwrite(str(images / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    elif kind == "tif":
        cv2.imwrite(str(images / f"{stem}.tif"), image)
    elif kind == "zero":
        ipath.write_bytes(b"")
    elif kind == "junk":
        ipath.write_bytes(os.urandom(64))
    elif kind == "truncated":
        ok, buf = cv2.imencode(".png", image)
        ipath.write_bytes(buf.tobytes()[: len(buf) // 2])
    elif kind == "text":
        ipath.write_text("this is not an image")
    elif kind == "giant":
        ipath.write_bytes(giant_png())
    elif kind in ("symlink", "broken_link"):
        target = root / f"store_{stem}.png"
        cv2.imwrite(str(target), image)
        ipath.symlink_to(target)
        if kind == "broken_link":
            target.unlink()
    elif kind == "hidden":
        cv2.imwrite(str(ipath), image)
        (images / f".{stem}.png").write_bytes(b"ignored")
    elif kind == "dup_ext":
        cv2.imwrite(str(ipath), image)
        cv2.imwrite(str(images / f"{stem}.tif"), image)
    else:
        cv2.imwrite(str(ipath), image)
    if kind == "odd_mask_values":
        mask = (mask > 0).astype(np.uint8) * 3  # 0/3 instead of 0/255: still foreground
    if kind == "empty_mask":
        mask[:] = 0
    cv2.imwrite(str(mpath), mask)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6),
    sizes=st.lists(st.tuples(st.integers(1, 48), st.integers(1, 48)), min_size=6, max_size=6),
)
def test_any_folder_loads_correctly_or_names_the_bad_file(tmp_path_factory, kinds, sizes):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "train_images").mkdir()
    (root / "train_masks").mkdir()
    for i, kind in enumerate(kinds):
        write_case(root, i, kind, *sizes[i])
    # The file the error must name: discovery fails on the first duplicated stem, loading on
    # the first unreadable image (cases load in stem order).
    duplicated = [i for i, k in enumerate(kinds) if k == "dup_ext"]
    unreadable = [i for i, k in enumerate(kinds) if k in BAD_IMAGE]
    try:
        data = load_cases(discover_cases(root), 32)
    except SegxError as exc:
        message = str(exc)
        assert "\n" not in message
        if duplicated:
            expected = f"{root}/train_images/c{duplicated[0]}.tif: stem 'c{duplicated[0]}'"
        else:
            assert unreadable, f"a folder of good files was refused: {message}"
            expected = f"{root}/train_images/c{unreadable[0]}.png: "
        assert message.startswith(expected), (message, expected)
        return
    assert not duplicated and not unreadable, f"loaded a folder with bad files: {kinds}"
    # Loaded: every case must carry its own image and its own mask, never a neighbour's.
    for k, stem in enumerate(data.stems):
        i = int(stem[1:])
        kind = kinds[i]
        mean = data.images[k].astype(float).mean()
        if kind != "png16":  # 16-bit is rescaled to its own range
            assert abs(mean - value_of(i)) <= 3 or sizes[i][0] * sizes[i][1] == 1, (stem, kind, mean)
        expected = 0.0 if kind == "empty_mask" else rows_of(i) / 8
        h = sizes[i][0]
        tolerance = 1.0 / h + 1 / 32 + 1e-6  # rounding of rows when the mask is resized
        assert abs(data.masks[k].mean() - expected) <= tolerance, (stem, kind, data.masks[k].mean(), expected)
