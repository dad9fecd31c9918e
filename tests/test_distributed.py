"""Distributed conv2d: the tests/mpi suite under real mpiexec runs, plus the plan logic.

The runs start ``python -m mpi4py -m pytest tests/mpi`` on 2, 3 and 4 ranks (4 is more ranks
than this machine's cores) with one OpenMP thread per rank, each under ``timeout`` so a rank
left waiting fails the test instead of hanging the suite.
"""

from pathlib import Path

import pytest

from conftest import requires_mpi4py, requires_mpiexec, run_mpi

MPI_TESTS = Path(__file__).parent / "mpi"


@pytest.mark.mpi
@requires_mpi4py
@requires_mpiexec
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_mpi_suite_passes_on_ranks(ranks):
    result = run_mpi(ranks, ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(MPI_TESTS)],
                     timeout=120)
    report = f"exit status {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 0, report
    assert result.stdout.count(" passed") >= ranks, report
    assert " failed" not in result.stdout, report


def _geometry(n, h, k=8):
    from pyconvmpi import _validate as V

    return V.geometry((n, 4, h, 16), (k, 4, 3, 3), 1, 1, 1, 1, "test")


def test_heuristic_prefers_batch_then_rows_then_channels():
    from pyconvmpi.distributed import heuristic_strategy

    assert heuristic_strategy(_geometry(n=4, h=16), 4) == "batch"
    assert heuristic_strategy(_geometry(n=1, h=64), 4) == "rows"
    assert heuristic_strategy(_geometry(n=1, h=8), 4) == "channels"
    assert heuristic_strategy(_geometry(n=1, h=8, k=2), 4) == "rows"
    assert heuristic_strategy(_geometry(n=1, h=2, k=2), 4) == "batch"


def test_default_grid_uses_divisors():
    from pyconvmpi.distributed import default_grid

    assert default_grid(_geometry(n=8, h=16), 4) == (4, 1)
    assert default_grid(_geometry(n=2, h=16), 4) == (2, 2)
    assert default_grid(_geometry(n=1, h=16), 6) == (1, 6)


def test_check_plan_rejects_grid_larger_than_communicator():
    import pyconvmpi as pcm
    from pyconvmpi.distributed import check_plan

    with pytest.raises(ValueError, match="decompose: a 3x2 process grid needs 6 ranks; communicator has 4"):
        check_plan(pcm.Plan(strategy="hybrid", grid=(3, 2)), "replicated", 4)
    with pytest.raises(ValueError, match="placement='rows' needs plan.strategy='rows'"):
        check_plan(pcm.Plan(strategy="batch"), "rows", 2)
    with pytest.raises(ValueError, match="'local' runs without a communicator"):
        check_plan(pcm.Plan(strategy="local"), "root", 2)
    check_plan(pcm.Plan(strategy="hybrid", grid=(2, 2)), "replicated", 4)


def test_row_bands_are_uneven_and_cover_rows():
    from pyconvmpi.distributed import row_bands

    assert row_bands(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert row_bands(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert row_bands(0, 3) == [(0, 0), (0, 0), (0, 0)]


@requires_mpi4py
def test_choose_plan_uses_profile_first(monkeypatch):
    from mpi4py import MPI

    import pyconvmpi as pcm
    from pyconvmpi import distributed, profile

    tuned = pcm.Plan(strategy="channels", active_ranks=1, threads=1, source="profile")
    calls = []

    def lookup(geo, op, dtype, comm_size=1, ranks_per_node=1):
        calls.append((op, comm_size, ranks_per_node))
        return tuned

    monkeypatch.setattr(profile, "lookup", lookup)
    chosen = distributed.choose_plan(_geometry(n=2, h=8), "forward", "float32", MPI.COMM_SELF)
    assert chosen is tuned
    assert calls == [("forward", 1, 1)]
    forced = distributed.choose_plan(_geometry(n=2, h=8), "forward", "float32", MPI.COMM_SELF,
                                     strategy="rows")
    assert forced.strategy == "rows"
    assert forced.source == "heuristic"


@pytest.mark.mpi
@pytest.mark.slow
@requires_mpi4py
@requires_mpiexec
def test_int_count_path_passes_mpi_suite(tmp_path):
    """The path for MPIs without large-count calls, with limits lowered so that small arrays
    cross them: struct datatypes of chunks and reductions split into pieces."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    cmake = shutil.which("cmake", path=str(bin_dir)) or shutil.which("cmake")
    ninja = shutil.which("ninja", path=str(bin_dir)) or shutil.which("ninja")
    mpicc = bin_dir / "mpicc"
    if cmake is None or ninja is None or not mpicc.is_file():
        pytest.skip("cmake, ninja or the environment's mpicc is missing")
    build = tmp_path / "build"
    flags = "-DPCM_MPI_INT_COUNTS -DPCM_INT_LIMIT=100 -DPCM_CHUNK=37"
    configure = subprocess.run(
        [cmake, "-S", str(root), "-B", str(build), "-G", "Ninja", f"-DMPI_C_COMPILER={mpicc}",
         f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DCMAKE_C_FLAGS={flags}"],
        capture_output=True, text=True, timeout=300,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True,
                              timeout=600)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr

    library = build / "cpp" / "libpyconvmpi.so"
    result = run_mpi(3, ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(MPI_TESTS)],
                     timeout=120, env={"PYCONVMPI_LIBRARY": str(library)})
    report = f"exit status {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 0, report
    assert " failed" not in result.stdout, report


@requires_mpi4py
def test_invalid_profile_plan_falls_back(monkeypatch):
    from mpi4py import MPI

    import pyconvmpi as pcm
    from pyconvmpi import distributed, profile

    too_wide = pcm.Plan(strategy="hybrid", grid=(2, 2), source="profile")
    monkeypatch.setattr(profile, "lookup", lambda *args, **kwargs: too_wide)
    chosen = distributed.choose_plan(_geometry(n=2, h=8), "forward", "float32", MPI.COMM_SELF)
    assert chosen.source == "heuristic"
    assert chosen.strategy == "batch"
