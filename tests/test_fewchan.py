"""Few-channel layers (1-4 input channels per group) against the float64 reference and PyTorch.

The few-channel kernels (conv2d_fewchan.c) run under the DIRECT algorithm for layers with
horizontal stride 1 and up to 8 (forward) or 16 (weight gradient) output channels per group;
other few-channel layers run the register-tiled direct kernels. The forward kernel computes
tiles of output channels x output rows x vectors of output columns over staged input rows.
The cases therefore put output widths on both sides of 4, 8 and 16 lanes and heights below and
above its 8-row blocks, and some images are wide or tall enough to need several staging steps.
The
weight-gradient kernel masks the columns outside the image and past the row's end, so the same
widths test its masks. Forward outputs start as NaN, so an element a kernel leaves unwritten fails.
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

# (n, c, h, w, k, r, s, stride, padding, dilation, groups)
CASES = [
    (2, 3, 17, 33, 3, 3, 3, 1, 1, 1, 1),
    (3, 1, 32, 32, 1, 3, 3, 1, 1, 1, 1),
    (1, 1, 9, 7, 2, 3, 3, 1, 1, 1, 1),
    (1, 2, 5, 8, 4, 3, 3, 1, 1, 1, 1),
    (1, 4, 11, 9, 5, 3, 3, 1, 1, 1, 1),
    (1, 3, 6, 15, 6, 3, 3, 1, 1, 1, 1),
    (1, 3, 19, 16, 7, 3, 3, 1, 1, 1, 1),
    (1, 2, 10, 17, 8, 3, 3, 1, 1, 1, 1),
    (1, 1, 13, 31, 16, 3, 3, 1, 1, 1, 1),
    (1, 3, 12, 47, 12, 3, 3, 1, 1, 1, 1),
    (1, 2, 4, 48, 3, 3, 3, 1, 0, 1, 1),
    (1, 1, 3, 49, 1, 3, 3, 1, 2, 1, 1),
    (1, 3, 70, 200, 3, 3, 3, 1, 1, 1, 1),
    (1, 3, 9, 1030, 3, 3, 3, 1, 1, 1, 1),
    (1, 3, 20, 112, 3, 3, 3, 1, 1, 1, 1),
    (1, 1, 1, 1, 3, 3, 3, 1, 1, 1, 1),
    (2, 2, 9, 40, 5, 3, 5, 1, "same", 1, 1),
    (1, 3, 12, 21, 2, 4, 4, 1, "same", 1, 1),
    (1, 3, 15, 18, 7, 5, 3, 1, 2, 2, 1),
    (1, 1, 21, 23, 3, 3, 3, 1, "same", (2, 3), 1),
    (1, 4, 20, 21, 16, 3, 3, (2, 1), 1, 1, 1),
    (1, 2, 23, 19, 4, 3, 3, (3, 1), (0, 1), 1, 1),
    (1, 4, 20, 21, 8, 3, 3, 2, 1, 1, 1),
    (1, 3, 5, 70, 9, 1, 1, 1, 0, 1, 1),
    (1, 3, 31, 17, 6, 7, 7, 1, 3, 1, 1),
    (1, 1, 8, 8, 4, 3, 3, 1, 0, 1, 1),
    (2, 4, 11, 19, 6, 3, 3, 1, 1, 1, 2),
    (1, 6, 9, 25, 9, 3, 3, 1, 1, 1, 3),
    (1, 8, 10, 18, 32, 3, 3, 1, 1, 1, 2),
    (1, 3, 13, 34, 20, 3, 3, 1, 1, 1, 1),
    (0, 3, 9, 9, 3, 3, 3, 1, 1, 1, 1),
]


def case_id(case):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    return f"{n}x{c}x{h}x{w}:{k}x{r}x{s}:s{stride}:p{padding}:d{dilation}:g{groups}"


def options(case):
    _, _, _, _, _, _, _, stride, padding, dilation, groups = case
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def arrays(case, dtype, seed):
    n, c, h, w, k, r, s, _, _, _, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    bias = rng.standard_normal((k,)).astype(dtype)
    return x, weight, bias


def geometry(case):
    n, c, h, w, k, r, s = case[:7]
    return reference.Geometry((n, c, h, w), (k, c // case[10], r, s), **options(case))


def desc_for(case):
    geo = geometry(case)
    top, bottom, left, right = geo.pad
    return _lib.ConvDesc(geo.n, geo.c, geo.h, geo.w, geo.k, geo.r, geo.s, geo.out_h, geo.out_w,
                         geo.stride[0], geo.stride[1], top, left, bottom, right,
                         geo.dilation[0], geo.dilation[1], geo.groups)


def check_forward(case, dtype, algorithm, threads, seed):
    x, weight, bias = arrays(case, dtype, seed)
    expected = reference.forward(x, weight, bias, **options(case))
    scale = reference.abs_forward(x, weight, bias, **options(case))
    out = np.full(expected.shape, np.nan, dtype=dtype)
    exec_ = Plan(algorithm=algorithm, threads=threads).exec_struct()
    _lib.conv2d_forward(desc_for(case), exec_, x, weight, bias, out)
    terms = weight.shape[1] * weight.shape[2] * weight.shape[3]
    tolerances.assert_close(out, expected, scale, dtype=dtype, terms=terms,
                            factor=tolerances.ALGORITHM_FACTOR[algorithm],
                            label=f"forward {case_id(case)} {algorithm} threads={threads} "
                                  f"seed={seed}")


def check_backward(case, dtype, algorithm, threads, seed):
    x, weight, _ = arrays(case, dtype, seed)
    geo = geometry(case)
    rng = np.random.default_rng(seed + 1)
    grad = rng.standard_normal((geo.n, geo.k, geo.out_h, geo.out_w)).astype(dtype)
    exec_ = Plan(algorithm=algorithm, threads=threads).exec_struct()
    factor = tolerances.ALGORITHM_FACTOR[algorithm]
    label = f"{case_id(case)} {algorithm} threads={threads} seed={seed}"

    grad_input = np.full(x.shape, np.nan, dtype=dtype)
    _lib.conv2d_backward_data(desc_for(case), exec_, grad, weight, grad_input)
    expected = reference.backward_input(grad, x.shape, weight, **options(case))
    scale = reference.abs_backward_input(grad, x.shape, weight, **options(case))
    terms = (geo.k // geo.groups) * geo.r * geo.s
    tolerances.assert_close(grad_input, expected, scale, dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_input {label}")

    grad_weight = np.full(weight.shape, np.nan, dtype=dtype)
    grad_bias = np.full((geo.k,), np.nan, dtype=dtype)
    _lib.conv2d_backward_weight(desc_for(case), exec_, grad, x, grad_weight, grad_bias)
    terms = geo.n * geo.out_h * geo.out_w
    expected = reference.backward_weight(grad, x, weight.shape, **options(case))
    scale = reference.abs_backward_weight(grad, x, weight.shape, **options(case))
    tolerances.assert_close(grad_weight, expected, scale, dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_weight {label}")
    tolerances.assert_close(grad_bias, reference.backward_bias(grad),
                            reference.backward_bias(np.abs(grad)), dtype=dtype, terms=terms,
                            factor=factor, label=f"grad_bias {label}")


@pytest.mark.parametrize("algorithm", ("direct", "auto"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: case_id(CASES[i]))
def test_forward_matches_reference(index, dtype, algorithm):
    check_forward(CASES[index], dtype, algorithm, threads=1, seed=index)


@pytest.mark.parametrize("algorithm", ("direct", "auto"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: case_id(CASES[i]))
def test_backward_matches_reference(index, dtype, algorithm):
    check_backward(CASES[index], dtype, algorithm, threads=1, seed=300 + index)


@pytest.mark.parametrize("threads", (2, 3))
def test_thread_counts_match_reference(threads):
    # Bands of rows split between threads, and per-thread weight-gradient sums added up.
    for index in (0, 1, 12, 13, 20, 26):
        check_forward(CASES[index], np.float32, "direct", threads, seed=600 + index)
        check_backward(CASES[index], np.float64, "direct", threads, seed=700 + index)


def test_batch_of_one_image_many_threads_matches_reference():
    case = (1, 3, 64, 40, 3, 3, 3, 1, 1, 1, 1)
    check_forward(case, np.float32, "direct", threads=4, seed=5)
    check_backward(case, np.float32, "direct", threads=4, seed=6)


def test_infinite_input_outside_every_window_stays_unread():
    # With stride 2, rows 9 and 10 of an 11-row image lie in no window. Columns from 40 on lie
    # in no window when the output is cut to 38 columns. An inf there must not turn a zero
    # product into NaN in the output or in the weight gradient.
    n, c, h, w, k = 1, 2, 11, 44, 3
    desc = _lib.ConvDesc(n, c, h, w, k, 3, 3, 4, 38, 2, 1, 0, 0, 0, 0, 1, 1, 1)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    x[:, :, 9:, :] = np.inf
    x[:, :, :, 40:] = np.inf
    grad = rng.standard_normal((n, k, 4, 38)).astype(np.float32)
    exec_ = Plan(algorithm="direct", threads=1).exec_struct()
    out = np.full((n, k, 4, 38), np.nan, dtype=np.float32)
    _lib.conv2d_forward(desc, exec_, x, weight, None, out)
    assert np.isfinite(out).all()
    grad_weight = np.full(weight.shape, np.nan, dtype=np.float32)
    _lib.conv2d_backward_weight(desc, exec_, grad, x, grad_weight, None)
    assert np.isfinite(grad_weight).all()
    expected = reference.backward_weight(grad.astype(np.float64),
                                         x[:, :, :9, :40].astype(np.float64), weight.shape,
                                         stride=(2, 1))
    scale = reference.abs_backward_weight(grad, x[:, :, :9, :40], weight.shape, stride=(2, 1))
    tolerances.assert_close(grad_weight, expected, scale, dtype=np.float32, terms=4 * 38,
                            factor=tolerances.ALGORITHM_FACTOR["direct"],
                            label="grad_weight with inf outside the windows")


def test_auto_picks_direct_for_few_channel_weight_gradients():
    exec_ = Plan().exec_struct()
    for case in (CASES[0], CASES[1], CASES[8], CASES[26], CASES[28]):
        assert _lib.choose_algorithm("backward_weight", desc_for(case), exec_) == "direct", (
            case_id(case))
    # 20 output channels per group, or 8 input channels per group: GEMM as before.
    for case in (CASES[29], (1, 8, 9, 9, 4, 3, 3, 1, 1, 1, 1)):
        assert _lib.choose_algorithm("backward_weight", desc_for(case), exec_) == "gemm", (
            case_id(case))


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("index", (0, 1, 9, 16, 19, 21, 26),
                         ids=lambda i: case_id(CASES[i]))
def test_public_api_matches_torch(index, dtype):
    import torch

    case = CASES[index]
    x, weight, bias = arrays(case, dtype, seed=900 + index)
    geo = geometry(case)
    grad = np.random.default_rng(950 + index).standard_normal(
        (geo.n, geo.k, geo.out_h, geo.out_w)).astype(dtype)
    opts = options(case)
    out = pyconvmpi.conv2d(x, weight, bias, **opts)
    grads = pyconvmpi.conv2d_backward(grad, x, weight, **opts)

    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(weight).requires_grad_()
    tb = torch.from_numpy(bias).requires_grad_()
    expected = torch.nn.functional.conv2d(tx, tw, tb, **opts)
    expected.backward(torch.from_numpy(grad))
    label = f"{case_id(case)} seed={900 + index}"
    factor = tolerances.TORCH_FACTOR + tolerances.ALGORITHM_FACTOR["auto"]
    terms_forward = geo.cg * geo.r * geo.s
    terms_weight = geo.n * geo.out_h * geo.out_w
    pairs = [
        (out, expected.detach().numpy(), reference.abs_forward(x, weight, bias, **opts),
         terms_forward, "forward"),
        (grads.input, tx.grad.numpy(),
         reference.abs_backward_input(grad, x.shape, weight, **opts),
         (geo.k // geo.groups) * geo.r * geo.s, "grad_input"),
        (grads.weight, tw.grad.numpy(),
         reference.abs_backward_weight(grad, x, weight.shape, **opts), terms_weight,
         "grad_weight"),
        (grads.bias, tb.grad.numpy(), reference.backward_bias(np.abs(grad)), terms_weight,
         "grad_bias"),
    ]
    for result, theirs, scale, terms, name in pairs:
        tolerances.assert_close(result, theirs.astype(np.float64), scale, dtype=dtype,
                                terms=terms, factor=factor, label=f"{name} vs torch {label}")


@pytest.mark.parametrize("level", ("avx2", "scalar"))
def test_lower_simd_levels_match_reference(level):
    """Run this module's reference checks in a subprocess capped at a lower SIMD level."""
    env = dict(os.environ, PYCONVMPI_SIMD=level, OMP_NUM_THREADS="2")
    probe = subprocess.run(
        [sys.executable, "-c", "from pyconvmpi import _lib; print(_lib.simd_level())"],
        capture_output=True, text=True, env=env, check=True)
    if probe.stdout.strip() != level:
        pytest.skip(f"this CPU does not support {level}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(Path(__file__)), "-k", "matches_reference and direct or thread_counts"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
