"""Local kernels: every algorithm forced on every shape it accepts, against a float64 reference.

The C entry points are called through ``_lib`` with hand-made geometries, so that cases the
Python API never produces (negative or asymmetric pads, output sizes below the maximum) are
covered too. Outputs start as NaN, so an element a kernel leaves unwritten fails.
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

# Maximum error relative to max(1, max |reference|). float32 kernels accumulate in float32
# over up to a few thousand products (error about sqrt(length) * 2^-24 * magnitude), float64
# kernels in float64; the reference algorithm accumulates in float64 for both.
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}
ALGORITHMS = ("direct", "gemm", "auto", "reference")
DTYPES = (np.float32, np.float64)


class Case:
    """One geometry: input (n, c, h, w), weight (k, c / groups, r, s) and the options."""

    def __init__(self, n, c, h, w, k, r, s, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1),
                 groups=1, out=None):
        self.n, self.c, self.h, self.w, self.k, self.r, self.s = n, c, h, w, k, r, s
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.pad_top, self.pad_left, self.pad_bottom, self.pad_right = pad
        full_h = (h + self.pad_top + self.pad_bottom - dilation[0] * (r - 1) - 1) // stride[0] + 1
        full_w = (w + self.pad_left + self.pad_right - dilation[1] * (s - 1) - 1) // stride[1] + 1
        self.out_h, self.out_w = out if out is not None else (full_h, full_w)

    def __repr__(self):
        return (f"{self.n}x{self.c}x{self.h}x{self.w}:{self.k}x{self.r}x{self.s}"
                f":s{self.stride}:p{(self.pad_top, self.pad_left, self.pad_bottom, self.pad_right)}"
                f":d{self.dilation}:g{self.groups}:o{(self.out_h, self.out_w)}")

    def desc(self):
        return _lib.ConvDesc(
            self.n, self.c, self.h, self.w, self.k, self.r, self.s, self.out_h, self.out_w,
            self.stride[0], self.stride[1], self.pad_top, self.pad_left, self.pad_bottom,
            self.pad_right, self.dilation[0], self.dilation[1], self.groups,
        )

    def arrays(self, dtype, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.c, self.h, self.w)).astype(dtype)
        w = rng.standard_normal((self.k, self.c // self.groups, self.r, self.s)).astype(dtype)
        b = rng.standard_normal((self.k,)).astype(dtype)
        g = rng.standard_normal((self.n, self.k, self.out_h, self.out_w)).astype(dtype)
        return x, w, b, g


CASES = [
    Case(2, 3, 9, 13, 4, 3, 3, pad=(1, 1, 1, 1)),
    Case(2, 8, 17, 19, 16, 3, 3, pad=(1, 1, 1, 1)),
    Case(1, 16, 7, 7, 32, 1, 1),
    Case(2, 12, 5, 37, 24, 1, 1),
    Case(1, 6, 20, 21, 6, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), groups=3),
    Case(2, 4, 11, 37, 4, 3, 3, pad=(1, 1, 1, 1), groups=4),
    Case(1, 4, 12, 15, 8, 3, 3, pad=(1, 1, 1, 1), groups=4),
    Case(2, 3, 13, 21, 3, 3, 3, stride=(2, 1), pad=(2, -1, 0, 3), dilation=(1, 2), groups=3),
    Case(3, 5, 6, 40, 5, 3, 3, pad=(1, 1, 1, 1), groups=5),
    Case(1, 5, 12, 33, 7, 3, 5, pad=(2, 0, 2, 0), dilation=(1, 2)),
    Case(1, 3, 30, 30, 5, 7, 7, stride=(2, 2), pad=(3, 3, 3, 3)),
    Case(1, 2, 19, 23, 3, 3, 3, stride=(1, 3), pad=(0, 2, 1, 0)),
    Case(1, 2, 19, 23, 3, 3, 3, stride=(3, 1), pad=(2, 0, 0, 1), dilation=(2, 1)),
    Case(3, 2, 1, 1, 3, 3, 3, pad=(1, 1, 1, 1)),
    Case(2, 3, 1, 1, 5, 1, 1),
    Case(0, 2, 5, 5, 3, 3, 3, pad=(1, 1, 1, 1)),
    Case(1, 40, 9, 70, 30, 3, 3, pad=(1, 1, 1, 1)),
    Case(1, 2, 8, 8, 3, 4, 4, pad=(1, 1, 2, 2)),
    Case(2, 1, 33, 47, 1, 3, 3, pad=(1, 1, 1, 1)),
    Case(1, 1, 6, 6, 2, 8, 8, pad=(1, 1, 1, 1)),
    Case(1, 3, 10, 17, 4, 3, 3, pad=(-2, -3, 0, 0)),
    Case(1, 3, 10, 17, 4, 3, 3, pad=(2, 1, 0, 0), out=(5, 9)),
    Case(1, 2, 6, 40, 3, 1, 35, pad=(0, 0, 0, 0)),
    Case(2, 64, 6, 6, 48, 3, 3, pad=(1, 1, 1, 1)),
    Case(2, 6, 9, 9, 0, 3, 3, pad=(1, 1, 1, 1)),
    Case(2, 0, 9, 9, 4, 3, 3, pad=(1, 1, 1, 1)),
]


def taps(case, i, j):
    """Return input rows and columns tap (i, j) reads, and whether each lies in the image."""
    iy = np.arange(case.out_h) * case.stride[0] - case.pad_top + i * case.dilation[0]
    ix = np.arange(case.out_w) * case.stride[1] - case.pad_left + j * case.dilation[1]
    return iy, ix, (iy >= 0) & (iy < case.h), (ix >= 0) & (ix < case.w)


def reference(case, x, w, b, g):
    """Return the forward output and the weight and bias gradients in float64."""
    x, w, g = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    cg, kg = case.c // case.groups, case.k // case.groups
    y = np.zeros((case.n, case.k, case.out_h, case.out_w)) + b.astype(np.float64)[:, None, None]
    gw = np.zeros_like(w)
    for i in range(case.r):
        for j in range(case.s):
            iy, ix, my, mx = taps(case, i, j)
            patch = np.zeros((case.n, case.c, case.out_h, case.out_w))
            inside = x[:, :, iy[my][:, None], ix[mx][None, :]]
            patch[:, :, my[:, None] & mx[None, :]] = inside.reshape(case.n, case.c, -1 if case.n * case.c else int(my.sum() * mx.sum()))
            for grp in range(case.groups):
                ks, cs = slice(grp * kg, (grp + 1) * kg), slice(grp * cg, (grp + 1) * cg)
                wt = w[ks, :, i, j]
                y[:, ks] += np.einsum("nchw,kc->nkhw", patch[:, cs], wt)
                gw[ks, :, i, j] += np.einsum("nkhw,nchw->kc", g[:, ks], patch[:, cs])
    return y, gw, g.sum(axis=(0, 2, 3))


def reference_grad_input(case, w, g):
    """Return the input gradient in float64: each tap adds its products at the input
    positions it read (one tap never reads a position twice)."""
    w, g = w.astype(np.float64), g.astype(np.float64)
    cg, kg = case.c // case.groups, case.k // case.groups
    gx = np.zeros((case.n, case.c, case.h, case.w))
    for i in range(case.r):
        for j in range(case.s):
            iy, ix, my, mx = taps(case, i, j)
            if not my.any() or not mx.any():
                continue
            for grp in range(case.groups):
                ks = slice(grp * kg, (grp + 1) * kg)
                contrib = np.einsum("nkhw,kc->nchw", g[:, ks], w[ks, :, i, j])[:, :, my][:, :, :, mx]
                rows, cols = iy[my], ix[mx]
                for ci in range(cg):
                    view = gx[:, grp * cg + ci]
                    view[:, rows[:, None], cols[None, :]] += contrib[:, ci]
    return gx


def run(case, algorithm, dtype, seed, exec_fields=None, threads=0):
    """Return the three kernels' results for ``case`` with NaN-filled outputs."""
    x, w, b, g = case.arrays(dtype, seed)
    fields = dict(algorithm=algorithm, threads=threads)
    fields.update(exec_fields or {})
    exec_ = Plan(**fields).exec_struct()
    desc = case.desc()
    y = np.full((case.n, case.k, case.out_h, case.out_w), np.nan, dtype=dtype)
    gx = np.full(x.shape, np.nan, dtype=dtype)
    gw = np.full(w.shape, np.nan, dtype=dtype)
    gb = np.full(b.shape, np.nan, dtype=dtype)
    _lib.conv2d_forward(desc, exec_, x, w, b, y)
    _lib.conv2d_backward_data(desc, exec_, g, w, gx)
    _lib.conv2d_backward_weight(desc, exec_, g, x, gw, gb)
    return (x, w, b, g), (y, gx, gw, gb)


def assert_close(name, result, expected, dtype, context):
    assert result.shape == expected.shape, f"{name} shape {result.shape} != {expected.shape}: {context}"
    assert not np.isnan(result).any(), f"{name} has unwritten (NaN) elements: {context}"
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    error = float(np.abs(result - expected).max()) / scale if expected.size else 0.0
    assert error <= TOLERANCE[dtype], f"{name} error {error:.3g} > {TOLERANCE[dtype]:.1g}: {context}"


_EXPECTED = {}


def expected_results(case, dtype, seed):
    """Return the reference results for a case's seeded arrays, computed once per process."""
    key = (repr(case), np.dtype(dtype).name, seed)
    if key not in _EXPECTED:
        x, w, b, g = case.arrays(dtype, seed)
        ry, rgw, rgb = reference(case, x, w, b, g)
        _EXPECTED[key] = (ry, reference_grad_input(case, w, g), rgw, rgb)
    return _EXPECTED[key]


def check_case(case, algorithm, dtype, seed, exec_fields=None, threads=0):
    context = f"{case!r} algorithm={algorithm} dtype={np.dtype(dtype).name} seed={seed} " \
              f"exec={exec_fields} threads={threads}"
    _, (y, gx, gw, gb) = run(case, algorithm, dtype, seed, exec_fields, threads)
    ry, rgx, rgw, rgb = expected_results(case, dtype, seed)
    assert_close("forward", y, ry, dtype, context)
    assert_close("grad_input", gx, rgx, dtype, context)
    assert_close("grad_weight", gw, rgw, dtype, context)
    assert_close("grad_bias", gb, rgb, dtype, context)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: repr(CASES[i]))
def test_forced_algorithm_matches_reference(index, algorithm, dtype):
    case = CASES[index]
    for op in ("forward", "backward_data", "backward_weight"):
        assert _lib.algorithm_supported(algorithm, op, case.desc()), f"{algorithm} {op} {case!r}"
    check_case(case, algorithm, dtype, seed=index)


TILE_CASES = [
    Case(2, 9, 11, 37, 29, 3, 3, pad=(1, 1, 1, 1)),
    Case(1, 7, 6, 45, 13, 1, 1),
    Case(1, 5, 13, 21, 11, 3, 3, stride=(2, 2), pad=(1, 0, 1, 0)),
]
BLOCK_K = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 100)
BLOCK_W = (0, 1, 8, 16, 32, 48, 64, 96, 128, 1000)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ("direct", "gemm"))
@pytest.mark.parametrize("index", range(len(TILE_CASES)))
def test_every_tile_size_matches_reference(index, algorithm, dtype):
    case = TILE_CASES[index]
    for block_k in BLOCK_K:
        for block_w in BLOCK_W:
            fields = dict(block_k=block_k, block_w=block_w, block_c=1 + (block_k % 4))
            check_case(case, algorithm, dtype, seed=100 + index, exec_fields=fields)


@pytest.mark.parametrize("threads", (1, 2, 3, 5))
@pytest.mark.parametrize("algorithm", ("direct", "gemm"))
def test_thread_counts_match_reference(algorithm, threads):
    for index, case in enumerate(CASES[:8]):
        check_case(case, algorithm, np.float32, seed=200 + index, threads=threads)


def test_block_c_larger_than_channels_matches_reference():
    check_case(CASES[1], "gemm", np.float64, seed=3, exec_fields=dict(block_c=1000))
    check_case(CASES[1], "direct", np.float64, seed=3, exec_fields=dict(block_c=1000))


# The float64 weight gradient runs a GEMM over tiles of 256 output pixels of the whole batch
# (a tile may span images) and channel blocks of at most 256 im2col rows. These cases cross
# both limits: several tiles with image boundaries inside them, 1x1 layers whose input is
# transposed image by image, more than one channel block, groups, strides and dilation.
PIXEL_TILE_CASES = [
    Case(3, 5, 13, 17, 11, 3, 3, pad=(1, 1, 1, 1)),
    Case(4, 6, 9, 15, 13, 1, 1),
    Case(3, 300, 5, 7, 9, 1, 1),
    Case(2, 40, 12, 12, 20, 3, 3, pad=(1, 1, 1, 1), groups=2),
    Case(2, 30, 11, 13, 17, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1)),
    Case(1, 9, 20, 30, 26, 3, 5, stride=(1, 2), pad=(2, 1, 0, 3), dilation=(2, 1)),
    Case(2, 3, 40, 40, 19, 7, 7, stride=(2, 2), pad=(3, 3, 3, 3)),
    # At least 32 output channels per group and a spatial kernel on small planes: float32
    # runs these on the pixel GEMM too.
    Case(3, 5, 13, 17, 37, 3, 3, pad=(1, 1, 1, 1)),
    Case(2, 12, 10, 10, 66, 3, 3, pad=(1, 1, 1, 1), groups=2),
]
PIXEL_TILE_EXECS = (None, dict(block_c=7), dict(block_k=8, block_w=16), dict(block_k=24),
                    dict(block_k=3, block_w=8))


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("index", range(len(PIXEL_TILE_CASES)),
                         ids=lambda i: repr(PIXEL_TILE_CASES[i]))
def test_float64_pixel_tiles_match_reference(index, threads):
    case = PIXEL_TILE_CASES[index]
    for fields in PIXEL_TILE_EXECS:
        check_case(case, "gemm", np.float64, seed=300 + index, exec_fields=fields,
                   threads=threads)


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("index", range(len(PIXEL_TILE_CASES)),
                         ids=lambda i: repr(PIXEL_TILE_CASES[i]))
def test_float32_pixel_tile_cases_match_reference(index, threads):
    # The same geometries in float32: the dot tiles, or the pixel GEMM with float32 tile sums
    # added to float64 copies for the last two cases.
    for fields in PIXEL_TILE_EXECS:
        check_case(PIXEL_TILE_CASES[index], "gemm", np.float32, seed=300 + index,
                   exec_fields=fields, threads=threads)


@pytest.mark.slow
@pytest.mark.parametrize("level", ("avx2", "scalar"))
def test_lower_simd_levels_match_reference(level):
    """Run this module's forced-algorithm grid in a subprocess capped at a lower SIMD level."""
    env = dict(os.environ, PYCONVMPI_SIMD=level)
    probe = subprocess.run([sys.executable, "-c", "from pyconvmpi import _lib; print(_lib.simd_level())"],
                           capture_output=True, text=True, env=env, check=True)
    assert probe.stdout.strip() == level
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "forced_algorithm or every_tile_size or pixel_tile"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_winograd_reported_unsupported():
    # Winograd computes forward and backward data of 3x3 stride-1 layers only.
    assert _lib.algorithm_supported("winograd", "forward", CASES[1].desc())
    assert not _lib.algorithm_supported("winograd", "backward_weight", CASES[1].desc())
    desc = CASES[4].desc()  # stride 2
    assert not _lib.algorithm_supported("winograd", "forward", desc)
    exec_ = Plan(algorithm="winograd").exec_struct()
    with pytest.raises(pyconvmpi.UnsupportedError):
        _lib.conv2d_forward(desc, exec_, *([np.zeros(1, np.float32)] * 3), np.zeros(1, np.float32))


def test_choose_algorithm_never_returns_auto():
    exec_ = Plan().exec_struct()
    for case in CASES:
        for op in ("forward", "backward_data", "backward_weight"):
            assert _lib.choose_algorithm(op, case.desc(), exec_) in ("direct", "gemm")


def test_choose_algorithm_few_channels_uses_direct():
    exec_ = Plan().exec_struct()
    assert _lib.choose_algorithm("forward", Case(4, 1, 32, 32, 1, 3, 3, pad=(1, 1, 1, 1)).desc(),
                                 exec_) == "direct"
    assert _lib.choose_algorithm("forward", Case(4, 64, 14, 14, 64, 3, 3, pad=(1, 1, 1, 1)).desc(),
                                 exec_) == "gemm"


def test_choose_algorithm_input_gradient_of_first_layers():
    exec_ = Plan().exec_struct()
    mnist_first = Case(64, 1, 28, 28, 32, 3, 3)
    rgb_small = Case(16, 3, 32, 32, 64, 3, 3, pad=(1, 1, 1, 1))
    rgb_large = Case(8, 3, 224, 224, 64, 3, 3, pad=(1, 1, 1, 1))
    rgb_strided = Case(8, 3, 224, 224, 64, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1))
    assert _lib.choose_algorithm("backward_data", mnist_first.desc(), exec_) == "direct"
    assert _lib.choose_algorithm("backward_data", rgb_small.desc(), exec_) == "direct"
    assert _lib.choose_algorithm("backward_data", rgb_large.desc(), exec_) == "gemm"
    assert _lib.choose_algorithm("backward_data", rgb_strided.desc(), exec_) == "gemm"


def test_choose_algorithm_returns_forced_choice():
    exec_ = Plan(algorithm="reference").exec_struct()
    assert _lib.choose_algorithm("forward", CASES[0].desc(), exec_) == "reference"


def test_peak_gflops_is_positive():
    assert _lib.peak_gflops(_lib.FLOAT32, 1, 0.05) > 0
    assert _lib.peak_gflops(_lib.FLOAT64, 1, 0.05) > 0


def test_peak_gflops_rejects_bad_seconds():
    with pytest.raises(ValueError):
        _lib.peak_gflops(_lib.FLOAT32, 1, 0.0)
    with pytest.raises(ValueError):
        _lib.peak_gflops(_lib.FLOAT32, -1, 0.1)


def denormal_survives():
    """Return whether this thread's floating-point state keeps float32 denormals."""
    tiny = np.array([1e-38], dtype=np.float32)
    return bool((tiny * np.float32(1e-3))[0] != 0)


@pytest.mark.parametrize("algorithm", ("direct", "gemm", "reference"))
def test_caller_denormal_state_restored(algorithm):
    before = denormal_survives()
    case = CASES[1]
    x, w, b, _ = case.arrays(np.float32, 7)
    x *= np.float32(1e-39)  # denormal inputs: flushed inside the kernels
    y = np.empty((case.n, case.k, case.out_h, case.out_w), np.float32)
    _lib.conv2d_forward(case.desc(), Plan(algorithm=algorithm, threads=2).exec_struct(), x, w, b, y)
    assert denormal_survives() == before
    np.testing.assert_allclose(y, np.broadcast_to(b[None, :, None, None], y.shape), rtol=0, atol=1e-30)


def test_public_conv2d_forced_algorithms_agree():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 23, 31)).astype(np.float32)
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    results = [pyconvmpi.conv2d(x, w, stride=(1, 2), padding="valid", dilation=2,
                                plan=Plan(algorithm=a)) for a in ALGORITHMS]
    for result in results[1:]:
        np.testing.assert_allclose(result, results[-1], rtol=0, atol=1e-4)
