"""The typed ensemble record (segx.ensembling.record.EnsembleRecord): records written by earlier
versions (committed under tests/fixtures/) still load, predict, and are written back unchanged."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from segx.data.labels import Labels
from segx.data.view import View
from segx.ensembling.probs import Weights
from segx.ensembling.record import EnsembleRecord, RecordMember
from segx.errors import SegxError
from segx.scoring.postprocess import PostProcess

FIXTURES = Path(__file__).parent / "fixtures"
V3_BINARY = FIXTURES / "ensemble_v3_binary.json"
V4_CLASSES = FIXTURES / "ensemble_v4_classes.json"
V4_REGIONS = FIXTURES / "ensemble_v4_regions.json"
SMALL = {"decoder_filters": [16, 8, 8, 8, 8]}


@pytest.mark.parametrize("path", [V3_BINARY, V4_CLASSES, V4_REGIONS], ids=lambda p: p.stem)
def test_a_record_is_written_back_as_it_was_read(path):
    text = path.read_text()
    record = EnsembleRecord.load(path)
    assert json.dumps(record.to_json(), indent=2) + "\n" == text  # key for key, in its order
    assert EnsembleRecord.from_json(record.to_json()) == record
    # The run ID is added once logged; nothing else moves.
    assert record.with_run_id("r" * 32).to_json() == {**json.loads(text), "run_id": "r" * 32}


def test_version_3_binary_record_loads():
    record = EnsembleRecord.load(V3_BINARY)
    assert record.version == 3 and record.labels is None and record.threshold == 0.45
    assert record.flip_swap is None and not record.no_flip_tta and record.n_outputs == 1
    assert record.weights == Weights((1, 2), 3)
    assert record.views == [View("patch", 32), View("resize", 32)]
    assert [m.backbone for m in record.members] == ["mobilenetv2", "mobilenetv2"]
    assert all(isinstance(m, RecordMember) and m.folds == () and m.model_artifact == "model" for m in record.members)
    assert record.postprocess == PostProcess(min_size=20)
    assert record.class_postprocess == {} and record.region_thresholds == {}
    assert record.tta == "none" and record.chosen_method == "grid" and record.val_dice == 0.8312


def test_version_4_classes_record_loads():
    record = EnsembleRecord.load(V4_CLASSES)
    assert record.version == 4 and record.threshold is None
    assert isinstance(record.labels, Labels)
    assert record.labels.names == ("background", "left_lung", "right_lung", "heart")
    assert record.labels.values == (0, 1, 2, 4) and record.labels.regions is None
    assert record.flip_swap == (0, 2, 1, 3) and not record.no_flip_tta and record.n_outputs == 4
    assert record.class_postprocess == {"heart": PostProcess(keep_largest=True)}
    assert record.members[0].folds == ("2" * 32, "3" * 32) and record.members[0].runs == ["2" * 32, "3" * 32]
    assert record.members[1].runs == ["4" * 32] and record.views[1].resize_mode == "pad"
    assert record.weights == Weights((1, 1), 2) and record.tta == "flip"


def test_version_4_regions_record_loads():
    record = EnsembleRecord.load(V4_REGIONS)
    assert record.labels.region_names == ("whole", "core", "enhancing")
    assert record.no_flip_tta and record.flip_swap is None and record.n_outputs == 3
    assert record.region_thresholds == {"whole": 0.45, "core": 0.5, "enhancing": 0.35}
    assert record.class_postprocess == {}


def test_a_changed_record_writes_its_change_and_keeps_the_rest():
    record = EnsembleRecord.load(V3_BINARY)
    written = json.loads(V3_BINARY.read_text())
    equal = replace(
        record,
        members=tuple(replace(m, weight=0.5, weight_count=1) for m in record.members),
        weight_denominator=2,
    )
    out = equal.to_json()
    assert [m["weight_count"] for m in out["members"]] == [1, 1] and out["weight_denominator"] == 2
    assert {k: v for k, v in out.items() if k not in ("members", "weight_denominator")} == {
        k: v for k, v in written.items() if k not in ("members", "weight_denominator")
    }
    assert EnsembleRecord.from_json(out).weights == Weights((1, 1), 2)


def test_a_bad_record_is_refused_once_on_reading(tmp_path):
    written = json.loads(V3_BINARY.read_text())
    written["members"][0]["weight_count"] = 2
    with pytest.raises(SegxError, match=r"members\[0\]\.weight=0\.3333333333333333 disagrees"):
        EnsembleRecord.from_json(written)
    (tmp_path / "ensemble.json").write_text("{")
    with pytest.raises(SegxError, match="ensemble.json is missing or not JSON"):
        EnsembleRecord.load(tmp_path / "ensemble.json")


def _member(folder: Path, classes: int, activation: str) -> Path:
    from segx.backend import keras
    from segx.member_spec import MemberSpec
    from segx.models import Head, build_model, save_member

    keras.utils.set_random_seed(0)
    model = build_model("unet", "mobilenetv2", 32, head=Head(classes, activation), **SMALL)
    spec = {"arch": "unet", "backbone": "mobilenetv2", "image_size": 32, "options": SMALL}
    if classes > 1:
        spec["labels"] = {"names": ["background", "left_lung", "right_lung", "heart"], "values": [0, 1, 2, 4]}
    return save_member(model, folder, MemberSpec.from_json(spec))


def test_old_records_predict(tmp_path):
    """A predictor is built from the version 3 and 4 records as they were written, and predicts."""
    from segx.inference.predictor import EnsemblePredictor

    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    binary = _member(tmp_path / "binary", 1, "sigmoid")
    predictor = EnsemblePredictor(EnsembleRecord.load(V3_BINARY), [binary, binary])
    assert predictor.threshold == 0.45 and predictor.weights == Weights((1, 2), 3) and predictor.labels is None
    (out,) = predictor.predict([image])
    assert out.mask.shape == (40, 50) and out.mask.dtype == bool

    classes = _member(tmp_path / "classes", 4, "softmax")
    predictor = EnsemblePredictor(EnsembleRecord.load(V4_CLASSES), [[classes, classes], classes], tta="none")
    assert predictor.threshold is None and predictor.labels.n_classes == 4 and predictor.swap == [0, 2, 1, 3]
    post = predictor.record.class_postprocess  # by class name; prediction applies it by index
    assert {predictor.labels.index(name): p for name, p in post.items()} == {3: PostProcess(keep_largest=True)}
    (out,) = predictor.predict([image])
    assert out.mask.shape == (40, 50) and set(np.unique(out.mask)) <= {0, 1, 2, 3}
