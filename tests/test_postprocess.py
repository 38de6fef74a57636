"""Post-processing on hand-drawn masks, and the resize/pad round trip of model-size inputs."""

from __future__ import annotations

import numpy as np
import pytest

from segx.data.folder import from_model_size, to_model_size
from segx.scoring.metrics import dice_per_case
from segx.scoring.postprocess import PostProcess, apply, apply_one, candidates


def blobs() -> np.ndarray:
    """Three components (5, 12 and 30 px) on a 20x20 canvas."""
    mask = np.zeros((20, 20), bool)
    mask[0, 0:5] = True  # 5 px
    mask[5:8, 5:9] = True  # 12 px
    mask[12:17, 12:18] = True  # 30 px
    return mask


def test_min_size_removes_only_smaller_components():
    out = apply_one(blobs(), PostProcess(min_size=12))
    assert out.sum() == 12 + 30 and not out[0, 0:5].any() and out[5:8, 5:9].all()
    assert apply_one(blobs(), PostProcess(min_size=31)).sum() == 0


def test_keep_largest_keeps_one_component():
    out = apply_one(blobs(), PostProcess(keep_largest=True))
    assert out.sum() == 30 and out[12:17, 12:18].all()


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # 8-connected: one 3-px component
    assert apply_one(mask, PostProcess(min_size=3)).sum() == 3
    assert apply_one(mask, PostProcess(min_size=4)).sum() == 0


def test_fill_holes_fills_enclosed_background_only():
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # a 3x3 hole
    cup = ring.copy()
    cup[3:6, 6:9] = False  # the same hole opened to the border: not a hole any more
    filled = apply_one(ring, PostProcess(fill_holes=True))
    assert filled[3:6, 3:6].all() and filled.sum() == 49
    assert np.array_equal(apply_one(cup, PostProcess(fill_holes=True)), cup)


def test_identity_and_empty_masks_pass_through():
    batch = np.stack([blobs(), np.zeros((20, 20), bool)])
    assert np.array_equal(apply(batch, PostProcess()), batch)
    assert not apply(batch, PostProcess(min_size=10, fill_holes=True))[1].any()


def test_candidates_start_with_identity_and_describe_themselves():
    options = candidates([0, 10])
    assert options[0].is_identity and options[0].describe() == "none"
    assert [o.describe() for o in options[1:]] == [
        "remove<10px",
        "fill-holes",
        "remove<10px+fill-holes",
        "keep-largest",
    ]
    assert PostProcess(**options[3].to_dict()) == options[3]  # what the record stores rebuilds it


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (64, 64), (17, 200)])
def test_pad_mode_round_trip_keeps_geometry(shape):
    height, width = shape
    mask = np.zeros(shape, np.uint8)
    mask[height // 2 :, width // 2 :] = 1  # bottom-right quarter
    small = to_model_size(mask, 64, "pad", is_mask=True)
    side = max(shape)
    # The image sits at the top left of a zero-padded square; nothing wraps or stretches.
    assert small.shape == (64, 64)
    assert (
        not small[int(np.ceil(height / side * 64)) :, :].any() and not small[:, int(np.ceil(width / side * 64)) :].any()
    )
    back = from_model_size(small.astype(np.float32), shape, "pad") >= 0.5
    assert back.shape == shape
    assert dice_per_case(back[None], mask[None].astype(bool))[0] > 0.9


def test_resize_and_pad_differ_on_non_square_images():
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, :50] = 200
    resized, padded = to_model_size(image, 64, "resize", False), to_model_size(image, 64, "pad", False)
    assert resized[:, :32].mean() > 190 and resized[:, 32:].max() == 0  # stretched to fill the square
    assert padded[30:].max() == 0 and padded[:25, :32].mean() > 190  # bottom rows are padding
