"""Fresh-environment install: build a wheel, install it into a new venv, convolve elsewhere.

The new environment gets no PYTHONPATH, PYCONVMPI_LIBRARY or LD_LIBRARY_PATH, so the import
must find the library inside the installed package and libmpi through the library's RUNPATH.
Packages come from the configured package index (numpy, mpich, mpi4py and the build backend),
so these tests need it to be reachable.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONVOLVE = (
    "import numpy as np, pyconvmpi\n"
    "out = pyconvmpi.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 3, 3), np.float32))\n"
    "print(pyconvmpi._lib.library_path)\n"
    "print(out.dtype, out.shape, float(out.sum()))\n"
)
EXPECTED_RESULT = "float32 (1, 1, 1, 1) 9.0"


def _clean_env(venv=None):
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYCONVMPI_LIBRARY", "LD_LIBRARY_PATH", "VIRTUAL_ENV",
                          "PYTHONHOME")}
    if venv is not None:
        # What "source venv/bin/activate" does to PATH.
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


def _run(command, cwd, env, timeout=600):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def _source_copy(destination):
    """Copy the project's sources, without build products or environments, to destination."""
    ignore = shutil.ignore_patterns("build", "dist", ".git", ".venv*", "__pycache__", "*.so",
                                    ".pytest_cache", "*.egg-info", "_skbuild")
    shutil.copytree(REPO, destination, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Return the venv directory of a fresh environment with the wheel installed."""
    root = tmp_path_factory.mktemp("install")
    source = _source_copy(root / "source")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-w", dist], root,
         _clean_env())
    wheels = list(dist.glob("pyconvmpi-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], root, _clean_env())
    # The runtime dependencies an import needs; optuna (for the tuner) is left out for speed.
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "numpy", "mpich", "mpi4py"],
         root, _clean_env())
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheels[0]], root,
         _clean_env())
    return venv


def test_wheel_is_pure_python_tagged(installed):
    wheels = list((installed.parent / "dist").glob("*.whl"))

    assert wheels[0].name.startswith("pyconvmpi-")
    assert "-py3-none-" in wheels[0].name


def test_import_and_convolve_elsewhere(installed, tmp_path):
    output = _run([installed / "bin" / "python", "-c", CONVOLVE], tmp_path, _clean_env())
    library, result = output.splitlines()

    assert Path(library).is_relative_to(installed)
    assert result == EXPECTED_RESULT


def test_import_from_source_checkout(installed):
    # "python -m pytest" in the repository root puts the source tree's package, which contains no
    # built library, ahead of the installed one; the installed library must still be found.
    source = installed.parent / "source"

    output = _run([installed / "bin" / "python", "-c", CONVOLVE], source, _clean_env())
    library, result = output.splitlines()

    assert Path(library).is_relative_to(installed)
    assert result == EXPECTED_RESULT


def test_import_after_mpi4py(installed, tmp_path):
    output = _run([installed / "bin" / "python", "-c", "import mpi4py.MPI\n" + CONVOLVE],
                  tmp_path, _clean_env())

    assert output.splitlines()[-1] == EXPECTED_RESULT


def test_mpi4py_after_import(installed, tmp_path):
    script = CONVOLVE + "from mpi4py import MPI\nprint(MPI.COMM_WORLD.Get_size())\n"

    output = _run([installed / "bin" / "python", "-c", script], tmp_path, _clean_env())

    assert output.splitlines()[-1] == "1"


def test_main_module_runs(installed, tmp_path):
    output = _run([installed / "bin" / "python", "-m", "pyconvmpi"], tmp_path, _clean_env())

    assert output.startswith("pyconvmpi ")
    assert "MPI library:     MPICH" in output


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
def test_library_runpath_is_relative(installed):
    library = next(installed.glob("lib/python*/site-packages/pyconvmpi/libpyconvmpi.so"))

    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True,
                             check=True).stdout

    runpaths = [line for line in dynamic.splitlines() if "RUNPATH" in line or "RPATH" in line]
    assert runpaths, dynamic
    assert all("$ORIGIN" in line and "/tmp" not in line for line in runpaths), runpaths


def test_editable_install(tmp_path):
    # The documented editable workflow: an activated venv with the build requirements, then
    # "pip install -e . --no-build-isolation". The package imports from the source tree while
    # the library is installed into site-packages.
    source = _source_copy(tmp_path / "source")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, _clean_env())
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "scikit-build-core", "cmake", "ninja", "mpich",
          "numpy", "mpi4py"], tmp_path, _clean_env(venv))
    _run([python, "-m", "pip", "install", "-q", "-e", ".", "--no-build-isolation", "--no-deps"],
         source, _clean_env(venv))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    output = _run([python, "-c", "import pyconvmpi; print(pyconvmpi.__file__)\n" + CONVOLVE],
                  elsewhere, _clean_env())
    module, library, result = output.splitlines()

    assert Path(module).is_relative_to(source)
    assert Path(library).is_relative_to(venv)
    assert result == EXPECTED_RESULT
