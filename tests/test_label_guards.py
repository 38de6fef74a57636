"""Labels, regions and flips that would train a wrong model, and configs that Hydra would
report in many lines, refused in one line naming the key and the fix (issue 27)."""

from __future__ import annotations

import numpy as np
import pytest

from segx.data.labels import Labels
from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from tests.helpers import run_in_process

TUMOUR = {"background": 0, "oedema": 1, "necrosis": 2, "enhancing": 4}


def test_a_class_in_no_region_is_refused_naming_it():
    with pytest.raises(SegxError, match=r"class enhancing is in no region.*data.regions.enhancing=\[enhancing\]"):
        Labels.from_config(TUMOUR, regions={"whole": ["oedema", "necrosis"], "core": ["necrosis"]})


def test_the_background_is_never_swapped_by_a_flip():
    labels = Labels.from_config({"background": 0, "a": 1, "b": 2})
    with pytest.raises(SegxError, match="data.flip_swap: background is the background"):
        labels.swap_table([["background", "a"]])
    with pytest.raises(SegxError, match="data.flip_swap: background is the background"):
        labels.swap_table([["a", "background"]])


def test_yaml_booleans_as_class_names_are_refused_naming_them(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "labels.yaml"
    path.write_text("background: 0\nyes: 1\non: 2\n")
    labels = OmegaConf.to_container(OmegaConf.load(path))  # yes and on are both True: one key
    with pytest.raises(SegxError, match=r"data.labels: class name True is not a name .*quote it"):
        Labels.from_config(labels)
    with pytest.raises(SegxError, match=r"data.labels: class name None is not a name"):
        Labels.from_config({"background": 0, None: 1})


@pytest.mark.parametrize(
    "name", ["LeftLung", "RightLung", "leftlung", "rightlung", "lungright", "kidneyLeft", "L_lung", "lung_left"]
)
def test_side_names_without_a_separator_are_sided(name):
    assert Labels.from_config({"background": 0, name: 1, "vessel": 2}).sided() == [name]


@pytest.mark.parametrize("name", ["liver", "lung", "bright", "upright", "cleft", "leftover", "lr"])
def test_words_that_only_contain_left_or_right_or_l_or_r_are_not_sided(name):
    assert Labels.from_config({"background": 0, name: 1}).sided() == []


def test_a_single_in_between_mask_value_gets_the_anti_aliasing_hint():
    labels = Labels.from_config({"background": 0, "a": 100, "b": 200})
    with pytest.raises(SegxError, match=r"150 \(1 px\).*in-between values: anti-aliased"):
        labels.encode(np.array([[0, 100, 150, 200]], np.uint8), "m.png")
    with pytest.raises(SegxError) as info:  # a value past every class: an unnamed class, no hint
        labels.encode(np.array([[0, 100, 250]], np.uint8), "m.png")
    assert "anti-aliased" not in str(info.value)


def test_class_weights_are_checked_against_the_classes_in_plain_numbers():
    from segx.data.labels import check_class_weights

    labels = Labels.from_config({"background": 0, "a": 1, "b": 2})
    with pytest.raises(SegxError, match=r"^trainer.class_weights=\[1, 2\] must give 3 non-negative factors"):
        check_class_weights([1, 2], labels)
    assert check_class_weights([1, 2, 0.5], labels) == [1.0, 2.0, 0.5]
    with pytest.raises(SegxError, match="data.labels is null"):
        check_class_weights([1, 2], None)


def test_class_weights_of_the_wrong_length_are_refused_before_any_run(tmp_path):
    from segx.errors import SegxError
    from segx.workflows.member import validate_config
    from tests.conftest import compose_config, store_overrides

    cfg = compose_config(
        "train",
        [
            *store_overrides(tmp_path),
            "data=synthetic_multiclass",
            f"data.root={tmp_path}/d",
            "trainer.class_weights=[1,2]",
        ],
    )
    with pytest.raises(SegxError, match=r"trainer.class_weights=\[1, 2\] must give 4"):
        validate_config(cfg)


def test_a_threshold_on_a_region_ensemble_is_refused_saying_regions_are_thresholded():
    from segx.data.view import View
    from segx.inference.predictor import EnsemblePredictor

    labels = Labels.from_config(
        TUMOUR,
        regions={
            "whole": ["oedema", "necrosis", "enhancing"],
            "core": ["necrosis", "enhancing"],
            "enhancing": ["enhancing"],
        },
    )
    record = {
        "format": "segx-ensemble",
        "version": 4,
        "members": [
            {"run_id": "a", "backbone": "resnet18", "weight": 1.0, "weight_count": 1, "view": View().to_dict()}
        ],
        "weight_denominator": 1,
        "threshold": None,
        "labels": labels.to_record(),
        "region_thresholds": {"whole": 0.45, "core": 0.5, "enhancing": 0.35},
    }
    with pytest.raises(
        SegxError,
        match=r"3 regions \(whole, core, enhancing\), each at its own threshold chosen on "
        r"validation \(whole=0.45, core=0.5, enhancing=0.35\); drop the threshold override",
    ):
        EnsemblePredictor(EnsembleRecord.from_json(record), ["unused"], threshold=0.4)


def run_command(module: str, args: list[str], cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "override,message",
    [
        ('data.labels={background: 0, "left lung": 1}', "data.labels: the name 'left lung' must start with a letter"),
        ('data.labels={background: 0, "a:b": 1}', "data.labels: the name 'a:b' must start with a letter"),
        ("data.labels={background: 0, é: 1}", "data.labels: the name 'é' must start with a letter"),
        ("data.labels={background: 0, null: 1}", "data.labels: a key is null, which names nothing"),
        (
            "data.labels={background: 0, left_lobe: 1, right_lobe: 2, extra: 3, vessel: 4}",
            "data.labels on the command line adds extra to data.labels of the config",
        ),
        (
            "data.labels={background: 0, left_lobe: 1, right_lobe: 2}",
            "data.labels on the command line lacks vessel of data.labels of the config (background, left_lobe, "
            "right_lobe, vessel), which Hydra would keep",
        ),
    ],
)
def test_class_names_hydra_cannot_read_or_would_merge_are_one_line(tmp_path, override, message):
    args = ["data=synthetic_multiclass", f"paths.output_dir={tmp_path}/out", override]
    result = run_command("segx.train", args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"segx: error: {message}"), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_cleared_labels_on_the_command_line_replace_the_configs(tmp_path):
    from segx.config import check_override_values

    check_override_values(
        "train", ["data=synthetic_multiclass", "data.labels=null", "data.labels={background: 0, a: 1}"]
    )


def test_a_null_or_boolean_key_in_a_config_file_is_one_line_naming_the_line(tmp_path):
    from segx.config import CONF_DIR, check_config_files

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("labels:\n  background: 0\n  on: 1\n")
    with pytest.raises(SegxError, match=r"mine.yaml:3: the key on is read as a boolean, not a name; quote it"):
        check_config_files([CONF_DIR, tmp_path])
    (tmp_path / "data" / "mine.yaml").write_text("labels:\n  background: 0\n  null: 1\n")
    with pytest.raises(SegxError, match=r"mine.yaml:3: the key null is read as null"):
        check_config_files([CONF_DIR, tmp_path])


# -- segx.data.check runs segx.train's rules and writes nothing -----------------------------------


def _folder(root, cases: dict[str, dict[str, int]]):
    """``cases``: 'train/c0' -> {mask value: rows}; 8x8 images, masks of those values by rows."""
    import cv2

    for key, rows in cases.items():
        part, stem = key.split("/")
        for kind in ("images", "masks"):
            (root / f"{part}_{kind}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / f"{part}_images" / f"{stem}.png"), np.full((8, 8, 3), 50, np.uint8))
        mask, row = np.zeros((8, 8), np.uint8), 0
        for value, n in rows.items():
            mask[row : row + n] = value
            row += n
        cv2.imwrite(str(root / f"{part}_masks" / f"{stem}.png"), mask)


def test_the_data_check_refuses_what_training_refuses_and_writes_nothing(tmp_path, capfd):
    data = tmp_path / "data"
    _folder(data, {**{f"train/c{i}": {1: 3} for i in range(6)}, "test/c0": {1: 2, 2: 2}, "test/t1": {2: 4}})
    work = tmp_path / "work"
    work.mkdir()
    args = [f"data.root={data}", "data.labels={background: 0, a: 1, b: 2}", f"paths.output_dir={work}/out"]
    result = run_in_process(capfd, ["segx.data.check", *args], cwd=work)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{data}: stem 'c0' is in both train_images/ and test_images/; rename one" in result.stdout
    assert "class b (data.labels.b=2) appears in no training case" in result.stdout
    assert list(work.iterdir()) == [], list(work.rglob("*"))  # no outputs/hydra, no check.log


def test_the_data_check_judges_classes_on_the_training_cases_of_the_split(tmp_path):
    from segx.check import check_folder

    _folder(tmp_path, {"train/c0": {1: 2, 2: 2}, "train/c1": {1: 4}, "train/c2": {1: 4}})
    labels = Labels.from_config({"background": 0, "a": 1, "b": 2})
    assert check_folder(tmp_path, labels=labels)[1] == []
    problems = check_folder(tmp_path, labels=labels, training=lambda stems, test: [["c0", "c1"], ["c1", "c2"]])[1]
    assert problems == [
        f"class b (data.labels.b=2) appears in no training case of {tmp_path}; check its mask value, or drop it from data.labels"
    ]


# -- segx.info takes what the other commands take ---------------------------------------------------


def test_info_takes_paths_output_dir_and_prints_a_completion_script(tmp_path, capfd):
    result = run_in_process(capfd, ["segx.info", "run_id=0123", f"paths.output_dir={tmp_path}/elsewhere"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"segx: error: no MLflow store at {tmp_path}/elsewhere/mlflow.db; check mlflow.tracking_uri or train first"
    )
    result = run_command("segx.info", ["-sc", "install=bash"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("complete ") and "run_id=" in result.stdout and "segx-info" in result.stdout


# -- members with other labels: what differs, not two hashes ----------------------------------------


def test_members_with_other_labels_are_refused_saying_what_differs():
    from types import SimpleNamespace

    from segx.data.split import fingerprint_parts
    from segx.ensembling.members import check_compatible

    nested = {
        "whole": ["oedema", "necrosis", "enhancing"],
        "core": ["necrosis", "enhancing"],
        "enhancing": ["enhancing"],
    }
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}

    def member(run_id, labels):
        parts = fingerprint_parts(split, None, None, None, None, labels.key)
        return SimpleNamespace(
            run_id=run_id, label=run_id, folds=None, fingerprint=parts["data"], fingerprint_parts=parts,
            labels=labels.to_record(),
        )  # fmt: skip

    softmax = member("aaa", Labels.from_config(TUMOUR))
    regions = member("bbb", Labels.from_config(TUMOUR, regions=nested))
    with pytest.raises(SegxError) as info:
        check_compatible([softmax, regions])
    assert "one softmax over the classes vs regions whole, core, enhancing" in str(info.value)
    assert "labels-" not in str(info.value)
    other = member("ccc", Labels.from_config({"background": 0, "oedema": 1, "necrosis": 2}))
    with pytest.raises(
        SegxError, match="classes background, oedema, necrosis, enhancing vs background, oedema, necrosis"
    ):
        check_compatible([softmax, other])
