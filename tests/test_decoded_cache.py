"""The decoded cache's contents are verified: a damaged entry (changed, truncated, unreadable
meta.json, bad fields) is rebuilt from the original files with one warning, never read; entries
from before content hashes are rebuilt once; temporary files of killed writers are removed.
Real files (a few 32-64 px images), one new process simulated by forgetting what was verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from segx.data import decoded
from segx.data.folder import discover_cases, read_case, rescale

SIZES = [(48, 64), (64, 40), (32, 56)]
SCALE = 0.0625


def make_data(root: Path) -> Path:
    """Image/mask pairs: a bright rectangle and disc on noise."""
    rng = np.random.default_rng(3)
    for name in ("train_images", "train_masks"):
        (root / name).mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[4:20, 6:30] = 255
        cv2.circle(mask, (w // 2, h - 10), 6, 255, -1)
        image[mask > 0] = 200
        cv2.imwrite(str(root / "train_images" / f"case{i}.png"), image)
        cv2.imwrite(str(root / "train_masks" / f"case{i}.png"), mask)
    return root


@pytest.fixture
def cache(tmp_path):
    """(data folder, cache folder, entries decoded once with a rescaled copy each, originals)."""
    root, where = make_data(tmp_path / "data"), tmp_path / "cache"
    cases = decoded.decode_cases(discover_cases(root), where)
    for case in cases:
        case.scaled(SCALE)
    originals = [read_case(c, 0, 10**8) for c in discover_cases(root)]
    return root, where, cases, originals


def next_run(monkeypatch, root: Path, where: Path) -> list:
    """The cache used by a new process (nothing verified yet): every case and its rescaled copy."""
    monkeypatch.setattr(decoded, "_VERIFIED", set(), raising=False)
    cases = decoded.decode_cases(discover_cases(root), where)
    return [(c, c.scaled(SCALE)) for c in cases]


def assert_intact(runs, originals) -> None:
    """Every entry reads what the original files hold, at its own size and rescaled."""
    for (case, small), (image, mask) in zip(runs, originals, strict=True):
        assert np.array_equal(case.image(), image) and np.array_equal(case.mask(), mask)
        assert case.foreground_pixels == np.count_nonzero(mask)
        assert np.array_equal(case.foreground(), np.argwhere(mask > 0))
        assert np.array_equal(small.image(), rescale(image, SCALE, is_mask=False))
        small_mask = rescale(mask, SCALE, is_mask=True)
        assert np.array_equal(small.mask(), small_mask) and small.foreground_pixels == np.count_nonzero(small_mask)
        assert np.array_equal(small.foreground(), np.argwhere(small_mask > 0))


def one_warning(capsys, folder: Path, name: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("segx: warning: decoded cache entry ") and str(folder) in lines[0] and name in lines[0]
    assert "rebuilding it from" in lines[0]
    return lines[0]


def data_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


def test_a_zeroed_mask_keeping_its_header_is_rebuilt_not_trained_on(cache, monkeypatch, capsys):
    root, where, cases, originals = cache
    path = cases[0].folder / "mask.npy"
    offset = data_offset(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(path.stat().st_size - offset))
    assert np.load(path, mmap_mode="r").shape == SIZES[0] and not np.load(path).any()  # a valid header
    capsys.readouterr()
    runs = next_run(monkeypatch, root, where)
    assert_intact(runs, originals)
    line = one_warning(capsys, cases[0].folder, "mask.npy")
    assert "case0.png" in line
    assert runs[0][0].folder == cases[0].folder  # the same entry, rewritten
    next_run(monkeypatch, root, where)  # healthy again: no further rebuild
    assert capsys.readouterr().err == ""


def test_a_truncated_rescaled_entry_is_rebuilt_without_a_traceback(cache, monkeypatch, capsys):
    root, where, cases, originals = cache
    path = cases[1].folder / f"image-x{SCALE:g}.npy"
    os.truncate(path, path.stat().st_size - 5)
    capsys.readouterr()
    runs = next_run(monkeypatch, root, where)
    assert_intact(runs, originals)
    one_warning(capsys, cases[1].folder, f"image-x{SCALE:g}.npy")
    from segx.training.patches import PatchSampler

    image, mask = PatchSampler([small for _, small in runs], 16).sample(1, seed=0, slot=1, batch_size=2)
    assert image.shape == (16, 16, 3) and mask.shape == (16, 16)


def test_meta_json_turned_into_a_folder_is_rebuilt(cache, monkeypatch, capsys):
    root, where, cases, originals = cache
    meta = cases[2].folder / "meta.json"
    meta.unlink()
    meta.mkdir()
    (meta / "inside.txt").write_text("x")
    capsys.readouterr()
    runs = next_run(monkeypatch, root, where)
    assert_intact(runs, originals)
    one_warning(capsys, cases[2].folder, "meta.json")
    assert meta.is_file() and set(json.loads(meta.read_text())["hashes"]) == {"image.npy", "mask.npy", "foreground.npy"}


def test_garbage_foreground_with_a_valid_header_is_rebuilt(cache, monkeypatch, capsys):
    root, where, cases, originals = cache
    path = cases[0].folder / "foreground.npy"
    np.save(path, np.full((7, 2), 10**6, np.int32))
    capsys.readouterr()
    runs = next_run(monkeypatch, root, where)
    assert_intact(runs, originals)
    one_warning(capsys, cases[0].folder, "foreground.npy")


@pytest.mark.parametrize("value", ["many", 2.5, None, True])
def test_a_non_numeric_foreground_count_is_rebuilt(cache, monkeypatch, capsys, value):
    root, where, cases, originals = cache
    meta_path = cases[1].folder / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "foreground_pixels": value}))
    capsys.readouterr()
    runs = next_run(monkeypatch, root, where)
    assert_intact(runs, originals)
    one_warning(capsys, cases[1].folder, "foreground_pixels")


def test_entries_without_hashes_are_rebuilt_once_quietly_and_verified_once_per_process(cache, monkeypatch, capsys):
    root, where, cases, originals = cache
    for case in cases:  # as an older segx wrote them
        for name in ("meta.json", f"meta-x{SCALE:g}.json"):
            meta = json.loads((case.folder / name).read_text())
            del meta["hashes"]
            (case.folder / name).write_text(json.dumps(meta))
    stamps = {c.folder: (c.folder / "image.npy").stat().st_ino for c in cases}
    capsys.readouterr()
    assert_intact(next_run(monkeypatch, root, where), originals)
    assert capsys.readouterr().err == ""
    rebuilt = {c.folder: (c.folder / "image.npy").stat().st_ino for c in cases}
    assert all(rebuilt[f] != stamps[f] for f in stamps)  # rewritten
    for case in cases:
        assert "hashes" in json.loads((case.folder / "meta.json").read_text())
    hashed = []
    real = decoded._content_hash
    monkeypatch.setattr(decoded, "_content_hash", lambda path: hashed.append(path.name) or real(path))
    next_run(monkeypatch, root, where)  # a new process: every file hashed once, nothing rewritten
    assert {c.folder: (c.folder / "image.npy").stat().st_ino for c in cases} == rebuilt
    assert sorted(hashed) == sorted(
        [
            "image.npy",
            "mask.npy",
            "foreground.npy",
            f"image-x{SCALE:g}.npy",
            f"mask-x{SCALE:g}.npy",
            f"foreground-x{SCALE:g}.npy",
        ]
        * len(cases)
    )
    hashed.clear()
    again = decoded.decode_cases(discover_cases(root), where)  # the same process: not hashed again
    assert [c.scaled(SCALE).shape for c in again] and hashed == []


def test_temporary_files_of_dead_writers_are_removed_when_the_cache_opens(cache):
    root, where, cases, _ = cache
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()
    dead = writer.pid
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    folder = cases[0].folder
    orphans = [
        folder / f".x.npy.tmp-{dead}",
        folder / f".meta.json.tmp-{dead}",
        cases[1].folder / f".image.npy.tmp-{dead}",
    ]
    live = folder / f".x.npy.tmp-{os.getpid()}"
    for path in [*orphans, live]:
        path.write_bytes(b"partial")
    decoded.decode_cases(discover_cases(root), where)
    assert not any(p.exists() for p in orphans) and live.exists()
    assert (folder / "image.npy").exists()  # the entry itself is kept
