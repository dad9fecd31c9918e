"""pyconvmpi.parallel.DataParallel in one process, and the MPI torch tests on 2 and 3 ranks."""

import math
from pathlib import Path

import pytest

from conftest import requires_mpi4py, requires_mpiexec, requires_torch, run_mpi

pytestmark = [requires_torch, requires_mpi4py]

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

from pyconvmpi.parallel import DEFAULT_BUCKET_BYTES, DataParallel  # noqa: E402

MPI_TESTS = Path(__file__).parent / "mpi" / "test_torch_mpi.py"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(18, 2))


def _step(model):
    model(torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_average_one_rank_keeps_gradients():
    model = _model()
    dp = DataParallel(model, MPI.COMM_SELF)
    before = _step(model)
    dp.average_gradients(weight=4)
    for parameter, grad in zip(model.parameters(), before):
        assert torch.equal(parameter.grad, grad)


def test_sum_one_rank_keeps_gradients():
    model = _model()
    dp = DataParallel(model, MPI.COMM_SELF, bucket_bytes=8)
    before = _step(model)
    dp.sum_gradients()
    for parameter, grad in zip(model.parameters(), before):
        assert torch.equal(parameter.grad, grad)


def test_default_bucket_is_25_mib():
    assert DEFAULT_BUCKET_BYTES == 25 * 2**20
    assert len(DataParallel(_model(), MPI.COMM_SELF)._buckets) == 1


def test_buckets_split_by_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    buckets = DataParallel(model, MPI.COMM_SELF, broadcast=False)._buckets
    assert sorted(str(bucket.dtype) for bucket in buckets) == ["torch.float32", "torch.float64"]


def test_frozen_parameters_are_not_reduced():
    model = _model()
    model[0].weight.requires_grad_(False)
    dp = DataParallel(model, MPI.COMM_SELF)
    assert all(p is not model[0].weight for p in dp._bucketed)


def test_call_runs_module_forward():
    model = _model()
    dp = DataParallel(model, MPI.COMM_SELF)
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(dp(x), model(x))


def test_broadcast_keeps_parameter_objects():
    model = _model()
    parameters = list(model.parameters())
    DataParallel(model, MPI.COMM_SELF)
    assert all(a is b for a, b in zip(parameters, model.parameters()))


def test_non_module_raises_type_error():
    with pytest.raises(TypeError, match="DataParallel: module must be a torch.nn.Module; got list"):
        DataParallel([], MPI.COMM_SELF)


def test_bad_comm_raises_type_error():
    with pytest.raises(TypeError, match="DataParallel: comm must be an mpi4py intracommunicator; got str"):
        DataParallel(_model(), "world")


@pytest.mark.parametrize("bucket_bytes", [0, -1, 2.5, True])
def test_bad_bucket_bytes_raises_value_error(bucket_bytes):
    with pytest.raises(ValueError, match="bucket_bytes must be a positive integer"):
        DataParallel(_model(), MPI.COMM_SELF, bucket_bytes=bucket_bytes)


@pytest.mark.parametrize("weight", [-1, math.nan, math.inf, "3", True, None])
def test_bad_weight_raises_value_error(weight):
    dp = DataParallel(_model(), MPI.COMM_SELF)
    with pytest.raises(ValueError, match="DataParallel.average_gradients: weight must be a non-negative"):
        dp.average_gradients(weight=weight)


def test_zero_weight_raises_value_error():
    dp = DataParallel(_model(), MPI.COMM_SELF)
    with pytest.raises(ValueError, match="the weights of all ranks are 0"):
        dp.average_gradients(weight=0.0)


def test_meta_parameter_raises_type_error():
    model = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(TypeError, match="parameter 'weight' must be a dense CPU tensor; got device 'meta'"):
        DataParallel(model, MPI.COMM_SELF)


@pytest.mark.mpi
@requires_mpiexec
@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_torch_mpi_tests_pass_on_ranks(ranks):
    result = run_mpi(ranks, ["-m", "pytest", "-q", "-p", "no:cacheprovider", MPI_TESTS],
                     timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count(" passed") == ranks, output[-4000:]
    assert " failed" not in output, output[-4000:]
