"""Parity of conv2d_backward's three gradients with the float64 reference and with PyTorch."""

import itertools

import numpy as np
import pytest

import pyconvmpi

import reference
import tolerances
from cases import (
    LAYOUTS,
    OPTION_CASES,
    Case,
    assert_unchanged,
    forced_algorithms,
    in_layout,
    random_case,
    snapshot,
)
from conftest import HAS_TORCH, requires_torch

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

DTYPES = ("float32", "float64")
GRID_SEEDS = range(1000, 1120)
ALL = ("input", "weight", "bias")


def _algorithms_and_needs(case):
    """Return (algorithm, need) pairs: auto with every gradient, then each forced algorithm
    with the gradients whose operation it supports."""
    pairs = [("auto", ALL)]
    data = set(forced_algorithms(case, "backward_data"))
    weight = set(forced_algorithms(case, "backward_weight"))
    for algorithm in sorted(data | weight):
        need = (("input",) if algorithm in data else ()) + (
            ("weight", "bias") if algorithm in weight else ())
        pairs.append((algorithm, need))
    return pairs


def _torch_gradients(go, x, w, options):
    import torch

    tx = torch.from_numpy(x.copy()).requires_grad_()
    tw = torch.from_numpy(w.copy()).requires_grad_()
    tb = torch.zeros(w.shape[0], dtype=tx.dtype, requires_grad=True)
    out = torch.nn.functional.conv2d(tx, tw, tb, **options)
    out.backward(torch.from_numpy(go))
    return {"input": tx.grad.numpy(), "weight": tw.grad.numpy(), "bias": tb.grad.numpy()}


def check_backward(case, seed):
    """Run one case's backward pass with every algorithm; compare each gradient."""
    dtype = np.dtype(case.dtype)
    x64, w64, _ = case.arrays(seed)
    x, w = x64.astype(dtype), w64.astype(dtype)
    options = case.options
    geo = reference.Geometry(x.shape, w.shape, **options)
    out_shape = geo.output_shape if geo.batched else geo.output_shape[1:]
    go = np.random.default_rng(seed + 7).standard_normal(out_shape).astype(dtype)

    kg_rs = (w.shape[0] // geo.groups) * geo.r * geo.s
    nhw = geo.n * geo.out_h * geo.out_w
    expected = {
        "input": (reference.backward_input(go, x.shape, w, **options),
                  reference.abs_backward_input(go, x.shape, w, **options), kg_rs),
        "weight": (reference.backward_weight(go, x, w.shape, **options),
                   reference.abs_backward_weight(go, x, w.shape, **options), nhw),
        "bias": (reference.backward_bias(go, geo.batched),
                 reference.backward_bias(np.abs(go), geo.batched), nhw),
    }
    torch_grads = _torch_gradients(go, x, w, options) if HAS_TORCH else None

    args = [in_layout(a, case.layout) for a in (go, x, w)]
    saved = [snapshot(a) for a in args]
    for algorithm, need in _algorithms_and_needs(case):
        plan = None if algorithm == "auto" else pyconvmpi.Plan(algorithm=algorithm)
        grads = pyconvmpi.conv2d_backward(*args, **options, need=need, plan=plan)
        assert isinstance(grads, pyconvmpi.Conv2dGrads)
        factor = tolerances.ALGORITHM_FACTOR[algorithm]
        for name in ALL:
            result = getattr(grads, name)
            if name not in need:
                assert result is None, f"{name} gradient was not requested"
                continue
            assert type(result) is np.ndarray
            assert result.dtype == dtype
            value, scale, terms = expected[name]
            tolerances.assert_close(result, value, scale, dtype=dtype, terms=terms,
                                    factor=factor, label=f"grad {name}, algorithm {algorithm}")
            if torch_grads is not None:
                tolerances.assert_close(
                    result, torch_grads[name].astype(np.float64), scale, dtype=dtype,
                    terms=terms, factor=factor + tolerances.TORCH_FACTOR,
                    label=f"grad {name} against PyTorch, algorithm {algorithm}")
    for name, value, before in zip(("grad_output", "input", "weight"), args, saved):
        assert_unchanged(value, before, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_backward_option(name, dtype):
    case = OPTION_CASES[name]
    case.dtype = dtype
    check_backward(case, seed=100 + sorted(OPTION_CASES).index(name))


def _grid_params():
    layouts = list(LAYOUTS)
    return [
        pytest.param(random_case(seed, dtype, layouts), seed, id=f"seed={seed}-{dtype}")
        for seed in GRID_SEEDS
        for dtype in DTYPES
    ]


@pytest.mark.parametrize("case, seed", _grid_params())
def test_backward_random_grid(case, seed):
    check_backward(case, seed)


@pytest.mark.parametrize("need", [combo for size in range(4)
                                  for combo in itertools.combinations(ALL, size)],
                         ids=lambda need: "+".join(need) or "nothing")
def test_need_subsets(need):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 6, 5))
    w = rng.standard_normal((6, 2, 3, 3))
    go = rng.standard_normal((2, 6, 3, 5))
    options = dict(stride=(2, 1), padding=1, groups=2)
    full = pyconvmpi.conv2d_backward(go, x, w, **options)

    grads = pyconvmpi.conv2d_backward(go, x, w, **options, need=need)

    for name in ALL:
        if name in need:
            np.testing.assert_array_equal(getattr(grads, name), getattr(full, name))
        else:
            assert getattr(grads, name) is None


def test_need_accepts_single_name_and_list():
    x = np.ones((1, 1, 4, 4))
    w = np.ones((1, 1, 3, 3))
    go = np.ones((1, 1, 2, 2))

    by_name = pyconvmpi.conv2d_backward(go, x, w, need="bias")
    by_list = pyconvmpi.conv2d_backward(go, x, w, need=["bias", "input"])

    assert by_name.input is None
    assert by_name.weight is None
    assert by_name.bias.tolist() == [4.0]
    assert by_list.weight is None
    assert by_list.input.shape == (1, 1, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(stride=3),                        # columns and rows between windows
    dict(stride=(2, 3), dilation=2),       # holes inside each window
    dict(padding="valid", stride=2),       # the last rows and columns fall off the end
    dict(dilation=(4, 1), stride=(4, 1)),  # rows between the dilated taps
], ids=["stride_3", "stride_dilation", "valid_stride", "dilation_rows"])
def test_unread_input_gets_exact_zero(options, dtype):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 10, 11)).astype(dtype)
    w = rng.standard_normal((4, 3, 2, 2)).astype(dtype)
    geo = reference.Geometry(x.shape, w.shape, **options)
    go = rng.standard_normal(geo.output_shape).astype(dtype)
    read = reference.read_mask(x.shape, w.shape, **options)
    assert not read.all(), "the case must leave some input elements unread"

    for algorithm, need in _algorithms_and_needs(Case(x.shape, w.shape, options)):
        if "input" not in need:
            continue
        plan = None if algorithm == "auto" else pyconvmpi.Plan(algorithm=algorithm)
        grad = pyconvmpi.conv2d_backward(go, x, w, **options, need=("input",), plan=plan).input

        assert (grad[~read] == 0).all(), f"algorithm {algorithm}"
        assert (grad[read] != 0).any(), f"algorithm {algorithm}"


def test_batch_zero_gives_zero_weight_gradient():
    x = np.ones((0, 2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    go = np.ones((0, 3, 3, 3), np.float32)

    grads = pyconvmpi.conv2d_backward(go, x, w)

    assert grads.input.shape == (0, 2, 5, 5)
    assert (grads.weight == 0).all()
    assert grads.weight.shape == (3, 2, 3, 3)
    assert (grads.bias == 0).all()
    assert grads.bias.shape == (3,)


def test_unbatched_gradients_keep_3d_shape():
    x = np.ones((2, 5, 5))
    w = np.ones((3, 2, 3, 3))
    go = np.ones((3, 3, 3))

    grads = pyconvmpi.conv2d_backward(go, x, w)

    assert grads.input.shape == (2, 5, 5)
    assert grads.weight.shape == (3, 2, 3, 3)
    assert grads.input[0, 2, 2] == 27.0
    assert grads.weight[0, 0, 0, 0] == 9.0
    assert grads.bias.tolist() == [9.0, 9.0, 9.0]


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_count_does_not_change_gradients(threads):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 3))
    go = rng.standard_normal((3, 6, 5, 8))
    options = dict(stride=(2, 1), padding=1, groups=2)
    expected = pyconvmpi.conv2d_backward(go, x, w, **options, plan=pyconvmpi.Plan(threads=1))

    grads = pyconvmpi.conv2d_backward(go, x, w, **options, plan=pyconvmpi.Plan(threads=threads))

    for name in ALL:
        np.testing.assert_allclose(getattr(grads, name), getattr(expected, name),
                                   rtol=1e-12, atol=1e-12, err_msg=name)


@requires_torch
def test_gradients_match_torch_autograd_of_forward():
    # torch.autograd differentiates sum(conv2d(x, w) * go); conv2d_backward must return the
    # same gradients for the go that pyconvmpi's own forward output shape implies.
    import torch

    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 6, 7, 8))
    w = rng.standard_normal((9, 2, 3, 2))
    options = dict(stride=(1, 2), padding="valid", dilation=(2, 1), groups=3)
    out = pyconvmpi.conv2d(x, w, **options)
    go = rng.standard_normal(out.shape)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    (torch.nn.functional.conv2d(tx, tw, **options) * torch.from_numpy(go)).sum().backward()

    grads = pyconvmpi.conv2d_backward(go, x, w, **options)

    np.testing.assert_allclose(grads.input, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.weight, tw.grad.numpy(), rtol=1e-12, atol=1e-12)


@requires_torch
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, options", [
    (((3, 24, 15, 15), (40, 24, 3, 3)), dict(padding=1)),
    (((5, 96, 9, 11), (32, 96, 1, 1)), {}),
    (((2, 16, 21, 19), (24, 8, 3, 3)), dict(stride=2, padding=1, groups=2)),
], ids=["3x3", "1x1", "strided-grouped"])
def test_float64_pixel_tiles_match_torch(shape, options, threads):
    # Layers with more than 256 output pixels, so the float64 weight gradient sums several
    # pixel tiles, some of them spanning two images.
    import torch

    rng = np.random.default_rng(31)
    x = rng.standard_normal(shape[0])
    w = rng.standard_normal(shape[1])
    go = rng.standard_normal(pyconvmpi.conv2d(x, w, **options).shape)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    torch.nn.functional.conv2d(tx, tw, **options).backward(torch.from_numpy(go))

    grads = pyconvmpi.conv2d_backward(go, x, w, **options, plan=pyconvmpi.Plan(threads=threads))

    scale = float(np.abs(tw.grad.numpy()).max())
    np.testing.assert_allclose(grads.weight, tw.grad.numpy(), rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(grads.input, tx.grad.numpy(), rtol=0,
                               atol=1e-13 * float(np.abs(tx.grad.numpy()).max()))
