"""A volume dataset named by the config (no network): classes from dataset.json, a disagreeing
data.labels refused, splits and folds by patient, segx.check's report (issue 29)."""

from __future__ import annotations

import json

import pytest

from segx.data.volume_prep import case_of
from segx.errors import SegxError
from tests.conftest import compose_config, store_overrides

SMALL = ["data.n_cases=6", "data.source_size=24", "data.depth=4"]


def _data(tmp_path, *extra):
    cfg = compose_config("train", [*store_overrides(tmp_path / "out"), "data=synthetic_volumes",
                                   f"data.root={tmp_path / 'vol'}", *SMALL, *extra])  # fmt: skip
    return cfg


def test_classes_come_from_dataset_json_and_a_disagreeing_data_labels_is_refused(tmp_path):
    from segx.workflows.prepare import prepare, validate_data_config

    cfg = _data(tmp_path)
    prepared = prepare(cfg.data, str(tmp_path / "out"))
    assert prepared.labels.names == ("background", "liver", "kidney_left", "kidney_right")
    assert prepared.volumes.dataset.layout == "nnunet"
    folder = compose_config(
        "train",
        [*store_overrides(tmp_path / "out"), "data=folder", f"data.root={tmp_path / 'vol'}",
         "data.labels={background: 0, liver: 1}"],
    )  # fmt: skip
    with pytest.raises(SegxError, match=r"data.labels=.*liver.*disagrees with .*dataset.json's labels .*kidney_left"):
        validate_data_config(folder.data)


@pytest.mark.parametrize("folds", [None, 3])
def test_split_and_folds_are_by_patient(tmp_path, folds):
    from segx.workflows.prepare import prepare

    extra = [f"data.folds={folds}", "fold=1"] if folds else []
    cfg = _data(tmp_path, *extra)
    prepared = prepare(cfg.data, str(tmp_path / "out"), fold=cfg.get("fold"))
    roles = {role: {case_of(s) for s in stems} for role, stems in prepared.split.items()}
    assert not (roles["train"] & roles["val"] or roles["train"] & roles["test"] or roles["val"] & roles["test"])
    assert roles["train"] | roles["val"] | roles["test"] == {f"case_{i:03d}" for i in range(6)}
    for role, stems in prepared.split.items():  # every slice of a patient goes where the patient goes
        assert len(stems) == 4 * len(roles[role])
    written = json.loads(prepared.split_path.read_text())
    assert all(not s.count("__s") for key in ("test",) for s in written[key])  # the file names patients


def test_context_slices_beyond_one_is_refused(tmp_path):
    from segx.workflows.prepare import prepare

    with pytest.raises(SegxError, match=r"data.context_slices=2 must be 0 or 1"):
        prepare(_data(tmp_path, "data.context_slices=2").data, str(tmp_path / "out"))


def test_check_reports_the_volumes_and_their_slices(tmp_path, capsys):
    from segx.check import run_check

    cfg = compose_config("check", [f"paths.output_dir={tmp_path / 'out'}", "data=synthetic_volumes",
                                   f"data.root={tmp_path / 'vol'}", *SMALL])  # fmt: skip
    assert run_check(cfg) == []
    printed = capsys.readouterr().out
    assert "(nnunet): 6 training and 0 test cases; sliced along z, in-plane 0.8 x 0.8 mm" in printed
    assert "normalised CT: ct" in printed
    assert "train_images: 24 pairs" in printed
