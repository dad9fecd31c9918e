"""Bad arguments on one rank, communicators of every kind, and isolation of user traffic.

Every test leaves the communicator usable: a collective call after an error must work, which
proves that no rank was left inside a half-finished exchange.
"""

import numpy as np
import pytest

import pyconvmpi as pcm
from pyconvmpi.distributed import default_threads, ranks_per_node, row_bands


def _layer(seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 4, 9, 7)), rng.standard_normal((5, 4, 3, 3))


def _still_usable(comm):
    x, w = _layer()
    out = pcm.conv2d(x, w, padding=1, comm=comm)
    np.testing.assert_allclose(out, pcm.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)


def test_bad_shape_on_last_rank_raises_everywhere(comm):
    last = comm.Get_size() - 1
    x, w = _layer()
    if comm.Get_rank() == last:
        x = x[:, :3]  # 3 channels against a 4-channel weight
    with pytest.raises(ValueError, match=rf"conv2d: rank {last} of {comm.Get_size()}: .*input has 3"):
        pcm.conv2d(x, w, comm=comm)
    _still_usable(comm)


def test_bad_dtype_on_last_rank_raises_everywhere(comm):
    last = comm.Get_size() - 1
    x, w = _layer()
    if comm.Get_rank() == last:
        x = x.astype(np.int32)
    with pytest.raises(ValueError, match=rf"rank {last} of .*dtype float32 or float64") as info:
        pcm.conv2d_backward(np.zeros((3, 5, 7, 5)), x, w, comm=comm)
    if comm.Get_rank() == last:
        assert isinstance(info.value, TypeError)
    _still_usable(comm)


def test_ranks_disagreeing_on_stride_raise_everywhere(comm):
    x, w = _layer()
    stride = 1 + comm.Get_rank() % 2
    if comm.Get_size() == 1:
        out = pcm.conv2d(x, w, stride=stride, comm=comm)
        assert out.shape == (3, 5, 7, 5)
        return
    with pytest.raises(ValueError, match=r"ranks disagree on stride: rank 1 has \(2, 2\) but rank 0 has \(1, 1\)"):
        pcm.conv2d(x, w, stride=stride, comm=comm)
    _still_usable(comm)


def test_rows_band_of_wrong_height_raises_everywhere(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    x, w = _layer()
    p, q = row_bands(x.shape[2], size)[rank]
    if size == 1:
        assert pcm.conv2d(x, w, comm=comm, placement="rows").shape == (3, 5, 7, 5)
        return
    # Two extra rows on rank 0 make a total whose bands no longer match what rank 0 passed.
    band = x[:, :, p:q + 2] if rank == 0 else x[:, :, p:q]
    with pytest.raises(ValueError, match=r"rank 0 passed \d+ input rows but its band"):
        pcm.conv2d(band, w, comm=comm, placement="rows")
    _still_usable(comm)


def test_unknown_placement_raises_on_all(comm):
    x, w = _layer()
    with pytest.raises(ValueError, match="placement must be one of"):
        pcm.conv2d(x, w, comm=comm, placement="columns")


def test_grid_larger_than_communicator_raises(comm):
    size = comm.Get_size()
    x, w = _layer()
    plan = pcm.Plan(strategy="hybrid", grid=(size + 1, 2))
    message = f"decompose: a {size + 1}x2 process grid needs {2 * size + 2} ranks; communicator has {size}"
    with pytest.raises(ValueError, match=message):
        pcm.conv2d(x, w, comm=comm, plan=plan)
    _still_usable(comm)


def test_plan_with_too_many_active_ranks_raises(comm):
    x, w = _layer()
    plan = pcm.Plan(strategy="rows", active_ranks=comm.Get_size() + 1)
    with pytest.raises(ValueError, match="active_ranks must be at most the communicator size"):
        pcm.conv2d_backward(np.zeros((3, 5, 7, 5)), x, w, comm=comm, plan=plan)
    _still_usable(comm)


def test_root_placement_ignores_other_ranks_arrays(comm):
    x, w = _layer()
    if comm.Get_rank() == 0:
        out = pcm.conv2d(x, w, comm=comm, placement="root", strategy="rows")
        np.testing.assert_allclose(out, pcm.conv2d(x, w), rtol=1e-12, atol=1e-12)
    else:
        assert pcm.conv2d(None, None, comm=comm, placement="root", strategy="rows") is None


def test_split_communicators_work_independently(comm):
    rank = comm.Get_rank()
    sub = comm.Split(color=rank % 2, key=rank)
    try:
        x, w = _layer(seed=20 + rank % 2)
        for strategy in ("batch", "rows", "channels"):
            out = pcm.conv2d(x, w, padding=1, comm=sub, strategy=strategy)
            np.testing.assert_allclose(out, pcm.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)
        grads = pcm.conv2d_backward(np.ones((3, 5, 9, 7)), x, w, padding=1, comm=sub,
                                    strategy="rows")
        expected = pcm.conv2d_backward(np.ones((3, 5, 9, 7)), x, w, padding=1)
        np.testing.assert_allclose(grads.weight, expected.weight, rtol=1e-12, atol=1e-12)
    finally:
        sub.Free()


def test_dup_and_self_communicators(comm):
    from mpi4py import MPI

    x, w = _layer()
    expected = pcm.conv2d(x, w, padding=1)
    dup = comm.Dup()
    try:
        out = pcm.conv2d(x, w, padding=1, comm=dup, strategy="hybrid")
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    finally:
        dup.Free()
    out = pcm.conv2d(x, w, padding=1, comm=MPI.COMM_SELF, placement="rows")
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_user_messages_are_not_intercepted(comm):
    """A receive the user posted before the call still gets the user's message after it."""
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    source, dest = (rank - 1) % size, (rank + 1) % size
    box = np.zeros(4)
    request = comm.Irecv(box, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
    x, w = _layer()
    pcm.conv2d(x, w, padding=1, comm=comm, strategy="rows")
    comm.Send(np.full(4, float(rank)), dest=dest, tag=1)
    request.Wait()
    np.testing.assert_array_equal(box, np.full(4, float(source)))


def test_threads_default_and_node_count(comm, monkeypatch):
    count = ranks_per_node(comm)
    assert 1 <= count <= comm.Get_size()
    assert ranks_per_node(comm) == count  # cached, no second Split_type
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(comm) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(comm) >= 1


def test_plan_reports_heuristic_choice(comm):
    size = comm.Get_size()
    chosen = pcm.plan((size * 2, 3, 16, 16), (4, 3, 3, 3), comm=comm)
    assert chosen.strategy == "batch"
    assert chosen.source == "heuristic"
    assert chosen.active_ranks == size
    rows = pcm.plan((1, 3, 64 * size, 16), (4, 3, 3, 3), padding=1, comm=comm)
    assert rows.strategy == ("batch" if size == 1 else "rows")


def _c_forward(comm, x, w, output, placement="replicated", strategy="rows", grid=(0, 0), dtype=None):
    from pyconvmpi import _lib
    from pyconvmpi import _validate as V
    from pyconvmpi.plan import desc_struct

    geo = V.geometry(x.shape, w.shape, 1, 1, 1, 1, "test")
    _lib.mpi_conv2d_forward(
        comm.py2f(), placement, strategy, grid, 0, _lib.FLOAT64 if dtype is None else dtype,
        desc_struct(geo), _lib.Exec(0, 1, 0, 0, 0), x, w, None, output,
    )


def test_c_driver_agrees_on_one_bad_rank(comm):
    """Python validation bypassed: a NULL output on the last rank fails every rank in C."""
    from pyconvmpi.errors import InvalidArgumentError, RemoteRankError

    last = comm.Get_size() - 1
    x, w = _layer()
    output = None if comm.Get_rank() == last else np.empty((3, 5, 9, 7))
    expected = InvalidArgumentError if comm.Get_rank() == last else RemoteRankError
    with pytest.raises(expected, match="conv2d"):
        _c_forward(comm, x, w, output)
    _still_usable(comm)


def test_c_driver_rejects_bad_dtype_and_grid(comm):
    from pyconvmpi.errors import InvalidArgumentError

    x, w = _layer()
    output = np.empty((3, 5, 9, 7))
    with pytest.raises(InvalidArgumentError):
        _c_forward(comm, x, w, output, dtype=7)
    size = comm.Get_size()
    with pytest.raises(InvalidArgumentError):
        _c_forward(comm, x, w, output, strategy="hybrid", grid=(size + 1, 1))
    _c_forward(comm, x, w, output, strategy="hybrid", grid=(1, size))
    np.testing.assert_allclose(output, pcm.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)


def test_bad_names_on_last_rank_raise_everywhere(comm):
    last = comm.Get_size() - 1
    x, w = _layer()
    bad = comm.Get_rank() == last
    with pytest.raises(ValueError, match=rf"rank {last} of .*placement must be one of"):
        pcm.conv2d(x, w, comm=comm, placement="columns" if bad else "replicated")
    with pytest.raises(ValueError, match=rf"rank {last} of .*need entries must be one of"):
        pcm.conv2d_backward(np.zeros((3, 5, 7, 5)), x, w, comm=comm,
                            need=("input", "gamma") if bad else ("input",))
    _still_usable(comm)


def test_strategy_with_data_placement_raises(comm):
    x, w = _layer()
    with pytest.raises(ValueError, match="placement='batch' fixes the split; strategy must be 'auto' or 'batch'"):
        pcm.conv2d(x, w, comm=comm, placement="batch", strategy="channels")
