"""Dice, IoU and HD95 on hand-computed cases, including the empty-mask rules."""

from __future__ import annotations

import numpy as np
import pytest

from segx.scoring.metrics import dice_per_case, hd95, iou_per_case


def masks(*arrays):
    return np.stack([np.asarray(a, bool) for a in arrays])


def test_dice_and_iou_by_hand():
    true = np.zeros((4, 4), bool)
    true[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 pixels, 4 overlapping
    assert dice_per_case(masks(pred), masks(true))[0] == pytest.approx(2 * 4 / (6 + 4))
    assert iou_per_case(masks(pred), masks(true))[0] == pytest.approx(4 / 6)


def test_empty_mask_rules():
    empty = np.zeros((5, 5), bool)
    full = np.ones((5, 5), bool)
    assert dice_per_case(masks(empty), masks(empty))[0] == 1.0
    assert iou_per_case(masks(empty), masks(empty))[0] == 1.0
    assert dice_per_case(masks(full), masks(empty))[0] == 0.0
    assert dice_per_case(masks(empty), masks(full))[0] == 0.0
    assert hd95(empty, empty) == 0.0
    assert hd95(full, empty) == pytest.approx(np.hypot(5, 5))


def test_hd95_of_shifted_square_is_the_shift():
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b = np.zeros((40, 40), bool)
    b[10:20, 13:23] = True  # shifted right by 3
    assert hd95(a, a) == 0.0
    assert hd95(a, b) == pytest.approx(3.0, abs=1e-6)
    assert hd95(b, a) == pytest.approx(3.0, abs=1e-6)
