"""Flip TTA: the un-flip is right, and an ensemble with ensemble.tta=flip is chosen, reported and
predicted on one pipeline (the members' flip-TTA caches are what segx.predict computes)."""

from __future__ import annotations

import numpy as np
import pytest

from segx import tracking
from segx.errors import SegxError
from tests.conftest import compose_config, store_overrides

SIZE = 64


def _asymmetric_images(n: int) -> np.ndarray:
    """Horizontal ramp in red, vertical ramp in green, a bright blob in a different corner-ish
    place per image: nothing here is symmetric under a width or height flip."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        images[i, ..., 0] = (x * 4) % 256
        images[i, ..., 1] = (y * 3 + 7 * i) % 256
        images[i, ..., 2] = 40
        cy, cx = 6 + i, 9 + 2 * i
        images[i][(y - cy) ** 2 + (x - cx) ** 2 < 36] = 250
    return images


@pytest.fixture(scope="module")
def random_net():
    from segx.models import build_model, clear_session, set_determinism

    set_determinism(3, False)  # fixed random init: the margins below do not depend on luck
    model = build_model("unet", "resnet18", SIZE)
    yield model
    clear_session()


def test_flip_tta_is_the_mean_of_passes_flipped_back(random_net):
    from segx.ensembling.probs import quantize
    from segx.models import predict_probs, preprocessing

    images = _asymmetric_images(3)
    x = preprocessing("resnet18")(images.astype(np.float32))

    def net(batch):  # the model called directly, not through segx's compiled forward
        return random_net(np.ascontiguousarray(batch), training=False).numpy()[..., 0]

    plain, on_w, on_h = net(x), net(x[:, :, ::-1]), net(x[:, ::-1])
    # The net is not flip-symmetric on these inputs, so a missing or wrong un-flip shows.
    assert np.abs(on_w[:, :, ::-1] - plain).max() > 1e-2 and np.abs(on_h[:, ::-1] - plain).max() > 1e-2
    expected = (plain + on_w[:, :, ::-1] + on_h[:, ::-1]) / 3

    got = predict_probs(random_net, images, "resnet18", tta="flip")
    # Eager calls and segx's compiled forward run different kernels: ~4e-5 apart at most here.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    not_unflipped = (plain + on_w + on_h) / 3
    axes_swapped = (plain + on_w[:, ::-1] + on_h[:, :, ::-1]) / 3
    for wrong in (not_unflipped, axes_swapped):
        assert np.abs(got - wrong).max() > 0.1  # 1,000 times the tolerance above
        assert (quantize(got) != quantize(wrong)).any()


def test_modes_at_once_equal_single_mode_calls_bit_for_bit(random_net):
    """What training caches (all modes in one call) is what prediction computes (one mode),
    across a batch boundary (9 images, inference batches of 8)."""
    from segx.models import INFERENCE_BATCH, predict_probs, predict_probs_modes

    images = _asymmetric_images(INFERENCE_BATCH + 1)
    both = predict_probs_modes(random_net, images, "resnet18", ("none", "flip"))
    for mode in ("none", "flip"):
        assert np.array_equal(both[mode], predict_probs(random_net, images, "resnet18", tta=mode))
    assert not np.array_equal(both["none"], both["flip"])
    with pytest.raises(SegxError, match="tta='rot90' is not valid"):
        predict_probs(random_net, images[:1], "resnet18", tta="rot90")


def _cases(root, stems):
    from segx.data.folder import discover_cases, load_cases

    data = load_cases([c for c in discover_cases(root) if c.stem in stems], SIZE)
    assert data.stems == list(stems)
    return data


def test_flip_ensemble_chooses_and_reports_on_what_predict_runs(member_store_copy, synthetic_root, tmp_path, capsys):
    from segx.ensembling.probs import cache_artifact, load_cached
    from segx.scoring.metrics import dice_per_case
    from segx.workflows.ensemble import build_ensemble
    from segx.workflows.predict import load_ensemble

    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    for run_id in runs.values():  # training cached both pipelines
        names = {a.path for a in client.list_artifacts(run_id, "predictions")}
        assert {cache_artifact(r, t) for r in ("val", "test") for t in ("none", "flip")} <= names

    # No post-processing, so the recorded validation Dice (chosen before post-processing) and
    # the test Dice (after it) are both Dice of the predictor's own masks.
    cfg = compose_config(
        "ensemble",
        [
            *store_overrides(out),
            "ensemble.members=[resnet18,mobilenetv2]",
            "ensemble.tta=flip",
            "ensemble.postprocess=false",
        ],
    )
    record = build_ensemble(cfg)
    assert record.tta == "flip"

    _, predictor = load_ensemble(client, record.run_id, tmp_path / "flip")
    assert predictor.tta == "flip"
    first = record.members[0].run_id
    folder = tmp_path / "cache"
    cached = {
        role: load_cached(tracking.download(client, first, cache_artifact(role, "flip"), folder), folder)
        for role in ("val", "test")
    }
    val, test = (
        _cases(synthetic_root, cached["val"].stems),
        _cases(synthetic_root, cached["test"].stems),
    )

    # Members' flip caches are, bit for bit, what the rebuilt member computes with flip TTA.
    member_probs = [p for p in predictor.member_probs(val.images) if p is not None]
    assert member_probs and np.array_equal(member_probs[0], cached["val"].probs)

    def dice(pred, data):
        masks = np.stack([p.mask for p in pred.predict(list(data.images))])
        return dice_per_case(masks, data.masks).mean(), masks

    val_dice, flip_masks = dice(predictor, val)
    assert val_dice == record.val_dice
    metrics = client.get_run(record.run_id).data.metrics
    assert dice(predictor, test)[0] == metrics["test/dice"]

    # The test is sensitive: the same record predicted without TTA gives other masks, and says
    # in one line that it was tuned for another TTA.
    capsys.readouterr()
    _, plain = load_ensemble(client, record.run_id, tmp_path / "plain", tta="none")
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("segx: warning:") and "tuned for tta=flip" in warning and "\n" not in warning
    assert not np.array_equal(dice(plain, val)[1], flip_masks)


def test_flip_ensemble_refuses_a_member_without_flip_cache(member_store_copy, tmp_path):
    """A member logged before flip caches existed: one line naming it and the two ways out."""
    from segx.ensembling.probs import cache_artifact

    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    real = client.get_run(runs["resnet18"])
    tags = {k: v for k, v in real.data.tags.items() if not k.startswith("mlflow.")}  # segx's tags: role, fingerprint
    old = client.create_run(real.info.experiment_id, tags=tags, run_name="member-before-tta-caches")
    for role in ("val", "test"):  # only the plain caches, as older segx wrote them
        path = tracking.download(client, real.info.run_id, cache_artifact(role, "none"), tmp_path / "dl")
        client.log_artifact(old.info.run_id, str(path), "predictions")
    client.set_terminated(old.info.run_id)
    old = client.get_run(old.info.run_id)
    try:
        _refused_without_flip_cache(client, out, runs, real, old, tmp_path)
    finally:  # the shared store's newest resnet18 member must stay a real one for the tests after this
        client.delete_run(old.info.run_id)


def _refused_without_flip_cache(client, out, runs, real, old, tmp_path):
    from segx.workflows.ensemble import build_ensemble
    from segx.workflows.members import member_from_run

    assert len(member_from_run(client, old, tmp_path / "c").val.probs) > 0  # tta=none still works
    cfg = compose_config(
        "ensemble",
        [*store_overrides(out), f"ensemble.run_ids=[{runs['mobilenetv2']},{old.info.run_id}]", "ensemble.tta=flip"],
    )
    with pytest.raises(SegxError) as info:
        build_ensemble(cfg)
    message = str(info.value)
    assert "\n" not in message and old.info.run_id in message
    assert "no flip-TTA cache" in message and "retrain it to search with TTA, or use ensemble.tta=none" in message
    ensembles = tracking.find_runs(client, real.info.experiment_id, "ensemble", status=None)
    assert all(old.info.run_id not in r.data.tags.get("segx.members", "") for r in ensembles)  # refused before logging
