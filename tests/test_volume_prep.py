"""nnU-Net's 2D rules for volumes (segx/data/volume_prep.py, issue 29): the slice axis, the in-plane
spacing, CT and z-score normalisation, 2.5D context slices, and predictions put back on the scan's
grid."""

from __future__ import annotations

import numpy as np
import pytest

from segx.data.volume_prep import (
    ChannelNorm,
    SlicedVolume,
    SlicePlan,
    back_to_grid,
    case_of,
    check_channels,
    choose_slice_axis,
    ct_norm,
    normalise,
    slice_stem,
    target_spacing,
    to_uint8,
)
from segx.errors import SegxError

SHAPE = (5, 12, 8)  # (z, y, x)
SPACING_ZYX = (2.5, 0.8, 0.7)
ZSCORE = (ChannelNorm("zscore"),)


def ramp_volume(seed: int = 0) -> np.ndarray:
    """(1, z, y, x) float: each slice its own level (so a slice is told from its neighbour)."""
    rng = np.random.default_rng(seed)
    return (np.arange(SHAPE[0])[:, None, None] * 10.0 + rng.normal(0, 1, SHAPE))[None]


def label_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, SHAPE).astype(np.uint8)


def plan(axis=0, spacing=None, context=0, norms=ZSCORE) -> SlicePlan:
    spacing = spacing or tuple(s for i, s in enumerate(SPACING_ZYX) if i != axis)
    return SlicePlan(axis, spacing, context, norms)


# -- slice axis and spacing ---------------------------------------------------------------------


def test_the_slice_axis_is_the_coarsest_median_spacing():
    assert choose_slice_axis([(3.0, 0.8, 0.8), (2.5, 0.7, 0.7), (5.0, 0.9, 0.9)], None) == 0
    assert choose_slice_axis([(1.0, 1.0, 4.0), (1.0, 1.0, 3.0), (1.2, 1.0, 3.5)], None) == 2  # x
    assert choose_slice_axis([(1.0, 5.0, 1.0), (0.8, 4.0, 1.0), (1.0, 0.5, 1.0)], None) == 1  # median, not max
    assert choose_slice_axis([(1.0, 1.0, 1.0), (0.5, 0.5, 0.5)], None) == 0  # isotropic: z


def test_data_slice_axis_overrides_the_rule():
    spacings = [(3.0, 0.8, 0.8)]
    assert [choose_slice_axis(spacings, a) for a in ("x", "y", "z")] == [2, 1, 0]
    with pytest.raises(SegxError, match=r"data\.slice_axis='w' must be x, y, z or null"):
        choose_slice_axis(spacings, "w")


def test_the_target_spacing_is_the_median_in_plane_spacing_or_data_spacing():
    spacings = [(3.0, 0.8, 0.7), (2.0, 0.6, 0.5), (4.0, 1.0, 0.9)]
    assert target_spacing(spacings, 0, None) == (0.8, 0.7)
    assert target_spacing(spacings, 2, None) == (3.0, 0.8)
    assert target_spacing(spacings, 0, 0.5) == (0.5, 0.5)
    assert target_spacing(spacings, 0, [0.5, 0.4]) == (0.5, 0.4)
    for bad in (0, -1.0, [0.5, 0.4, 0.3], float("nan")):
        with pytest.raises(SegxError, match=r"data\.spacing=.* must be null, one positive number \(mm\) or two"):
            target_spacing(spacings, 0, bad)


@pytest.mark.parametrize(
    ("axis", "target", "expected"),
    [(0, (0.4, 0.35), (24, 16)), (1, (1.25, 0.35), (10, 16)), (2, (1.25, 0.4), (10, 24)), (0, (1.6, 1.4), (6, 4))],
)
def test_in_plane_resampling_gives_the_expected_slice_shape(axis, target, expected):
    label = label_volume()
    sliced = SlicedVolume(ramp_volume(), label, SPACING_ZYX, plan(axis, target))
    assert sliced.n == SHAPE[axis]
    assert sliced.plane_shape == tuple(s for i, s in enumerate(SHAPE) if i != axis)
    assert sliced.shape == expected
    for i in (0, sliced.n - 1):
        assert sliced.image(i).shape == (*expected, 3) and sliced.image(i).dtype == np.uint8
        resampled = sliced.label(i)
        assert resampled.shape == expected and resampled.dtype == np.uint8
        assert set(np.unique(resampled)) <= set(np.unique(label))  # nearest neighbour: no new values


def test_no_resampling_at_the_source_spacing_and_labels_move_with_the_slice_axis():
    label = label_volume()
    for axis in (0, 1, 2):
        sliced = SlicedVolume(ramp_volume(), label, SPACING_ZYX, plan(axis))
        assert sliced.shape == sliced.plane_shape
        for i in range(sliced.n):
            np.testing.assert_array_equal(sliced.label(i), np.take(label, i, axis=axis))


# -- normalisation and context ------------------------------------------------------------------


def test_ct_normalisation_clips_to_the_foreground_percentiles_and_uses_their_statistics():
    values = np.concatenate([np.linspace(0, 100, 1001), [5000.0]])
    norm = ct_norm([values[:500], values[500:]], "CT")
    assert norm.kind == "ct" and norm.low == pytest.approx(np.percentile(values, 0.5))
    assert norm.high == pytest.approx(np.percentile(values, 99.5)) and norm.high < 5000
    out = normalise(np.array([-1000.0, norm.low, norm.high, 5000.0]), norm)
    np.testing.assert_allclose(
        out, np.array([norm.low, norm.low, norm.high, norm.high]) / norm.std - norm.mean / norm.std
    )
    with pytest.raises(SegxError, match=r"channel CT is CT but no training label has foreground"):
        ct_norm([np.zeros(0)], "CT")


def test_zscore_uses_the_nonzero_voxels_of_a_volume_with_a_zero_background():
    volume = np.zeros((4, 10, 10))
    volume[:, 2:8, 2:8] = np.random.default_rng(0).normal(300, 20, (4, 6, 6))
    z = normalise(volume, ChannelNorm("zscore"))
    inside = z[:, 2:8, 2:8]
    assert abs(inside.mean()) < 1e-4 and inside.std() == pytest.approx(1, abs=1e-4)
    assert z.dtype == np.float32


def test_context_slices_repeat_the_edge_slice_at_both_ends():
    sliced = SlicedVolume(ramp_volume(), None, SPACING_ZYX, plan(context=1))
    last = sliced.n - 1
    first_image, last_image = sliced.image(0), sliced.image(last)
    np.testing.assert_array_equal(first_image[..., 0], first_image[..., 1])  # slice -1 is slice 0
    np.testing.assert_array_equal(first_image[..., 2], sliced.image(1)[..., 1])
    np.testing.assert_array_equal(last_image[..., 2], last_image[..., 1])  # slice n is slice n - 1
    np.testing.assert_array_equal(last_image[..., 0], sliced.image(last - 1)[..., 1])
    assert not np.array_equal(first_image[..., 1], first_image[..., 2])  # the neighbours differ
    middle = sliced.image(2)
    np.testing.assert_array_equal(middle[..., 0], sliced.image(1)[..., 1])
    np.testing.assert_array_equal(middle[..., 2], sliced.image(3)[..., 1])


def test_one_channel_without_context_fills_three_channels_and_two_channels_keep_their_order():
    one = SlicedVolume(ramp_volume(), None, SPACING_ZYX, plan()).image(2)
    assert (one[..., 0] == one[..., 1]).all() and (one[..., 1] == one[..., 2]).all()
    two = np.concatenate([ramp_volume(), -ramp_volume()])
    image = SlicedVolume(two, None, SPACING_ZYX, plan(norms=ZSCORE * 2)).image(SHAPE[0] - 1)  # the brightest slice
    np.testing.assert_array_equal(image[..., 1], image[..., 2])  # the last channel repeated
    assert image[..., 0].mean() > 160 and image[..., 1].mean() < 96


def test_more_than_three_input_channels_are_refused():
    check_channels(1, 1)
    check_channels(3, 0)
    with pytest.raises(SegxError, match=r"2 channel\(s\) with data\.context_slices=1 make 6 input channels; .* take 3"):
        check_channels(2, 1)
    with pytest.raises(SegxError, match=r"1 channel\(s\) with data\.context_slices=2 make 5 input channels"):
        check_channels(1, 2)


def test_the_8_bit_encoding_spans_four_standard_deviations_each_side():
    np.testing.assert_array_equal(to_uint8(np.array([-10.0, -4.0, 0.0, 4.0, 10.0])), [0, 0, 128, 255, 255])


# -- back onto the scan's grid ---------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_back_to_grid_inverts_the_slicing_of_a_label_volume(axis):
    label = label_volume(axis)
    sliced = SlicedVolume(ramp_volume(), label, SPACING_ZYX, plan(axis))
    planes = np.stack([sliced.label(i) for i in range(sliced.n)])
    np.testing.assert_array_equal(back_to_grid(planes, sliced.plane_shape, axis), label)
    maps = np.stack([planes == k for k in range(4)], axis=-1).astype(np.float32)  # (n, h, w, K) probabilities
    np.testing.assert_array_equal(back_to_grid(maps, sliced.plane_shape, axis).argmax(-1), label)


@pytest.mark.parametrize("channels", [None, 1, 2])
def test_back_to_grid_resamples_to_the_volume_and_keeps_a_channel_axis(channels):
    sliced = SlicedVolume(ramp_volume(), label_volume(), SPACING_ZYX, plan(0, (0.4, 0.35)))
    n, (h, w) = sliced.n, sliced.shape
    planes = np.random.default_rng(0).random((n, h, w) + ((channels,) if channels else ()), dtype=np.float32)
    back = back_to_grid(planes, sliced.plane_shape, 0)
    assert back.shape == SHAPE + ((channels,) if channels else ())
    constant = np.full((n, h, w), 0.25, np.float32)
    np.testing.assert_allclose(back_to_grid(constant, sliced.plane_shape, 0), 0.25, atol=1e-6)


def test_slice_stems_name_their_case():
    assert slice_stem("case_001", 7) == "case_001__s0007"
    assert case_of(slice_stem("a__sb", 12)) == "a__sb"


def test_a_slice_plan_round_trips_through_json_and_its_key_follows_it():
    written = plan(1, (1.25, 0.35), 1, (ChannelNorm("ct", -100.0, 200.0, 40.0, 50.0),))
    assert SlicePlan.from_json(written.to_json()) == written
    assert SlicePlan.from_json(written.to_json()).key == written.key
    assert plan(2).key != plan(1).key
