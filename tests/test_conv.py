"""Forward parity of conv2d with the float64 reference and with torch.nn.functional.conv2d.

Every case runs with the automatic choice and with each algorithm the library reports as
supported for its shape, in both dtypes. The random grid also cycles through memory layouts.
"""

import numpy as np
import pytest

import pyconvmpi
from pyconvmpi import _lib

import reference
import tolerances
from cases import (
    LAYOUTS,
    Case,
    OPTION_CASES,
    assert_unchanged,
    forced_algorithms,
    in_layout,
    random_case,
    snapshot,
)
from conftest import HAS_TORCH

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

DTYPES = ("float32", "float64")
GRID_SEEDS = range(160)


def _forward_terms(case):
    _, cg, r, s = case.w_shape
    return cg * r * s + (1 if case.bias else 0)


def check_forward(case, seed):
    """Run one case with every algorithm; compare with the reference and with PyTorch."""
    dtype = np.dtype(case.dtype)
    x64, w64, b64 = case.arrays(seed)
    x, w = x64.astype(dtype), w64.astype(dtype)
    b = None if b64 is None else b64.astype(dtype)
    options = case.options
    expected = reference.forward(x, w, b, **options)
    scale = reference.abs_forward(x, w, b, **options)
    terms = _forward_terms(case)

    expected_torch = None
    if HAS_TORCH:
        import torch

        tensors = [None if a is None else torch.from_numpy(a) for a in (x, w, b)]
        expected_torch = torch.nn.functional.conv2d(*tensors, **options).numpy()
        assert expected_torch.dtype == dtype

    args = [in_layout(a, case.layout) if a is not None else None for a in (x, w, b)]
    saved = [snapshot(a) for a in args]
    for algorithm in ["auto", *forced_algorithms(case, "forward")]:
        plan = None if algorithm == "auto" else pyconvmpi.Plan(algorithm=algorithm)
        out = pyconvmpi.conv2d(*args, **options, plan=plan)
        assert type(out) is np.ndarray
        assert out.dtype == dtype
        assert out.flags.c_contiguous
        tolerances.assert_close(out, expected, scale, dtype=dtype, terms=terms,
                                factor=tolerances.ALGORITHM_FACTOR[algorithm],
                                label=f"forward, algorithm {algorithm}")
        if expected_torch is not None:
            factor = tolerances.ALGORITHM_FACTOR[algorithm] + tolerances.TORCH_FACTOR
            tolerances.assert_close(out, expected_torch.astype(np.float64), scale, dtype=dtype,
                                    terms=terms, factor=factor,
                                    label=f"forward against PyTorch, algorithm {algorithm}")
    for name, value, before in zip(("input", "weight", "bias"), args, saved):
        assert_unchanged(value, before, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_forward_option(name, dtype):
    case = OPTION_CASES[name]
    case.dtype = dtype
    check_forward(case, seed=sorted(OPTION_CASES).index(name))


def _grid_params():
    layouts = list(LAYOUTS)
    return [
        pytest.param(random_case(seed, dtype, layouts), seed, id=f"seed={seed}-{dtype}")
        for seed in GRID_SEEDS
        for dtype in DTYPES
    ]


@pytest.mark.parametrize("case, seed", _grid_params())
def test_forward_random_grid(case, seed):
    check_forward(case, seed)


def test_grid_covers_every_option():
    cases = [random_case(seed, "float32", ["contiguous"]) for seed in GRID_SEEDS]
    paddings = {type(c.options["padding"]).__name__ if not isinstance(c.options["padding"], str)
                else c.options["padding"] for c in cases}

    assert paddings == {"int", "tuple", "list", "same", "valid"}
    assert any(c.options["groups"] > 1 and c.w_shape[1] == 1 for c in cases)  # depthwise
    assert any(c.w_shape[0] > c.x_shape[-3] for c in cases)  # channel multiplier
    assert any(not c.batched for c in cases)
    assert any(c.batched and c.x_shape[0] == 0 for c in cases)
    assert any(c.options["stride"] not in (1, (1, 1)) for c in cases)
    assert any(c.options["dilation"] not in (1, (1, 1)) for c in cases)
    assert any(isinstance(c.options["stride"], tuple) for c in cases)
    assert any(not c.bias for c in cases)


def test_result_dtype_follows_input():
    x = np.ones((1, 1, 4, 4), np.float64)
    w = np.ones((1, 1, 2, 2), np.float64)

    assert pyconvmpi.conv2d(x, w).dtype == np.float64
    assert pyconvmpi.conv2d(x.astype(np.float32), w.astype(np.float32)).dtype == np.float32


def test_unbatched_result_is_3d():
    x = np.ones((2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)

    out = pyconvmpi.conv2d(x, w, padding=1)

    assert out.shape == (3, 5, 5)
    assert out[0, 2, 2] == 18.0
    assert out[0, 0, 0] == 8.0


def test_batch_zero_gives_empty_result():
    out = pyconvmpi.conv2d(np.ones((0, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32))

    assert out.shape == (0, 3, 3, 3)
    assert out.dtype == np.float32


def test_same_padding_even_kernel_puts_extra_row_below():
    # With a 2x2 kernel the total padding is 1; PyTorch adds it below and to the right, so the
    # first output reads only the image's first 2x2 block and the last one reads zeros.
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.ones((1, 1, 2, 2), np.float64)

    out = pyconvmpi.conv2d(x, w, padding="same")

    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 0, 0] == 0 + 1 + 3 + 4
    assert out[0, 0, 2, 2] == 8


def test_kernel_as_large_as_padded_input():
    x = np.ones((1, 1, 3, 4), np.float64)
    w = np.ones((1, 1, 5, 6), np.float64)

    out = pyconvmpi.conv2d(x, w, padding=1)

    assert out.shape == (1, 1, 1, 1)
    assert out[0, 0, 0, 0] == 12


@pytest.mark.parametrize("algorithm", [a for a in _lib.ALGORITHMS if a != "auto"])
def test_unsupported_algorithm_raises(algorithm):
    case = OPTION_CASES["base"]
    if algorithm in forced_algorithms(case, "forward"):
        pytest.skip(f"{algorithm} computes this shape, so there is no rejection to test")
    x = np.ones(case.x_shape, np.float32)
    w = np.ones(case.w_shape, np.float32)

    with pytest.raises(pyconvmpi.UnsupportedError, match="conv2d"):
        pyconvmpi.conv2d(x, w, plan=pyconvmpi.Plan(algorithm=algorithm))


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_count_does_not_change_result(threads):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 6, 11, 9))
    w = rng.standard_normal((8, 3, 3, 3))
    options = dict(stride=(2, 1), padding=1, groups=2)
    expected = pyconvmpi.conv2d(x, w, **options, plan=pyconvmpi.Plan(threads=1))

    case = Case(x.shape, w.shape, options)
    for algorithm in ["auto", *forced_algorithms(case, "forward")]:
        plan = pyconvmpi.Plan(threads=threads, algorithm=algorithm)
        out = pyconvmpi.conv2d(x, w, **options, plan=plan)
        np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("algorithm", ["auto", "gemm", "direct"])
@pytest.mark.parametrize("channels, kernel", [(2048, 3), (4096, 1)])
def test_long_sums_match_pytorch_error(algorithm, channels, kernel):
    # Weights scaled by 1/sqrt(terms) keep the outputs near 1, so the error is the rounding
    # of a long sum. Summing all 18432 terms in one register chain gives about 12 times
    # PyTorch's error, which is why the tiles sum in blocks.
    import torch

    rng = np.random.default_rng(11)
    terms = channels * kernel * kernel
    x = rng.standard_normal((2, channels, 6, 6)).astype(np.float32)
    w = (rng.standard_normal((24, channels, kernel, kernel)) / np.sqrt(terms)).astype(np.float32)
    pad = kernel // 2
    exact = reference.forward(x.astype(np.float64), w.astype(np.float64), padding=pad)
    theirs = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=pad)
    ours = pyconvmpi.conv2d(x, w, padding=pad, plan=pyconvmpi.Plan(algorithm=algorithm))

    torch_error = np.abs(theirs.numpy() - exact).max()
    floor = tolerances.eps(np.float32) * np.abs(exact).max()
    assert np.abs(ours - exact).max() <= 2.5 * torch_error + floor
    torch.testing.assert_close(torch.from_numpy(ours), theirs)
