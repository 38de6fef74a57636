"""Volume scores in physical units (segx.scoring.volume_metrics) against a brute-force reference:
surface voxels listed one by one, their coordinates times the spacing, all pairwise distances by
``scipy.spatial.distance.cdist`` -- no erosion, no distance transform, no cropping."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from segx.errors import SegxError
from segx.scoring import volume_metrics as vm
from segx.scoring.classes import class_metrics
from segx.scoring.metrics import hd95 as hd95_2d

ANISO = (3.0, 0.8, 0.8)  # (z, y, x) mm: thick slices, fine in-plane


# -- the reference ------------------------------------------------------------------------------


def surface_points(mask: np.ndarray, full: bool = False) -> np.ndarray:
    """Index coordinates of the foreground voxels with a background neighbour (face neighbours,
    or every neighbour when ``full``), outside the array being background; checked voxel by voxel."""
    padded = np.pad(mask, 1)
    ndim = mask.ndim
    if full:
        steps = [s for s in np.ndindex(*(3,) * ndim) if s != (1,) * ndim]
        steps = [tuple(v - 1 for v in s) for s in steps]
    else:
        steps = [tuple(d if a == axis else 0 for a in range(ndim)) for axis in range(ndim) for d in (-1, 1)]
    points = []
    for index in zip(*np.nonzero(mask), strict=True):
        if any(not padded[tuple(i + 1 + d for i, d in zip(index, step, strict=True))] for step in steps):
            points.append(index)
    return np.array(points, float).reshape(-1, ndim)


def brute_distances(pred, truth, spacing, full=False):
    p = surface_points(pred, full) * np.asarray(spacing)
    t = surface_points(truth, full) * np.asarray(spacing)
    pairwise = cdist(p, t)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def brute_hd95(pred, truth, spacing, full=False):
    to_truth, to_pred = brute_distances(pred, truth, spacing, full)
    return max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))


def brute_nsd(pred, truth, spacing, tol):
    """A distance equal to the tolerance up to rounding (relative 1e-9) is within it."""
    to_truth, to_pred = brute_distances(pred, truth, spacing)
    limit = tol * (1 + 1e-9)
    return (np.sum(to_truth <= limit) + np.sum(to_pred <= limit)) / (len(to_truth) + len(to_pred))


# -- hand-built volumes -------------------------------------------------------------------------


def box(shape, *ranges):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def ellipsoid(shape, centre, radius_mm, spacing):
    """A ball of ``radius_mm`` in physical space (an ellipsoid in voxels when the spacing is anisotropic)."""
    grid = np.indices(shape, float)
    r2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True))
    return r2 <= radius_mm**2


SHAPE = (16, 18, 18)
BOX_A = box(SHAPE, (3, 9), (4, 14), (4, 14))  # 6 x 10 x 10 voxels
BOX_B = box(SHAPE, (5, 11), (4, 14), (4, 14))  # the same, 2 voxels further along z
BOX_C = box(SHAPE, (4, 9), (6, 15), (3, 12))  # offset along every axis, another size
BALL = ellipsoid((12, 30, 30), (5.5, 14.0, 14.5), 8.0, ANISO)
BALL_SHIFTED = ellipsoid((12, 30, 30), (6.5, 16.5, 13.0), 8.0, ANISO)
PAIRS = {"offset boxes": (BOX_A, BOX_C), "shifted ball": (BALL, BALL_SHIFTED), "z-shifted boxes": (BOX_A, BOX_B)}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_hd95_and_nsd_equal_the_brute_force(name):
    pred, truth = PAIRS[name]
    assert pred.any() and truth.any() and not np.array_equal(pred, truth)
    for spacing in (ANISO, (0.8, 0.8, 3.0), (1.0, 1.0, 1.0)):
        expected = brute_hd95(pred, truth, spacing)
        assert vm.hd95(pred, truth, spacing) == pytest.approx(expected, abs=1e-6)
        for tol in (0.5, 1.0, 2.0, 3.5, 6.0):
            assert vm.surface_dice(pred, truth, spacing, tol) == pytest.approx(
                brute_nsd(pred, truth, spacing, tol), abs=1e-6
            )
    # The directed distances themselves, as multisets.
    for mine, theirs in zip(vm.surface_distances(pred, truth, ANISO), brute_distances(pred, truth, ANISO), strict=True):
        np.testing.assert_allclose(np.sort(mine), np.sort(theirs), atol=1e-9)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_the_spacing_and_its_axis_order_change_the_answer(name):
    pred, truth = PAIRS[name]
    aniso = vm.hd95(pred, truth, ANISO)
    # A spacing ignored (or read in the wrong axis order) would give one of these.
    assert abs(aniso - brute_hd95(pred, truth, (1.0, 1.0, 1.0))) > 0.1
    assert abs(aniso - brute_hd95(pred, truth, ANISO[::-1])) > 0.1
    assert abs(aniso - vm.hd95(pred, truth, ANISO[::-1])) > 0.1
    nsd = vm.surface_dice(pred, truth, ANISO, 2.0)
    assert abs(nsd - brute_nsd(pred, truth, (1.0, 1.0, 1.0), 2.0)) > 0.01
    assert abs(nsd - brute_nsd(pred, truth, ANISO[::-1], 2.0)) > 0.01


def test_boxes_shifted_along_z_by_d_voxels_are_d_times_the_slice_spacing_apart():
    # Every surface distance is at most d * s_z (side walls meet their twins at 0, the faces meet
    # the other box's faces d slices away), and the whole leading face of each box -- 100 of its
    # 344 surface voxels, 29 % > 5 % -- is exactly d * s_z away: the 95th percentile is d * s_z.
    d, s_z = 2, ANISO[0]
    to_b, to_a = vm.surface_distances(BOX_A, BOX_B, ANISO)
    assert len(to_b) == len(to_a) == 2 * 10 * 10 + 36 * (6 - 2)
    for distances in (to_b, to_a):
        assert distances.max() == pytest.approx(d * s_z)
        assert np.count_nonzero(np.isclose(distances, d * s_z)) == 100
    assert vm.hd95(BOX_A, BOX_B, ANISO) == pytest.approx(d * s_z, abs=1e-12)
    assert vm.hd95(BOX_A, BOX_B, (1.0, 1.0, 1.0)) == pytest.approx(d, abs=1e-12)


def test_nsd_flips_to_one_as_the_tolerance_passes_the_shift():
    shift = 2 * ANISO[0]
    below = vm.surface_dice(BOX_A, BOX_B, ANISO, shift - 0.01)
    # Below the shift exactly the two leading faces (100 voxels each) fall out.
    assert below == pytest.approx((344 - 100) / 344, abs=1e-12) and below < 1
    assert vm.surface_dice(BOX_A, BOX_B, ANISO, shift) == 1.0  # a distance equal to the tolerance is within it
    assert vm.surface_dice(BOX_A, BOX_B, ANISO, shift + 0.01) == 1.0
    assert vm.surface_dice(BOX_A, BOX_A, ANISO, 0.0) == 1.0
    # The same shift with thinner slices is within a smaller tolerance.
    assert vm.surface_dice(BOX_A, BOX_B, (1.0, 0.8, 0.8), shift - 0.01) == 1.0


def test_a_tolerance_equal_to_a_lattice_distance_is_within_it_whatever_the_rounding():
    # Tolerances as a person types them: 3 voxels of 0.8 mm are 2.4 mm, but the distance transform
    # returns 2.4000000000000004; a shift of exactly the tolerance must not fall out of it by an ulp.
    for spacing in ((0.6, 0.7, 0.8), (1.1, 0.3, 1.1)):
        for axis in range(3):
            for k in (1, 2, 3):
                moved = np.roll(BOX_A, k, axis=axis)
                tol = round(k * spacing[axis], 6)
                assert vm.surface_dice(BOX_A, moved, spacing, tol) == 1.0, (spacing, axis, k)
                assert brute_nsd(BOX_A, moved, spacing, tol) == 1.0
                assert vm.surface_dice(BOX_A, moved, spacing, tol * (1 - 1e-6)) < 1.0
    # One voxel along y and three along x at (0.7, 0.8) mm: 2.5 mm, returned as 2.5000000000000004.
    moved = np.roll(np.roll(BOX_A, 1, axis=1), 3, axis=2)
    assert vm.surface_dice(BOX_A, moved, (0.6, 0.7, 0.8), 2.5) == 1.0
    assert vm.surface_dice(BOX_A, moved, (0.6, 0.7, 0.8), 2.49) < 1.0


def test_dice_and_iou_count_voxels_over_the_whole_volume():
    # 600 voxels each, overlapping in 4 of their 6 slices: 400.
    assert vm.dice(BOX_A, BOX_B) == pytest.approx(2 * 400 / 1200)
    assert vm.iou(BOX_A, BOX_B) == pytest.approx(400 / 800)
    assert vm.dice(BOX_A, BOX_A) == vm.iou(BOX_A, BOX_A) == 1.0


def test_empty_masks():
    empty = np.zeros(SHAPE, bool)
    diagonal = np.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, ANISO, strict=True)))
    assert vm.dice(empty, empty) == vm.iou(empty, empty) == 1.0
    assert vm.dice(BOX_A, empty) == vm.dice(empty, BOX_A) == vm.iou(empty, BOX_A) == 0.0
    assert vm.hd95(empty, empty, ANISO) == 0.0
    assert vm.hd95(BOX_A, empty, ANISO) == vm.hd95(empty, BOX_A, ANISO) == pytest.approx(diagonal)
    assert np.isnan(vm.surface_dice(empty, empty, ANISO, 1.0))  # MONAI: 0/0 is NaN
    assert vm.surface_dice(empty, empty, ANISO, 1.0, both_empty=1.0) == 1.0  # segx's binary rule, asked for
    assert vm.surface_dice(BOX_A, empty, ANISO, 1e9) == vm.surface_dice(empty, BOX_A, ANISO, 1e9) == 0.0
    with pytest.raises(SegxError, match="both masks non-empty"):
        vm.surface_distances(BOX_A, empty, ANISO)


def test_the_image_border_counts_as_background_and_cropping_changes_nothing():
    # A mask running into the array's border has a surface there (as metrics.py's 2D rule);
    # padding the arrays with background, or embedding them in a much larger volume, changes no score.
    pred = box((6, 10, 10), (0, 4), (0, 10), (2, 7))
    truth = box((6, 10, 10), (1, 6), (0, 8), (3, 10))
    assert vm.surface(np.ones((3, 4, 5), bool)).sum() == 3 * 4 * 5 - 1 * 2 * 3
    big_p, big_t = (np.pad(m, ((40, 3), (7, 60), (0, 5))) for m in (pred, truth))
    for spacing in (ANISO, (1.0, 1.0, 1.0)):
        assert vm.hd95(pred, truth, spacing) == pytest.approx(brute_hd95(pred, truth, spacing), abs=1e-6)
        assert vm.hd95(big_p, big_t, spacing) == pytest.approx(vm.hd95(pred, truth, spacing), abs=1e-12)
        for tol in (0.8, 2.5):
            assert vm.surface_dice(big_p, big_t, spacing, tol) == vm.surface_dice(pred, truth, spacing, tol)
            assert vm.surface_dice(pred, truth, spacing, tol) == pytest.approx(brute_nsd(pred, truth, spacing, tol))


def test_two_dimensional_arrays_work_the_same():
    spacing = (2.5, 0.7)  # (row, column)
    a = box((30, 40), (5, 15), (8, 30))
    b = box((30, 40), (8, 18), (8, 30))  # 3 rows further down
    assert vm.hd95(a, b, spacing) == pytest.approx(3 * 2.5, abs=1e-12)
    assert vm.surface_dice(a, b, spacing, 3 * 2.5 - 0.01) < 1
    assert vm.surface_dice(a, b, spacing, 3 * 2.5) == 1.0
    disc = ellipsoid((30, 40), (14.0, 19.0), 9.0, spacing)
    moved = ellipsoid((30, 40), (15.5, 22.0), 9.0, spacing)
    assert vm.hd95(disc, moved, spacing) == pytest.approx(brute_hd95(disc, moved, spacing), abs=1e-6)
    assert vm.surface_dice(disc, moved, spacing, 1.5) == pytest.approx(brute_nsd(disc, moved, spacing, 1.5), abs=1e-6)
    # With every neighbour counted the surface is metrics.py's 3x3 erosion: its 2D HD95, spacing and all.
    for s in (spacing, (1.0, 1.0), (0.5, 0.5)):
        full = vm.hd95(disc, moved, s, connectivity=2)
        assert full == pytest.approx(brute_hd95(disc, moved, s, full=True), abs=1e-6)
        assert full == pytest.approx(hd95_2d(disc, moved, s), rel=1e-5)


NAMES = ("background", "liver", "kidney", "absent", "missed", "phantom")


def label_maps():
    truth = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    truth[BOX_A] = 1
    pred[BOX_B] = 1
    truth[12:15, 2:6, 2:6] = 2
    pred[12:15, 3:7, 2:6] = 2
    truth[1:3, 15:17, 15:17] = 4  # missed: in the truth only
    pred[13:15, 14:17, 14:17] = 5  # phantom: predicted only
    return pred, truth


def test_per_class_scores_and_the_empty_class_rule():
    pred, truth = label_maps()
    out = vm.volume_class_metrics(pred, truth, NAMES, ANISO, 2.0)
    fg = NAMES[1:]
    expected_keys = ["dice", "iou"] + [f"{m}/{c}" for c in fg for m in ("dice", "iou")]
    expected_keys += ["hd95"] + [f"hd95/{c}" for c in fg] + ["nsd"] + [f"nsd/{c}" for c in fg]
    assert list(out) == expected_keys
    assert all(v.shape == (1,) and v.dtype == np.float64 for v in out.values())
    diagonal = np.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, ANISO, strict=True)))
    assert out["dice/liver"][0] == pytest.approx(vm.dice(BOX_A, BOX_B))
    assert out["hd95/liver"][0] == pytest.approx(6.0)
    assert out["nsd/liver"][0] == pytest.approx(brute_nsd(BOX_A, BOX_B, ANISO, 2.0), abs=1e-6)
    kidney_p, kidney_t = pred == 2, truth == 2
    assert out["hd95/kidney"][0] == pytest.approx(brute_hd95(kidney_p, kidney_t, ANISO), abs=1e-6)
    assert out["nsd/kidney"][0] == pytest.approx(brute_nsd(kidney_p, kidney_t, ANISO, 2.0), abs=1e-6)
    for key in ("dice", "iou", "hd95", "nsd"):
        assert np.isnan(out[f"{key}/absent"][0])  # absent from both: not counted
    for name in ("missed", "phantom"):
        assert out[f"dice/{name}"][0] == out[f"iou/{name}"][0] == out[f"nsd/{name}"][0] == 0.0
        assert out[f"hd95/{name}"][0] == pytest.approx(diagonal)
    for key in ("dice", "iou", "hd95", "nsd"):
        per_class = [out[f"{key}/{c}"][0] for c in ("liver", "kidney", "missed", "phantom")]
        assert out[key][0] == pytest.approx(np.mean(per_class))
    # Nothing to find, nothing found: the binary rules.
    nothing = vm.volume_class_metrics(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8), NAMES, ANISO, 2.0)
    assert [nothing[k][0] for k in ("dice", "iou", "hd95", "nsd")] == [1.0, 1.0, 0.0, 1.0]
    # Without HD95 and a tolerance: overlap scores only.
    assert list(vm.volume_class_metrics(pred, truth, NAMES, ANISO, None, with_hd95=False)) == expected_keys[:12]


def test_ignored_voxels_count_for_nothing():
    pred, truth = label_maps()
    truth = truth.copy()
    truth[:, :, 15:] = 255  # IGNORE_INDEX: all of the missed class, the phantom but for one column
    out = vm.volume_class_metrics(pred, truth, NAMES, ANISO, 2.0)
    assert np.isnan(out["dice/missed"][0])
    assert out["dice/phantom"][0] == 0.0
    assert out["dice/liver"][0] == pytest.approx(vm.dice(BOX_A, BOX_B))


def test_per_class_scores_do_not_depend_on_the_background_around():
    # The label maps are cropped to their foreground before anything is counted: padding them with
    # background (and with ignored voxels) changes no score but the one-empty HD95, the array's diagonal.
    pred, truth = label_maps()
    big_p = np.pad(pred, ((9, 2), (0, 30), (4, 4)))
    big_t = np.pad(truth, ((9, 2), (0, 30), (4, 4)))
    big_t[:5] = 255
    small = vm.volume_class_metrics(pred, truth, NAMES, ANISO, 2.0)
    big = vm.volume_class_metrics(big_p, big_t, NAMES, ANISO, 2.0)
    assert list(big) == list(small)
    diagonal = np.sqrt(sum((n * s) ** 2 for n, s in zip(big_p.shape, ANISO, strict=True)))
    for key in small:
        if key in ("hd95", "hd95/missed", "hd95/phantom"):
            continue
        np.testing.assert_array_equal(big[key], small[key], err_msg=key)
    assert big["hd95/missed"][0] == big["hd95/phantom"][0] == pytest.approx(diagonal)


def test_a_two_dimensional_label_map_scores_as_class_metrics():
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 50), np.uint8)
    truth[5:20, 5:25], truth[22:35, 30:45] = 1, 2
    pred = truth.copy()
    pred[rng.random(pred.shape) < 0.05] = 1
    pred[25:30, 10:15] = 3
    truth[0, :] = 255
    names = ("background", "a", "b", "c", "d")
    spacing = (1.25, 0.5)
    mine = vm.volume_class_metrics(pred, truth, names, spacing, None, connectivity=2)
    theirs = class_metrics(pred[None], truth[None], names, spacing=spacing)
    assert list(mine) == list(theirs)
    for key in theirs:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, equal_nan=True, err_msg=key)


@pytest.mark.parametrize(
    "spacing, ndim",
    [
        ((0.0, 1.0, 1.0), 3),
        ((-3.0, 0.8, 0.8), 3),
        ((float("nan"), 0.8, 0.8), 3),
        ((float("inf"), 0.8, 0.8), 3),
        ((0.8, 0.8), 3),
        ((3.0, 0.8, 0.8), 2),
        (None, 3),
        ("3.0", 3),
        (("3", "0.8", "0.8"), 3),
        ((True, 1.0, 1.0), 3),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), 3),
        (0.0, 2),
    ],
)
def test_bad_spacing_is_refused_in_one_line(spacing, ndim):
    with pytest.raises(SegxError) as caught:
        vm.hd95(*([BOX_A, BOX_B] if ndim == 3 else [BOX_A[0], BOX_B[0]]), spacing)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"voxel spacing must be {ndim} positive finite numbers, one per array axis")


def test_good_spacing_forms_and_bad_tolerances():
    assert vm.voxel_spacing(np.array([3, 0.8, 0.8]), 3) == ANISO
    assert vm.voxel_spacing(0.5, 2) == (0.5, 0.5)
    assert vm.voxel_spacing([np.float32(2.0), 1], 2) == (2.0, 1.0)
    for tol in (-1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(SegxError, match="tolerance must be a finite distance >= 0"):
            vm.surface_dice(BOX_A, BOX_B, ANISO, tol)
    with pytest.raises(SegxError, match="same shape"):
        vm.dice(BOX_A, BOX_A[0])
    with pytest.raises(SegxError, match="connectivity must be 1"):
        vm.hd95(BOX_A, BOX_B, ANISO, connectivity=4)


def test_imports_neither_tensorflow_nor_simpleitk():
    code = "import segx.scoring.volume_metrics, sys; print(sorted({'tensorflow', 'SimpleITK'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_2d_ensemble_gains_the_surface_dice_where_a_pixel_spacing_is_given(tmp_path):
    """segx.ensemble's evaluation of members with data.pixel_spacing: a per-case table with the
    NSD at their tolerance, equal to surface_dice on the ensemble's own test masks."""
    import dataclasses

    from segx.workflows.ensemble import _metrics, evaluate
    from tests.conftest import compose_config, store_overrides
    from tests.helpers import member

    members = [
        dataclasses.replace(member(f"run{i}", seed=i), pixel_spacing=(0.5, 0.25), nsd_tolerance_mm=0.6)
        for i in range(2)
    ]
    cfg = compose_config("ensemble", [*store_overrides(tmp_path), "ensemble.members=[resnet18,mobilenetv2]"])
    result = evaluate(cfg, members)
    table = result.per_volume
    assert set(table["case"]) == {"t1", "t2"} and {"nsd", "dice", "hd95"} <= set(table.columns)
    truth = members[0].test.masks
    for i, case in enumerate(("t1", "t2")):
        expected = vm.surface_dice(np.asarray(result.preds["ensemble"][i]), np.asarray(truth[i]), (0.5, 0.25), 0.6)
        row = table[(table.method == "ensemble") & (table.case == case)]
        assert row["nsd"].iloc[0] == pytest.approx(expected)
    metrics = _metrics(result)
    assert "test/nsd" in metrics and "test3d/dice" not in metrics
