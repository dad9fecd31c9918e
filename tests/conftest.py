"""Environment probes (run once) turned into skip markers, and shared fixtures."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MPI4PY = importlib.util.find_spec("mpi4py") is not None
MPIEXEC = Path(sys.executable).parent / "mpiexec"
HAS_MPIEXEC = MPIEXEC.is_file()

requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
requires_mpi4py = pytest.mark.skipif(not HAS_MPI4PY, reason="mpi4py is not installed")
requires_mpiexec = pytest.mark.skipif(
    not HAS_MPIEXEC, reason=f"no mpiexec next to the interpreter ({MPIEXEC})"
)


@pytest.fixture
def comm():
    """The communicator MPI tests run on: COMM_WORLD under mpiexec, else COMM_SELF."""
    if not HAS_MPI4PY:
        pytest.skip("mpi4py is not installed")
    from mpi4py import MPI

    return MPI.COMM_WORLD


def run_mpi(ranks, args, timeout=300, threads=1, env=None):
    """Run ``python -m mpi4py ARGS`` on ``ranks`` ranks under the environment's own mpiexec.

    Every run is wrapped in ``timeout`` so that a rank left waiting cannot hang the suite;
    returns the CompletedProcess (stdout and stderr captured as text).
    """
    full_env = dict(os.environ)
    full_env["OMP_NUM_THREADS"] = str(threads)
    full_env.update(env or {})
    command = [
        "timeout", "--signal=KILL", str(timeout), str(MPIEXEC), "-n", str(ranks),
        sys.executable, "-m", "mpi4py", *map(str, args),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=full_env)
