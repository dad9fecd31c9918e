"""PyTorch layers and DataParallel across ranks.

Run on several ranks by tests/test_parallel.py (``mpiexec -n 2`` and ``-n 3``); under plain
pytest the ``comm`` fixture is COMM_WORLD of one process and every test still runs. Every
rank runs every test in the same order, so collectives always match.
"""

import numpy as np
import pytest

from conftest import requires_mpi4py, requires_torch

pytestmark = [requires_torch, requires_mpi4py]

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

import pyconvmpi  # noqa: E402
import pyconvmpi.torch as pt  # noqa: E402
from pyconvmpi.distributed import row_bands  # noqa: E402
from pyconvmpi.parallel import DataParallel  # noqa: E402

# Gradients reduced over ranks are sums in another order than one process's sum.
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
FLOAT32 = dict(rtol=1e-5, atol=1e-6)


def _distributed_built():
    """Return False while pyconvmpi's collective conv2d is not built into this checkout."""
    try:
        pyconvmpi.conv2d(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)), comm=MPI.COMM_SELF)
    except NotImplementedError:
        return False
    return True


requires_distributed = pytest.mark.skipif(
    not _distributed_built(), reason="collective conv2d (comm=...) is not built in this checkout"
)


def _random(shape, dtype, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)


def _part(count, rank, size):
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GatherAlong(torch.autograd.Function):
    """Concatenate every rank's tensor along ``dim``; backward returns this rank's part."""

    @staticmethod
    def forward(ctx, tensor, comm, dim):
        parts = comm.allgather(tensor.detach().numpy())
        ctx.dim, ctx.sizes, ctx.rank = dim, [p.shape[dim] for p in parts], comm.Get_rank()
        return torch.from_numpy(np.concatenate(parts, axis=dim))

    @staticmethod
    def backward(ctx, grad):
        return grad.split(ctx.sizes, dim=ctx.dim)[ctx.rank], None, None


class _SumGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks.

    A tensor that every rank has in full but uses only a part of gets, on every rank, the
    gradient of the global function.
    """

    @staticmethod
    def forward(ctx, tensor, comm):
        ctx.comm = comm
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        summed = np.ascontiguousarray(grad.numpy(), dtype=grad.numpy().dtype)
        ctx.comm.Allreduce(MPI.IN_PLACE, summed, op=MPI.SUM)
        return torch.from_numpy(summed), None


def _global_function(comm, placement, options):
    """Return F(X, w, b): the full output of a batch- or rows-placement conv of the full X.

    Each rank convolves its own part of X and the parts are gathered. F is then the same
    function on every rank, so gradcheck's perturbations agree across ranks.
    """

    def function(x, w, b=None):
        x = _SumGradient.apply(x, comm)
        if placement == "batch":
            start, stop = _part(x.shape[0], comm.Get_rank(), comm.Get_size())
            local = pt.conv2d(x[start:stop], w, b, comm=comm, placement="batch", **options)
            return _GatherAlong.apply(local, comm, 0)
        start, stop = row_bands(x.shape[2], comm.Get_size())[comm.Get_rank()]
        local = pt.conv2d(x[:, :, start:stop], w, b, comm=comm, placement="rows", **options)
        return _GatherAlong.apply(local, comm, 2)

    return function


GRADCHECK_OPTIONS = [
    dict(stride=1, padding=1),
    dict(stride=2, padding=(1, 0), dilation=1),
    dict(stride=1, padding="same", dilation=2),
    dict(stride=(2, 1), padding=2, dilation=(2, 1), groups=2),
    dict(stride=1, padding="valid", groups=2),
]


@requires_distributed
@pytest.mark.parametrize("placement", ["batch", "rows"])
@pytest.mark.parametrize("options", GRADCHECK_OPTIONS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv2d_collective_gradcheck_float64(comm, placement, options, bias):
    x = _random((3, 2, 7, 5), torch.float64, seed=1, requires_grad=True)
    w = _random((4, 2 // options.get("groups", 1), 3, 3), torch.float64, seed=2, requires_grad=True)
    b = _random((4,), torch.float64, seed=3, requires_grad=True) if bias else None
    function = _global_function(comm, placement, options)
    # Every gradcheck evaluation is a collective call, so the full Jacobian (two calls per
    # element) of every case would take minutes on oversubscribed cores. fast_mode checks
    # random projections of it in a few calls. The full Jacobian is checked once below.
    assert torch.autograd.gradcheck(function, (x, w) if b is None else (x, w, b), fast_mode=True)


@requires_distributed
@pytest.mark.parametrize("placement", ["batch", "rows"])
def test_conv2d_collective_full_gradcheck(comm, placement):
    x = _random((3, 2, 5, 4), torch.float64, seed=4, requires_grad=True)
    w = _random((2, 1, 3, 2), torch.float64, seed=5, requires_grad=True)
    b = _random((2,), torch.float64, seed=6, requires_grad=True)
    options = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)
    function = _global_function(comm, placement, options)
    assert torch.autograd.gradcheck(function, (x, w, b))


@requires_distributed
@pytest.mark.parametrize("placement", ["batch", "rows"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_collective_matches_torch_conv2d(comm, placement, padding_mode):
    if placement == "rows" and padding_mode != "zeros":
        pytest.skip("rows placement supports only padding_mode='zeros'")
    torch.manual_seed(4)
    reference = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).double()
    layer = pt.convert(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).double(),
                       comm=comm, placement=placement)
    layer.load_state_dict(reference.state_dict())
    x = _random((5, 3, 9, 7), torch.float64, seed=5, requires_grad=True)

    expected = reference(x)
    expected.square().sum().backward()
    rank, size = comm.Get_rank(), comm.Get_size()
    if placement == "batch":
        start, stop = _part(5, rank, size)
        local_x = x.detach()[start:stop].clone().requires_grad_(True)
        local_expected = expected[start:stop]
        local_expected_grad = x.grad[start:stop]
    else:
        start, stop = row_bands(9, size)[rank]
        local_x = x.detach()[:, :, start:stop].clone().requires_grad_(True)
        local_expected = expected[:, :, start:stop]
        local_expected_grad = x.grad[:, :, start:stop]
    output = layer(local_x)
    torch.testing.assert_close(output, local_expected, **FLOAT64)
    output.square().sum().backward()
    torch.testing.assert_close(local_x.grad, local_expected_grad, **FLOAT64)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, **FLOAT64)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, **FLOAT64)


@requires_distributed
@pytest.mark.parametrize("strategy", ["batch", "channels", "rows"])
def test_conv2d_replicated_matches_local(comm, strategy):
    x = _random((3, 2, 6, 6), torch.float64, seed=6, requires_grad=True)
    w = _random((4, 2, 3, 3), torch.float64, seed=7, requires_grad=True)
    local = torch.autograd.grad(pt.conv2d(x, w, padding=1).sum(), (x, w))
    collective = pt.conv2d(x, w, padding=1, comm=comm, placement="replicated", strategy=strategy)
    torch.testing.assert_close(collective, pt.conv2d(x, w, padding=1), **FLOAT64)
    grads = torch.autograd.grad(collective.sum(), (x, w))
    for mine, reference in zip(grads, local):
        torch.testing.assert_close(mine, reference, **FLOAT64)


@requires_distributed
def test_module_root_placement_inference(comm):
    torch.manual_seed(8)
    layer = pt.Conv2d(3, 2, 3, padding=1, padding_mode="reflect", comm=comm, placement="root",
                      strategy="batch")
    reference = torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")
    reference.load_state_dict(layer.state_dict())
    x = _random((4, 3, 6, 5), torch.float32, seed=9)
    with torch.no_grad():
        output = layer(x if comm.Get_rank() == 0 else None)
        if comm.Get_rank() == 0:
            torch.testing.assert_close(output, reference(x), **FLOAT32)
        else:
            assert output is None


def test_root_placement_grad_raises_everywhere(comm):
    weight = torch.zeros((2, 3, 3, 3), requires_grad=True)
    x = torch.zeros((1, 3, 5, 5)) if comm.Get_rank() == 0 else None
    with pytest.raises(ValueError, match="placement='root' supports inference only"):
        pt.conv2d(x, weight, comm=comm, placement="root")


def test_bad_dtype_one_rank_raises_everywhere(comm):
    bad_rank = comm.Get_size() - 1
    dtype = torch.float16 if comm.Get_rank() == bad_rank else torch.float32
    x = torch.zeros((1, 2, 5, 5), dtype=dtype)
    w = torch.zeros((3, 2, 3, 3), dtype=dtype)
    if comm.Get_rank() == bad_rank:
        with pytest.raises(TypeError, match="input must have dtype torch.float32 or torch.float64"):
            pt.conv2d(x, w, comm=comm, placement="batch")
    else:
        with pytest.raises(pyconvmpi.RemoteRankError, match=f"rank {bad_rank} rejected"):
            pt.conv2d(x, w, comm=comm, placement="batch")


def test_bad_placement_one_rank_raises_everywhere(comm):
    bad_rank = comm.Get_size() - 1
    placement = "everywhere" if comm.Get_rank() == bad_rank else "batch"
    x, w = torch.zeros((1, 2, 5, 5)), torch.zeros((3, 2, 3, 3))
    if comm.Get_rank() == bad_rank:
        with pytest.raises(ValueError, match="placement must be one of"):
            pt.conv2d(x, w, comm=comm, placement=placement)
    else:
        with pytest.raises(pyconvmpi.RemoteRankError, match=f"rank {bad_rank} rejected"):
            pt.conv2d(x, w, comm=comm, placement=placement)


# --- DataParallel -------------------------------------------------------------------------

def _small_model(seed, conv=torch.nn.Conv2d):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        conv(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
        conv(4, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(36, 3),
    ).double()


def _allgather_tensors(comm, tensors):
    return comm.allgather([t.detach().numpy().copy() for t in tensors])


def test_data_parallel_broadcasts_rank0_parameters_and_buffers(comm):
    model = _small_model(seed=10 + comm.Get_rank())
    with torch.no_grad():
        model[2].running_mean.fill_(comm.Get_rank())
    DataParallel(model, comm)
    tensors = list(model.parameters()) + list(model.buffers())
    gathered = _allgather_tensors(comm, tensors)
    for rank_tensors in gathered:
        for mine, theirs in zip(rank_tensors, gathered[0]):
            np.testing.assert_array_equal(mine, theirs)
    reference = _small_model(seed=10)
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert torch.all(model[2].running_mean == 0)


def _set_rank_gradients(model, rank):
    for index, parameter in enumerate(model.parameters()):
        parameter.grad = _random(parameter.shape, parameter.dtype, seed=100 * rank + index)


@pytest.mark.parametrize("bucket_bytes", [25 * 2**20, 64, 1], ids=["25MiB", "64B", "1B"])
def test_data_parallel_average_is_weighted_mean(comm, bucket_bytes):
    model = _small_model(seed=11)
    dp = DataParallel(model, comm, bucket_bytes=bucket_bytes)
    _set_rank_gradients(model, comm.Get_rank())
    weight = comm.Get_rank() + 1.5
    before = comm.allgather(([p.grad.numpy().copy() for p in model.parameters()], weight))
    dp.average_gradients(weight=weight)
    total = sum(w for _, w in before)
    for index, parameter in enumerate(model.parameters()):
        expected = sum(grads[index] * w for grads, w in before) / total
        np.testing.assert_allclose(parameter.grad.numpy(), expected, **FLOAT64)


def test_data_parallel_bucket_count_follows_bucket_bytes(comm):
    model = _small_model(seed=12)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    assert len(DataParallel(model, comm)._buckets) == 1
    assert len(DataParallel(model, comm, bucket_bytes=1)._buckets) == len(sizes)
    assert 1 < len(DataParallel(model, comm, bucket_bytes=max(sizes))._buckets) < len(sizes)


def test_data_parallel_sum_and_missing_gradients(comm):
    model = _small_model(seed=13)
    dp = DataParallel(model, comm)
    _set_rank_gradients(model, comm.Get_rank())
    parameters = list(model.parameters())
    if comm.Get_rank() == 0:
        parameters[0].grad = None           # missing here, present elsewhere
    parameters[1].grad = None               # missing everywhere
    before = comm.allgather([None if p.grad is None else p.grad.numpy().copy() for p in parameters])
    dp.sum_gradients()
    assert parameters[1].grad is None
    for index, parameter in enumerate(parameters):
        if index == 1:
            continue
        present = [grads[index] for grads in before if grads[index] is not None]
        if not present:
            assert parameter.grad is None
            continue
        np.testing.assert_allclose(parameter.grad.numpy(), sum(present), **FLOAT64)


def test_data_parallel_step_matches_full_batch(comm):
    """A split global batch with weighted averaging gives the one-process gradient."""
    x = _random((7, 1, 8, 8), torch.float64, seed=14)
    y = torch.arange(7) % 3
    loss_fn = torch.nn.CrossEntropyLoss()
    # Evaluation mode: BatchNorm then uses its running statistics, the same on every rank,
    # instead of statistics of the local batch.
    reference = _small_model(seed=15, conv=pt.Conv2d).eval()
    loss_fn(reference(x), y).backward()

    model = _small_model(seed=15, conv=pt.Conv2d).eval()
    dp = DataParallel(model, comm)
    start, stop = _part(7, comm.Get_rank(), comm.Get_size())
    if stop > start:
        loss_fn(model(x[start:stop]), y[start:stop]).backward()
    dp.average_gradients(weight=stop - start)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, **FLOAT64, msg=lambda m: f"{name}: {m}")


def test_data_parallel_bad_weight_raises_on_every_rank(comm):
    model = _small_model(seed=16)
    dp = DataParallel(model, comm)
    bad_rank = comm.Get_size() - 1
    weight = -1.0 if comm.Get_rank() == bad_rank else 1.0
    if comm.Get_rank() == bad_rank:
        with pytest.raises(ValueError, match="weight must be a non-negative finite number; got -1.0"):
            dp.average_gradients(weight=weight)
    else:
        with pytest.raises(pyconvmpi.RemoteRankError, match=f"rank {bad_rank} rejected"):
            dp.average_gradients(weight=weight)


def test_data_parallel_all_zero_weights_raise_value_error(comm):
    dp = DataParallel(_small_model(seed=17), comm)
    with pytest.raises(ValueError, match="the weights of all ranks are 0"):
        dp.average_gradients(weight=0)


def test_data_parallel_different_models_raise_on_every_rank(comm):
    if comm.Get_size() == 1:
        pytest.skip("needs two ranks")
    width = 36 if comm.Get_rank() == 0 else 37
    model = torch.nn.Sequential(torch.nn.Linear(width, 2))
    with pytest.raises(pyconvmpi.RemoteRankError, match="model differs from rank 0's"):
        DataParallel(model, comm)


def test_data_parallel_meta_parameter_on_one_rank_raises_on_every_rank(comm):
    bad_rank = comm.Get_size() - 1
    device = "meta" if comm.Get_rank() == bad_rank else "cpu"
    model = torch.nn.Linear(3, 2, device=device)
    if comm.Get_rank() == bad_rank:
        with pytest.raises(TypeError, match="parameter 'weight' must be a dense CPU tensor"):
            DataParallel(model, comm)
    else:
        with pytest.raises(pyconvmpi.RemoteRankError, match=f"rank {bad_rank} rejected its model"):
            DataParallel(model, comm)


def test_data_parallel_rejects_replicated_collective_layer(comm):
    model = torch.nn.Sequential(pt.Conv2d(1, 2, 3, comm=comm, placement="replicated"))
    with pytest.raises(ValueError, match="layer '0' has placement='replicated'"):
        DataParallel(model, comm)


def test_data_parallel_rejects_sparse_embedding(comm):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True))
    with pytest.raises(TypeError, match="layer '0' \\(Embedding\\) has sparse=True"):
        DataParallel(model, comm)


def _batch_placement_step(comm, uneven):
    x = _random((6, 1, 8, 8), torch.float64, seed=18)
    y = torch.arange(6) % 3
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    reference = _small_model(seed=19).eval()
    (loss_fn(reference(x), y) / 6).backward()

    model = pt.convert(_small_model(seed=19), comm=comm, placement="batch").eval()
    dp = DataParallel(model, comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    start, stop = _part(6, rank, size) if not uneven else ((0, 6) if rank == 0 else (6, 6))
    (loss_fn(model(x[start:stop]), y[start:stop]) / 6).backward()
    return model, dp, reference, stop - start


@requires_distributed
def test_data_parallel_with_batch_placement_layers_sums_once(comm):
    model, dp, reference, _ = _batch_placement_step(comm, uneven=True)
    assert len(dp._reduced) == 4
    dp.sum_gradients()
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, **FLOAT64, msg=lambda m: f"{name}: {m}")


@requires_distributed
def test_data_parallel_batch_placement_unequal_weights_raise(comm):
    if comm.Get_size() == 1:
        pytest.skip("needs two ranks")
    model, dp, _, local = _batch_placement_step(comm, uneven=True)
    with pytest.raises(ValueError, match="cannot be averaged; divide the loss by the global batch"):
        dp.average_gradients(weight=local)
