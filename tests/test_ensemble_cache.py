"""The ensemble's extracted member probabilities are keyed by the artifact's content and a corrupt
cache is one error naming the run and the file (issue 21, part 3). On the real member store."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from segx import tracking
from segx.ensembling.probs import load_cached, save_cached
from segx.errors import SegxError
from segx.workflows.members import member_from_run


@pytest.fixture
def member(member_store_copy):
    """(client, run, predictions folder in the store): a private copy of the session's store,
    whose predictions the test may replace or damage."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(runs["resnet18"])
    return client, run, Path(local_file_uri_to_path(run.info.artifact_uri)) / "predictions"


def _flip_inside(npz: Path, entry: str = "probs.npy") -> None:
    """Flip one byte in the middle of ``entry``'s compressed stream (a valid zip around it)."""
    with zipfile.ZipFile(npz) as archive:
        info = archive.getinfo(entry)
    data = bytearray(npz.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + k : info.header_offset + k + 2], "little") for k in (26, 28)
    )
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    data[at] ^= 0xFF
    npz.write_bytes(bytes(data))


def test_a_replaced_artifact_is_extracted_again_not_answered_from_the_old_file(member, tmp_path):
    client, run, predictions = member
    work = tmp_path / "cache"
    first = member_from_run(client, run, work)
    old = np.array(first.val.probs.flat)
    new = (255 - old).astype(np.uint8)  # a valid cache with other probabilities, same cases
    save_cached(
        predictions / "val.npz", first.val.stems, first.val.probs.like(new), first.val.masks, list(first.val.previews)
    )
    again = member_from_run(client, run, work)
    assert np.array_equal(again.val.probs.flat, new) and not np.array_equal(again.val.probs.flat, old)
    assert len(list((work / run.info.run_id).glob("val.*probs.npy"))) == 1  # the stale extraction is gone


def test_a_flipped_byte_in_val_npz_is_one_error_naming_the_run_and_file(member, tmp_path):
    client, run, predictions = member
    work = tmp_path / "cache"
    member_from_run(client, run, work)  # extracted once from the good artifact
    _flip_inside(predictions / "val.npz")
    with pytest.raises(SegxError) as err:
        member_from_run(client, run, work)
    text = str(err.value)
    assert run.info.run_id in text and "predictions/val.npz" in text and "corrupt" in text, text
    assert "retrain the member or re-log its predictions" in text and "\n" not in text, text
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no zlib traceback behind it


def test_a_corrupt_test_npz_is_named_as_corrupt_not_as_other_test_cases(member, tmp_path):
    client, run, predictions = member
    test_npz = predictions / "test.npz"
    test_npz.write_bytes(test_npz.read_bytes()[: test_npz.stat().st_size // 2])  # truncated
    with pytest.raises(SegxError, match="corrupt") as err:
        member_from_run(client, run, tmp_path / "cache")
    text = str(err.value)
    assert run.info.run_id in text and "predictions/test.npz" in text, text
    assert "different test cases" not in text and "empty test split" not in text


def test_load_cached_rejects_arrays_of_the_wrong_shape(tmp_path):
    path = save_cached(tmp_path / "val.npz", ["a"], np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), bool))
    with np.load(path) as data:
        arrays = dict(data)
    np.savez_compressed(path, **{**arrays, "shapes": np.array([[4, 5]])})  # 20 pixels, 16 stored
    with pytest.raises(
        SegxError, match=r"member run r1: artifact predictions/val.npz \(.*\) is corrupt .*masks do not match"
    ):
        load_cached(path, tmp_path / "w", run_id="r1", artifact="predictions/val.npz")
