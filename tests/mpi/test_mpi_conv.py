"""Collective conv2d and conv2d_backward against the single-process result.

Runs under plain pytest (a one-rank COMM_WORLD) and under ``mpiexec -n 2/3/4 python -m mpi4py
-m pytest tests/mpi``; every rank runs the same tests in the same order, so collectives line
up. Shapes are chosen so that splits are uneven, some ranks get no batch items, channels or
rows, halos span several bands, and groups are cut between ranks.
"""

import numpy as np
import pytest

import pyconvmpi as pcm
from pyconvmpi.distributed import row_bands

# Tolerances per dtype: the decomposed sums add the same products in another order, so the
# difference is rounding only (a few ulps times the reduction length).
TOLERANCE = {np.float64: 1e-10, np.float32: 2e-4}

# (name, input shape, weight shape, options)
CASES = [
    ("groups_cut", (3, 4, 11, 9), (6, 2, 3, 3), dict(stride=1, padding=1, groups=2)),
    ("stride2_dilation2", (2, 3, 13, 7), (5, 3, 3, 2), dict(stride=2, padding=(2, 1), dilation=2)),
    ("same_even_kernel", (1, 4, 5, 6), (4, 1, 4, 3), dict(padding="same", groups=4)),
    ("stride3_dilation2_g3", (5, 6, 7, 8), (9, 2, 5, 3),
     dict(stride=(3, 1), padding=2, dilation=(2, 1), groups=3)),
    ("thin_bands_wide_halo", (2, 2, 6, 5), (3, 2, 3, 3), dict(padding="same", dilation=3)),
    ("tiny_image", (1, 2, 3, 3), (3, 2, 3, 3), dict(padding="same", dilation=2)),
    ("one_item_one_channel", (1, 1, 4, 4), (1, 1, 4, 4), dict(padding=0)),
    ("multiplier_k_gt_c", (2, 2, 9, 4), (6, 1, 2, 3), dict(stride=(2, 1), padding=(1, 0), groups=2)),
    ("empty_batch", (0, 3, 5, 5), (2, 3, 3, 3), dict(padding=1)),
]

PAIRS = [("replicated", s) for s in ("batch", "channels", "rows", "hybrid", "auto")]
PAIRS += [("root", s) for s in ("batch", "channels", "rows", "hybrid", "auto")]
PAIRS += [("batch", "auto"), ("rows", "auto")]


def _data(case_index, dtype, input_shape, weight_shape):
    seed = 1000 + case_index
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape).astype(dtype)
    w = rng.standard_normal(weight_shape).astype(dtype)
    b = rng.standard_normal(weight_shape[0]).astype(dtype)
    return rng, x, w, b


def _assert_close(name, got, expected, dtype):
    assert got is not None, f"{name}: got None"
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype} != {expected.dtype}"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol, err_msg=name)


def _local_parts(placement, comm, x, go, ref_shape):
    """This rank's input and grad_output slices, and the slices of the results it gets."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if placement == "batch":
        n0, n1 = row_bands(x.shape[0], size)[rank]
        return x[n0:n1], go[n0:n1], np.s_[n0:n1], np.s_[n0:n1]
    if placement == "rows":
        p, q = row_bands(x.shape[2], size)[rank]
        y0, y1 = row_bands(ref_shape[2], size)[rank]
        return x[:, :, p:q], go[:, :, y0:y1], np.s_[:, :, y0:y1], np.s_[:, :, p:q]
    if placement == "root" and rank != 0:
        return None, None, None, None
    return x, go, np.s_[...], np.s_[...]


@pytest.mark.parametrize("placement,strategy", PAIRS, ids=[f"{p}-{s}" for p, s in PAIRS])
@pytest.mark.parametrize(
    "case_index", range(len(CASES)), ids=[f"{c[0]}-seed{1000 + i}" for i, c in enumerate(CASES)]
)
def test_collective_matches_single_process(comm, case_index, placement, strategy):
    name, input_shape, weight_shape, options = CASES[case_index]
    if placement == "batch" and input_shape[0] == 0:
        input_shape = (comm.Get_size() // 2, *input_shape[1:])  # some ranks still get nothing
    dtype = np.float64
    rng, x, w, b = _data(case_index, dtype, input_shape, weight_shape)
    expected = pcm.conv2d(x, w, b, **options)
    go = rng.standard_normal(expected.shape).astype(dtype)
    grads = pcm.conv2d_backward(go, x, w, **options)

    x_local, go_local, out_slice, in_slice = _local_parts(placement, comm, x, go, expected.shape)
    out = pcm.conv2d(x_local, w, b, **options, comm=comm, placement=placement, strategy=strategy)
    got = pcm.conv2d_backward(go_local, x_local, w, **options, comm=comm, placement=placement,
                              strategy=strategy)

    if placement == "root" and comm.Get_rank() != 0:
        assert out is None
        assert got == (None, None, None)
        return
    _assert_close("output", out, expected[out_slice], dtype)
    _assert_close("grad_input", got.input, grads.input[in_slice], dtype)
    _assert_close("grad_weight", got.weight, grads.weight, dtype)
    _assert_close("grad_bias", got.bias, grads.bias, dtype)


@pytest.mark.parametrize("placement,strategy", PAIRS, ids=[f"{p}-{s}" for p, s in PAIRS])
def test_float32_and_need_subsets_match(comm, placement, strategy):
    name, input_shape, weight_shape, options = CASES[3]
    dtype = np.float32
    rng, x, w, b = _data(3, dtype, input_shape, weight_shape)
    expected = pcm.conv2d(x, w, b, **options)
    go = rng.standard_normal(expected.shape).astype(dtype)
    grads = pcm.conv2d_backward(go, x, w, **options)
    x_local, go_local, out_slice, in_slice = _local_parts(placement, comm, x, go, expected.shape)
    reads = x_local is not None

    out = pcm.conv2d(x_local, w, None, **options, comm=comm, placement=placement,
                     strategy=strategy)
    if reads:
        _assert_close("output without bias", out, expected[out_slice] - b[:, None, None], dtype)
    for need in (("input",), ("weight",), ("bias",), ("weight", "bias")):
        got = pcm.conv2d_backward(go_local, x_local, w, **options, need=need, comm=comm,
                                  placement=placement, strategy=strategy)
        for entry in ("input", "weight", "bias"):
            value = getattr(got, entry)
            if entry not in need or not reads:
                assert value is None, f"{entry} with need={need}"
            else:
                full = getattr(grads, entry)
                _assert_close(f"{entry} with need={need}", value,
                              full[in_slice] if entry == "input" else full, dtype)


@pytest.mark.parametrize("strategy", ["batch", "channels", "rows", "hybrid"])
def test_unbatched_input_replicated(comm, strategy):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 10, 7))
    w = rng.standard_normal((5, 3, 3, 3))
    expected = pcm.conv2d(x, w, padding=1)
    go = rng.standard_normal(expected.shape)
    grads = pcm.conv2d_backward(go, x, w, padding=1)
    out = pcm.conv2d(x, w, padding=1, comm=comm, strategy=strategy)
    got = pcm.conv2d_backward(go, x, w, padding=1, comm=comm, strategy=strategy)
    _assert_close("output", out, expected, np.float64)
    _assert_close("grad_input", got.input, grads.input, np.float64)
    _assert_close("grad_weight", got.weight, grads.weight, np.float64)


@pytest.mark.parametrize(
    "plan_fields",
    [dict(strategy="rows", active_ranks=1), dict(strategy="channels", active_ranks=1),
     dict(strategy="hybrid", grid=(1, 1)), dict(strategy="batch", active_ranks=0),
     dict(strategy="rows", active_ranks=0, threads=1, algorithm="reference")],
    ids=["rows-1rank", "channels-1rank", "hybrid-1x1", "batch-all", "rows-reference"],
)
def test_user_plan_is_followed(comm, plan_fields):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 9, 6))
    w = rng.standard_normal((4, 2, 3, 3))
    plan = pcm.Plan(**plan_fields)
    expected = pcm.conv2d(x, w, padding=1, groups=2)
    go = rng.standard_normal(expected.shape)
    grads = pcm.conv2d_backward(go, x, w, padding=1, groups=2)
    out = pcm.conv2d(x, w, padding=1, groups=2, comm=comm, plan=plan)
    got = pcm.conv2d_backward(go, x, w, padding=1, groups=2, comm=comm, plan=plan)
    _assert_close("output", out, expected, np.float64)
    _assert_close("grad_input", got.input, grads.input, np.float64)
    _assert_close("grad_weight", got.weight, grads.weight, np.float64)


def test_hybrid_full_grid(comm):
    size = comm.Get_size()
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 6, 8, 5))
    w = rng.standard_normal((6, 2, 3, 3))
    options = dict(padding=1, groups=3)
    plans = [pcm.Plan(strategy="hybrid", grid=(rows, size // rows))
             for rows in range(1, size + 1) if size % rows == 0]
    expected = pcm.conv2d(x, w, **options)
    go = rng.standard_normal(expected.shape)
    grads = pcm.conv2d_backward(go, x, w, **options)
    for plan in plans:
        for placement in ("replicated", "root"):
            out = pcm.conv2d(x, w, **options, comm=comm, placement=placement, plan=plan)
            got = pcm.conv2d_backward(go, x, w, **options, comm=comm, placement=placement,
                                      plan=plan)
            if placement == "root" and comm.Get_rank() != 0:
                continue
            _assert_close(f"output {plan.grid}", out, expected, np.float64)
            _assert_close(f"grad_input {plan.grid}", got.input, grads.input, np.float64)
            _assert_close(f"grad_weight {plan.grid}", got.weight, grads.weight, np.float64)


def test_weight_grads_identical_on_every_rank(comm):
    rng = np.random.default_rng(17)
    x = rng.standard_normal((5, 3, 12, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    go = rng.standard_normal((5, 4, 10, 5)).astype(np.float32)
    for placement in ("replicated", "batch", "rows"):
        x_local, go_local, _, _ = _local_parts(placement, comm, x, go, go.shape)
        got = pcm.conv2d_backward(go_local, x_local, w, comm=comm, placement=placement)
        everyone = comm.allgather((got.weight.tobytes(), got.bias.tobytes()))
        assert all(item == everyone[0] for item in everyone), placement


def test_empty_results_have_shapes(comm):
    """Ranks without rows or items return empty arrays of the right shape."""
    size, rank = comm.Get_size(), comm.Get_rank()
    x = np.ones((1, 1, 1, 4))
    w = np.ones((2, 1, 1, 1))
    p, q = row_bands(1, size)[rank]
    out = pcm.conv2d(x[:, :, p:q], w, comm=comm, placement="rows")
    assert out.shape == (1, 2, q - p, 4)
    n0, n1 = row_bands(1, size)[rank]
    out = pcm.conv2d(x[n0:n1], w, comm=comm, placement="batch")
    assert out.shape == (n1 - n0, 2, 1, 4)
    grads = pcm.conv2d_backward(np.ones((n1 - n0, 2, 1, 4)), x[n0:n1], w, comm=comm,
                                placement="batch")
    assert grads.input.shape == (n1 - n0, 1, 1, 4)
    np.testing.assert_array_equal(grads.weight, np.full((2, 1, 1, 1), 4.0))


def test_unbatched_rows_bands(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    expected = pcm.conv2d(x, w, padding="same")
    go = rng.standard_normal(expected.shape)
    grads = pcm.conv2d_backward(go, x, w, padding="same")
    p, q = row_bands(11, size)[rank]
    out = pcm.conv2d(x[:, p:q], w, padding="same", comm=comm, placement="rows")
    got = pcm.conv2d_backward(go[:, p:q], x[:, p:q], w, padding="same", comm=comm,
                              placement="rows")
    _assert_close("output", out, expected[:, p:q], np.float64)
    _assert_close("grad_input", got.input, grads.input[:, p:q], np.float64)
    _assert_close("grad_weight", got.weight, grads.weight, np.float64)
