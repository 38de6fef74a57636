"""Native resolution: patch training, sliding-window prediction, scoring at each image's own
size, the on-disk decoded cache, and the checks on patch settings. Real files, real TF models,
a real MLflow store."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from segx.data.ragged import Ragged
from segx.errors import SegxError
from tests.conftest import compose_config
from tests.helpers import SIZES, make_folder, native_overrides


def read_sizes(root: Path, stems) -> list[tuple[int, int]]:
    return [cv2.imread(str(root / "train_images" / f"{s}.png")).shape[:2] for s in stems]


def test_patch_and_resize_members_score_at_each_image_size_and_predict_exactly_what_was_searched(
    native_store, tmp_path
):
    """A patch-mode member (sliding window) and a resize-mode member on the same odd-sized files
    (the session's native store, tests/conftest.py): both cache probabilities at each image's own
    size, they ensemble together, and the rebuilt ensemble predicts, image by image at its own
    size, the masks the search scored."""
    from segx import tracking
    from segx.data.io import read_image
    from segx.ensembling.probs import binarize, combine, load_cached
    from segx.scoring.metrics import dice_per_case
    from segx.workflows.predict import load_ensemble

    root, out = native_store["root"], native_store["out"]
    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    runs = {r.info.run_name: r for r in tracking.find_runs(client, native_store["experiment"], "member")}
    assert runs["patch"].data.params["data.mode"] == "patch"
    # Both members share the data fingerprint: how a member sees the images is not the data.
    assert runs["patch"].data.tags["segx.data_fingerprint"] == runs["resize"].data.tags["segx.data_fingerprint"]
    cached = {}
    for name, run in runs.items():
        path = tracking.download(client, run.info.run_id, "predictions/val.npz", tmp_path / name)
        cached[name] = load_cached(path, tmp_path / name)
        sizes = read_sizes(root, cached[name].stems)
        assert [tuple(s) for s in cached[name].probs.shapes] == sizes  # each image's own size
        assert [tuple(s) for s in cached[name].masks.shapes] == sizes
        original = [
            cv2.imread(str(root / "train_masks" / f"{s}.png"), cv2.IMREAD_GRAYSCALE) > 0 for s in cached[name].stems
        ]
        assert all(
            np.array_equal(m, o) for m, o in zip(cached[name].masks, original, strict=True)
        )  # the original masks
    # The searched ensemble (grid search, no post-processing) of [patch, resize].
    record = native_store["record"]
    assert [m.run_id for m in record.members] == [runs["patch"].info.run_id, runs["resize"].info.run_id]
    assert [m.view.mode for m in record.members] == ["patch", "resize"]
    assert record.members[0].view.size == 32 and record.members[1].view.size == 64
    _, predictor = load_ensemble(client, record.run_id, tmp_path / "rebuild")
    stems = cached["patch"].stems
    images = [read_image(root / "train_images" / f"{s}.png") for s in stems]
    score, probs = predictor.score(images)
    for name, p in zip(["patch", "resize"], probs, strict=True):
        assert p is None or np.array_equal(p.flat, cached[name].probs.flat), name  # bit for bit
    searched = binarize(combine([cached["patch"].probs, cached["resize"].probs], predictor.weights), record.threshold)
    assert dice_per_case(searched, cached["patch"].masks).mean() == record.val_dice
    predictions = predictor.predict(images)
    for i, prediction in enumerate(predictions):
        assert prediction.mask.shape == images[i].shape[:2]
        assert np.array_equal(prediction.mask, searched[i])


def test_resize_mode_is_scored_against_the_original_mask():
    """A prediction that is perfect at the network's size is not perfect at the image's size:
    thin structures are lost by resizing, and segx scores against the original mask."""
    from segx.inference.view import View, predict_cases
    from segx.scoring.metrics import dice_per_case

    thin = np.zeros((96, 96), np.uint8)
    thin[:, 47] = 1  # a 1-px line: resizing to 32 px and back cannot keep it
    blocky = np.zeros((64, 64), np.uint8)
    blocky[16:40, 8:32] = 1  # aligned to the 2x factor of 64 -> 32: survives the round trip
    view = View("resize", 32)

    def perfect(masks):
        # The "network" returns the resized mask itself: Dice 1 at the network's size.
        return lambda batch: {
            "none": np.stack([cv2.resize(m, (32, 32), interpolation=cv2.INTER_NEAREST) for m in masks]).astype(
                np.float32
            )
        }

    cases = [thin, blocky]
    maps = [next(predict_cases([np.repeat(m[:, :, None] * 255, 3, axis=2)], view, perfect([m])))["none"] for m in cases]
    assert [m.shape for m in maps] == [(96, 96), (64, 64)]  # back at each image's own size
    pred = Ragged.from_list([m >= 0.5 for m in maps], bool)
    dice = dice_per_case(pred, Ragged.from_list([c.astype(bool) for c in cases], bool))
    assert dice[1] == 1.0
    assert dice[0] < 0.7  # the thin line: at 32 px it was "perfect"


def test_hd95_in_pixels_and_in_physical_units():
    from segx.scoring.metrics import case_metrics, hd95

    true = np.zeros((40, 40), bool)
    true[10:20, 10:20] = True
    pred = np.zeros((40, 40), bool)
    pred[13:23, 10:20] = True  # shifted 3 rows down
    assert hd95(pred, true) == pytest.approx(3.0)
    assert hd95(pred, true, 2.0) == pytest.approx(6.0)
    assert hd95(pred, true, (0.5, 4.0)) == pytest.approx(1.5)  # rows are 0.5 units apart
    ragged = case_metrics(Ragged.from_list([pred, pred[:30]]), Ragged.from_list([true, true[:30]]), spacing=(0.5, 4.0))
    assert ragged["hd95"] == pytest.approx([1.5, 1.5])


def test_search_over_ragged_cases_equals_brute_force():
    """The compacted search on cases of different sizes scores every grid candidate exactly as
    combining and binarising each case on its own would."""
    from segx.ensembling import search
    from segx.ensembling.probs import Weights, binarize, combine

    rng = np.random.default_rng(3)
    shapes = [(17, 23), (5, 64), (40, 9), (1, 1), (33, 33)]
    truth = [rng.random(s) < 0.3 for s in shapes]
    members = [
        [np.clip(t * 170 + rng.integers(0, 120, t.shape), 0, 255).astype(np.uint8) for t in truth] for _ in range(3)
    ]
    thresholds = [0.3, 0.45, 0.5, 0.65]
    data = search.compact([Ragged.from_list(m) for m in members], Ragged.from_list(truth), thresholds)
    counts = search.simplex_counts(3, 4)
    scored = search.evaluate(data, counts, 4)
    for row, k in enumerate(counts):
        weights = Weights(tuple(int(v) for v in k), 4)
        for j, t in enumerate(thresholds):
            per_case = []
            for c in range(len(shapes)):
                mask = binarize(combine([m[c] for m in members], weights), t)
                tp, pp, tt = np.count_nonzero(mask & truth[c]), np.count_nonzero(mask), np.count_nonzero(truth[c])
                per_case.append(1.0 if pp + tt == 0 else 2 * tp / (pp + tt))
            assert scored[row, j] == pytest.approx(np.mean(per_case), abs=1e-12)


def test_decoded_cache_is_rebuilt_when_data_or_version_change(tmp_path):
    from segx.data import decoded
    from segx.data.folder import discover_cases

    root = make_folder(tmp_path / "data", SIZES[:3])
    cache = tmp_path / "cache"
    first = decoded.decode_cases(discover_cases(root), cache)
    image = np.asarray(first[0].image())
    assert image.shape == (48, 80, 3) and isinstance(first[0].image(), np.memmap)
    # Reused as is: nothing is rewritten.
    stamp = (first[0].folder / "image.npy").stat().st_mtime_ns
    again = decoded.decode_cases(discover_cases(root), cache)
    assert again[0].folder == first[0].folder and (first[0].folder / "image.npy").stat().st_mtime_ns == stamp
    # A changed mask file is another entry: the old one is never read for it.
    mask_path = root / "train_masks" / "case00.png"
    changed = np.zeros((48, 80), np.uint8)
    changed[:5] = 255
    cv2.imwrite(str(mask_path), changed)
    third = decoded.decode_cases(discover_cases(root), cache)
    assert third[0].folder != first[0].folder
    assert np.array_equal(np.asarray(third[0].mask()), (changed > 0).astype(np.uint8))
    # An entry written by another segx version (or a half-written one) is rewritten, not read.
    meta_path = third[0].folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    np.save(third[0].folder / "mask.npy", np.zeros((48, 80), np.uint8))  # wrong contents
    meta_path.write_text(json.dumps({**meta, "segx": "0.0.1"}))
    fourth = decoded.decode_cases(discover_cases(root), cache)
    assert np.array_equal(np.asarray(fourth[0].mask()), (changed > 0).astype(np.uint8))
    meta_path.unlink()  # as after a crash mid-write
    np.save(third[0].folder / "mask.npy", np.zeros((48, 80), np.uint8))
    fifth = decoded.decode_cases(discover_cases(root), cache)
    assert np.array_equal(np.asarray(fifth[0].mask()), (changed > 0).astype(np.uint8))
    # A lower pixel limit is enforced on cached entries too, with the same message.
    with pytest.raises(SegxError, match=r"case00.png: header declares 80x48 pixels, over the limit of 3000; downscale"):
        decoded.decode_cases(discover_cases(root), cache, max_pixels=3000)
    # A rescaled copy is cached beside it, at the rounded size.
    half = fifth[0].scaled(0.5)
    assert half.shape == (24, 40) and np.asarray(half.image()).shape == (24, 40, 3)


def test_patches_are_padded_seeded_and_forced_onto_foreground(tmp_path):
    from segx.data import decoded
    from segx.data.folder import discover_cases
    from segx.training.patches import PatchSampler, forced_slots

    root = tmp_path / "data"
    (root / "train_images").mkdir(parents=True)
    (root / "train_masks").mkdir(parents=True)
    big = np.zeros((200, 300), np.uint8)
    big[150:153, 20:23] = 255  # 9 foreground pixels in 60,000
    cv2.imwrite(str(root / "train_images" / "big.png"), np.dstack([big] * 3))
    cv2.imwrite(str(root / "train_masks" / "big.png"), big)
    small = np.full((20, 25), 255, np.uint8)
    cv2.imwrite(str(root / "train_images" / "small.png"), np.dstack([small] * 3))
    cv2.imwrite(str(root / "train_masks" / "small.png"), small)
    cases = decoded.decode_cases(discover_cases(root), tmp_path / "cache")
    sampler = PatchSampler(cases, 32, foreground_fraction=0.25)
    assert forced_slots(8, 0.25) == 2 and forced_slots(8, 0.33) == 3 and forced_slots(8, 0.0) == 0
    big_index = [c.stem for c in cases].index("big")
    forced = [sampler.sample(big_index, seed, slot=7, batch_size=8)[1] for seed in range(40)]
    free = [sampler.sample(big_index, seed, slot=0, batch_size=8)[1] for seed in range(40)]
    assert all(m.shape == (32, 32) and m.any() for m in forced)  # the last slots: always foreground
    assert sum(m.any() for m in free) < 10  # random places rarely hit 9 pixels in 60,000
    image, mask = sampler.sample(1 - big_index, 5, 0, 8)
    assert image.shape == (32, 32, 3) and mask[:20, :25].all() and not mask[20:].any() and not mask[:, 25:].any()
    a, b = sampler.sample(big_index, 11, 7, 8), sampler.sample(big_index, 11, 7, 8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # resumable: same seed, same patch


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["data.patch_size=40"],
            r"data.patch_size=40 does not suit arch=unet: it needs a multiple of 32; use data.patch_size=32 or 64",
        ),
        (
            ["data.patch_size=48", "arch=pspnet", "data.patch_size=64"],
            r"data.patch_size=64 does not suit arch=pspnet: it needs a multiple of 48",
        ),
        (
            ["data.patch_size=256", "data.pad=false"],
            r"data.pad=false but case\d+ .* is smaller than data.patch_size=256 .*every image is smaller \(largest side 120 px\)",
        ),
        (["data.scale=0.1"], r"data.scale=0.1 shrinks case03 \(50x29\) to 2.9 px; use data.scale >= 0.276"),
        (["data.overlap=1.0"], r"data.overlap=1.0 is out of range; use a value in \[0.0, 0.9\]"),
        (["data.pixel_spacing=-1"], r"data.pixel_spacing=-1 must be null, one positive number or \[row, column\]"),
        (
            ["data.max_pixels=3000"],
            r"case\d+.png: header declares \d+x\d+ pixels, over the limit of 3000; downscale the file or raise data.max_pixels",
        ),
    ],
)
def test_bad_patch_settings_get_one_line_before_any_model(tmp_path, extra, message):
    from segx import tracking
    from segx.workflows.member import train_member

    root, out = make_folder(tmp_path / "data"), tmp_path / "out"
    cfg = compose_config(
        "train", native_overrides(out, root, "backbone=resnet18", "data.mode=patch", "data.patch_size=32", *extra)
    )
    with pytest.raises(SegxError, match=message):
        train_member(cfg)
    if (out / "mlflow.db").exists():  # no run was started for a config that cannot train
        client = tracking.connect(f"sqlite:///{out}/mlflow.db")
        exp = client.get_experiment_by_name("segx")
        assert exp is None or not tracking.find_runs(client, exp.experiment_id, "member", status=None)


def test_sliding_window_memory_is_bounded_for_a_4096_image():
    """Peak memory of predicting a 4096 x 4096 image: the input, a few full-size float32 maps and
    one batch of windows, never all windows at once."""
    from segx.inference.window import count_windows, sliding_window

    image = np.zeros((4096, 4096, 3), np.uint8)
    tracemalloc.start()
    try:
        out = sliding_window(image, 256, lambda b: {"none": b[..., 0].astype(np.float32)}, overlap=0.5, batch_size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    full_map = 4096 * 4096 * 4
    assert out["none"].shape == (4096, 4096)
    assert count_windows(4096, 4096, 256, 0.5) == 31 * 31
    assert peak < 4 * full_map  # all 961 float32 windows alone would be 3.75 full maps more


def test_post_processing_and_majority_vote_work_case_by_case_on_ragged_cases():
    from segx.ensembling.search import majority_vote
    from segx.scoring.postprocess import PostProcess, apply, apply_one

    rng = np.random.default_rng(0)
    masks = [rng.random(s) < 0.4 for s in [(30, 17), (8, 50), (21, 21)]]
    post = PostProcess(min_size=5, fill_holes=True)
    out = apply(Ragged.from_list(masks), post)
    assert [tuple(s) for s in out.shapes] == [(30, 17), (8, 50), (21, 21)]
    for got, mask in zip(out, masks, strict=True):
        assert np.array_equal(got, apply_one(mask, post))
    probs = [Ragged.from_list([rng.integers(0, 256, m.shape).astype(np.uint8) for m in masks]) for _ in range(3)]
    votes = majority_vote(probs)
    for i in range(len(masks)):
        expected = sum((p[i] >= 128).astype(int) for p in probs) >= 2
        assert np.array_equal(votes[i], expected)


def test_epoch_plan_fills_whole_batches_even_below_half_a_batch():
    from segx.training.fit import epoch_plan

    order, seeds = epoch_plan(2, 8, 0, 0)  # 2 cases, batch 8: one whole batch of repeats
    assert len(order) == len(seeds) == 8 and set(order) == {0, 1}
    order, _ = epoch_plan(10, 4, 3, 1)  # the usual case: the shuffle, then its first cases
    assert len(order) == 12 and sorted(order[:10]) == list(range(10)) and list(order[10:]) == list(order[:2])
    patches, _ = epoch_plan(3, 4, 0, 0, samples=9)  # patch mode: 9 samples from 3 cases
    assert len(patches) == 12 and all(np.bincount(patches[:9], minlength=3) == 3)
