"""The data layer on tiny real files: reading, pairing, splitting, and every bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from segx.data import discover_cases, load_cases, read_image, read_mask
from segx.data.folder import check_foreground
from segx.data.split import fingerprint, load_or_create_split, make_split
from segx.errors import SegxError


def write_pair(root, stem, size=(40, 30), image_ext=".png", mask_ext=".png", mask_value=255, image=None):
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    (root / "train_masks").mkdir(parents=True, exist_ok=True)
    h, w = size
    if image is None:
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[5:15, 5:15] = mask_value
    cv2.imwrite(str(root / "train_images" / f"{stem}{image_ext}"), image)
    cv2.imwrite(str(root / "train_masks" / f"{stem}{mask_ext}"), mask)
    return root


def test_reads_grayscale_rgb_rgba_and_16_bit(tmp_path):
    gray = np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50
    cv2.imwrite(str(tmp_path / "g16.png"), gray)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.full((30, 40, 4), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "g8.tif"), np.full((30, 40), 7, np.uint8))
    for name in ("g16.png", "rgba.png", "g8.tif"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape == (30, 40, 3)
    assert read_image(tmp_path / "g16.png").max() == 255  # scaled to the full 8-bit range


def test_mask_threshold_and_values(tmp_path):
    mask = np.array([[0, 1, 127, 128, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    assert read_mask(tmp_path / "m.png").tolist() == [[0, 1, 1, 1, 1]]
    assert read_mask(tmp_path / "m.png", threshold=127).tolist() == [[0, 0, 0, 1, 1]]


def test_pairs_by_stem_and_resizes_mixed_sizes(tmp_path):
    write_pair(tmp_path, "a", (40, 30))
    write_pair(tmp_path, "b", (64, 80), image_ext=".jpg")
    (tmp_path / "train_images" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "train_images" / "notes.txt").write_text("ignored")
    cases = discover_cases(tmp_path)
    assert [c.stem for c in cases] == ["a", "b"]
    data = load_cases(cases, 32)
    assert data.images.shape == (2, 32, 32, 3) and data.masks.shape == (2, 32, 32)
    assert set(np.unique(data.masks)) == {0, 1}
    assert data.original_sizes == [(40, 30), (64, 80)]


@pytest.mark.parametrize(
    "breaker,message",
    [
        (lambda r: (r / "train_masks" / "a.png").unlink(), r"a\.png: no mask"),
        (lambda r: (r / "train_images" / "a.png").unlink(), r"a\.png: mask without an image"),
        (lambda r: (r / "train_images" / "a.png").write_bytes(b"not a png"), r"a\.png: not a readable image"),
        (lambda r: (r / "train_images" / "a.png").write_bytes(b""), r"a\.png: file is empty"),
        (
            lambda r: cv2.imwrite(str(r / "train_masks" / "a.png"), np.zeros((7, 7), np.uint8)),
            r"a\.png: mask is 7x7 but its image is 30x40",
        ),
        (
            lambda r: cv2.imwrite(str(r / "train_images" / "a.jpg"), np.zeros((7, 7, 3), np.uint8)),
            r"stem 'a' also used",
        ),
    ],
    ids=["image-without-mask", "mask-without-image", "corrupt", "zero-bytes", "size-mismatch", "duplicate-stem"],
)
def test_bad_inputs_give_one_line_naming_the_file(tmp_path, breaker, message):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b")
    breaker(tmp_path)
    with pytest.raises(SegxError, match=message) as info:
        load_cases(discover_cases(tmp_path), 32)
    assert "\n" not in str(info.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(SegxError, match="does not exist; set data.root"):
        discover_cases(tmp_path / "nope")
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train_masks").mkdir()
    with pytest.raises(SegxError, match="holds no images"):
        discover_cases(tmp_path)


def test_no_foreground_anywhere_is_an_error(tmp_path):
    write_pair(tmp_path, "a", mask_value=0)
    data = load_cases(discover_cases(tmp_path), 32)
    with pytest.raises(SegxError, match="no mask .* has any foreground"):
        check_foreground(data, "x")


def test_split_is_deterministic_stratified_and_written_once(tmp_path):
    stems = [f"c{i:03d}" for i in range(100)]
    groups = {s: ("bright" if i < 20 else "fluo") for i, s in enumerate(stems)}
    a = make_split(stems, 0.15, 0.15, seed=3, groups=groups)
    assert a == make_split(stems, 0.15, 0.15, seed=3, groups=groups)
    assert a != make_split(stems, 0.15, 0.15, seed=4, groups=groups)
    assert sum(groups[s] == "bright" for s in a["test"]) == 3  # 15% of each stratum
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])
    path = tmp_path / "split.json"
    first = load_or_create_split(path, stems, 0.15, 0.15, 3)
    before = path.read_text()
    # Different fractions later must not silently rewrite the file that members share.
    assert load_or_create_split(path, stems, 0.3, 0.3, 9) == first
    assert path.read_text() == before
    assert fingerprint(first) == fingerprint(json.loads(before))
    assert fingerprint(first, 64) != fingerprint(first, 128)


def test_split_file_naming_unknown_cases_is_refused(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["x"], "val": ["ghost"], "test": []}))
    with pytest.raises(SegxError, match="names case 'ghost'"):
        load_or_create_split(path, ["x"], 0.2, 0.2, 0)


@pytest.mark.parametrize("key,value", [("data.val_fraction", 1.5), ("data.test_fraction", -0.1)])
def test_out_of_range_fractions_name_the_key(key, value):
    with pytest.raises(SegxError, match=key.replace(".", r"\.")):
        make_split(["a", "b", "c"], value if "val" in key else 0.2, value if "test" in key else 0.2, 0)
