"""Winograd F(2x2, 3x3) kernels through _lib against the float64 reference.

Covers what the shared parity suites do not reach: partial last tiles (odd output sizes),
negative and asymmetric pads of pcm_conv_desc, groups, empty batches, 1x1 images, thread
counts, and outputs pre-filled with NaN so that every element must be written. The reference
(tests/reference.py) only handles symmetric non-negative padding, so each case builds the
window the descriptor describes explicitly: ``extended`` holds input[y - pad_top][x - pad_left]
(zero outside the image) over out_h + 2 rows and out_w + 2 columns, and the reference runs
on it without padding.
"""

import numpy as np
import pytest

import pyconvmpi
from pyconvmpi import _lib

import reference
import tolerances

DTYPES = (np.float32, np.float64)
THREADS = (1, 2, 3)

# (n, c, h, w, k, groups, pad_top, pad_left, out_h, out_w)
SHAPES = {
    "odd_sizes_partial_tiles": (2, 3, 9, 13, 5, 1, 1, 1, 9, 13),
    "valid_odd": (1, 4, 8, 7, 6, 1, 0, 0, 6, 5),
    "one_row_of_tiles": (1, 2, 3, 40, 3, 1, 0, 1, 1, 40),
    "asymmetric_pads": (2, 4, 10, 11, 4, 2, 2, 0, 11, 10),
    "negative_pads": (1, 3, 12, 14, 4, 1, -2, -3, 7, 8),
    "negative_pads_past_edges": (1, 2, 6, 6, 3, 1, -1, -2, 6, 7),
    "groups": (2, 6, 11, 9, 9, 3, 1, 1, 11, 9),
    "depthwise": (1, 5, 7, 12, 5, 5, 1, 1, 7, 12),
    "many_channels_one_tile_block": (1, 33, 5, 5, 17, 1, 1, 1, 5, 5),
    "one_by_one_image_padded": (2, 3, 1, 1, 4, 1, 1, 1, 1, 1),
    "one_by_one_image_pad_2": (1, 2, 1, 1, 3, 1, 2, 2, 3, 3),
    "zero_batch": (0, 3, 5, 5, 4, 1, 1, 1, 5, 5),
    "output_past_the_image": (1, 2, 4, 4, 2, 1, 3, 3, 6, 6),
}


def _desc(n, c, h, w, k, groups, pad_top, pad_left, out_h, out_w):
    pad_bottom = max(0, out_h + 2 - h - pad_top)
    pad_right = max(0, out_w + 2 - w - pad_left)
    return _lib.ConvDesc(n, c, h, w, k, 3, 3, out_h, out_w, 1, 1, pad_top, pad_left,
                         pad_bottom, pad_right, 1, 1, groups)


def _extended(x, pad_top, pad_left, out_h, out_w):
    """Return the zero-filled window input[y - pad_top][x - pad_left] of out_h + 2 rows."""
    n, c, h, w = x.shape
    ext = np.zeros((n, c, out_h + 2, out_w + 2))
    for y in range(out_h + 2):
        for col in range(out_w + 2):
            iy, ix = y - pad_top, col - pad_left
            if 0 <= iy < h and 0 <= ix < w:
                ext[:, :, y, col] = x[:, :, iy, ix]
    return ext


def _arrays(shape, dtype, seed):
    n, c, h, w, k, groups, pad_top, pad_left, out_h, out_w = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((k, c // groups, 3, 3)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    grad_output = rng.standard_normal((n, k, out_h, out_w)).astype(dtype)
    return x, weight, bias, grad_output


def _exec(threads):
    return _lib.Exec(_lib.ALGORITHMS["winograd"], threads, 0, 0, 0)


def forward_error(shape, dtype, threads, seed=0):
    """Run the forward kernel; return the error in units of eps * sqrt(terms) * scale."""
    n, c, h, w, k, groups, pad_top, pad_left, out_h, out_w = shape
    x, weight, bias, _ = _arrays(shape, dtype, seed)
    desc = _desc(*shape)
    assert _lib.algorithm_supported("winograd", "forward", desc)
    out = np.full((n, k, out_h, out_w), np.nan, dtype)
    x_before, w_before = x.copy(), weight.copy()

    _lib.conv2d_forward(desc, _exec(threads), x, weight, bias, out)

    assert np.array_equal(x, x_before)
    assert np.array_equal(weight, w_before)
    ext = _extended(x.astype(np.float64), pad_top, pad_left, out_h, out_w)
    expected = reference.forward(ext, weight, bias, groups=groups)
    scale = reference.abs_forward(ext, weight, bias, groups=groups)
    terms = c // groups * 9
    factor = tolerances.ALGORITHM_FACTOR["winograd"]
    tolerances.assert_close(out, expected, scale, dtype=dtype, terms=terms, factor=factor,
                            label=f"winograd forward {shape}")
    return _relative_error(out, expected, scale, dtype, terms)


def backward_data_error(shape, dtype, threads, seed=0):
    """Run the backward-data kernel; return the error in units of eps * sqrt(terms) * scale."""
    n, c, h, w, k, groups, pad_top, pad_left, out_h, out_w = shape
    _, weight, _, grad_output = _arrays(shape, dtype, seed)
    desc = _desc(*shape)
    assert _lib.algorithm_supported("winograd", "backward_data", desc)
    grad_input = np.full((n, c, h, w), np.nan, dtype)

    _lib.conv2d_backward_data(desc, _exec(threads), grad_output, weight, grad_input)

    # Gradient of the extended window, then the image's part of it; image elements outside
    # the window receive nothing and must be exactly zero.
    ext_shape = (n, c, out_h + 2, out_w + 2)
    g_ext = reference.backward_input(grad_output, ext_shape, weight, groups=groups)
    a_ext = reference.abs_backward_input(grad_output, ext_shape, weight, groups=groups)
    expected, scale = np.zeros((n, c, h, w)), np.zeros((n, c, h, w))
    for iy in range(h):
        for ix in range(w):
            y, col = iy + pad_top, ix + pad_left
            if 0 <= y < out_h + 2 and 0 <= col < out_w + 2:
                expected[:, :, iy, ix] = g_ext[:, :, y, col]
                scale[:, :, iy, ix] = a_ext[:, :, y, col]
    terms = k // groups * 9
    factor = tolerances.ALGORITHM_FACTOR["winograd"]
    tolerances.assert_close(grad_input, expected, scale, dtype=dtype, terms=terms, factor=factor,
                            label=f"winograd backward data {shape}")
    return _relative_error(grad_input, expected, scale, dtype, terms)


def _relative_error(result, expected, scale, dtype, terms):
    unit = tolerances.eps(dtype) * np.sqrt(max(terms, 1)) * scale
    error = np.abs(result.astype(np.float64) - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(unit > 0, error / np.where(unit > 0, unit, 1.0), 0.0)
    return float(ratio.max()) if ratio.size else 0.0


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_matches_reference(name, dtype, threads):
    forward_error(SHAPES[name], dtype, threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(SHAPES))
def test_backward_data_matches_reference(name, dtype, threads):
    backward_data_error(SHAPES[name], dtype, threads)


def test_forward_without_bias_writes_only_products():
    shape = SHAPES["odd_sizes_partial_tiles"]
    x, weight, _, _ = _arrays(shape, np.float64, 3)
    desc = _desc(*shape)
    out = np.full((2, 5, 9, 13), np.nan)

    _lib.conv2d_forward(desc, _exec(1), x, weight, None, out)

    expected = reference.forward(x, weight, None, padding=1)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_thread_counts_agree_exactly():
    # Tasks own disjoint outputs and sum in a fixed order, so threads cannot change a bit.
    shape = (3, 7, 15, 17, 6, 1, 1, 1, 15, 17)
    x, weight, bias, _ = _arrays(shape, np.float32, 4)
    outs = []
    for threads in THREADS:
        out = np.full((3, 6, 15, 17), np.nan, np.float32)
        _lib.conv2d_forward(_desc(*shape), _exec(threads), x, weight, bias, out)
        outs.append(out)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("op", ["forward", "backward_data", "backward_weight"])
def test_rejects_geometry_it_cannot_compute(op):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    w5 = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w3 = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    plan = pyconvmpi.Plan(algorithm="winograd")

    if op == "forward":
        for weight, options in ((w5, {}), (w3, {"stride": 2}), (w3, {"dilation": 2})):
            with pytest.raises(pyconvmpi.UnsupportedError, match="winograd"):
                pyconvmpi.conv2d(x, weight, **options, plan=plan)
    else:
        desc = _desc(1, 2, 8, 8, 2, 1, 1, 1, 8, 8)
        assert _lib.algorithm_supported("winograd", op, desc) == (op == "backward_data")
        desc.stride_h = 2
        desc.out_h = 4
        assert not _lib.algorithm_supported("winograd", op, desc)


def test_public_conv2d_runs_winograd():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 13, 10))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)

    out = pyconvmpi.conv2d(x, w, b, padding=1, groups=2,
                           plan=pyconvmpi.Plan(algorithm="winograd", threads=2))

    expected = reference.forward(x, w, b, padding=1, groups=2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
