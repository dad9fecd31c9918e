"""The only module that talks to the C library through ctypes.

It finds ``libpyconvmpi.so`` (``PYCONVMPI_LIBRARY`` overrides the location), declares every
symbol of ``pcm.h`` in one table, checks the ABI number and the size of the two structs, and
turns status codes into exceptions in ``check``.
"""

import ctypes
import logging
import os
import sys
from pathlib import Path

from . import errors

logger = logging.getLogger(__name__)

ABI_VERSION = 2
LIBRARY_NAME = "libpyconvmpi.so"

FLOAT32, FLOAT64 = 0, 1
ALGORITHMS = {"auto": 0, "direct": 1, "gemm": 2, "winograd": 3, "reference": 4}
PLACEMENTS = {"replicated": 0, "root": 1, "batch": 2, "rows": 3}
STRATEGIES = {"batch": 1, "channels": 2, "rows": 3, "hybrid": 4}
OPS = {"forward": 0, "backward_data": 1, "backward_weight": 2}
NEED_BITS = {"input": 1, "weight": 2, "bias": 4}
STATUS_NAMES = {
    0: "PCM_OK",
    1: "PCM_ERR_INVALID_ARGUMENT",
    2: "PCM_ERR_UNSUPPORTED",
    3: "PCM_ERR_OUT_OF_MEMORY",
    4: "PCM_ERR_MPI",
    5: "PCM_ERR_INTERNAL",
    6: "PCM_ERR_REMOTE",
}


class ConvDesc(ctypes.Structure):
    """Mirror of ``pcm_conv_desc``; its size is checked against the library at import."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "n", "c", "h", "w", "k", "r", "s", "out_h", "out_w", "stride_h", "stride_w",
            "pad_top", "pad_left", "pad_bottom", "pad_right", "dilation_h", "dilation_w",
            "groups",
        )
    ]


class Exec(ctypes.Structure):
    """Mirror of ``pcm_exec``; its size is checked against the library at import."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("algorithm", "threads", "block_k", "block_c", "block_w")
    ]


def _candidate_paths():
    override = os.environ.get("PYCONVMPI_LIBRARY")
    if override:
        return [Path(override)]
    # An editable install keeps __file__ in the source tree while the built library sits in
    # site-packages, so search every directory of the package's __path__.
    package = sys.modules[__package__]
    return [Path(entry) / LIBRARY_NAME for entry in package.__path__]


def _installed_path():
    """Return where pip installed the library, or None if the package is not installed.

    Running Python from a source checkout (``python -m pytest`` in the repository root) imports
    the source tree's package, which contains no built library, ahead of the installed one.
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution("pyconvmpi")
    except metadata.PackageNotFoundError:
        return None
    return Path(distribution.locate_file(f"pyconvmpi/{LIBRARY_NAME}"))


def _load():
    candidates = _candidate_paths()
    if not os.environ.get("PYCONVMPI_LIBRARY") and not any(p.is_file() for p in candidates):
        installed = _installed_path()
        if installed is not None:
            candidates.append(installed)
    for path in candidates:
        if path.is_file():
            try:
                library = ctypes.CDLL(str(path))
            except OSError as exc:
                raise ImportError(f"pyconvmpi: cannot load {path}: {exc}") from exc
            return library, path
    searched = ", ".join(str(p) for p in candidates)
    raise ImportError(
        f"pyconvmpi: {LIBRARY_NAME} not found (searched {searched}); reinstall with "
        "'pip install .' or set PYCONVMPI_LIBRARY to the built library"
    )


_c_int, _c_int64, _c_char_p, _c_void_p = ctypes.c_int, ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p
_desc_p, _exec_p = ctypes.POINTER(ConvDesc), ctypes.POINTER(Exec)
_int64_p = ctypes.POINTER(ctypes.c_int64)

# (name, restype, argtypes), in the order of pcm.h; status returns are declared c_int.
_SIGNATURES = [
    # const char *pcm_strerror(int status);
    ("pcm_strerror", _c_char_p, [_c_int]),
    # const char *pcm_version(void);
    ("pcm_version", _c_char_p, []),
    # int pcm_abi_version(void);
    ("pcm_abi_version", _c_int, []),
    # int64_t pcm_sizeof_conv_desc(void);
    ("pcm_sizeof_conv_desc", _c_int64, []),
    # int64_t pcm_sizeof_exec(void);
    ("pcm_sizeof_exec", _c_int64, []),
    # const char *pcm_simd_level(void);
    ("pcm_simd_level", _c_char_p, []),
    # int pcm_default_threads(void);
    ("pcm_default_threads", _c_int, []),
    # pcm_status pcm_mpi_library_version(char *buffer_out, int64_t size);
    ("pcm_mpi_library_version", _c_int, [_c_char_p, _c_int64]),
    # int pcm_algorithm_supported(int64_t algorithm, int op, const pcm_conv_desc *desc);
    ("pcm_algorithm_supported", _c_int, [_c_int64, _c_int, _desc_p]),
    # pcm_status pcm_choose_algorithm(int op, const pcm_conv_desc *desc, const pcm_exec *exec,
    #     int64_t *algorithm_out);
    ("pcm_choose_algorithm", _c_int, [_c_int, _desc_p, _exec_p, _int64_p]),
    # pcm_status pcm_peak_gflops(int dtype, int64_t threads, double seconds, double *gflops_out);
    ("pcm_peak_gflops", _c_int, [_c_int, _c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_double)]),
    # pcm_status pcm_conv2d_forward(int dtype, const pcm_conv_desc *desc, const pcm_exec *exec,
    #     const void *input, const void *weight, const void *bias, void *output);
    ("pcm_conv2d_forward", _c_int, [_c_int, _desc_p, _exec_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p]),
    # pcm_status pcm_conv2d_backward_data(int dtype, const pcm_conv_desc *desc,
    #     const pcm_exec *exec, const void *grad_output, const void *weight, void *grad_input);
    ("pcm_conv2d_backward_data", _c_int, [_c_int, _desc_p, _exec_p, _c_void_p, _c_void_p, _c_void_p]),
    # pcm_status pcm_conv2d_backward_weight(int dtype, const pcm_conv_desc *desc,
    #     const pcm_exec *exec, const void *grad_output, const void *input, void *grad_weight,
    #     void *grad_bias);
    ("pcm_conv2d_backward_weight", _c_int, [_c_int, _desc_p, _exec_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p]),
    # pcm_status pcm_row_band(int64_t rows, int64_t ranks, int64_t rank, int64_t *start_out,
    #     int64_t *stop_out);
    ("pcm_row_band", _c_int, [_c_int64, _c_int64, _c_int64, _int64_p, _int64_p]),
    # pcm_status pcm_mpi_conv2d_forward(int comm_f, int placement, int strategy,
    #     int64_t grid_batch, int64_t grid_channels, int64_t active_ranks, int dtype,
    #     const pcm_conv_desc *desc, const pcm_exec *exec, const void *input,
    #     const void *weight, const void *bias, void *output);
    ("pcm_mpi_conv2d_forward", _c_int,
     [_c_int, _c_int, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _desc_p, _exec_p,
      _c_void_p, _c_void_p, _c_void_p, _c_void_p]),
    # pcm_status pcm_mpi_conv2d_backward(int comm_f, int placement, int strategy,
    #     int64_t grid_batch, int64_t grid_channels, int64_t active_ranks, int dtype, int need,
    #     const pcm_conv_desc *desc, const pcm_exec *exec, const void *grad_output,
    #     const void *input, const void *weight, void *grad_input, void *grad_weight,
    #     void *grad_bias);
    ("pcm_mpi_conv2d_backward", _c_int,
     [_c_int, _c_int, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _desc_p, _exec_p,
      _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p]),
]


def _declare(library, path):
    for name, restype, argtypes in _SIGNATURES:
        try:
            function = getattr(library, name)
        except AttributeError:
            raise ImportError(
                f"pyconvmpi: {path} has no function {name}, so it is older than this Python "
                f"package; rebuild with 'pip install .'"
            ) from None
        function.restype = restype
        function.argtypes = argtypes


def _check_abi(library, path):
    found = library.pcm_abi_version()
    if found != ABI_VERSION:
        raise ImportError(
            f"pyconvmpi: {path} has ABI version {found} but this Python package expects "
            f"{ABI_VERSION}; rebuild with 'pip install .'"
        )
    for struct, size_function in ((ConvDesc, "pcm_sizeof_conv_desc"), (Exec, "pcm_sizeof_exec")):
        native = getattr(library, size_function)()
        if native != ctypes.sizeof(struct):
            raise ImportError(
                f"pyconvmpi: {path} reports {size_function}() = {native} but the binding's "
                f"mirror has {ctypes.sizeof(struct)} bytes; rebuild with 'pip install .'"
            )


lib, library_path = _load()
_check_abi(lib, library_path)
_declare(lib, library_path)
logger.info("loaded %s (version %s)", library_path, lib.pcm_version().decode())


def strerror(status):
    """Return the library's text for a status number."""
    return lib.pcm_strerror(int(status)).decode()


def check(status, context):
    """Raise the exception class of ``status`` unless it is ``PCM_OK``.

    The single place where a status becomes an exception; messages read
    ``<context>: <strerror text> (<STATUS_NAME>)``.
    """
    if status == 0:
        return
    name = STATUS_NAMES.get(status, f"status {status}")
    cls = errors.STATUS_CLASSES.get(status, errors.PyconvmpiError)
    raise cls(f"{context}: {strerror(status)} ({name})", status=status, status_name=name)


def version():
    """Return the C library's version string."""
    return lib.pcm_version().decode()


def simd_level():
    """Return the SIMD level the kernels dispatch to."""
    return lib.pcm_simd_level().decode()


def default_threads():
    """Return the OpenMP thread count of a call that does not set one."""
    return lib.pcm_default_threads()


def mpi_library_version():
    """Return MPI_Get_library_version() of the MPI the C library is linked against."""
    buffer = ctypes.create_string_buffer(8192)
    check(lib.pcm_mpi_library_version(buffer, len(buffer)), "mpi_library_version")
    return buffer.value.decode(errors="replace")


def row_band(rows, ranks, rank):
    """Return the band ``(start, stop)`` of ``rows`` that ``rank`` of ``ranks`` owns."""
    start, stop = ctypes.c_int64(), ctypes.c_int64()
    check(lib.pcm_row_band(rows, ranks, rank, ctypes.byref(start), ctypes.byref(stop)), "row_band")
    return start.value, stop.value


def algorithm_supported(algorithm, op, desc):
    """Return whether the named algorithm can compute ``op`` for this geometry."""
    return bool(lib.pcm_algorithm_supported(ALGORITHMS[algorithm], OPS[op], ctypes.byref(desc)))


def choose_algorithm(op, desc, exec_):
    """Return the name of the algorithm a local call of ``op`` with ``exec_`` runs."""
    value = ctypes.c_int64()
    check(lib.pcm_choose_algorithm(OPS[op], ctypes.byref(desc), ctypes.byref(exec_),
                                   ctypes.byref(value)), "choose_algorithm")
    names = {code: name for name, code in ALGORITHMS.items()}
    return names[value.value]


def peak_gflops(dtype_code, threads, seconds=0.2):
    """Return the measured multiply-add peak in GFLOP/s of the kernels' SIMD level."""
    value = ctypes.c_double()
    check(lib.pcm_peak_gflops(dtype_code, threads, seconds, ctypes.byref(value)), "peak_gflops")
    return value.value


def _pointer(array):
    return None if array is None else array.ctypes.data


def _dtype_code(array):
    return FLOAT32 if array.dtype.itemsize == 4 else FLOAT64


def conv2d_forward(desc, exec_, input, weight, bias, output):
    """Run ``pcm_conv2d_forward`` on C-contiguous native arrays."""
    status = lib.pcm_conv2d_forward(
        _dtype_code(input), ctypes.byref(desc), ctypes.byref(exec_),
        _pointer(input), _pointer(weight), _pointer(bias), _pointer(output),
    )
    check(status, "conv2d")


def conv2d_backward_data(desc, exec_, grad_output, weight, grad_input):
    """Run ``pcm_conv2d_backward_data`` on C-contiguous native arrays."""
    status = lib.pcm_conv2d_backward_data(
        _dtype_code(weight), ctypes.byref(desc), ctypes.byref(exec_),
        _pointer(grad_output), _pointer(weight), _pointer(grad_input),
    )
    check(status, "conv2d_backward")


def conv2d_backward_weight(desc, exec_, grad_output, input, grad_weight, grad_bias):
    """Run ``pcm_conv2d_backward_weight`` on C-contiguous native arrays."""
    status = lib.pcm_conv2d_backward_weight(
        _dtype_code(input), ctypes.byref(desc), ctypes.byref(exec_),
        _pointer(grad_output), _pointer(input), _pointer(grad_weight), _pointer(grad_bias),
    )
    check(status, "conv2d_backward")


def mpi_conv2d_forward(comm_f, placement, strategy, grid, active_ranks, dtype, desc, exec_,
                       input, weight, bias, output, context="conv2d"):
    """Run ``pcm_mpi_conv2d_forward``; arrays may be None where the placement allows."""
    status = lib.pcm_mpi_conv2d_forward(
        comm_f, PLACEMENTS[placement], STRATEGIES[strategy], grid[0], grid[1], active_ranks,
        dtype, ctypes.byref(desc), ctypes.byref(exec_),
        _pointer(input), _pointer(weight), _pointer(bias), _pointer(output),
    )
    check(status, context)


def mpi_conv2d_backward(comm_f, placement, strategy, grid, active_ranks, dtype, need, desc,
                        exec_, grad_output, input, weight, grad_input, grad_weight, grad_bias,
                        context="conv2d_backward"):
    """Run ``pcm_mpi_conv2d_backward``; ``need`` is a set of gradient names."""
    need_bits = sum(NEED_BITS[name] for name in need)
    status = lib.pcm_mpi_conv2d_backward(
        comm_f, PLACEMENTS[placement], STRATEGIES[strategy], grid[0], grid[1], active_ranks,
        dtype, need_bits, ctypes.byref(desc), ctypes.byref(exec_),
        _pointer(grad_output), _pointer(input), _pointer(weight),
        _pointer(grad_input), _pointer(grad_weight), _pointer(grad_bias),
    )
    check(status, context)


_mpi_match_checked = False


def ensure_same_mpi():
    """Raise ImportError if mpi4py and the C library use different MPI libraries.

    Two MPI libraries in one process cannot share communicators; the check compares
    ``MPI_Get_library_version`` of both and runs once per process.
    """
    global _mpi_match_checked
    if _mpi_match_checked:
        return
    from mpi4py import MPI

    ours, theirs = mpi_library_version().strip(), MPI.Get_library_version().strip()
    if ours != theirs:
        raise ImportError(
            "pyconvmpi: the C library and mpi4py use different MPI libraries; rebuild "
            "pyconvmpi against mpi4py's MPI (see the README, 'Building against a system MPI').\n"
            f"  pyconvmpi: {ours.splitlines()[0] if ours else '?'}\n"
            f"  mpi4py:    {theirs.splitlines()[0] if theirs else '?'}"
        )
    _mpi_match_checked = True


if "mpi4py.MPI" in sys.modules:
    ensure_same_mpi()
