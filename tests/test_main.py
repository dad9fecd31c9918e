"""``python -m pyconvmpi``: the report of version, library, SIMD level, threads and MPI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyconvmpi
from pyconvmpi import _lib

from conftest import requires_mpi4py


def _run(threads=None, cwd=None):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run([sys.executable, "-m", "pyconvmpi"], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    fields = {}
    lines = result.stdout.splitlines()
    for line in lines[1:]:
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return lines[0], fields


def test_first_line_is_name_and_version():
    first, _ = _run()

    assert first == f"pyconvmpi {pyconvmpi.__version__}"


def test_library_path_and_version():
    _, fields = _run()

    assert Path(fields["library"]) == Path(_lib.library_path)
    assert Path(fields["library"]).is_file()
    assert fields["library version"] == f"{pyconvmpi.__version__} (ABI {_lib.ABI_VERSION})"


def test_simd_level():
    _, fields = _run()

    assert fields["SIMD level"] in ("avx512", "avx2", "scalar")
    assert fields["SIMD level"] == _lib.simd_level()


@pytest.mark.parametrize("threads", [1, 3])
def test_openmp_threads_follow_environment(threads):
    _, fields = _run(threads=threads)

    assert fields["OpenMP threads"] == str(threads)


def test_openmp_threads_default_is_positive():
    _, fields = _run()

    assert int(fields["OpenMP threads"]) >= 1


@requires_mpi4py
def test_mpi_library_matches_mpi4py():
    from mpi4py import MPI

    _, fields = _run()

    assert fields["MPI library"]
    assert fields["MPI library"] == MPI.Get_library_version().strip().splitlines()[0].strip()


def test_runs_from_another_directory(tmp_path):
    first, fields = _run(cwd=tmp_path)

    assert first.startswith("pyconvmpi ")
    assert set(fields) == {"library", "library version", "SIMD level", "OpenMP threads",
                           "MPI library"}
