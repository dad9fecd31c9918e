"""Distributed conv2d on two hosts, run by tests/test_cluster.py under mpiexec.

Every strategy's result must match the single-process result on every rank; rank 0 prints
one line per strategy so the test can count them.
"""

import numpy as np
from mpi4py import MPI

import pyconvmpi as pcm


def main():
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 37, 29))
    w = rng.standard_normal((6, 4, 3, 3))
    b = rng.standard_normal(6)
    expected = pcm.conv2d(x, w, b, padding=1)
    for strategy in ("batch", "channels", "rows", "hybrid"):
        out = pcm.conv2d(x, w, b, padding=1, comm=comm, strategy=strategy)
        error = float(np.max(np.abs(out - expected)))
        if comm.rank == 0:
            print(f"strategy {strategy} max error {error:.3e}", flush=True)
        if error > 1e-12:
            raise AssertionError(f"strategy {strategy}: max error {error} on rank {comm.rank}")


if __name__ == "__main__":
    main()
