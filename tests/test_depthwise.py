"""Depthwise convolutions (groups == in_channels) against the float64 reference.

The depthwise 3x3 kernel (conv2d_depthwise.c) computes several output rows per vector of
output columns and masks the columns outside the image, so the cases below put every output
width on both sides of a vector (8 and 16 lanes), odd widths and heights, stride 2 with odd
widths, pads 0 to 2 and 'same', and bands of fewer rows than the kernel's row block. Forward
outputs start as NaN, so an element the kernel leaves unwritten fails. Channel multipliers
and dilation 2 run the other kernels and are checked on the same cases.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyconvmpi
from pyconvmpi import _lib
from pyconvmpi.plan import Plan

import reference
import tolerances
from conftest import requires_torch

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


# Grid of the depthwise 3x3 kernels' paths, (n, c, h, w, stride, padding, dilation) with one
# output channel per input channel. Stride 1 with output rows as wide as input rows runs the
# flat kernels: pads 1 and 'same' at dilation 1, pad 2 at dilation 2. Those cut vectors across
# row ends, so the widths sit on both sides of 8 and 16 lanes, and the heights include planes
# shorter than the kernel. Rows of up to two vectors at pad_left 1 run the narrow-row kernels
# instead, so pads (0, 1) and (2, 1) check their top and bottom rows. Stride 2 with pads 0 to 2
# runs the row kernel forward, the parity-class input gradient and the strided weight
# gradient. Pad 0 at stride 1 keeps the row kernel and the older plane kernels in the grid.
GRID_WIDTHS = (1, 2, 3, 7, 8, 9, 14, 15, 16, 17, 23, 24, 31, 32, 33, 40)
GRID_HEIGHTS = (1, 2, 3, 5, 6, 9, 4, 7)


def grid_cases():
    cases = []
    for index, w in enumerate(GRID_WIDTHS):
        h = GRID_HEIGHTS[index % len(GRID_HEIGHTS)]
        n, c = 1 + index % 3, 1 + index % 4
        cases.append((n, c, h, w, 1, 1, 1))
        cases.append((n, c, w % 11 + 1, w, 1, 2, 2))
        cases.append((n, c, h + 1, w, 1, "same", 1))
        for pad in (0, 1, 2):
            height = GRID_HEIGHTS[(index + pad) % len(GRID_HEIGHTS)] + pad
            if min(height, w) + 2 * pad >= 3:
                cases.append((n, c, height, w, 2, pad, 1))
    cases += [(2, 3, 7, 56, 1, 1, 1), (1, 2, 9, 63, 1, 1, 1), (1, 2, 5, 64, 1, 1, 1),
              (2, 2, 6, 65, 1, 1, 1), (1, 2, 4, 70, 1, 1, 1), (1, 2, 3, 112, 1, 1, 1),
              (1, 2, 9, 57, 2, 1, 1), (2, 2, 8, 112, 2, 1, 1), (1, 3, 6, 20, 1, 0, 1),
              (1, 3, 17, 17, 1, 0, 2), (0, 3, 5, 9, 1, 1, 1), (0, 3, 9, 9, 2, 1, 1),
              (2, 3, 7, 14, 1, (0, 1), 1), (1, 2, 6, 9, 1, (2, 1), 1), (1, 2, 5, 27, 1, (0, 1), 1),
              (1, 2, 4, 31, 1, (2, 1), 1), (1, 2, 6, 40, 1, (0, 1), 1)]
    return cases


GRID = grid_cases()


def grid_id(case):
    n, c, h, w, stride, padding, dilation = case
    return f"{n}x{c}x{h}x{w}:s{stride}:p{padding}:d{dilation}"


def grid_desc(case):
    n, c, h, w, stride, padding, dilation = case
    return desc_for((n, c, h, w, 1, stride, padding, dilation))


def run_kernels(case, x, weight, bias, grad, algorithm, threads):
    """Return the forward output and the input, weight and bias gradients of the C kernels.

    Every output array starts as NaN, so an element that a kernel leaves unwritten fails.
    """
    n, c, h, w, stride, padding, dilation = case
    desc = grid_desc(case)
    exec_ = Plan(algorithm=algorithm, threads=threads).exec_struct()
    out = np.full((n, c, desc.out_h, desc.out_w), np.nan, dtype=x.dtype)
    grad_input = np.full(x.shape, np.nan, dtype=x.dtype)
    grad_weight = np.full(weight.shape, np.nan, dtype=x.dtype)
    grad_bias = np.full(bias.shape, np.nan, dtype=x.dtype)
    _lib.conv2d_forward(desc, exec_, x, weight, bias, out)
    _lib.conv2d_backward_data(desc, exec_, grad, weight, grad_input)
    _lib.conv2d_backward_weight(desc, exec_, grad, x, grad_weight, grad_bias)
    return out, grad_input, grad_weight, grad_bias


def grid_arrays(case, dtype, seed):
    n, c, h, w, stride, padding, dilation = case
    x, weight, bias = arrays((n, c, h, w, 1, stride, padding, dilation), dtype, seed)
    desc = grid_desc(case)
    grad = np.random.default_rng(seed + 1).standard_normal(
        (n, c, desc.out_h, desc.out_w)).astype(dtype)
    return x, weight, bias, grad


def check_grid_results(case, results, expected, dtype, algorithm, label):
    out, grad_input, grad_weight, grad_bias = results
    (ref_out, scale_out), (ref_gi, scale_gi), (ref_gw, scale_gw), (ref_gb, scale_gb) = expected
    factor = tolerances.ALGORITHM_FACTOR[algorithm]
    terms = case[0] * out.shape[2] * out.shape[3]
    tolerances.assert_close(out, ref_out, scale_out, dtype=dtype, terms=9, factor=factor,
                            label=f"forward {label}")
    tolerances.assert_close(grad_input, ref_gi, scale_gi, dtype=dtype, terms=9, factor=factor,
                            label=f"grad_input {label}")
    tolerances.assert_close(grad_weight, ref_gw, scale_gw, dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_weight {label}")
    tolerances.assert_close(grad_bias, ref_gb, scale_gb, dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_bias {label}")


def grid_expected(case, x, weight, bias, grad):
    _, c, _, _, stride, padding, dilation = case
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    return (
        (reference.forward(x, weight, bias, **options),
         reference.abs_forward(x, weight, bias, **options)),
        (reference.backward_input(grad, x.shape, weight, **options),
         reference.abs_backward_input(grad, x.shape, weight, **options)),
        (reference.backward_weight(grad, x, weight.shape, **options),
         reference.abs_backward_weight(grad, x, weight.shape, **options)),
        (reference.backward_bias(grad), reference.backward_bias(np.abs(grad))),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("index", range(len(GRID)), ids=lambda i: grid_id(GRID[i]))
def test_kernel_grid_matches_reference(index, dtype):
    case = GRID[index]
    seed = 1000 + index
    x, weight, bias, grad = grid_arrays(case, dtype, seed)
    expected = grid_expected(case, x, weight, bias, grad)
    for algorithm in ("direct", "auto", "gemm", "reference"):
        for threads in (1, 3):
            results = run_kernels(case, x, weight, bias, grad, algorithm, threads)
            check_grid_results(case, results, expected, dtype, algorithm,
                               f"{grid_id(case)} {algorithm} threads={threads} seed={seed}")


@pytest.mark.skipif(_lib.simd_level() != "avx512",
                    reason="the other kernels sum per-thread partial gradients")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("stride", (1, 2))
def test_weight_gradient_same_for_every_thread_count(stride, dtype):
    # Tasks of the depthwise weight gradient are blocks of channels, so each sum has one
    # order; 70 channels make three blocks. The bias gradient sums per-thread partials.
    case = (3, 70, 14, 14, stride, 1, 1)
    x, weight, bias, grad = grid_arrays(case, dtype, seed=7)
    first = run_kernels(case, x, weight, bias, grad, "direct", 1)
    for threads in (2, 3):
        other = run_kernels(case, x, weight, bias, grad, "direct", threads)
        assert np.array_equal(first[2], other[2]), f"grad_weight threads={threads}"


@pytest.mark.parametrize("column, tap", [(-1, 0), (0, 2)], ids=("last", "first"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", [(1, 2, 9, 20, 1, 1, 1), (1, 2, 9, 70, 1, 1, 1),
                                  (1, 2, 9, 21, 2, 1, 1), (1, 2, 10, 40, 2, 1, 1)],
                         ids=grid_id)
def test_infinity_across_row_end_stays_out(case, dtype, column, tap):
    # The flat kernels load vectors that run across row ends, and the strided ones load whole
    # vectors of columns, then mask lanes. At pad 1, only column taps 1 and 2 read the last
    # input column, and only taps 0 and 1 read the first. So with infinities in one of them,
    # the outputs that do not read them and the weight gradient of the other tap stay finite.
    x, weight, bias, grad = grid_arrays(case, dtype, seed=11)
    x[:, :, 1::3, column] = np.inf
    out, _, grad_weight, _ = run_kernels(case, x, weight, bias, grad, "direct", 1)
    _, c, _, _, stride, padding, dilation = case
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    label = f"{grid_id(case)} infinity in column {column}"

    with np.errstate(invalid="ignore"):
        expected = reference.forward(x, weight, bias, **options)
        scale = reference.abs_forward(x, weight, bias, **options)
        expected_gw = reference.backward_weight(grad, x, weight.shape, **options)
        scale_gw = reference.abs_backward_weight(grad, x, weight.shape, **options)
    finite = np.isfinite(expected)
    assert (~finite).any(), f"{label}: the case reads no infinity"
    assert np.array_equal(np.isposinf(out), np.isposinf(expected)), f"forward {label}"
    assert np.array_equal(np.isneginf(out), np.isneginf(expected)), f"forward {label}"
    tolerances.assert_close(np.where(finite, out, 0), np.where(finite, expected, 0),
                            np.where(finite, scale, 0), dtype=dtype, terms=9,
                            factor=tolerances.ALGORITHM_FACTOR["direct"], label=f"forward {label}")
    terms = grad.shape[0] * grad.shape[2] * grad.shape[3]
    tolerances.assert_close(grad_weight[..., tap], expected_gw[..., tap], scale_gw[..., tap],
                            dtype=dtype, terms=terms, factor=tolerances.ALGORITHM_FACTOR["direct"],
                            label=f"grad_weight tap {tap} {label}")


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", [(2, 8, 112, 112, 1, 1, 1), (1, 8, 112, 112, 2, 1, 1),
                                  (2, 16, 56, 56, 1, 1, 1), (2, 32, 28, 28, 1, 1, 1),
                                  (2, 64, 14, 14, 1, 1, 1), (2, 8, 29, 29, 2, 1, 1)],
                         ids=grid_id)
def test_mobilenet_shapes_match_torch(case, dtype):
    import torch

    n, c, h, w, stride, padding, dilation = case
    x, weight, bias, grad = grid_arrays(case, dtype, seed=21)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    out = pyconvmpi.conv2d(x, weight, bias, **options)
    grads = pyconvmpi.conv2d_backward(grad, x, weight, **options)

    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(weight).requires_grad_()
    bt = torch.from_numpy(bias).requires_grad_()
    expected = torch.nn.functional.conv2d(xt, wt, bt, **options)
    expected.backward(torch.from_numpy(grad))
    terms = n * grad.shape[2] * grad.shape[3]
    factor = tolerances.ALGORITHM_FACTOR["auto"] + tolerances.TORCH_FACTOR
    pairs = (
        ("forward", out, expected.detach().numpy(),
         reference.abs_forward(x, weight, bias, **options), 9),
        ("grad_input", grads.input, xt.grad.numpy(),
         reference.abs_backward_input(grad, x.shape, weight, **options), 9),
        ("grad_weight", grads.weight, wt.grad.numpy(),
         reference.abs_backward_weight(grad, x, weight.shape, **options), terms),
        ("grad_bias", grads.bias, bt.grad.numpy(), reference.backward_bias(np.abs(grad)), terms),
    )
    for name, ours, theirs, scale, count in pairs:
        tolerances.assert_close(ours, theirs.astype(np.float64), scale, dtype=dtype, terms=count,
                                factor=factor, label=f"{name} {grid_id(case)} against PyTorch")


@pytest.mark.skipif(_lib.simd_level() != "avx512",
                    reason="the depthwise 3x3 kernels run on AVX-512 CPUs only")
def test_auto_direct_for_stride2_gradients():
    desc = grid_desc((2, 64, 112, 112, 2, 1, 1))
    for op in ("backward_data", "backward_weight"):
        assert _lib.choose_algorithm(op, desc, Plan().exec_struct()) == "direct", op


@pytest.mark.parametrize("level", ("avx2", "scalar"))
def test_kernel_grid_under_lower_simd_levels(level):
    """Run the grid in a subprocess capped at a lower SIMD level, where other kernels serve."""
    env = dict(os.environ, PYCONVMPI_SIMD=level)
    probe = subprocess.run([sys.executable, "-c", "from pyconvmpi import _lib; print(_lib.simd_level())"],
                           capture_output=True, text=True, env=env, check=True)
    assert probe.stdout.strip() == level
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "kernel_grid_matches or infinity"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
