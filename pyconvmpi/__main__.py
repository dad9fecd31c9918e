"""``python -m pyconvmpi``: report the version, library, SIMD level, threads and MPI."""

import sys

from . import __version__, _lib


def main():
    mpi = _lib.mpi_library_version().strip().splitlines()
    lines = [
        f"pyconvmpi {__version__}",
        f"library:         {_lib.library_path}",
        f"library version: {_lib.version()} (ABI {_lib.ABI_VERSION})",
        f"SIMD level:      {_lib.simd_level()}",
        f"OpenMP threads:  {_lib.default_threads()}",
        f"MPI library:     {mpi[0] if mpi else 'unknown'}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
