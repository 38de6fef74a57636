"""segx.data.staging: a folder of results written whole or not at all, and segx.data.view: the one
description of how a member sees an image, as members log it and records store it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from segx.data import staging
from segx.data.view import View
from segx.errors import SegxError

PREFIX = ".segx-partial-test-"


def test_a_failure_inside_the_stage_leaves_the_disk_as_it_was(tmp_path):
    parent = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="boom"):
        with staging.staged_folder(parent, PREFIX) as stage:
            (stage / "half.png").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # the stage, b/ and a/ (made for it) are gone


def test_what_the_block_moves_out_stays_and_the_rest_goes(tmp_path):
    kept = tmp_path / "out.txt"
    with staging.staged_folder(tmp_path, PREFIX) as stage:
        assert stage.parent == tmp_path and staging.is_staging(stage.name, PREFIX)
        (stage / "out.txt").write_text("done")
        (stage / "scratch").write_text("tmp")
        os.replace(stage / "out.txt", kept)
    assert kept.read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_stale_stages_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{PREFIX}{dead_pid}-abc"
    aside = tmp_path / f"{PREFIX}old-{dead_pid}-def"
    live = tmp_path / f"{PREFIX}{os.getpid()}-ghi"
    foreign = tmp_path / "results"
    for folder in (stale, aside, live, foreign):
        folder.mkdir()
    staging.remove_stale(tmp_path, PREFIX)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])


def test_view_from_logged_params_matches_the_data_config_it_came_from():
    patch = {"data.mode": "patch", "data.patch_size": "64", "data.scale": "0.5", "data.overlap": "0.25"}
    assert View.from_params(patch) == View("patch", 64, "resize", 0.5, 0.25)
    assert View.from_params({"data.image_size": "96", "data.resize_mode": "pad"}) == View("resize", 96, "pad")
    assert View.from_params({}) == View()  # a run of an older segx: the defaults it trained with
    assert View.from_dict(View("patch", 64, "resize", 0.5, 0.25).to_dict()) == View("patch", 64, "resize", 0.5, 0.25)


@pytest.mark.parametrize(
    ("view", "message"),
    [
        ({"mode": "tiles", "size": 64}, "needs a 'mode' of resize or patch"),
        ({"mode": "patch", "size": 64.0}, r"\.size=64\.0 must be a whole number"),
        ({"mode": "patch", "size": 64, "overlap": 1.0}, r"\.overlap=1\.0 must be in \[0, 1\)"),
        ({"mode": "resize", "size": 64, "resize_mode": "crop"}, r"\.resize_mode='crop' must be 'resize' or 'pad'"),
    ],
)
def test_view_validate_names_the_field(view, message):
    with pytest.raises(SegxError, match=message):
        View.validate(view, "ensemble.json: members[0].view")
    View.validate(View().to_dict(), "ensemble.json: members[0].view")  # a good one passes
