"""Adversarial tests of the single-process API: reproducers of bugs, and reported corner cases.

A test of a fixed bug failed before its fix. A test marked ``xfail(strict=True)`` reproduces a
bug in a C kernel that is still open, and its reason names the kernel. The remaining cases are
shapes and layouts that broke other convolution libraries, compared with the float64 reference.
"""

import json

import numpy as np
import pytest

import pyconvmpi as pcm
from pyconvmpi import _lib, profile
from pyconvmpi import _validate as V
from pyconvmpi.plan import desc_struct

import reference
from tolerances import ALGORITHM_FACTOR, assert_close


@pytest.mark.parametrize(
    "input_shape,exc,words",
    [
        ((1, 1, -4, 4), ValueError, ["input_shape", "non-negative", "-4"]),
        ((1.5, 1, 4, 4), TypeError, ["input_shape", "integers", "1.5"]),
        ((1, 1, "a", 4), TypeError, ["input_shape", "integers", "'a'"]),
        (5, TypeError, ["input_shape", "sequence", "5"]),
        ((1, 1, True, 4), TypeError, ["input_shape", "integers", "True"]),
    ],
    ids=["negative", "float", "string", "int", "bool"],
)
def test_plan_rejects_bad_shape_entries(input_shape, exc, words):
    """plan() took a negative height into the geometry, truncated 1.5 to 1, and let int()
    and tuple() raise their own messages without the function or argument name."""
    with pytest.raises(exc) as info:
        pcm.plan(input_shape, (1, 1, 3, 3))
    message = str(info.value)
    assert message.startswith("plan: "), message
    for word in words:
        assert word in message, message


def test_plan_rejects_bad_weight_shape():
    with pytest.raises(ValueError, match=r"plan: weight_shape must contain non-negative .*-3"):
        pcm.plan((1, 1, 4, 4), (1, 1, -3, 3))


def test_plan_accepts_numpy_integer_shapes():
    shape = np.array([2, 3, 8, 8])
    got = pcm.plan(tuple(shape), np.array([4, 3, 3, 3]), padding=1)
    assert got == pcm.plan((2, 3, 8, 8), (4, 3, 3, 3), padding=1)


def test_plan_fields_accept_numpy_integers():
    """Plan(threads=np.int64(2)) raised 'threads must be a non-negative integer; got 2'."""
    plan = pcm.Plan(strategy="hybrid", threads=np.int64(2), active_ranks=np.int32(1),
                    grid=[np.int64(1), 1])
    assert plan.threads == 2
    assert type(plan.threads) is int
    assert type(plan.active_ranks) is int
    assert plan.grid == (1, 1)
    assert all(type(v) is int for v in plan.grid)


@pytest.mark.parametrize(
    "fields,words",
    [
        (dict(threads=2.0), ["threads", "non-negative integer", "2.0"]),
        (dict(threads=True), ["threads", "non-negative integer", "True"]),
        (dict(grid=(1, 1, 1)), ["grid", "pair", "(1, 1, 1)"]),
        (dict(grid=(1.0, 1)), ["grid", "pair", "1.0"]),
    ],
    ids=["float", "bool", "triple", "float-grid"],
)
def test_plan_fields_still_reject_non_integers(fields, words):
    with pytest.raises(ValueError) as info:
        pcm.Plan(**fields)
    for word in words:
        assert word in str(info.value)


def test_numpy_integer_plan_runs_conv2d():
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    w = np.random.default_rng(4).standard_normal((4, 3, 3, 3))
    plan = pcm.Plan(threads=np.int64(1), algorithm="reference")
    np.testing.assert_allclose(pcm.conv2d(x, w, plan=plan), pcm.conv2d(x, w), rtol=1e-12,
                               atol=1e-12)


# --- Cases from public bug reports of other convolution libraries -------------------------
#
# Each is a shape or layout that once gave wrong results in PyTorch, oneDNN or another
# library. Every algorithm that accepts the shape is compared with the float64 reference, so a
# kernel that mishandles the same corner fails here.

_rng = np.random.default_rng(20261204)
_W5 = _rng.standard_normal((3, 16, 3, 3, 3))
_POINTWISE = _rng.standard_normal((64, 32, 1, 1))

REPORTED_CASES = {
    # pytorch/pytorch#50042: depthwise 24 channels, stride 2, padding 1 gave a wrong weight
    # gradient for the last row of taps.
    "depthwise24-stride2": (np.ones((1, 24, 6, 6)), np.ones((24, 1, 3, 3)),
                            dict(stride=2, padding=1, groups=24)),
    # tracel-ai/burn#1891: depthwise stride 2 weight gradient sliced with wrong dimensions.
    "depthwise4-stride2-arange": (np.arange(64.0).reshape(1, 4, 4, 4),
                                  np.arange(36.0).reshape(4, 1, 3, 3),
                                  dict(stride=2, padding=1, groups=4)),
    # pytorch/pytorch#55781 and #1246: a weight sliced with a step was read as if contiguous.
    "weight-step-slice": (np.ones((4, 16, 6, 6)),
                          np.arange(0, 1.0, 1 / 2.0**10).reshape(32, 16, 1, 2)[:, :, :, ::2], {}),
    # pytorch/pytorch#192212: weight5d[:, :, k], a Conv3d weight cut into a Conv2d one.
    "weight-from-5d": (_rng.standard_normal((2, 16, 7, 9)), _W5[:, :, 1], dict(padding=1)),
    # huggingface/candle#3736: a 1x1 weight that is a slice at a nonzero offset.
    "weight-offset-slice": (_rng.standard_normal((2, 16, 5, 5)), _POINTWISE[8:16, 16:32], {}),
    # Maratyszcza/NNPACK#103 (FCN's first layer pads by 100) and ml-explore/mlx#833 (padding
    # larger than the kernel failed in the gradient).
    "padding-100": (_rng.standard_normal((1, 3, 5, 5)), _rng.standard_normal((4, 3, 3, 3)),
                    dict(padding=100)),
    "padding-4-kernel-3": (_rng.standard_normal((5, 2, 11, 14)), _rng.standard_normal((3, 2, 3, 3)),
                           dict(padding=4)),
    # tensorflow/tensorflow#1991: a kernel smaller than the stride.
    "kernel-1-stride-3": (_rng.standard_normal((1, 1, 8, 8)), _rng.standard_normal((1, 1, 1, 1)),
                          dict(stride=3)),
    "kernel-2-stride-5": (_rng.standard_normal((2, 3, 17, 13)), _rng.standard_normal((4, 3, 2, 2)),
                          dict(stride=5, padding=2)),
    # 'same' with even kernels and dilation: the odd padding element goes bottom and right.
    "same-even-dilated": (_rng.standard_normal((1, 3, 8, 9)), _rng.standard_normal((4, 3, 4, 2)),
                          dict(padding="same", dilation=(3, 2))),
    "same-even-one-row": (_rng.standard_normal((1, 3, 1, 9)), _rng.standard_normal((4, 3, 2, 2)),
                          dict(padding="same")),
    "dilation-past-image": (_rng.standard_normal((1, 2, 5, 300)), _rng.standard_normal((3, 2, 1, 3)),
                            dict(dilation=(1000, 140))),
    "kernel-equals-padded-input": (_rng.standard_normal((2, 3, 5, 6)),
                                   _rng.standard_normal((4, 3, 7, 8)), dict(padding=1)),
    "one-pixel-padded": (_rng.standard_normal((3, 4, 1, 1)), _rng.standard_normal((5, 4, 3, 3)),
                         dict(padding=1)),
    "channel-multiplier-3": (_rng.standard_normal((2, 6, 9, 9)), _rng.standard_normal((18, 1, 5, 5)),
                             dict(groups=6, padding=2, stride=2)),
}


def _supported(algorithm, op, geo):
    return algorithm == "auto" or _lib.algorithm_supported(algorithm, op, desc_struct(geo))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(REPORTED_CASES))
def test_reported_case_matches_reference(name, dtype):
    x, w, options = REPORTED_CASES[name]
    x, w = x.astype(dtype), w.astype(dtype)  # astype keeps the weight's strides
    geo = V.geometry(x.shape, w.shape, options.get("stride", 1), options.get("padding", 0),
                     options.get("dilation", 1), options.get("groups", 1), "test")
    go = np.random.default_rng(7).standard_normal(geo.output_shape).astype(dtype)
    expected = reference.forward(x, w, **options)
    expected_gi = reference.backward_input(go, x.shape, w, **options)
    expected_gw = reference.backward_weight(go, x, w.shape, **options)
    scale = reference.abs_forward(x, w, **options)
    scale_gi = reference.abs_backward_input(go, x.shape, w, **options)
    scale_gw = reference.abs_backward_weight(go, x, w.shape, **options)
    terms = geo.c // geo.groups * geo.r * geo.s
    terms_gi = geo.k // geo.groups * geo.r * geo.s
    terms_gw = geo.n * geo.out_h * geo.out_w
    for algorithm in _lib.ALGORITHMS:
        plan = pcm.Plan(algorithm=algorithm)
        factor = ALGORITHM_FACTOR[algorithm]
        label = f"{name} {np.dtype(dtype).name} {algorithm}"
        if _supported(algorithm, "forward", geo):
            assert_close(pcm.conv2d(x, w, plan=plan, **options), expected, scale, dtype=dtype,
                         terms=terms, factor=factor, label=label + " forward")
        if _supported(algorithm, "backward_data", geo):
            got = pcm.conv2d_backward(go, x, w, need=("input",), plan=plan, **options).input
            assert_close(got, expected_gi, scale_gi, dtype=dtype, terms=terms_gi, factor=factor,
                         label=label + " grad input")
        if _supported(algorithm, "backward_weight", geo):
            got = pcm.conv2d_backward(go, x, w, need=("weight",), plan=plan, **options).weight
            assert_close(got, expected_gw, scale_gw, dtype=dtype, terms=terms_gw, factor=factor,
                         label=label + " grad weight")


def test_depthwise_stride2_gradients_exact():
    """The values printed in tracel-ai/burn#1891, from PyTorch, for depthwise stride 2."""
    x, w, options = REPORTED_CASES["depthwise4-stride2-arange"]
    y = pcm.conv2d(x, w, **options)
    grads = pcm.conv2d_backward(np.ones_like(y), x, w, **options)
    expected_first_rows = np.array([[4.0, 8.0, 4.0, 5.0], [8.0, 16.0, 8.0, 10.0]])
    np.testing.assert_array_equal(grads.input[0, 0, :2], expected_first_rows)
    np.testing.assert_array_equal(grads.bias, np.full(4, 4.0))
    np.testing.assert_array_equal(grads.weight, reference.backward_weight(np.ones_like(y), x,
                                                                          w.shape, **options))


REPRODUCIBLE_CASES = [
    ((3, 5, 66, 70), (18, 5, 3, 3), {}, ("auto", "gemm")),
    ((9, 6, 16, 24), (28, 3, 3, 3), dict(padding=1, dilation=2, groups=2), ("auto", "direct")),
]


@pytest.mark.parametrize("case", range(len(REPRODUCIBLE_CASES)), ids=["gemm", "fewchan"])
def test_float64_weight_grad_reproducible(case):
    """The float64 weight gradient (gemm_weight_pixels) and the few-channel weight and bias
    gradient handed out their tasks dynamically. With 2 or more threads, each call then summed
    different tasks per thread, and the result changed in the last bits from one identical
    call to the next (by up to 2e-13 here)."""
    xs, ws, options, algorithms = REPRODUCIBLE_CASES[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    go = rng.standard_normal(pcm.conv2d(x, w, **options).shape)
    for algorithm in algorithms:
        plan = pcm.Plan(algorithm=algorithm, threads=3)
        first = pcm.conv2d_backward(go, x, w, need=("weight", "bias"), plan=plan, **options)
        for _ in range(5):
            again = pcm.conv2d_backward(go, x, w, need=("weight", "bias"), plan=plan, **options)
            np.testing.assert_array_equal(again.weight, first.weight)
            np.testing.assert_array_equal(again.bias, first.bias)


# Layers of the new kernels (depthwise flat, narrow and stride-2, few-channel, float64 pixel
# GEMM) whose strides and dilations leave input elements unread.
UNREAD_CASES = [
    ((2, 6, 9, 18), (6, 1, 3, 3), dict(stride=2, groups=6)),
    ((1, 4, 8, 5), (12, 1, 3, 3), dict(stride=(3, 2), groups=4)),
    ((1, 3, 11, 19), (8, 3, 3, 3), dict(stride=(4, 1), dilation=(1, 2))),
    ((2, 2, 16, 16), (16, 1, 2, 4), dict(stride=(1, 5), groups=2)),
    ((1, 5, 10, 12), (7, 5, 1, 1), dict(stride=3, padding=1)),
    ((1, 8, 17, 17), (8, 1, 3, 3), dict(stride=2, dilation=3, groups=8)),
    ((1, 2, 40, 70), (3, 2, 5, 2), dict(stride=(2, 3), padding=(0, 1))),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(UNREAD_CASES)))
def test_unread_input_nan_changes_no_result(case, dtype):
    """NaN in every input element that no window reads leaves the output, the weight gradient
    and the bias gradient unchanged bit for bit. No kernel failed this; it guards over-reads."""
    xs, ws, options = UNREAD_CASES[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    unread = ~reference.read_mask(xs, ws, **options)
    assert unread.any()
    x_nan = x.copy()
    x_nan[unread] = np.nan
    geo = V.geometry(xs, ws, options.get("stride", 1), options.get("padding", 0),
                     options.get("dilation", 1), options.get("groups", 1), "test")
    go = rng.standard_normal(geo.output_shape).astype(dtype)
    for algorithm in ("auto", "direct", "gemm"):
        for threads in (1, 2):
            plan = pcm.Plan(algorithm=algorithm, threads=threads)
            if _supported(algorithm, "forward", geo):
                np.testing.assert_array_equal(pcm.conv2d(x_nan, w, plan=plan, **options),
                                              pcm.conv2d(x, w, plan=plan, **options))
            if _supported(algorithm, "backward_weight", geo):
                got = pcm.conv2d_backward(go, x_nan, w, need=("weight", "bias"), plan=plan,
                                          **options)
                clean = pcm.conv2d_backward(go, x, w, need=("weight", "bias"), plan=plan,
                                            **options)
                np.testing.assert_array_equal(got.weight, clean.weight)
                np.testing.assert_array_equal(got.bias, clean.bias)


# --- NaN and infinity placement -----------------------------------------------------------
#
# PyTorch multiplies every tap, so a NaN or infinity reaches exactly the outputs whose window
# covers it, zero weights included, and no others (not those that stride or padding skip).


def _kind(array):
    """Classify every element: 0 finite, 1 +inf, 2 -inf, 3 NaN."""
    array = np.asarray(array)
    return np.select([np.isnan(array), np.isposinf(array), np.isneginf(array)], [3, 1, 2], 0)


PLACEMENT_CASES = [
    ((1, 2, 7, 9), (3, 2, 3, 3), dict(padding=1)),
    ((1, 2, 7, 9), (3, 2, 3, 3), dict(stride=2)),
    ((1, 4, 6, 10), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)),
    ((1, 3, 9, 9), (2, 3, 3, 3), dict(dilation=2)),
    ((2, 16, 6, 6), (32, 16, 3, 3), dict(padding=1)),
    ((1, 1, 5, 33), (1, 1, 3, 3), dict(stride=2)),
]


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", range(len(PLACEMENT_CASES)))
def test_nonfinite_input_reaches_same_outputs(case, value):
    xs, ws, options = PLACEMENT_CASES[case]
    rng = np.random.default_rng(case)
    x0 = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    w.reshape(-1)[::3] = 0  # zero taps must propagate NaN too, as 0 * NaN does
    geo = V.geometry(xs, ws, options.get("stride", 1), options.get("padding", 0),
                     options.get("dilation", 1), options.get("groups", 1), "test")
    for algorithm in ("auto", "direct", "gemm", "reference"):
        if not _supported(algorithm, "forward", geo):
            continue
        for row, col in [(0, 0), (xs[2] - 1, xs[3] - 1), (xs[2] // 2, 1), (1, xs[3] - 2)]:
            x = x0.copy()
            x[0, 0, row, col] = value
            got = pcm.conv2d(x, w, plan=pcm.Plan(algorithm=algorithm), **options)
            expected = reference.forward(x, w, **options)
            np.testing.assert_array_equal(
                _kind(got), _kind(expected),
                err_msg=f"{algorithm}: {value} at ({row}, {col}) of input {xs}, {options}")


@pytest.mark.xfail(strict=True, reason="C kernels: backward data multiplies a weight tap by the "
                   "zero padding of grad_output, so 0 * NaN poisons unreached grad_input elements")
@pytest.mark.parametrize("options", [dict(padding=1), dict(dilation=2)], ids=["padding", "dilation"])
@pytest.mark.parametrize("algorithm", ["auto", "direct", "gemm"])
def test_nan_weight_grad_input_matches_torch(algorithm, options):
    """grad_input[i] sums go[o] * w[t] only over pairs with o * stride + t * dilation - pad = i.

    With w[0, 0, 0, 0] NaN, PyTorch and the reference make NaN only the input elements that
    some output reads through tap (0, 0). These are the top-left 2 x 2 of a 3 x 3 input with
    padding 1, and element (0, 0) of a 5 x 5 input with dilation 2. Every kernel but
    'reference' made NaN whole rows or the whole gradient.
    """
    size = 3 if "padding" in options else 5
    x = np.ones((1, 1, size, size), np.float32)
    w = np.ones((1, 1, 3, 3), np.float32)
    w[0, 0, 0, 0] = np.nan
    go = np.ones(pcm.conv2d(x, np.ones_like(w), **options).shape, np.float32)
    got = pcm.conv2d_backward(go, x, w, need=("input",), plan=pcm.Plan(algorithm=algorithm),
                              **options).input
    expected = reference.backward_input(go, x.shape, w, **options)
    assert np.isnan(expected).sum() == (4 if size == 3 else 1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))


@pytest.mark.parametrize("channels", [
    1,
    3,
    pytest.param(8, marks=pytest.mark.xfail(
        strict=True, reason="C kernel 'direct' backward weight outside the few-channel and "
        "depthwise kernels skips taps that read padding, so a NaN in grad_output does not reach them")),
])
def test_nan_grad_output_weight_grad_direct(channels):
    """A NaN at grad_output[0, 0, 0, 0] meets every weight tap (padding included, as 0 * NaN
    in PyTorch's im2col and in the reference)."""
    x = np.ones((1, channels, 3, 3), np.float32)
    w = np.ones((channels, channels, 3, 3), np.float32)
    go = np.ones((1, channels, 3, 3), np.float32)
    go[0, 0, 0, 0] = np.nan
    got = pcm.conv2d_backward(go, x, w, padding=1, need=("weight",),
                              plan=pcm.Plan(algorithm="direct")).weight
    assert np.isnan(got[0]).all(), got[0]


@pytest.mark.xfail(strict=True, reason="C kernel 'winograd': the input transform adds and "
                   "subtracts taps, so +inf - inf gives NaN where direct summation gives +-inf")
def test_winograd_infinite_input_stays_infinite():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 0, 1] = np.inf
    w = np.ones((1, 1, 3, 3), np.float32)
    got = pcm.conv2d(x, w, plan=pcm.Plan(algorithm="winograd"))
    np.testing.assert_array_equal(got[0, 0], [[np.inf, np.inf], [0.0, 0.0]])


@pytest.mark.xfail(strict=True, reason="C kernel 'winograd': the transform of finite inputs "
                   "near the float32 maximum overflows (3e38 - (-3e38)), giving NaN")
def test_winograd_large_finite_input_stays_finite():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 0, 1] = 3e38
    x[0, 0, 2, 1] = -3e38
    w = np.full((1, 1, 3, 3), 0.25, np.float32)
    got = pcm.conv2d(x, w, plan=pcm.Plan(algorithm="winograd"))
    expected = pcm.conv2d(x, w, plan=pcm.Plan(algorithm="reference"))
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))


@pytest.mark.xfail(strict=True, reason="C kernel 'winograd': backward data transforms whole "
                   "4x4 tiles, so an input element that one product reaches gets the rounding "
                   "of its tile neighbours, about 1000 times the tolerance of its own scale")
def test_winograd_grad_input_corner_within_tolerance():
    """Valid padding: grad_input[3, 0] is the single product go[1, 0] * w[2, 0]. Winograd
    gives 0.0006836653 where the product is 0.00068359374 (relative error 1e-4, 880 eps),
    while its tile neighbours sum products of weights 1."""
    w = np.ones((1, 1, 3, 3), np.float32)
    w[0, 0, 2, 0] = 2.0 ** -10
    go = np.array([[[[1.0, 0.3], [0.7, 1.0]]]], np.float32)
    x = np.zeros((1, 1, 4, 4), np.float32)
    got = pcm.conv2d_backward(go, x, w, need=("input",), plan=pcm.Plan(algorithm="winograd"))
    assert_close(got.input, reference.backward_input(go, x.shape, w),
                 reference.abs_backward_input(go, x.shape, w), dtype=np.float32, terms=9,
                 factor=ALGORITHM_FACTOR["winograd"], label="winograd grad_input")


# --- Subnormal numbers ----------------------------------------------------------------------


SUBNORMAL = {np.float32: np.float32(1e-39), np.float64: 1e-310}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_subnormals_flushed_to_zero_as_documented(dtype):
    """The kernels run with flush-to-zero and denormals-are-zero (README), unlike PyTorch's
    default; only the 'reference' algorithm keeps subnormal values."""
    tiny = SUBNORMAL[dtype]
    x = np.full((2, 3, 6, 6), tiny, dtype)
    w = np.ones((4, 3, 3, 3), dtype)
    go = np.full((2, 4, 6, 6), tiny, dtype)
    assert not pcm.conv2d(x, w, padding=1).any()
    assert not pcm.conv2d_backward(go, x, w, padding=1, need=("input",)).input.any()
    assert pcm.conv2d(x, w, padding=1, plan=pcm.Plan(algorithm="reference")).all()
    # A product of two normal numbers that is subnormal is flushed too.
    small = np.full((1, 1, 3, 3), 1e-20, dtype)
    weight = np.full((1, 1, 3, 3), 1e-19 if dtype == np.float32 else 1e-300, dtype)
    assert pcm.conv2d(small, weight)[0, 0, 0, 0] == 0
    assert pcm.conv2d(small, weight, plan=pcm.Plan(algorithm="reference"))[0, 0, 0, 0] > 0


# --- Profile files that are not what they claim ---------------------------------------------


@pytest.fixture
def profile_path(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    monkeypatch.setenv(profile.ENV_VAR, str(path))
    profile.reload()
    yield path
    profile.reload()


def test_binary_profile_falls_back_to_heuristic(profile_path, caplog):
    """A profile that is not UTF-8 made every conv2d call raise UnicodeDecodeError."""
    profile_path.write_bytes(b"\x00\xff\xfe not json")
    x, w = np.ones((1, 1, 5, 5), np.float32), np.ones((1, 1, 3, 3), np.float32)
    assert pcm.conv2d(x, w).sum() == 81
    assert pcm.plan(x.shape, w.shape).source == "heuristic"
    assert "is not valid JSON" in caplog.text


@pytest.mark.parametrize("field,value", [("groups", 0), ("stride", [0, 1])])
def test_profile_entry_dividing_by_zero_is_skipped(profile_path, caplog, field, value):
    """An entry with groups or stride 0 made every conv2d call raise ZeroDivisionError."""
    geo = V.geometry((1, 2, 8, 8), (3, 2, 3, 3), 1, 1, 1, 1, "test")
    key = profile.key_dict(geo, "forward", np.float32, 1, 1)
    key[field] = value
    entry = profile.make_entry(key, pcm.Plan(algorithm="direct"), 1.0, pcm.Plan(), 2.0)
    profile_path.write_text(json.dumps({"schema": profile.SCHEMA,
                                        "schema_version": profile.SCHEMA_VERSION,
                                        "entries": {"bad": entry}}))
    x, w = np.ones((1, 2, 8, 8), np.float32), np.ones((3, 2, 3, 3), np.float32)
    assert pcm.conv2d(x, w, padding=1).shape == (1, 3, 8, 8)
    assert pcm.plan(x.shape, w.shape, padding=1).source == "heuristic"
    assert "ZeroDivisionError" in caplog.text


# --- The PyTorch layer ------------------------------------------------------------------------


def _memory_formats():
    torch = pytest.importorskip("torch")
    return {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("weight_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_torch_output_memory_format_matches_torch(input_format, weight_format, dtype_name):
    """The output was always contiguous, while torch.nn.functional.conv2d returns channels_last
    when the input or the weight is, so a channels_last model lost its format at each layer."""
    torch = pytest.importorskip("torch")
    import pyconvmpi.torch as pt

    formats = _memory_formats()
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, dtype=dtype, generator=generator)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, generator=generator)
    x = x.contiguous(memory_format=formats[input_format])
    w = w.contiguous(memory_format=formats[weight_format])
    expected = torch.nn.functional.conv2d(x, w, padding=1)
    got = pt.conv2d(x, w, padding=1)
    for name, memory_format in formats.items():
        assert got.is_contiguous(memory_format=memory_format) == expected.is_contiguous(
            memory_format=memory_format), f"output {name}: got strides {got.stride()}"
    torch.testing.assert_close(got, expected)


def test_torch_channels_last_model_step_matches_torch():
    torch = pytest.importorskip("torch")
    import pyconvmpi.torch as pt

    torch.manual_seed(3)
    ours = pt.Conv2d(3, 5, 3, padding=1, padding_mode="reflect").double()
    theirs = torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect").double()
    theirs.load_state_dict(ours.state_dict())
    ours = ours.to(memory_format=torch.channels_last)
    theirs = theirs.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    got, expected = ours(x), theirs(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    assert ours.weight.grad.stride() == theirs.weight.grad.stride()


@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
def test_torch_unbatched_output_strides_match_torch(input_format):
    """PyTorch adds a batch dimension to an unbatched input and removes it from the output,
    which keeps channels_last strides in a 3-D output."""
    torch = pytest.importorskip("torch")
    import pyconvmpi.torch as pt

    formats = _memory_formats()
    x = torch.randn(1, 3, 6, 6).contiguous(memory_format=formats[input_format])[0]
    for weight_format in formats.values():
        w = torch.randn(4, 3, 3, 3).contiguous(memory_format=weight_format)
        expected = torch.nn.functional.conv2d(x, w)
        got = pt.conv2d(x, w)
        assert got.stride() == expected.stride(), (input_format, weight_format)
        torch.testing.assert_close(got, expected)


def test_torch_ambiguous_strides_stay_contiguous():
    """One channel and a 1 x 1 kernel match both formats; PyTorch calls that contiguous."""
    torch = pytest.importorskip("torch")
    import pyconvmpi.torch as pt

    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    w = torch.randn(1, 1, 1, 1, dtype=torch.float64)
    got = pt.conv2d(x, w)
    assert got.stride() == torch.nn.functional.conv2d(x, w).stride()


def test_torch_negative_view_matches_torch():
    """A tensor with the lazy negation bit made the layer raise RuntimeError from numpy(),
    while torch.nn.functional.conv2d and pyconvmpi.conv2d accept it."""
    torch = pytest.importorskip("torch")
    import pyconvmpi.torch as pt

    generator = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=generator)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=generator)
    negated = torch._neg_view(x).requires_grad_()
    assert negated.is_neg()
    got = pt.conv2d(negated, torch._neg_view(w))
    torch.testing.assert_close(got, torch.nn.functional.conv2d(-x, -w))
    got.sum().backward()
    leaf = (-x).requires_grad_()
    torch.nn.functional.conv2d(leaf, -w).sum().backward()
    torch.testing.assert_close(negated.grad, leaf.grad)


# --- python -m pyconvmpi.bench --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--shape", "1x1x4x4:1x9x9"], ["--shape 1x1x4x4:1x9x9", "must fit"]),
        (["--shape", "1x4x8x8:6x3x3:g4"], ["multiple of groups=4", "got 6"]),
        (["--shape", "1x4x8x8:4x3x3:s2:psame"], ["padding='same' requires stride 1"]),
        (["--json", "/nonexistent-pyconvmpi-dir/x.json"], ["--json", "not found"]),
    ],
    ids=["kernel-too-large", "groups", "same-stride", "json-directory"],
)
def test_bench_bad_arguments_exit_before_running(argv, words, capsys):
    """These raised a traceback after the peak measurement, or after the whole run for
    --json, instead of a usage error."""
    from pyconvmpi.bench.__main__ import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message, message


def test_bench_table_aligns_missing_torch_columns():
    """A missing PyTorch time padded each '-' to 93, 82 and 81 characters."""
    from pyconvmpi.bench import report

    row = {"layer": "l", "shape": "1x1x8x8:1x3x3", "algorithm": "direct", "seconds": 1e-3,
           "gflops": 1.0, "percent_peak": 1.0, "torch_seconds": None, "speedup": None,
           "max_error": None}
    header, _, line = report.table([row])
    assert len(line) == len(header), (header, line)
    assert line.endswith("        -        -        -")


def test_bench_shape_text_shows_dilation():
    from pyconvmpi import layers
    from pyconvmpi.bench.__main__ import shape_text

    assert shape_text(layers.parse_shape("1x2x9x9:3x3x3:p2:d2")) == "1x2x9x9:3x3x3:p2:d2"


def test_numpy_api_accepts_tensor_subclass():
    """A torch.Tensor subclass defined outside torch was rejected as 'must be a numpy.ndarray',
    although F.conv2d and the README accept any CPU tensor."""
    torch = pytest.importorskip("torch")

    class Tagged(torch.Tensor):
        pass

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=generator)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=generator)
    got = pcm.conv2d(x.as_subclass(Tagged), w.as_subclass(Tagged), padding=1)
    np.testing.assert_allclose(got, torch.nn.functional.conv2d(x, w, padding=1).numpy(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "rows,ranks,exc,words",
    [
        (9, 0, ValueError, ["ranks", "positive", "0"]),
        (9, -1, ValueError, ["ranks", "positive", "-1"]),
        (-1, 2, ValueError, ["rows", "-1"]),
        (9.0, 2, TypeError, ["rows", "integer", "9.0"]),
        (None, 2, TypeError, ["rows", "integer", "None"]),
        (True, 2, TypeError, ["rows", "integer", "True"]),
        (9, True, TypeError, ["ranks", "integer", "True"]),
    ],
    ids=["zero-ranks", "negative-ranks", "negative-rows", "float", "none", "bool-rows",
         "bool-ranks"],
)
def test_row_bands_rejects_bad_arguments(rows, ranks, exc, words):
    """row_bands returned [] for 0 or negative ranks, raised ctypes.ArgumentError for a float
    or None, and InvalidArgumentError without the argument's name for negative rows."""
    from pyconvmpi.distributed import row_bands

    with pytest.raises(exc) as info:
        row_bands(rows, ranks)
    message = str(info.value)
    assert message.startswith("row_bands: "), message
    for word in words:
        assert word in message, message


def test_row_bands_accepts_numpy_integers():
    from pyconvmpi.distributed import row_bands

    assert row_bands(np.int64(9), np.int32(2)) == [(0, 5), (5, 9)]
    assert row_bands(0, 3) == [(0, 0)] * 3
