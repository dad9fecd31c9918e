"""Depthwise convolutions (groups == in_channels) against the float64 reference.

The depthwise 3x3 kernel (conv2d_depthwise.c) computes several output rows per vector of
output columns and masks the columns outside the image, so the cases below put every output
width on both sides of a vector (8 and 16 lanes), odd widths and heights, stride 2 with odd
widths, pads 0 to 2 and 'same', and bands of fewer rows than the kernel's row block. Forward
outputs start as NaN, so an element the kernel leaves unwritten fails. Channel multipliers
and dilation 2 run the other kernels and are checked on the same cases.
"""

import numpy as np
import pytest

import pyconvmpi
from pyconvmpi import _lib
from pyconvmpi.plan import Plan

import reference
import tolerances

DTYPES = (np.float32, np.float64)

# (n, c, h, w, multiplier, stride, padding, dilation)
CASES = [
    (2, 3, 14, 14, 1, 1, 1, 1),
    (1, 4, 28, 28, 1, 1, 1, 1),
    (2, 2, 7, 7, 1, 1, 1, 1),
    (1, 3, 9, 17, 1, 1, 1, 1),
    (1, 2, 23, 33, 1, 1, 0, 1),
    (1, 2, 11, 45, 1, 1, 2, 1),
    (1, 3, 10, 16, 1, 1, 1, 1),
    (2, 2, 1, 1, 1, 1, 1, 1),
    (1, 2, 3, 3, 1, 1, 0, 1),
    (1, 2, 19, 70, 1, 1, 1, 1),
    (2, 3, 15, 15, 1, 2, 1, 1),
    (1, 2, 28, 28, 1, 2, 1, 1),
    (1, 2, 13, 31, 1, 2, 1, 1),
    (1, 2, 12, 33, 1, 2, 0, 1),
    (1, 2, 9, 67, 1, 2, 2, 1),
    (1, 2, 1, 3, 1, 2, 1, 1),
    (1, 3, 11, 13, 1, 1, "same", 1),
    (1, 2, 12, 19, 2, 1, 1, 1),
    (1, 3, 9, 14, 2, 2, 1, 1),
    (1, 2, 13, 21, 1, 1, 2, 2),
    (1, 2, 13, 21, 1, 1, "same", 2),
    (0, 3, 9, 9, 1, 1, 1, 1),
]


def case_id(case):
    n, c, h, w, mult, stride, padding, dilation = case
    return f"{n}x{c}x{h}x{w}:m{mult}:s{stride}:p{padding}:d{dilation}"


def arrays(case, dtype, seed):
    n, c, h, w, mult, _, _, _ = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((c * mult, 1, 3, 3)).astype(dtype)
    bias = rng.standard_normal((c * mult,)).astype(dtype)
    return x, weight, bias


def desc_for(case):
    n, c, h, w, mult, stride, padding, dilation = case
    top, bottom, left, right = reference.padding_sides(padding, (3, 3), (dilation, dilation))
    out_h = (h + top + bottom - dilation * 2 - 1) // stride + 1
    out_w = (w + left + right - dilation * 2 - 1) // stride + 1
    return _lib.ConvDesc(n, c, h, w, c * mult, 3, 3, out_h, out_w, stride, stride, top, left,
                         bottom, right, dilation, dilation, c)


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("algorithm", ("auto", "direct"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: case_id(CASES[i]))
def test_forward_matches_reference(index, dtype, algorithm, threads):
    case = CASES[index]
    _, c, _, _, _, stride, padding, dilation = case
    x, weight, bias = arrays(case, dtype, seed=index)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    expected = reference.forward(x, weight, bias, **options)
    scale = reference.abs_forward(x, weight, bias, **options)
    desc = desc_for(case)
    out = np.full(expected.shape, np.nan, dtype=dtype)
    _lib.conv2d_forward(desc, Plan(algorithm=algorithm, threads=threads).exec_struct(), x,
                        weight, bias, out)
    tolerances.assert_close(out, expected, scale, dtype=dtype, terms=9,
                            factor=tolerances.ALGORITHM_FACTOR[algorithm],
                            label=f"forward {case_id(case)} {algorithm} threads={threads}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: case_id(CASES[i]))
def test_public_forward_and_backward_match_reference(index, dtype):
    case = CASES[index]
    _, c, _, _, mult, stride, padding, dilation = case
    x, weight, bias = arrays(case, dtype, seed=100 + index)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    out = pyconvmpi.conv2d(x, weight, bias, **options)
    expected = reference.forward(x, weight, bias, **options)
    scale = reference.abs_forward(x, weight, bias, **options)
    factor = tolerances.ALGORITHM_FACTOR["auto"]
    tolerances.assert_close(out, expected, scale, dtype=dtype, terms=9, factor=factor,
                            label=f"conv2d {case_id(case)}")

    grad = np.random.default_rng(200 + index).standard_normal(out.shape).astype(dtype)
    grads = pyconvmpi.conv2d_backward(grad, x, weight, **options)
    expected_gx = reference.backward_input(grad, x.shape, weight, **options)
    scale_gx = reference.abs_backward_input(grad, x.shape, weight, **options)
    tolerances.assert_close(grads.input, expected_gx, scale_gx, dtype=dtype,
                            terms=9 * mult, factor=factor, label=f"grad_input {case_id(case)}")
    expected_gw = reference.backward_weight(grad, x, weight.shape, **options)
    scale_gw = reference.abs_backward_weight(grad, x, weight.shape, **options)
    terms = grad.shape[0] * grad.shape[2] * grad.shape[3]
    tolerances.assert_close(grads.weight, expected_gw, scale_gw, dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_weight {case_id(case)}")
    tolerances.assert_close(grads.bias, reference.backward_bias(grad),
                            reference.backward_bias(np.abs(grad)), dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_bias {case_id(case)}")


@pytest.mark.skipif(_lib.simd_level() != "avx512",
                    reason="the depthwise 3x3 kernel runs on AVX-512 CPUs only")
def test_auto_direct_for_strides_1_and_2():
    for stride in (1, 2):
        desc = desc_for((1, 32, 28, 28, 1, stride, 1, 1))
        assert _lib.choose_algorithm("forward", desc, Plan().exec_struct()) == "direct"
