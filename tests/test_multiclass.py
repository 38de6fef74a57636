"""Several classes: labels, label maps, per-class scores, the exact class search, flip swap.

Hand-built cases with known answers; one slow end-to-end test trains real members."""

from __future__ import annotations

import itertools
import subprocess
import sys

import albumentations as A
import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from segx.data.io import read_label_map
from segx.data.labels import IGNORE_INDEX, Labels
from segx.data.ragged import Ragged
from segx.ensembling import search
from segx.ensembling.classes import compact_classes, exact_class_dice, exact_labels
from segx.ensembling.probs import Weights
from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from segx.scoring.classes import class_dice, class_means, class_metrics, confusion_counts, foreground_mean

LUNGS = {"background": 0, "right_lung": 1, "left_lung": 2, "vessel": 3}


# -- labels and label maps ---------------------------------------------------------------------


def test_labels_are_ordered_by_value_with_background_first():
    labels = Labels.from_config({"tumour": 255, "background": 0, "oedema": 128})
    assert labels.names == ("background", "oedema", "tumour")
    assert labels.foreground == ("oedema", "tumour")
    raw = np.array([[0, 128], [255, 0]], np.uint8)
    assert labels.encode(raw, "m.png").tolist() == [[0, 1], [2, 0]]
    assert labels.decode(labels.encode(raw, "m.png")).tolist() == raw.tolist()


@pytest.mark.parametrize(
    "labels, palette, ignore, message",
    [
        ({"background": 0}, None, None, "at least two classes"),
        ({"a": 1, "b": 2}, None, None, "no class of value 0"),
        ({"background": 0, "a": 1, "b": 1}, None, None, "a and b share the value 1"),
        ({"background": 0, "a": 1}, None, 1, r"data.ignore=1 is also the value of class a"),
        ({"background": 0, "a": 1}, {"background": [0, 0, 0]}, None, "data.palette has no colour for a"),
        ({"background": 0, "a": 1}, {"background": [0, 0, 0], "b": [1, 1, 1]}, None, "data.palette.b is not a class"),
        (None, None, 255, "data.ignore is set but data.labels is null"),
    ],
)
def test_bad_label_configs_are_one_line_naming_the_key(labels, palette, ignore, message):
    with pytest.raises(SegxError, match=message) as info:
        Labels.from_config(labels, palette, ignore)
    assert "\n" not in str(info.value)


def test_a_mask_value_not_in_the_labels_names_the_file_the_value_and_the_key(tmp_path):
    labels = Labels.from_config(LUNGS)
    mask = np.zeros((8, 8), np.uint8)
    mask[2, 2] = 7
    cv2.imwrite(str(tmp_path / "case.png"), mask)
    with pytest.raises(SegxError, match=r"case.png: mask value\(s\) 7 \(1 px\) are not in data.labels"):
        read_label_map(tmp_path / "case.png", labels)


def test_anti_aliased_edges_are_named_with_their_stray_values(tmp_path):
    labels = Labels.from_config({"background": 0, "organ": 255})
    mask = np.zeros((16, 16), np.uint8)
    cv2.circle(mask, (8, 8), 5, 255, -1, lineType=cv2.LINE_AA)
    cv2.imwrite(str(tmp_path / "smooth.png"), mask)
    with pytest.raises(SegxError, match=r"smooth.png: .*anti-aliased") as info:
        read_label_map(tmp_path / "smooth.png", labels)
    stray = sorted(set(np.unique(mask)) - {0, 255})
    assert f"{stray[0]} (" in str(info.value)


def test_a_jpeg_label_mask_is_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "m.jpg"), np.zeros((8, 8), np.uint8))
    with pytest.raises(SegxError, match="m.jpg: a JPEG label mask is lossy"):
        read_label_map(tmp_path / "m.jpg", Labels.from_config(LUNGS))


def test_a_palette_round_trip_from_colours_in_to_colours_out(tmp_path):
    palette = {"background": [0, 0, 0], "right_lung": [255, 0, 0], "left_lung": [0, 0, 255], "vessel": [0, 255, 0]}
    labels = Labels.from_config(LUNGS, palette, [255, 255, 255])
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[0, :] = [255, 0, 0]
    rgb[1, :] = [0, 0, 255]
    rgb[2, :] = [0, 255, 0]
    rgb[3, :] = [255, 255, 255]
    cv2.imwrite(str(tmp_path / "colours.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    indices = read_label_map(tmp_path / "colours.png", labels)
    assert indices[:4, 0].tolist() == [1, 2, 3, IGNORE_INDEX]
    assert (indices[4:] == 0).all()
    back = labels.decode(np.where(indices == IGNORE_INDEX, 0, indices))
    assert np.array_equal(back[:3], rgb[:3]) and (back[3:] == 0).all()
    rgb[5, 5] = [9, 9, 9]
    cv2.imwrite(str(tmp_path / "odd.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    with pytest.raises(SegxError, match=r"odd.png: colour\(s\) \[9, 9, 9\] \(1 px\) are not in data.palette"):
        read_label_map(tmp_path / "odd.png", labels)


# -- per-class scores ---------------------------------------------------------------------------


def test_per_class_dice_and_the_empty_class_rule():
    truth = np.array([[[0, 1, 1, 0], [0, 0, 0, 0]], [[2, 2, 0, 0], [0, 0, 0, 0]]], np.uint8)
    pred = np.array([[[0, 1, 0, 0], [0, 0, 0, 2]], [[2, 2, 0, 0], [0, 0, 0, 0]]], np.uint8)
    names = ("background", "a", "b", "c")
    scores = class_metrics(pred, truth, names, with_hd95=False)
    # case 0: a has tp 1, pred 1, true 2 -> 2/3; b absent from the truth but predicted -> 0;
    # c absent from both -> not counted (NaN).
    assert scores["dice/a"][0] == pytest.approx(2 / 3)
    assert scores["dice/b"][0] == 0.0
    assert np.isnan(scores["dice/c"][0])
    # case 1: a absent from both (NaN), b perfect.
    assert np.isnan(scores["dice/a"][1]) and scores["dice/b"][1] == 1.0
    assert scores["dice"].tolist() == pytest.approx([(2 / 3 + 0) / 2, 1.0])
    # The objective: per class the mean over the cases that count it, then the foreground mean;
    # c is counted nowhere and left out.
    per_class = class_means(class_dice(*confusion_counts(pred, truth, 4)))
    assert per_class[1] == pytest.approx(2 / 3) and per_class[2] == pytest.approx(0.5) and np.isnan(per_class[3])
    assert foreground_mean(per_class) == pytest.approx((2 / 3 + 0.5) / 2)


def test_ignored_pixels_count_for_nothing():
    truth = np.array([[[1, 1, IGNORE_INDEX, IGNORE_INDEX]]], np.uint8)
    right = np.array([[[1, 1, 0, 0]]], np.uint8)
    other = np.array([[[1, 1, 1, 1]]], np.uint8)
    names = ("background", "a")
    assert class_metrics(right, truth, names, False)["dice/a"][0] == 1.0
    assert class_metrics(other, truth, names, False)["dice/a"][0] == 1.0  # what is predicted there does not matter


def test_the_class_loss_ignores_unannotated_pixels():
    from segx.backend import tf
    from segx.models import build_class_loss

    loss = build_class_loss(3, {"dice": 1.0, "ce": 1.0})
    labels = np.zeros((1, 4, 4, 1), np.float32)
    labels[0, :2] = 1
    labels[0, 3, :] = IGNORE_INDEX
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), (1, 4, 4)).astype(np.float32)
    changed = probs.copy()
    changed[0, 3] = rng.dirichlet(np.ones(3), 4)  # only the ignored row differs
    elsewhere = probs.copy()
    elsewhere[0, 0] = rng.dirichlet(np.ones(3), 4)
    base = float(loss(tf.constant(labels), tf.constant(probs)))
    assert float(loss(tf.constant(labels), tf.constant(changed))) == pytest.approx(base, abs=1e-6)
    assert abs(float(loss(tf.constant(labels), tf.constant(elsewhere))) - base) > 1e-3


# -- the exact class search ------------------------------------------------------------------


def _tied_members(seed: int, k: int = 4, members: int = 3):
    """Coarse probabilities (multiples of 60) so that class scores tie often, for every weighting."""
    rng = np.random.default_rng(seed)
    shapes = [(9, 13), (17, 6), (11, 11), (5, 20)]
    truth = Ragged.from_list([rng.integers(0, k, s).astype(np.uint8) for s in shapes])
    truth.flat[:7] = IGNORE_INDEX
    probs = [
        Ragged((rng.integers(0, 5, (truth.n_pixels, k)) * 60).astype(np.uint8), truth.shapes) for _ in range(members)
    ]
    return probs, truth


def _brute_force(probs, truth, counts, k):
    """Every weighting the slow way: float class scores from every pixel, argmax, per-case counts."""
    out = []
    for row in counts:
        score = sum(c * p.flat.astype(np.float64) for c, p in zip(row, probs, strict=True))
        pred = truth.like(np.argmax(score, axis=-1).astype(np.uint8))
        out.append(foreground_mean(class_means(class_dice(*confusion_counts(pred, truth, k)))))
    return np.asarray(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_class_search_equals_brute_force_with_ties(seed):
    probs, truth = _tied_members(seed)
    grid = search.simplex_counts(3, 10)
    raw = sum(p.flat.astype(np.int64) for p in probs)
    ties = (raw == raw.max(axis=-1, keepdims=True)).sum(axis=-1) > 1
    assert ties.mean() > 0.05  # the case is built to tie
    data = compact_classes(probs, truth, 4)
    assert 0 < data.kept_fraction < 1
    got = search.evaluate(data, grid, 10)[:, 0]
    assert np.array_equal(got, _brute_force(probs, truth, grid, 4))
    result = search.search_grid(data, 0.1)
    assert result.best.val_dice == got.max()
    # The prediction path's labels give the search's number for the chosen weights, bit for bit.
    assert exact_class_dice(probs, truth, result.best.weights, 4) == result.best.val_dice
    greedy = search.search_greedy(data)
    assert exact_class_dice(probs, truth, greedy.best.weights, 4) == greedy.best.val_dice


def test_ties_go_to_the_lowest_class_index():
    probs = [
        Ragged(np.array([[0, 100, 100, 0]], np.uint8), [(1, 1)]),
        Ragged(np.array([[0, 0, 100, 100]], np.uint8), [(1, 1)]),
    ]
    assert exact_labels(probs, Weights((1, 1), 2)).flat.tolist() == [2]
    assert exact_labels(probs, Weights((1, 0), 1)).flat.tolist() == [1]
    assert exact_labels(probs, Weights((0, 1), 1)).flat.tolist() == [2]


def test_pixels_where_members_agree_are_decided_for_every_weighting():
    probs, truth = _tied_members(5)
    labels = [np.argmax(p.flat, axis=-1) for p in probs]
    agree = (labels[0] == labels[1]) & (labels[1] == labels[2])
    for row in itertools.islice(search.simplex_counts(3, 6), 0, None, 3):
        if not sum(row):
            continue
        pred = exact_labels(probs, Weights(tuple(int(v) for v in row), int(sum(row)))).flat
        assert np.array_equal(pred[agree], labels[0][agree])


# -- data: class-uniform sampling, classes in no training case, flips ------------------------


def test_foreground_samples_give_a_rare_class_its_share():
    from segx.data.decoded import FOREGROUND_SAMPLES, _foreground_sample

    mask = np.zeros((400, 400), np.uint8)
    mask[:, :300] = 1  # a large class
    mask[10, 310:330] = 2  # a thin, rare one: 20 pixels
    sample = _foreground_sample(mask, "ab12")
    classes = mask[sample[:, 0], sample[:, 1]]
    assert len(sample) <= FOREGROUND_SAMPLES
    assert (classes == 2).sum() == 20  # all of its pixels, where a uniform draw would keep ~0


def test_a_class_in_no_training_case_is_refused(tmp_path):
    from segx.data.decoded import decode_cases
    from segx.data.folder import discover_cases
    from segx.workflows.prepare import check_classes

    labels = Labels.from_config(LUNGS)
    for folder in ("train_images", "train_masks"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "train_images" / f"c{i}.png"), np.full((8, 8, 3), 50, np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[:, :4], mask[:, 4:] = 1, 2  # no vessel anywhere
        cv2.imwrite(str(tmp_path / "train_masks" / f"c{i}.png"), mask)
    decoded = decode_cases(discover_cases(tmp_path), tmp_path / "cache", labels)
    with pytest.raises(SegxError, match=r"class vessel \(data.labels.vessel=3\) appears in no training case"):
        check_classes(labels, decoded, ["c0", "c1", "c2"], tmp_path)


def _lateral():
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8], mask[:, 8:] = 1, 2  # right_lung on the image's left, as radiographs show it
    return np.zeros((16, 16, 3), np.uint8), mask


def test_a_flip_with_swap_keeps_each_side_its_class_and_one_without_does_not():
    from segx.training.augment import SeededAugmenter

    labels = Labels.from_config(LUNGS)
    swap = labels.swap_table([["right_lung", "left_lung"]])
    image, mask = _lateral()
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    _, plain = SeededAugmenter(flip)(image, mask, 1)
    _, swapped = SeededAugmenter(flip, swap)(image, mask, 1)
    assert plain[0, 0] == 2  # unswapped: the left of the image now says left_lung, the wrong side
    assert np.array_equal(swapped, mask)  # swapped: each side keeps its class
    _, upside_down = SeededAugmenter(A.Compose([A.VerticalFlip(p=1.0)]), swap)(image, mask, 1)
    assert np.array_equal(upside_down, mask)  # a vertical flip keeps left and right: nothing is swapped


def test_a_flip_of_sided_classes_without_a_swap_is_refused_naming_the_key():
    from segx.workflows.prepare import flip_swap_of

    labels = Labels.from_config(LUNGS)
    data = OmegaConf.create({"flip_swap": None})
    flips = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]
    with pytest.raises(SegxError, match=r"augment has HorizontalFlip.*set data.flip_swap"):
        flip_swap_of(data, labels, flips)
    with pytest.raises(SegxError, match=r"ensemble.tta=flip .*set data.flip_swap"):
        flip_swap_of(data, labels, (), tta="flip")
    assert flip_swap_of(data, labels, ()) is None  # no mirroring: nothing to swap
    with pytest.raises(SegxError, match="data.flip_swap names 'left_lng'.*did you mean 'left_lung'"):
        flip_swap_of(OmegaConf.create({"flip_swap": [["right_lung", "left_lng"]]}), labels, flips)


def test_flip_tta_swaps_the_classes_of_its_mirrored_passes():
    from segx.models import _probs_modes

    images = np.zeros((1, 4, 4, 3), np.uint8)

    def forward(batches):  # a "network" that calls the image's left half class 1, the right half class 2
        out = np.zeros((len(batches[0]), 4, 4, 3), np.float32)
        out[:, :, :2, 1], out[:, :, 2:, 2] = 1.0, 1.0
        return [out]

    plain = _probs_modes(forward, ["resnet18"], images, ("flip",))[0]["flip"]
    swapped = _probs_modes(forward, ["resnet18"], images, ("flip",), [0, 2, 1])[0]["flip"]
    assert plain[0, 0, 0, 1] == pytest.approx(2 / 3)  # the width-flipped pass says class 2 on the left
    assert swapped[0, 0, 0, 1] == pytest.approx(1.0) and swapped[0, 0, 3, 2] == pytest.approx(1.0)
    assert swapped[0, 0, 0, 2] == 0.0


def test_the_lateral_synthetic_scene_has_every_class_and_a_rare_thin_vessel():
    from segx.data.synthetic import LATERAL_LABELS, lateral_case

    image, labels = lateral_case(np.random.default_rng(3), 128)
    assert image.shape == (128, 128, 3) and set(np.unique(labels)) == set(LATERAL_LABELS.values())
    assert (labels == 3).mean() < 0.04  # rare: a lobe holds about 12 %
    left, right = np.nonzero(labels == 1)[1].mean(), np.nonzero(labels == 2)[1].mean()
    assert left < 64 < right


# -- end to end ---------------------------------------------------------------------------------


REGIONS = "data.regions={all: [left_lobe, right_lobe, vessel], right: [right_lobe, vessel], vessel: [vessel]}"


def labels_of(written: np.ndarray, record: dict) -> np.ndarray:
    """A written mask (the data's own label values) as class indices, for scoring."""
    labels = Labels.from_record(record["labels"])
    table = np.zeros(256, np.uint8)
    table[list(labels.values)] = np.arange(labels.n_classes, dtype=np.uint8)
    assert set(np.unique(written)) <= set(labels.values)
    return table[written]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["classes", "regions"])
def test_multiclass_members_ensemble_predict_and_export_end_to_end(tmp_path, mode):
    """Two members on the lateral scene (softmax, or one sigmoid per region), then segx.ensemble:
    per-class (per-region) metrics and a record naming the classes; segx.predict's label maps equal
    the search's labels on the cached test probabilities bit for bit, and the SavedModel (bit for
    bit) and ONNX exports predict them too."""
    import json
    import shutil

    import mlflow

    from segx.ensembling.probs import load_cached
    from segx.ensembling.record import record_weights

    out = tmp_path / "out"
    common = [
        "data=synthetic_multiclass",
        f"data.root={tmp_path / 'data'}",
        "data.n_images=12",
        "data.image_size=32",
        f"paths.output_dir={out}",
        "mlflow.system_metrics=false",
        *([REGIONS] if mode == "regions" else []),
    ]
    train = [*common, "augment=none", "trainer.epochs=1", "trainer.batch_size=4"]
    for backbone in ("resnet18", "mobilenetv2"):
        subprocess.run([sys.executable, "-m", "segx.train", f"backbone={backbone}", *train], check=True, cwd=tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "segx.ensemble", *common, "ensemble.members=[resnet18,mobilenetv2]"],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    searched = (
        "a threshold per region on validation (greedy, 3 regions)"
        if mode == "regions"
        else "(greedy, 2 members, 4 classes)"
    )
    assert searched in done.stdout
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("segx").experiment_id, "tags.`segx.role` = 'ensemble'")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    metrics = runs[0].data.metrics
    parts = ("all", "right", "vessel") if mode == "regions" else ("left_lobe", "right_lobe", "vessel")
    assert {*(f"test/dice/{p}" for p in parts), "test/dice"} <= set(metrics)
    record = json.loads(open(client.download_artifacts(run_id, "ensemble.json", str(tmp_path))).read())
    assert record["version"] == 4 and record["threshold"] is None
    assert record["labels"]["names"] == ["background", "left_lobe", "right_lobe", "vessel"]

    # The search's labels on the cached test probabilities, through the prediction arithmetic.
    cached = []
    for i, member in enumerate(record["members"]):
        local = client.download_artifacts(member["run_id"], "predictions/test.npz", str(tmp_path / f"m{i}"))
        cached.append(load_cached(local, tmp_path / f"x{i}"))
    if mode == "regions":
        from segx.ensembling.regions import region_decisions

        labels = Labels.from_record(record["labels"])
        thresholds = [record["region_thresholds"][r] for r in labels.region_names]
        on = region_decisions([c.probs for c in cached], record_weights(record), thresholds)
        expected = on.like(labels.decode_regions(on.flat))
    else:  # the argmax labels, then the per-class post-processing the ensemble kept (predict applies it)
        from segx.scoring.postprocess import apply_classes

        written = EnsembleRecord.from_json(record)
        post = {written.labels.index(name): p for name, p in written.class_postprocess.items()}
        expected = apply_classes(exact_labels([c.probs for c in cached], record_weights(record)), post)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for stem in cached[0].stems:
        shutil.copy(tmp_path / "data" / "train_images" / f"{stem}.png", inputs / f"{stem}.png")
    for backend in ("keras", "savedmodel", "onnx"):
        if backend != "keras":
            fmt = backend
            subprocess.run(
                [sys.executable, "-m", "segx.export", f"ensemble_run_id={run_id}", f"format={fmt}",
                 f"output_dir={tmp_path / ('export-' + fmt)}", f"paths.output_dir={out}"],
                check=True, cwd=tmp_path, capture_output=True,
            )  # fmt: skip
        target = tmp_path / f"pred-{backend}"
        subprocess.run(
            [sys.executable, "-m", "segx.predict", f"ensemble_run_id={run_id}", f"input_dir={inputs}",
             f"output_dir={target}", f"paths.output_dir={out}", f"backend={backend}", "tta=none"],
            check=True, cwd=tmp_path, capture_output=True,
        )  # fmt: skip
        for i, stem in enumerate(cached[0].stems):
            got = cv2.imread(str(target / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            same = np.array_equal(got, expected[i])
            if backend == "onnx":  # within a rounding step of the probabilities: at most a few pixels
                assert (got != expected[i]).mean() < 0.01, (backend, stem)
            else:
                assert same, (backend, stem)
    # The report's per-case table is the score of the files segx.predict wrote (nnU-Net's rule for
    # regions: the decoded label map, converted back to regions), recomputed from those files.
    import pandas as pd

    from segx.scoring.classes import class_metrics, region_metrics

    table = pd.read_csv(client.download_artifacts(run_id, "tables/test_per_case.csv", str(tmp_path / "t")))
    rows = table[table["method"] == "ensemble"].set_index("stem")
    written = Ragged.from_list(
        [labels_of(cv2.imread(str(tmp_path / "pred-keras" / "masks" / f"{s}.png"), cv2.IMREAD_UNCHANGED), record)
         for s in cached[0].stems]
    )  # fmt: skip
    truth = cached[0].masks
    if mode == "regions":
        scores = region_metrics(written, truth, labels.region_names, labels.region_members)
        parts = labels.region_names
    else:
        scores = class_metrics(written, truth, Labels.from_record(record["labels"]).names)
        parts = Labels.from_record(record["labels"]).foreground
    for i, stem in enumerate(cached[0].stems):
        for key in ("dice", *(f"dice/{p}" for p in parts)):
            want, got = rows.loc[stem, key], scores[key][i]
            assert (np.isnan(want) and np.isnan(got)) or want == pytest.approx(got, rel=1e-12, abs=1e-12), (stem, key)
    # The ONNX export's K (or R) probabilities per member: within one uint8 step of the cached ones.
    from segx.inference.export_runtime import load_exported

    images = [cv2.cvtColor(cv2.imread(str(inputs / f"{stem}.png")), cv2.COLOR_BGR2RGB) for stem in cached[0].stems]
    onnx_probs = load_exported(tmp_path / "export-onnx").member_probs(images)
    for c, p in zip(cached, onnx_probs, strict=True):
        if p is None:  # a member the search gave weight 0 is not run
            continue
        assert p.flat.shape == c.probs.flat.shape
        assert np.abs(p.flat.astype(int) - np.asarray(c.probs.flat, int)).max() <= 1
    refused = subprocess.run(
        [sys.executable, "-m", "segx.predict", f"ensemble_run_id={run_id}", f"input_dir={inputs}",
         f"output_dir={tmp_path / 'refused'}", f"paths.output_dir={out}", "threshold=0.4"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    why = "each at its own threshold chosen on validation" if mode == "regions" else "labelled by argmax"
    assert refused.returncode != 0 and why in refused.stderr and "drop the threshold override" in refused.stderr


# -- post-processing per class, cross-validation ---------------------------------------------


def test_per_class_post_processing_is_kept_only_where_it_helps_that_class():
    from segx.scoring.postprocess import PostProcess, apply_classes, choose_class_postprocess

    truth = np.zeros((4, 40, 40), np.uint8)
    truth[:, 5:20, 5:20] = 1  # one blob of class 1
    truth[:, 25:35, 25:35] = 2  # one of class 2
    pred = truth.copy()
    pred[:, 30, 2] = 1  # specks of class 1 in the background: removing them helps class 1 only
    pred[:, 2, 30] = 1
    pred[:, 28:30, 28:30] = 0  # a hole in class 2's blob: filling it helps class 2
    chosen, rows = choose_class_postprocess(Ragged.of(pred), Ragged.of(truth), 3, [10], 1e-3)
    assert chosen[1].min_size == 10 or chosen[1].keep_largest
    assert chosen[2].fill_holes
    assert rows and all(r[0] in (1, 2) for r in rows)
    cleaned = apply_classes(pred, chosen)
    assert np.array_equal(cleaned, truth)
    # A filled hole never takes another class's pixels.
    other = np.zeros((1, 9, 9), np.uint8)
    other[0, 2:7, 2:7] = 1
    other[0, 4, 4] = 2
    assert apply_classes(other, {1: PostProcess(fill_holes=True)})[0, 4, 4] == 2


def test_out_of_fold_probabilities_keep_their_classes(tmp_path):
    from segx.ensembling.members import assemble_out_of_fold
    from segx.ensembling.probs import load_cached, save_cached

    rng = np.random.default_rng(0)
    names = ("background", "a", "b")
    folds = []
    for k, stems in enumerate((["c2", "c0"], ["c1"])):
        shapes = [(5, 7)] * len(stems)
        probs = Ragged.from_list([rng.integers(0, 256, (*s, 3)).astype(np.uint8) for s in shapes])
        labels = Ragged.from_list([rng.integers(0, 3, s).astype(np.uint8) for s in shapes])
        path = save_cached(tmp_path / f"f{k}.npz", stems, probs, labels, None, names)
        folds.append(load_cached(path))
    oof = assemble_out_of_fold(folds, tmp_path / "oof.npy")
    assert oof.stems == ["c0", "c1", "c2"] and oof.classes == names
    assert np.array_equal(oof.probs[0], folds[0].probs[1]) and np.array_equal(oof.masks[2], folds[0].masks[0])
    assert oof.probs.flat.shape[1] == 3 and oof.masks.flat.dtype == np.uint8


def test_members_naming_other_classes_never_combine():
    from types import SimpleNamespace

    from segx.workflows.ensemble import _common_labels

    lungs = Labels.from_config(LUNGS).to_record()
    other = Labels.from_config({"background": 0, "liver": 1}).to_record()
    members = [SimpleNamespace(run_id="aaa", labels=lungs), SimpleNamespace(run_id="bbb", labels=other)]
    with pytest.raises(SegxError, match=r"members aaa \(background, right_lung, left_lung, vessel\) and bbb"):
        _common_labels(members, "none")
    binary = [SimpleNamespace(run_id="aaa", labels=lungs), SimpleNamespace(run_id="ccc", labels=None)]
    with pytest.raises(SegxError, match=r"and ccc \(one structure\) name different classes"):
        _common_labels(binary, "none")
    assert _common_labels([SimpleNamespace(run_id="a", labels=lungs)] * 2, "none") == lungs
    with pytest.raises(SegxError, match="ensemble.tta=flip mirrors the images, and classes right_lung, left_lung"):
        _common_labels([SimpleNamespace(run_id="a", labels=lungs)], "flip")


def test_the_class_search_memory_is_bounded_by_its_chunk_not_the_data(tmp_path):
    """16 classes, members that agree on most pixels: the compaction reads the memory-mapped caches
    a few cases at a time, so its peak is a small share of the cached probabilities (the bound is
    members x (chunk pixels x (K + 8) + kept pixels x K) bytes; README)."""
    import tracemalloc

    from segx.ensembling.probs import load_cached, save_cached

    rng = np.random.default_rng(0)
    k, members, cases, side = 16, 3, 48, 128
    names = tuple(f"c{i}" for i in range(k))
    truth = Ragged.from_list([rng.integers(0, k, (side, side)).astype(np.uint8) for _ in range(cases)])
    cached = []
    for m in range(members):
        probs = np.full((truth.n_pixels, k), 5, np.uint8)
        probs[np.arange(truth.n_pixels), truth.flat] = 200  # every member right, so they agree ...
        flip = rng.random(truth.n_pixels) < 0.02  # ... but on 2 % of the pixels, each its own way
        probs[flip, (truth.flat[flip].astype(int) + 1 + m) % k] = 250
        path = save_cached(
            tmp_path / f"m{m}.npz", [f"s{i}" for i in range(cases)], Ragged(probs, truth.shapes), truth, None, names
        )
        cached.append(load_cached(path, tmp_path / f"x{m}"))
    del probs
    total = members * truth.n_pixels * k  # bytes of the members' cached probabilities
    tracemalloc.start()
    data = compact_classes([c.probs for c in cached], cached[0].masks, k, chunk=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    kept = data.probs.shape[1]
    assert 0.02 < kept / truth.n_pixels < 0.1
    chunk_pixels = 2 * side * side
    assert peak < members * (chunk_pixels * (k + 8) + kept * k) * 1.5 + (1 << 20)
    assert peak < total / 4


# -- overlapping regions ---------------------------------------------------------------------

TUMOUR = {"background": 0, "necrosis": 1, "oedema": 2, "enhancing": 4}
NESTED = {"whole": ["oedema", "necrosis", "enhancing"], "core": ["necrosis", "enhancing"], "enhancing": ["enhancing"]}


def test_regions_decode_in_their_order_each_painting_the_class_it_adds():
    labels = Labels.from_config(TUMOUR, regions=NESTED)
    assert labels.region_names == ("whole", "core", "enhancing")
    assert [labels.names[c] for c in labels.paints()] == ["oedema", "necrosis", "enhancing"]
    truth = np.array([0, 1, 2, 3], np.uint8)  # class indices: background, necrosis, oedema, enhancing
    on = labels.region_masks(truth)
    assert on.astype(int).tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert labels.decode_regions(on).tolist() == truth.tolist()
    # A later region wins where regions disagree: enhancing on, core off -> enhancing.
    assert labels.decode_regions(np.array([[True, False, True]])).tolist() == [3]
    assert Labels.from_record(labels.to_record()) == labels


@pytest.mark.parametrize(
    "regions, message",
    [
        ({"whole": ["oedema", "tumor"]}, r"data.regions.whole names 'tumor', not a class"),
        ({"all": ["background", "oedema"]}, r"data.regions.all holds the background"),
        (
            {"core": ["necrosis", "enhancing"], "whole": ["oedema", "necrosis", "enhancing"]},
            r"data.regions: core adds 0 classes over the regions after it .*order the regions from the largest",
        ),
        ({"whole": "oedema"}, r"data.regions.whole='oedema' must list the classes"),
    ],
)
def test_bad_regions_are_one_line_naming_the_key(regions, message):
    with pytest.raises(SegxError, match=message):
        Labels.from_config(TUMOUR, regions=regions)


def _raw_region_dice(on, truth, regions) -> float:
    """The search's own objective, by hand: each region's Dice of its raw decision (not decoded)."""
    from segx.scoring.classes import class_dice, mean_over_regions, nan_mean_last

    on, truth = Ragged.of(on), Ragged.of(truth)
    per_region = []
    for j, members in enumerate(regions):
        tp, pp, tt = (np.zeros((len(truth), 1), np.int64) for _ in range(3))
        for i in range(len(truth)):
            t = truth[i]
            keep = t != IGNORE_INDEX
            want, got = np.isin(t, members)[keep], on[i][..., j][keep]
            tp[i], pp[i], tt[i] = (want & got).sum(), got.sum(), want.sum()
        per_region.append(nan_mean_last(class_dice(tp, pp, tt)[:, 0]))
    return float(mean_over_regions(per_region))


def _random_region_problem(seed: int):
    rng = np.random.default_rng(seed)
    shapes = [(12, 15), (9, 20), (14, 14), (6, 6)]
    truth = Ragged.from_list([rng.integers(0, 4, s).astype(np.uint8) for s in shapes])
    truth.flat[:9] = IGNORE_INDEX
    truth[3][...] = 0  # a case without any region: not counted
    probs = [Ragged((rng.integers(0, 6, (truth.n_pixels, 3)) * 50).astype(np.uint8), truth.shapes) for _ in range(3)]
    return truth, probs


def test_the_region_search_equals_brute_force_over_weights_and_every_threshold_combination():
    # The search's stage one: each region's raw decision, separable by region, searched exactly.
    from segx.ensembling.regions import compact_regions, region_decisions

    regions = [(1, 2, 3), (1, 3), (3,)]
    truth, probs = _random_region_problem(4)
    thresholds = [0.3, 0.5, 0.7]
    data = compact_regions(probs, truth, regions, thresholds)
    grid = search.simplex_counts(3, 5)
    got = search.evaluate(data, grid, 5)[:, 0]
    for row, value in zip(grid, got, strict=True):
        w = Weights(tuple(int(v) for v in row), 5)
        raw = {
            ts: _raw_region_dice(region_decisions(probs, w, ts), truth, regions)
            for ts in itertools.product(thresholds, repeat=3)
        }
        assert value == max(raw.values())
        assert raw[tuple(data.thresholds_for(w))] == value


def test_region_scores_are_the_scores_of_the_decoded_label_map():
    # One case, three pixels, nested regions whole > core > enhancing (BraTS). Pixel 0: core on,
    # whole off -> decoded necrosis, which is in whole; pixel 1: enhancing only -> enhancing, in
    # all three; pixel 2: nothing. Raw decisions would count pixel 0 out of whole and pixel 1
    # out of core; the file (and so the score) has them in.
    from segx.scoring.classes import region_metrics

    labels = Labels.from_config(TUMOUR, regions=NESTED)
    on = np.array([[[[False, True, False], [False, False, True], [False, False, False]]]])  # (1 case, 1x3 px, R)
    truth = np.array([[[1, 3, 0]]], np.uint8)  # class indices: necrosis, enhancing, background
    decoded = labels.decode_regions(on)
    assert decoded.tolist() == [[[1, 3, 0]]]
    scores = region_metrics(decoded, truth, labels.region_names, labels.region_members, with_hd95=False)
    assert scores["dice/whole"].tolist() == [1.0]
    assert scores["dice/core"].tolist() == [1.0]
    assert scores["dice/enhancing"].tolist() == [1.0]
    assert _raw_region_dice(on, truth, labels.region_members) < 1.0  # what the report used to say


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_region_choice_scores_the_decoded_label_maps_it_records(seed):
    # run_search's region choice: the validation Dice it records is the Dice of the decoded label
    # maps at the recorded thresholds (what segx.predict writes), and refining the thresholds on
    # those maps never scores below the search's own per-region thresholds.
    from segx.ensembling.choose import SearchSettings, run_search
    from segx.ensembling.members import Member
    from segx.ensembling.probs import Cached
    from segx.ensembling.regions import compact_regions, exact_region_dice, region_labels
    from segx.scoring.classes import mean_region_dice

    labels = Labels.from_config(TUMOUR, regions=NESTED)
    truth, probs = _random_region_problem(seed)
    thresholds = (0.3, 0.5, 0.7)
    stems = [f"case{i}" for i in range(len(truth))]
    members = [
        Member(
            run_id=f"run{i}", backbone=f"net{i}", arch="unet", fingerprint="f", view={},
            val=Cached(stems, p, truth, None, labels.names, labels.region_names),
            test=None, labels=labels.to_record(),
        )
        for i, p in enumerate(probs)
    ]  # fmt: skip
    found = run_search(members, SearchSettings(method="greedy", thresholds=thresholds, postprocess=False))
    ts = [found.region_thresholds[r] for r in labels.region_names]
    decoded = region_labels(probs, found.weights, ts, labels)
    assert found.val_dice == mean_region_dice(decoded, truth, labels.region_members)
    proxy = compact_regions(probs, truth, labels.region_members, list(thresholds)).thresholds_for(found.weights)
    assert found.val_dice >= exact_region_dice(probs, truth, found.weights, proxy, labels)


def test_the_region_loss_targets_the_regions_and_ignores_unannotated_pixels():
    from segx.backend import tf
    from segx.models import build_region_loss

    loss = build_region_loss([(1, 2, 3), (3,)], {"dice": 1.0, "bce": 1.0})
    labels = np.zeros((1, 4, 4, 1), np.float32)
    labels[0, 0] = 1
    labels[0, 1] = 3
    labels[0, 3] = IGNORE_INDEX
    perfect = np.full((1, 4, 4, 2), 0.001, np.float32)
    perfect[0, :2, :, 0] = 0.999  # region 0: classes 1, 2, 3 -> rows 0 and 1
    perfect[0, 1, :, 1] = 0.999  # region 1: class 3 -> row 1
    wrong_where_ignored = perfect.copy()
    wrong_where_ignored[0, 3] = 0.999
    wrong = perfect.copy()
    wrong[0, 1, :, 1] = 0.001
    value = float(loss(tf.constant(labels), tf.constant(perfect)))
    assert value < 0.05
    assert float(loss(tf.constant(labels), tf.constant(wrong_where_ignored))) == pytest.approx(value, abs=1e-6)
    assert float(loss(tf.constant(labels), tf.constant(wrong))) > value + 0.3


def test_flip_tta_of_regions_needs_regions_the_swap_maps_onto_each_other():
    # Nested regions each add one class, so a left/right pair is added at two levels: the swap maps
    # {left_lung, vessel} to {right_lung, vessel}, which is no region, and flip TTA is not offered.
    lungs = Labels.from_config(
        LUNGS,
        regions={"lungs": ["right_lung", "left_lung", "vessel"], "left": ["left_lung", "vessel"], "v": ["vessel"]},
    )
    table = lungs.swap_table([["right_lung", "left_lung"]])
    assert lungs.output_swap(table) is None
    assert lungs.output_swap(None) is None
    assert Labels.from_config(LUNGS).output_swap(table) == [0, 2, 1, 3]  # a softmax: the classes' own


def test_the_data_check_reports_each_class_share_and_cases(tmp_path, capsys):
    from segx.check import check_folder, print_report

    labels = Labels.from_config(LUNGS)
    for folder in ("train_images", "train_masks"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "train_images" / f"c{i}.png"), np.full((10, 10, 3), 60, np.uint8))
        mask = np.zeros((10, 10), np.uint8)
        mask[:, :5] = 1
        if i == 0:
            mask[0, :] = 3  # the vessel, in one case: 10 of 400 pixels
        if i == 1:
            mask[5:, 5:] = 2  # the left lung, in one case (a class in no training case is a problem)
        cv2.imwrite(str(tmp_path / "train_masks" / f"c{i}.png"), mask)
    summary, problems = check_folder(tmp_path, labels=labels)
    assert problems == []
    classes = summary["train_images"]["classes"]
    assert classes["vessel"] == {"pixel_fraction": 10 / 400, "cases": 1}
    assert classes["left_lung"]["cases"] == 1 and classes["right_lung"]["cases"] == 4
    print_report(summary, problems)
    assert "vessel: 0.0250 of annotated pixels, in 1 of 4 cases" in capsys.readouterr().out


def test_a_stratified_foreground_sample_is_verified_as_written(tmp_path):
    """The decoded cache's check expects the rows the class-uniform sample keeps (every class's
    share), so a multi-class entry is not rebuilt on every read."""
    from segx.data.decoded import FOREGROUND_SAMPLES, _foreground_sample, sample_rows

    mask = np.zeros((300, 300), np.uint8)
    mask[:, :100], mask[:, 100:200], mask[:, 200:] = 1, 2, 3  # 3 classes of 30000 pixels each
    sample = _foreground_sample(mask, "00ff")
    assert len(sample) == sample_rows(mask, 90000) == 3 * (FOREGROUND_SAMPLES // 3) != FOREGROUND_SAMPLES
    binary = (mask > 0).astype(np.uint8)
    assert len(_foreground_sample(binary, "00ff")) == sample_rows(binary, 90000) == FOREGROUND_SAMPLES


def test_the_gain_verdict_refuses_to_read_two_cases():
    from segx.evaluation.report import gain_verdict

    assert gain_verdict(2, 0.01, 0.02).startswith("too few test cases (2)")
    assert gain_verdict(40, 0.01, 0.02).startswith("the gain is real")
    assert gain_verdict(40, -0.01, 0.02).startswith("not shown to be better")
    assert gain_verdict(40, -0.03, -0.02).startswith("the ensemble is worse")
