"""The data fingerprint covers file contents, and the ensemble says what differs and what it skips.

Real files, real tiny members (64 px, 1 epoch) in a real SQLite MLflow store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest

from segx import tracking
from segx.errors import SegxError
from tests.conftest import compose_config, store_overrides
from tests.helpers import copy_store, seed_store


def folder_overrides(out: Path, root: Path, split_file: Path, backbone: str = "resnet18") -> list[str]:
    return [
        *store_overrides(out),
        "data=folder",
        f"data.root={root}",
        f"data.split_file={split_file}",
        "data.image_size=64",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "trainer.verbose=0",
        f"backbone={backbone}",
    ]


def copy_data(synthetic_root: Path, dst: Path) -> Path:
    shutil.copytree(synthetic_root, dst)
    return dst


def invert_masks(root: Path, stems) -> None:
    for stem in stems:
        path = root / "train_masks" / f"{stem}.png"
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), 255 - mask)


def prepared(tmp_path: Path, root: Path, split_file: Path):
    from segx.workflows.prepare import prepare

    cfg = compose_config("train", folder_overrides(tmp_path / "out", root, split_file))
    return prepare(cfg.data, cfg.paths.output_dir)


def test_changing_mask_contents_changes_the_fingerprint(synthetic_root, tmp_path):
    root = copy_data(synthetic_root, tmp_path / "data")
    split_file = tmp_path / "split.json"
    before = prepared(tmp_path, root, split_file)
    invert_masks(root, before.split["train"])  # same names, other truth
    after = prepared(tmp_path, root, split_file)
    assert after.split == before.split
    assert after.fingerprint != before.fingerprint
    tags_before, tags_after = before.fingerprint_tags, after.fingerprint_tags
    assert tags_after["segx.split_fingerprint"] == tags_before["segx.split_fingerprint"]
    assert tags_after["segx.images_fingerprint"] == tags_before["segx.images_fingerprint"]
    assert tags_after["segx.masks_fingerprint"] != tags_before["segx.masks_fingerprint"]
    # How files become inputs is part of it too; the same files read the same way give the same.
    assert prepared(tmp_path, root, split_file).fingerprint == after.fingerprint
    from segx.workflows.prepare import prepare

    cfg = compose_config("train", [*folder_overrides(tmp_path / "out", root, split_file), "data.mask_threshold=127"])
    assert prepare(cfg.data, cfg.paths.output_dir).fingerprint != after.fingerprint


def test_pairs_the_split_does_not_list_are_reported_and_the_split_kept(synthetic_root, tmp_path, capsys):
    root = copy_data(synthetic_root, tmp_path / "data")
    split_file = tmp_path / "split.json"
    first = prepared(tmp_path, root, split_file)
    assert "warning" not in capsys.readouterr().err
    written = split_file.read_bytes()
    for part in ("train_images", "train_masks"):
        shutil.copy(root / part / "case_0000.png", root / part / "late_case.png")
    second = prepared(tmp_path, root, split_file)
    err = capsys.readouterr().err
    assert "segx: warning:" in err and "1 case(s)" in err and "'late_case'" in err
    assert "data.split_file" in err and str(split_file) in err
    assert split_file.read_bytes() == written  # the shared record is never rewritten
    assert second.split == first.split and second.fingerprint == first.fingerprint  # unused


@pytest.fixture(scope="module")
def retrained_store(tmp_path_factory, synthetic_root):
    """Two resnet18 members on the same split: before and after inverting every training mask."""
    from segx.workflows.member import train_member

    base = tmp_path_factory.mktemp("retrained")
    out, root, split_file = base / "out", copy_data(synthetic_root, base / "data"), base / "split.json"
    seed_store(out)  # an empty store: creating one is not what this test is about
    cfg = compose_config("train", folder_overrides(out, root, split_file))
    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    ids = []
    for step in range(2):
        if step == 1:
            invert_masks(root, json.loads(split_file.read_text())["train"])
        train_member(cfg)
        exp = client.get_experiment_by_name("segx").experiment_id
        ids.append(tracking.find_runs(client, exp, "member")[0].info.run_id)
    assert ids[0] != ids[1]
    return out, ids


@pytest.fixture
def retrained_copy(retrained_store, tmp_path):
    """A private copy of the retrained store, for a test that changes its runs (deletes one,
    marks one KILLED): (output_dir, (old, new)); the data and split stay the module's."""
    out, ids = retrained_store
    return copy_store(out, tmp_path / "store"), ids


def test_ensemble_refuses_members_trained_on_other_mask_contents(retrained_store):
    from segx.workflows.ensemble import build_ensemble

    out, (old, new) = retrained_store
    cfg = compose_config("ensemble", [*store_overrides(out), f"ensemble.run_ids=[{old},{new}]"])
    with pytest.raises(SegxError) as info:
        build_ensemble(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert old in message and new in message
    assert "same split, different file contents: the masks changed" in message
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("segx").experiment_id
    assert not tracking.find_runs(client, exp, "ensemble", status=None)
    tags = [client.get_run(r).data.tags for r in (old, new)]
    assert tags[0]["segx.split_fingerprint"] == tags[1]["segx.split_fingerprint"]
    assert tags[0]["segx.masks_fingerprint"] != tags[1]["segx.masks_fingerprint"]


def test_misspelt_member_backbone_suggests_the_trained_one(retrained_store):
    from segx.workflows.ensemble import build_ensemble

    out, _ = retrained_store
    cfg = compose_config("ensemble", [*store_overrides(out), "ensemble.members=[resnet81]"])
    with pytest.raises(SegxError, match=r"unknown backbone 'resnet81'.*did you mean 'resnet18'\?"):
        build_ensemble(cfg)


def test_deleted_and_other_fingerprint_members_are_reported_as_skipped(retrained_copy, capsys):
    from segx.workflows.members import select_runs

    out, (old, new) = retrained_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("segx").experiment_id
    # The newest member sets the fingerprint; the older one, trained on other masks, is skipped.
    assert [r.info.run_id for r in select_runs(client, exp, "segx", "auto")] == [new]
    err = capsys.readouterr().err
    assert "segx: skipped 1 member run (data fingerprint is not " in err and old in err
    client.delete_run(new)
    try:
        assert [r.info.run_id for r in select_runs(client, exp, "segx", "auto")] == [old]
        assert f"segx: skipped 1 member run (deleted): {new}" in capsys.readouterr().err
        # By backbone: the newest run of it was deleted, so the older one is used, and said so.
        assert [r.info.run_id for r in select_runs(client, exp, "segx", "list", backbones=["resnet18"])] == [old]
        assert f"segx: skipped 1 member run (deleted): {new}" in capsys.readouterr().err
        # Named by run ID: a deleted run is an error, not a skip.
        with pytest.raises(SegxError, match=f"run '{new}' is deleted"):
            select_runs(client, exp, "segx", "list", run_ids=[new])
    finally:
        client.restore_run(new)


def test_resume_refuses_a_run_whose_data_changed(retrained_store, retrained_copy, tmp_path):
    from segx.workflows.member import train_member

    out, (old, _new) = retrained_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    client.set_terminated(old, "KILLED")  # as if interrupted; its masks were inverted since
    root, split_file = retrained_store[0].parent / "data", retrained_store[0].parent / "split.json"
    cfg = compose_config("train", [*folder_overrides(out, root, split_file), f"resume={old}"])
    with pytest.raises(SegxError, match=rf"resume={old}: the data changed since that run started"):
        train_member(cfg)
    assert client.get_run(old).info.status == "KILLED"
