"""Sliding-window inference core (numpy only): coverage, blending, batching, memory pattern."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from segx.inference.window import (
    MIN_IMPORTANCE,
    count_windows,
    gaussian_importance,
    sliding_window,
    window_starts,
)


def identity(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Two modes that reconstruct channel 0 of the input (and its complement)."""
    first = batch[..., 0].astype(np.float32) / 255
    return {"none": first, "flip": 1 - first}


def random_image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def assert_reconstructs(image: np.ndarray, out: dict[str, np.ndarray]) -> None:
    expected = image[..., 0].astype(np.float32) / 255
    assert set(out) == {"none", "flip"}
    for mode, want in (("none", expected), ("flip", 1 - expected)):
        got = out[mode]
        assert got.dtype == np.float32 and got.shape == image.shape[:2], mode
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.round(got * 255), np.round(want * 255))
    # Borders are covered: all four corners come back.
    h, w = image.shape[:2]
    for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        assert out["none"][y, x] == pytest.approx(expected[y, x], abs=1e-6)


@pytest.mark.parametrize(
    ("h", "w", "window", "overlap"),
    [
        (64, 64, 64, 0.5),  # exactly one window
        (40, 64, 64, 0.5),  # smaller than a window on one axis
        (64, 23, 64, 0.5),
        (17, 30, 64, 0.5),  # smaller on both axes
        (517, 333, 64, 0.5),  # odd sizes
        (517, 333, 64, 0.25),
        (333, 517, 63, 0.0),  # odd window, no overlap
        (1, 200, 32, 0.5),  # 1 x N
        (200, 1, 32, 0.5),
        (1, 1, 8, 0.5),
        (100, 90, 1, 0.0),  # 1-px windows
    ],
)
def test_identity_predict_reconstructs_input(h, w, window, overlap):
    image = random_image(h, w)
    out = sliding_window(image, window, identity, overlap=overlap, batch_size=5)
    assert_reconstructs(image, out)


def test_padding_is_zero_at_bottom_right():
    image = np.full((10, 7, 1), 200, np.uint8)
    seen = []

    def record(batch):
        seen.append(batch.copy())
        return identity(batch)

    out = sliding_window(image, 16, record)
    (batch,) = seen
    assert batch.shape == (1, 16, 16, 1) and batch.dtype == np.uint8
    assert (batch[0, :10, :7] == 200).all()
    assert (batch[0, 10:] == 0).all() and (batch[0, :, 7:] == 0).all()
    assert out["none"].shape == (10, 7)


@pytest.mark.parametrize("length", [1, 10, 64, 65, 96, 100, 128, 333, 517, 2048])
@pytest.mark.parametrize(("window", "overlap"), [(64, 0.5), (64, 0.25), (64, 0.0), (7, 0.9)])
def test_window_starts_cover_the_axis(length, window, overlap):
    starts = window_starts(length, window, overlap)
    if length <= window:
        assert starts == [0]
        return
    step = max(1, math.floor(window * (1 - overlap)))
    assert starts[0] == 0
    assert starts[-1] == length - window
    assert len(starts) == math.ceil((length - window) / step) + 1
    gaps = np.diff(starts)
    assert (gaps >= 1).all() and (gaps <= step).all()
    assert all(isinstance(s, int) for s in starts)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()


def test_window_starts_known_values():
    # step 32: ceil(36 / 32) + 1 = 3 windows spread evenly over 0..36.
    assert window_starts(100, 64, 0.5) == [0, 18, 36]
    assert window_starts(128, 64, 0.5) == [0, 32, 64]
    assert window_starts(128, 64, 0.0) == [0, 64]
    assert window_starts(65, 64, 0.5) == [0, 1]
    assert count_windows(100, 128, 64, 0.5) == 9
    assert count_windows(10, 10, 64, 0.5) == 1
    assert count_windows(2048, 2048, 64, 0.5) == 63 * 63


@pytest.mark.parametrize("window", [64, 63, 1])
def test_gaussian_importance_shape_and_values(window):
    imp = gaussian_importance(window)
    assert imp.dtype == np.float32 and imp.shape == (window, window)
    assert imp.max() == 1.0
    c = window // 2
    assert imp[c, c] == 1.0  # (one of) the centre pixel(s)
    np.testing.assert_array_equal(imp, imp.T)
    np.testing.assert_array_equal(imp, imp[::-1, :])
    np.testing.assert_array_equal(imp, imp[:, ::-1])
    assert imp.min() > 0


def test_gaussian_importance_matches_documented_formula():
    window, scale = 64, 0.125
    imp = gaussian_importance(window, scale)
    sigma, centre = scale * window, (window - 1) / 2

    def g(x):
        return math.exp(-((x - centre) ** 2) / (2 * sigma**2))

    peak = g(31)  # the even window's centre falls between pixels 31 and 32
    for i, j in ((31, 32), (31, 40), (10, 50), (0, 31)):
        assert imp[i, j] == pytest.approx(g(i) * g(j) / peak**2, rel=1e-6)
    # The outermost corners of the map fall below the floor and are raised to it.
    assert g(0) ** 2 / peak**2 < MIN_IMPORTANCE
    assert imp[0, 0] == np.float32(MIN_IMPORTANCE) == imp.min()
    # A tiny sigma underflows to 0 off-centre; the floor still gives every pixel weight.
    assert gaussian_importance(33, 0.001).min() == np.float32(MIN_IMPORTANCE)


def test_constant_predict_gives_the_constant_everywhere():
    c = 0.37

    def constant(batch):
        return {"none": np.full(batch.shape[:3], c, np.float32)}

    out = sliding_window(random_image(131, 77), 32, constant, overlap=0.5, batch_size=3)
    np.testing.assert_allclose(out["none"], c, rtol=1e-6)


def test_pixels_covered_by_one_window_get_exactly_that_windows_value():
    h, w, window, overlap = 100, 150, 64, 0.5
    calls = itertools.count()

    def window_index(batch):
        idx = np.array([next(calls) for _ in range(len(batch))], np.float32)
        return {"none": np.broadcast_to(idx[:, None, None], batch.shape[:3]).copy()}

    out = sliding_window(random_image(h, w), window, window_index, overlap=overlap, batch_size=4)
    ys, xs = window_starts(h, window, overlap), window_starts(w, window, overlap)
    coverage = np.zeros((h, w), int)
    owner = np.full((h, w), -1)
    for k, (y, x) in enumerate(itertools.product(ys, xs)):  # row-major, as documented
        coverage[y : y + window, x : x + window] += 1
        owner[y : y + window, x : x + window] = k
    single = coverage == 1
    assert single.sum() > 0 and single[0, 0] and single[-1, -1]
    # (w * v) / w in float32 is v up to one rounding step.
    np.testing.assert_allclose(out["none"][single], owner[single], rtol=1e-6, atol=0)
    assert out["none"][0, 0] == 0
    assert out["none"][-1, -1] == pytest.approx(len(ys) * len(xs) - 1, rel=1e-6)
    # Where windows overlap, the blend lies between the values of the windows involved.
    assert (out["none"] >= 0).all() and (out["none"] <= len(ys) * len(xs) - 1 + 1e-5).all()


def test_the_blend_is_weighted_by_importance():
    # Two windows on a 1 x 96 row (window 64, starts 0 and 32); column 40 lies in both.
    image = np.zeros((1, 96, 1), np.uint8)
    calls = itertools.count()

    def window_index(batch):
        idx = np.array([next(calls) for _ in range(len(batch))], np.float32)
        return {"none": np.broadcast_to(idx[:, None, None], batch.shape[:3]).copy()}

    imp = gaussian_importance(64)
    out = sliding_window(image, 64, window_index, overlap=0.5, batch_size=1)
    w0, w1 = imp[0, 40], imp[0, 40 - 32]  # first row of the map: y=0 in both windows
    assert out["none"][0, 40] == pytest.approx((w0 * 0 + w1 * 1) / (w0 + w1), rel=1e-5)
    # A uniform importance map gives the plain mean of the covering windows.
    flat = sliding_window(image, 64, window_index, overlap=0.5, importance=np.ones((64, 64)))
    assert flat["none"][0, 40] == pytest.approx(2.5)  # windows 2 and 3 of this second run
    assert flat["none"][0, 10] == 2 and flat["none"][0, 90] == 3  # weight 1: exact


def test_windows_are_batched_in_row_major_order():
    h, w, window, overlap, batch_size = 150, 130, 32, 0.25, 4
    # Channel 0 holds the row and channel 1 the column, so a window's corner names its position.
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([rows, cols], axis=-1).astype(np.uint16)
    sizes, corners = [], []

    def record(batch):
        assert batch.dtype == np.uint16 and batch.shape[1:] == (window, window, 2)
        sizes.append(len(batch))
        corners.extend(map(tuple, batch[:, 0, 0, :].tolist()))
        return {"none": np.zeros(batch.shape[:3], np.float32)}

    sliding_window(image, window, record, overlap=overlap, batch_size=batch_size)
    n = count_windows(h, w, window, overlap)
    ys, xs = window_starts(h, window, overlap), window_starts(w, window, overlap)
    assert corners == list(itertools.product(ys, xs))
    assert len(sizes) == math.ceil(n / batch_size)
    assert sizes[:-1] == [batch_size] * (len(sizes) - 1)
    assert sizes[-1] == n - batch_size * (len(sizes) - 1)
    # Deterministic: the same calls again for the same input size.
    first = (list(sizes), list(corners))
    sizes.clear()
    corners.clear()
    sliding_window(image, window, record, overlap=overlap, batch_size=batch_size)
    assert (sizes, corners) == first


def test_large_input_is_streamed_one_batch_at_a_time():
    image = np.zeros((2048, 2048, 1), np.uint8)
    batch_size = 16
    sizes = []

    def record(batch):
        sizes.append(len(batch))
        return {"none": np.zeros(batch.shape[:3], np.float32)}

    out = sliding_window(image, 64, record, overlap=0.5, batch_size=batch_size)
    n = count_windows(2048, 2048, 64, 0.5)
    assert n == 3969
    # Windows arrive in ceil(n / batch_size) separate calls, never more than batch_size at once:
    # the function cannot have handed all windows over together.
    assert max(sizes) == batch_size and len(sizes) == math.ceil(n / batch_size)
    assert sum(sizes) == n
    assert out["none"].shape == (2048, 2048)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window must be an integer >= 1"),
        ({"window": 8.5}, "window must be an integer >= 1"),
        ({"overlap": 1.0}, "overlap must be a number in"),
        ({"overlap": -0.1}, "overlap must be a number in"),
        ({"overlap": float("nan")}, "overlap must be a number in"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"image": np.zeros((8, 8), np.uint8)}, "image must have shape"),
        ({"image": np.zeros((0, 8, 1), np.uint8)}, "image must have H, W, C >= 1"),
        ({"importance": np.ones((4, 4))}, "importance must have shape"),
        ({"importance": np.zeros((8, 8))}, "importance must be finite and > 0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    args = {"image": np.zeros((10, 10, 1), np.uint8), "window": 8, "predict": identity}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sliding_window(**args)


def test_bad_predict_output_raises_value_error():
    image = np.zeros((10, 10, 1), np.uint8)
    with pytest.raises(ValueError, match="expected \\(1, 8, 8\\)"):
        sliding_window(image, 8, lambda b: {"none": np.zeros((1, 4, 4))}, batch_size=1)
    modes = iter([["a"], ["b"]] + [["b"]] * 10)

    def changing(batch):
        return {m: np.zeros(batch.shape[:3]) for m in next(modes)}

    with pytest.raises(ValueError, match="earlier batches returned \\['a'\\]"):
        sliding_window(image, 8, changing, batch_size=1)
    with pytest.raises(ValueError, match="non-empty dict"):
        sliding_window(image, 8, lambda b: {})
    with pytest.raises(ValueError, match="length must be an integer >= 1"):
        window_starts(0, 8, 0.5)
