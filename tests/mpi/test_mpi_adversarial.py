"""Reproducers of bugs found by adversarial runs of the collective calls.

Each test failed before the fix it comes with, most of them by leaving every rank but one
waiting forever. They run under plain pytest on a one-rank COMM_WORLD and under the mpiexec
runs of tests/test_distributed.py, which collects every file of tests/mpi.
"""

import re

import numpy as np
import pytest

import pyconvmpi as pcm
from pyconvmpi import _lib
from pyconvmpi import _validate as V
from pyconvmpi.distributed import row_bands
from pyconvmpi.plan import desc_struct


def _layer():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 4, 9, 7))
    w = rng.standard_normal((6, 2, 3, 3))
    return x, w, dict(padding=1, groups=2)


def _still_usable(comm):
    x, w, options = _layer()
    out = pcm.conv2d(x, w, **options, comm=comm, strategy="rows")
    np.testing.assert_allclose(out, pcm.conv2d(x, w, **options), rtol=1e-12, atol=1e-12)


def _unsupported_algorithm(op):
    """An algorithm name this build cannot run on _layer(), or None if it runs them all."""
    x, w, options = _layer()
    desc = desc_struct(V.geometry(x.shape, w.shape, 1, options["padding"], 1, options["groups"],
                                  "test"))
    for name in _lib.ALGORITHMS:
        if not _lib.algorithm_supported(name, op, desc):
            return name
    return None


@pytest.mark.parametrize(
    "placement,strategy",
    [("replicated", "channels"), ("replicated", "rows"), ("root", "batch"), ("root", "rows")],
)
def test_unsupported_algorithm_raises_on_every_rank(comm, placement, strategy):
    """A plan naming an algorithm this build lacks used to fail only on the ranks with work,
    after the agreement, while the others waited for their results forever."""
    algorithm = _unsupported_algorithm("forward")
    if algorithm is None:
        pytest.skip("this build runs every algorithm on the layer")
    x, w, options = _layer()
    plan = pcm.Plan(strategy=strategy, algorithm=algorithm)
    with pytest.raises(pcm.UnsupportedError, match="conv2d: not supported"):
        pcm.conv2d(x, w, **options, comm=comm, placement=placement, plan=plan)
    go = np.ones(pcm.conv2d(x, w, **options).shape)
    backward = _unsupported_algorithm("backward_data")
    if backward is not None:
        plan = pcm.Plan(strategy=strategy, algorithm=backward)
        with pytest.raises(pcm.UnsupportedError, match="conv2d_backward: not supported"):
            pcm.conv2d_backward(go, x, w, **options, need=("input",), comm=comm,
                                placement=placement, plan=plan)
    _still_usable(comm)


class _BrokenIndex:
    """An option whose own code raises something other than TypeError or ValueError."""

    def __index__(self):
        raise RuntimeError("index failed")


def test_runtime_error_in_arguments_reaches_all(comm):
    """A RuntimeError raised while one rank checked its arguments escaped before the agreement,
    and the other ranks waited for that rank forever."""
    size, last = comm.Get_size(), comm.Get_size() - 1
    x, w, options = _layer()
    stride = _BrokenIndex() if comm.Get_rank() == last else 1
    with pytest.raises(ValueError, match=rf"conv2d: rank {last} of {size}: RuntimeError while "
                                         r"checking the arguments: index failed"):
        pcm.conv2d(x, w, stride=stride, **options, comm=comm)

    def need():
        yield "input"
        raise RuntimeError("need failed")

    go = np.ones(pcm.conv2d(x, w, **options).shape)
    with pytest.raises(ValueError, match=rf"rank {last} of {size}: RuntimeError .*need failed"):
        pcm.conv2d_backward(go, x, w, **options, comm=comm,
                            need=need() if comm.Get_rank() == last else ("input",))
    _still_usable(comm)


def test_rows_band_error_lists_every_rank(comm):
    """One rank's wrong band changes the global height, so the rank first blamed may not be the
    wrong one. The message lists what every rank passed."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        pytest.skip("one rank's band is the whole image, whatever its height")
    x, w, options = _layer()
    p, q = row_bands(9, size)[rank]
    if rank == size - 1:
        p -= 2  # two rows too many on the last rank
    passed = [stop - start for start, stop in row_bands(9, size)]
    passed[-1] += 2
    expected = [stop - start for start, stop in row_bands(11, size)]
    text = f"ranks passed {passed} rows, row_bands expects {expected}"
    with pytest.raises(ValueError, match=re.escape(text)):
        pcm.conv2d(x[:, :, p:q], w, **options, comm=comm, placement="rows")
    _still_usable(comm)


def test_plan_bad_dtype_on_one_rank(comm):
    """plan(comm=...) checked its arguments without an agreement, so a rank with a bad dtype
    raised alone while the others waited in the first Split_type of the new communicator."""
    size, last = comm.Get_size(), comm.Get_size() - 1
    fresh = comm.Dup()
    try:
        dtype = "int8" if comm.Get_rank() == last else "float32"
        with pytest.raises(ValueError, match=rf"plan: rank {last} of {size}: dtype must be"):
            pcm.plan((2, 3, 8, 8), (4, 3, 3, 3), dtype=dtype, comm=fresh)
        chosen = pcm.plan((2, 3, 8, 8), (4, 3, 3, 3), comm=fresh)
        assert chosen.source == "heuristic"
    finally:
        fresh.Free()


def test_plan_rejects_unknown_placement(comm):
    """plan(comm=..., placement="bogus") returned a plan instead of raising."""
    with pytest.raises(ValueError, match="plan: .*placement must be one of .*got 'bogus'"):
        pcm.plan((2, 3, 8, 8), (4, 3, 3, 3), comm=comm, placement="bogus")


def test_plan_ranks_disagree_on_shape(comm):
    """Ranks that passed different shapes got different plans without an error."""
    if comm.Get_size() == 1:
        pytest.skip("one rank cannot disagree with itself")
    shape = (2 + comm.Get_rank() % 2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"plan: ranks disagree on input_shape: rank 1 has "
                                         r"\(3, 3, 8, 8\) but rank 0 has \(2, 3, 8, 8\)"):
        pcm.plan(shape, (4, 3, 3, 3), comm=comm)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_torch_layer_padding_error_reaches_all(comm, padding_mode):
    """Conv2d padded the input with F.pad before the agreement. A rank whose input F.pad
    rejected (a 1-row image to reflect by 2) raised alone, and the others waited forever."""
    torch = pytest.importorskip("torch")
    import pyconvmpi.torch as pt

    from pyconvmpi.errors import RemoteRankError

    size, last = comm.Get_size(), comm.Get_size() - 1
    layer = pt.Conv2d(2, 3, 3, padding=2, padding_mode=padding_mode, comm=comm,
                      placement="batch").double()
    x = torch.ones(2, 2, 6, 6, dtype=torch.float64)
    if comm.Get_rank() == last:
        # Reflect padding of 2 needs 3 rows, circular padding of 2 needs 2 columns.
        x = x[:, :, :1] if padding_mode == "reflect" else x[:, :, :, :1]
    expected = RuntimeError if comm.Get_rank() == last else RemoteRankError
    with pytest.raises(expected):
        layer(x)
    good = torch.ones(1, 2, 6, 6, dtype=torch.float64)
    assert layer(good).shape == (1, 3, 8, 8)
    if size > 1:
        assert comm.allreduce(1) == size


# Geometries at the edges of the decompositions. Strides past the kernel skip rows between
# bands, and images of one row or column leave most row bands empty. Padding past the kernel
# gives bands made only of padding, and kernels reach the size of the padded image.
EDGE_CASES = [
    ("stride_past_kernel", (1, 2, 9, 9), (2, 2, 3, 3), dict(stride=4)),
    ("pointwise_stride3", (1, 2, 9, 9), (2, 2, 1, 1), dict(stride=3)),
    ("one_row_image", (1, 1, 1, 9), (1, 1, 1, 3), {}),
    ("one_column_image", (1, 1, 9, 1), (1, 1, 3, 1), dict(padding=(1, 0))),
    ("padding_past_kernel", (1, 2, 8, 8), (4, 2, 3, 3), dict(padding=(5, 0))),
    ("kernel_past_image", (1, 2, 3, 3), (1, 2, 7, 7), dict(padding=2)),
    ("kernel_is_image", (2, 2, 6, 6), (1, 2, 6, 6), {}),
]
EDGE_PAIRS = [(p, s) for p in ("replicated", "root")
              for s in ("batch", "channels", "rows", "hybrid", "auto")]
EDGE_PAIRS += [("batch", "auto"), ("rows", "auto")]


@pytest.mark.parametrize("placement,strategy", EDGE_PAIRS,
                         ids=[f"{p}-{s}" for p, s in EDGE_PAIRS])
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_geometry_matches_single_process(comm, case, placement, strategy):
    name, input_shape, weight_shape, options = case
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(len(name))
    x = rng.standard_normal(input_shape)
    w = rng.standard_normal(weight_shape)
    b = rng.standard_normal(weight_shape[0])
    y = pcm.conv2d(x, w, b, **options)
    go = rng.standard_normal(y.shape)
    grads = pcm.conv2d_backward(go, x, w, **options)
    out_rows = in_rows = np.s_[...]
    if placement == "batch":
        start, stop = row_bands(input_shape[0], size)[rank]
        out_rows = in_rows = np.s_[start:stop]
    elif placement == "rows":
        start, stop = row_bands(input_shape[2], size)[rank]
        out_start, out_stop = row_bands(y.shape[2], size)[rank]
        in_rows, out_rows = np.s_[:, :, start:stop], np.s_[:, :, out_start:out_stop]

    reads = placement != "root" or rank == 0
    arrays = [a if reads else None for a in (x[in_rows], w, b, go[out_rows])]
    kwargs = dict(options, comm=comm, placement=placement, strategy=strategy)
    got = pcm.conv2d(*arrays[:3], **kwargs)
    got_grads = pcm.conv2d_backward(arrays[3], *arrays[:2], **kwargs)
    if not reads:
        assert got is None
        assert got_grads == (None, None, None)
        return

    np.testing.assert_allclose(got, y[out_rows], rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got_grads.input, grads.input[in_rows], rtol=1e-12, atol=1e-12,
                               err_msg=name)
    np.testing.assert_allclose(got_grads.weight, grads.weight, rtol=1e-10, atol=1e-10,
                               err_msg=name)
    np.testing.assert_allclose(got_grads.bias, grads.bias, rtol=1e-10, atol=1e-10, err_msg=name)
