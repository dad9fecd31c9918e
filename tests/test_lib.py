"""The C API through pyconvmpi._lib, with Python's argument checks bypassed.

Covers the ABI number, version, status texts, enum values against pcm.h and struct sizes.
The library validates again on its own: every bad descriptor, execution setting or NULL pointer
must return a status instead of crashing. Kernels must write every output element and nothing
else.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyconvmpi
from pyconvmpi import _lib, errors

import reference
import tolerances
from cases import forced_algorithms, geometry_desc, random_case

HEADER = Path(__file__).resolve().parents[1] / "cpp" / "include" / "pyconvmpi" / "pcm.h"
OK, INVALID, UNSUPPORTED = 0, 1, 2
STATUSES = sorted(_lib.STATUS_NAMES)
UNKNOWN_STATUSES = [-(2**31), -1, max(STATUSES) + 1, 1000, 2**31 - 1]

requires_header = pytest.mark.skipif(not HEADER.is_file(), reason="pcm.h is not in this checkout")


def _header_enums():
    """Return {enum name: {constant: value}} for every enum in pcm.h (typedef'd or anonymous)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    enums = {}
    for index, match in enumerate(re.finditer(r"enum\s*(\w*)\s*\{(.*?)\}", text, flags=re.S)):
        name = match.group(1) or f"anonymous_{index}"
        enums[name] = {
            constant: int(value)
            for constant, value in re.findall(r"(PCM_\w+)\s*=\s*(-?\d+)", match.group(2))
        }
    return enums


def test_abi_version_matches_binding():
    assert _lib.lib.pcm_abi_version() == _lib.ABI_VERSION


@requires_header
def test_abi_version_matches_header():
    match = re.search(r"#define\s+PCM_ABI_VERSION\s+(\d+)", HEADER.read_text())

    assert int(match.group(1)) == _lib.ABI_VERSION


def test_version_matches_package():
    assert _lib.version() == pyconvmpi.__version__


def test_struct_sizes_match_mirrors():
    assert _lib.lib.pcm_sizeof_conv_desc() == ctypes.sizeof(_lib.ConvDesc) == 18 * 8
    assert _lib.lib.pcm_sizeof_exec() == ctypes.sizeof(_lib.Exec) == 5 * 8


@pytest.mark.parametrize("status", STATUSES)
def test_strerror_known_status(status):
    text = _lib.strerror(status)

    assert text
    assert text != _lib.strerror(UNKNOWN_STATUSES[0])


def test_strerror_texts_are_distinct():
    texts = [_lib.strerror(status) for status in STATUSES]

    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("status", UNKNOWN_STATUSES)
def test_strerror_unknown_status(status):
    assert _lib.strerror(status) == "unknown status"


@requires_header
def test_enum_values_unique_in_header():
    for name, constants in _header_enums().items():
        values = list(constants.values())
        assert len(values) == len(set(values)), f"enum {name} repeats a value: {constants}"


@requires_header
def test_binding_tables_match_header():
    constants = {c: v for enum in _header_enums().values() for c, v in enum.items()}

    assert {v: c for c, v in constants.items() if c.startswith("PCM_OK")
            or c.startswith("PCM_ERR_")} == _lib.STATUS_NAMES
    for name, value in _lib.ALGORITHMS.items():
        assert constants[f"PCM_ALGO_{name.upper()}"] == value
    for name, value in _lib.PLACEMENTS.items():
        assert constants[f"PCM_PLACEMENT_{name.upper()}"] == value
    for name, value in _lib.STRATEGIES.items():
        assert constants[f"PCM_STRATEGY_{name.upper()}"] == value
    for name, value in _lib.NEED_BITS.items():
        assert constants[f"PCM_NEED_{name.upper()}"] == value
    assert constants["PCM_FLOAT32"] == _lib.FLOAT32
    assert constants["PCM_FLOAT64"] == _lib.FLOAT64


@pytest.mark.parametrize("status", STATUSES[1:])
def test_check_maps_status_to_exception(status):
    with pytest.raises(errors.PyconvmpiError) as info:
        _lib.check(status, "context")

    assert type(info.value) is errors.STATUS_CLASSES[status]
    assert info.value.status == status
    assert str(info.value) == f"context: {_lib.strerror(status)} ({_lib.STATUS_NAMES[status]})"


def test_check_invalid_argument_is_value_error():
    with pytest.raises(ValueError):
        _lib.check(INVALID, "context")


def test_check_unknown_status():
    with pytest.raises(errors.PyconvmpiError, match=r"context: unknown status \(status 99\)"):
        _lib.check(99, "context")


def test_check_ok_returns_none():
    assert _lib.check(OK, "context") is None


def test_runtime_queries():
    assert _lib.simd_level() in ("avx512", "avx2", "scalar")
    assert _lib.default_threads() >= 1
    assert _lib.mpi_library_version().strip()


def test_mpi_library_version_buffer_rules():
    small = ctypes.create_string_buffer(4)

    assert _lib.lib.pcm_mpi_library_version(None, 16) == INVALID
    assert _lib.lib.pcm_mpi_library_version(small, 0) == INVALID
    assert _lib.lib.pcm_mpi_library_version(small, -5) == INVALID
    assert _lib.lib.pcm_mpi_library_version(small, 4) == OK
    assert len(small.value) <= 3


@pytest.mark.parametrize("rows, ranks, rank", [(10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)])
def test_row_band_invalid(rows, ranks, rank):
    start, stop = ctypes.c_int64(), ctypes.c_int64()

    status = _lib.lib.pcm_row_band(rows, ranks, rank, ctypes.byref(start), ctypes.byref(stop))

    assert status == INVALID


def test_row_band_null_outputs():
    assert _lib.lib.pcm_row_band(10, 2, 0, None, None) == INVALID


# --- the library's own validation -------------------------------------------------------------

GOOD = dict(n=1, c=2, h=5, w=5, k=2, r=3, s=3, out_h=3, out_w=3, stride_h=1, stride_w=1,
            pad_top=0, pad_left=0, pad_bottom=0, pad_right=0, dilation_h=1, dilation_w=1,
            groups=1)
BIG = 2**40

BAD_DESCS = {
    "n_negative": dict(n=-1),
    "c_negative": dict(c=-1),
    "h_negative": dict(h=-1),
    "w_negative": dict(w=-1),
    "k_negative": dict(k=-1),
    "r_zero": dict(r=0),
    "s_negative": dict(s=-3),
    "out_h_negative": dict(out_h=-1),
    "out_w_negative": dict(out_w=-2),
    "stride_h_zero": dict(stride_h=0),
    "stride_w_negative": dict(stride_w=-1),
    "dilation_h_zero": dict(dilation_h=0),
    "dilation_w_negative": dict(dilation_w=-4),
    "groups_zero": dict(groups=0),
    "groups_negative": dict(groups=-1),
    "groups_not_dividing_c": dict(groups=2, c=3, k=2),
    "groups_not_dividing_k": dict(groups=2, c=2, k=3),
    "pad_bottom_negative": dict(pad_bottom=-1),
    "pad_right_negative": dict(pad_right=-1),
    "input_elements_overflow": dict(n=BIG, c=BIG),
    "output_elements_overflow": dict(out_h=BIG, out_w=BIG),
    "weight_elements_overflow": dict(k=BIG, c=BIG),
    "dilated_kernel_overflow": dict(r=BIG, dilation_h=BIG),
    "pad_top_huge": dict(pad_top=2**62),
    "pad_left_huge_negative": dict(pad_left=-(2**62)),
    "stride_times_out_overflow": dict(stride_h=2**40, out_h=2**30),
    "all_max": {name: 2**63 - 1 for name in GOOD},
}


def _desc(**changes):
    return _lib.ConvDesc(**{**GOOD, **changes})


def _exec(algorithm=0, threads=0, block_k=0, block_c=0, block_w=0):
    return _lib.Exec(algorithm, threads, block_k, block_c, block_w)


class Buffers:
    """Valid float64 arrays for GOOD; bad descriptors never reach the data, so these suffice."""

    def __init__(self):
        self.x = np.ones((1, 2, 5, 5))
        self.w = np.ones((2, 2, 3, 3))
        self.b = np.ones(2)
        self.y = np.full((1, 2, 3, 3), np.nan)
        self.gx = np.full((1, 2, 5, 5), np.nan)
        self.gw = np.full((2, 2, 3, 3), np.nan)
        self.gb = np.full(2, np.nan)

    def pointer(self, name):
        return getattr(self, name).ctypes.data


def _forward(desc, exec_, buffers, dtype=_lib.FLOAT64, **pointers):
    p = {name: buffers.pointer(name) for name in ("x", "w", "b", "y")}
    p.update(pointers)
    return _lib.lib.pcm_conv2d_forward(dtype, desc, exec_, p["x"], p["w"], p["b"], p["y"])


def _backward_data(desc, exec_, buffers, dtype=_lib.FLOAT64, **pointers):
    p = {name: buffers.pointer(name) for name in ("y", "w", "gx")}
    p.update(pointers)
    return _lib.lib.pcm_conv2d_backward_data(dtype, desc, exec_, p["y"], p["w"], p["gx"])


def _backward_weight(desc, exec_, buffers, dtype=_lib.FLOAT64, **pointers):
    p = {name: buffers.pointer(name) for name in ("y", "x", "gw", "gb")}
    p.update(pointers)
    return _lib.lib.pcm_conv2d_backward_weight(dtype, desc, exec_, p["y"], p["x"], p["gw"],
                                               p["gb"])


ENTRY_POINTS = {"forward": _forward, "backward_data": _backward_data,
                "backward_weight": _backward_weight}
EXPLICIT_ALGORITHMS = [value for name, value in _lib.ALGORITHMS.items() if name != "auto"]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_good_call_succeeds(entry):
    buffers = Buffers()
    buffers.y[...] = 1.0

    assert ENTRY_POINTS[entry](_desc(), _exec(), buffers) == OK


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("name", list(BAD_DESCS))
def test_bad_desc_returns_invalid(name, entry):
    buffers = Buffers()

    status = ENTRY_POINTS[entry](_desc(**BAD_DESCS[name]), _exec(), buffers)

    assert status == INVALID
    assert np.isnan(buffers.gx).all()
    assert np.isnan(buffers.gw).all()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_null_desc_returns_invalid(entry):
    assert ENTRY_POINTS[entry](None, _exec(), Buffers()) == INVALID


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_null_exec_returns_invalid(entry):
    assert ENTRY_POINTS[entry](_desc(), None, Buffers()) == INVALID


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [-1, 2, 3, 2**31 - 1])
def test_bad_dtype_returns_invalid(entry, dtype):
    assert ENTRY_POINTS[entry](_desc(), _exec(), Buffers(), dtype=dtype) == INVALID


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("setting", [dict(algorithm=-1), dict(algorithm=99),
                                     dict(algorithm=2**62), dict(threads=-1),
                                     dict(block_k=-1), dict(block_c=-8), dict(block_w=-2**40)],
                         ids=["algorithm_negative", "algorithm_99", "algorithm_huge",
                              "threads_negative", "block_k", "block_c", "block_w"])
def test_bad_exec_returns_invalid(entry, setting):
    assert ENTRY_POINTS[entry](_desc(), _exec(**setting), Buffers()) == INVALID


@pytest.mark.parametrize("entry, pointer", [
    ("forward", "x"), ("forward", "w"), ("forward", "y"),
    ("backward_data", "y"), ("backward_data", "w"), ("backward_data", "gx"),
    ("backward_weight", "y"), ("backward_weight", "x"),
])
def test_null_array_returns_invalid(entry, pointer):
    assert ENTRY_POINTS[entry](_desc(), _exec(), Buffers(), **{pointer: None}) == INVALID


def test_backward_weight_needs_one_output():
    buffers = Buffers()

    assert _backward_weight(_desc(), _exec(), buffers, gw=None, gb=None) == INVALID
    buffers.y[...] = 1.0
    assert _backward_weight(_desc(), _exec(), buffers, gw=None) == OK
    assert np.isnan(buffers.gw).all()
    assert buffers.gb.tolist() == [9.0, 9.0]
    assert _backward_weight(_desc(), _exec(), buffers, gb=None) == OK
    assert (buffers.gw == 9.0).all()


def test_forward_null_bias_means_no_bias():
    buffers = Buffers()

    assert _forward(_desc(), _exec(), buffers, b=None) == OK
    assert (buffers.y == 18.0).all()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("algorithm", EXPLICIT_ALGORITHMS)
def test_unsupported_algorithm_returns_unsupported(entry, algorithm):
    op = {"forward": 0, "backward_data": 1, "backward_weight": 2}[entry]
    if _lib.lib.pcm_algorithm_supported(algorithm, op, _desc()):
        pytest.skip("the algorithm computes this geometry, so there is no rejection to test")
    buffers = Buffers()
    buffers.y[...] = 1.0

    assert ENTRY_POINTS[entry](_desc(), _exec(algorithm=algorithm), buffers) == UNSUPPORTED


# Tile sizes are caps that the kernels clamp to the layer, so values near 2**63 must neither
# overflow index arithmetic nor leave the output unwritten.
@pytest.mark.parametrize("entry", ["forward", "backward_data", "backward_weight"])
def test_huge_tile_sizes_still_compute(entry):
    # Tile sizes larger than the layer are legal and must behave like the layer's size.
    buffers = Buffers()
    buffers.y[...] = 1.0
    huge = _exec(algorithm=_lib.ALGORITHMS["direct"], block_k=2**63 - 1, block_c=2**63 - 1,
                 block_w=2**63 - 1)

    assert ENTRY_POINTS[entry](_desc(), huge, buffers) == OK
    if entry == "forward":
        assert (buffers.y == 19.0).all()
    elif entry == "backward_data":
        assert np.isfinite(buffers.gx).all()
    else:
        assert (buffers.gw == 9.0).all()


def test_algorithm_supported_rules():
    supported = _lib.lib.pcm_algorithm_supported

    assert supported(0, 0, _desc()) == 1
    assert supported(0, 0, None) == 0
    assert supported(0, 3, _desc()) == 0
    assert supported(0, -1, _desc()) == 0
    assert supported(0, 0, _desc(groups=0)) == 0
    assert supported(99, 0, _desc()) == 0


@pytest.mark.parametrize("changes", [
    dict(out_h=10, out_w=10),            # more outputs than the input allows: they read zeros
    dict(out_h=12, pad_top=-4),          # a window that starts inside the image
    dict(pad_left=10**6, out_w=3),       # a window far to the left of the image
], ids=["oversized_output", "negative_pad", "far_window"])
@pytest.mark.parametrize("algorithm", EXPLICIT_ALGORITHMS)
def test_windows_outside_image_read_zeros(changes, algorithm):
    # pcm.h allows a window into a larger image. Every element outside [0, h) x [0, w) reads
    # as zero, so the result equals the reference on the explicitly zero-padded input.
    desc = _desc(**changes)
    if not _lib.lib.pcm_algorithm_supported(algorithm, 0, desc):
        pytest.skip("the algorithm rejects this geometry, so there is no result to check")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 5, 5))
    w = rng.standard_normal((2, 2, 3, 3))
    y = np.full((1, 2, desc.out_h, desc.out_w), np.nan)
    top, left = desc.pad_top, desc.pad_left
    rows = desc.out_h + 2 - top - 5  # rows of zeros needed below the image
    cols = desc.out_w + 2 - left - 5
    padded = np.zeros((1, 2, 5 + abs(top) + max(rows, 0), 5 + abs(left) + max(cols, 0)))
    padded[:, :, max(top, 0):max(top, 0) + 5, max(left, 0):max(left, 0) + 5] = x
    start_y, start_x = max(-top, 0), max(-left, 0)
    window = padded[:, :, start_y:start_y + desc.out_h + 2, start_x:start_x + desc.out_w + 2]

    status = _lib.lib.pcm_conv2d_forward(_lib.FLOAT64, desc, _exec(algorithm=algorithm),
                                         x.ctypes.data, w.ctypes.data, None, y.ctypes.data)

    assert status == OK
    np.testing.assert_allclose(y, reference.forward(window, w), rtol=1e-12, atol=1e-12)


# --- kernels write every output element and nothing else --------------------------------------

def _guarded(shape, dtype):
    """Return (block, view): a NaN-filled block with 64 guard elements on each side of view."""
    size = int(np.prod(shape))
    block = np.full(size + 128, np.nan, dtype=dtype)
    return block, block[64:64 + size].reshape(shape)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", range(40), ids=lambda seed: f"seed={seed}")
def test_kernels_overwrite_nan_outputs_exactly(seed, dtype):
    case = random_case(2000 + seed, dtype, ["contiguous"])
    case.x_shape = case.x_shape if case.batched else (1, *case.x_shape)
    desc = geometry_desc(case)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.x_shape).astype(dtype)
    w = rng.standard_normal(case.w_shape).astype(dtype)
    b = rng.standard_normal(case.w_shape[0]).astype(dtype)
    out_shape = (desc.n, desc.k, desc.out_h, desc.out_w)
    go = rng.standard_normal(out_shape).astype(dtype)
    code = _lib.FLOAT32 if dtype == "float32" else _lib.FLOAT64
    options = case.options
    geo = reference.Geometry(x.shape, w.shape, **options)
    nhw = geo.n * geo.out_h * geo.out_w
    expected = {
        "output": (reference.forward(x, w, b, **options),
                   reference.abs_forward(x, w, b, **options), geo.cg * geo.r * geo.s + 1),
        "grad_input": (reference.backward_input(go, x.shape, w, **options),
                       reference.abs_backward_input(go, x.shape, w, **options),
                       geo.k // geo.groups * geo.r * geo.s),
        "grad_weight": (reference.backward_weight(go, x, w.shape, **options),
                        reference.abs_backward_weight(go, x, w.shape, **options), nhw),
        "grad_bias": (reference.backward_bias(go), reference.backward_bias(np.abs(go)), nhw),
    }

    for op in ("forward", "backward_data", "backward_weight"):
        for algorithm in ["auto", *forced_algorithms(case, op)]:
            exec_ = _exec(algorithm=_lib.ALGORITHMS[algorithm])
            if op == "forward":
                outputs = {"output": _guarded(out_shape, dtype)}
                status = _lib.lib.pcm_conv2d_forward(
                    code, desc, exec_, x.ctypes.data, w.ctypes.data, b.ctypes.data,
                    outputs["output"][1].ctypes.data)
            elif op == "backward_data":
                outputs = {"grad_input": _guarded(x.shape, dtype)}
                status = _lib.lib.pcm_conv2d_backward_data(
                    code, desc, exec_, go.ctypes.data, w.ctypes.data,
                    outputs["grad_input"][1].ctypes.data)
            else:
                outputs = {"grad_weight": _guarded(w.shape, dtype),
                           "grad_bias": _guarded(b.shape, dtype)}
                status = _lib.lib.pcm_conv2d_backward_weight(
                    code, desc, exec_, go.ctypes.data, x.ctypes.data,
                    outputs["grad_weight"][1].ctypes.data, outputs["grad_bias"][1].ctypes.data)
            assert status == OK, f"{op}, algorithm {algorithm}"

            for name, (block, view) in outputs.items():
                label = f"{name}, algorithm {algorithm}"
                assert np.isfinite(view).all(), f"{label}: unwritten elements"
                assert np.isnan(block[:64]).all(), f"{label}: written before the array"
                assert np.isnan(block[64 + view.size:]).all(), f"{label}: written after the array"
                value, scale, terms = expected[name]
                tolerances.assert_close(view, value, scale, dtype=np.dtype(dtype), terms=terms,
                                        factor=tolerances.ALGORITHM_FACTOR[algorithm],
                                        label=label)


def _stale_library(tmp_path, abi):
    """Build a library that exports only the ABI and struct-size functions."""
    source = tmp_path / "stale.c"
    source.write_text(
        "#include <stdint.h>\n"
        f"int pcm_abi_version(void) {{ return {abi}; }}\n"
        f"int64_t pcm_sizeof_conv_desc(void) {{ return {ctypes.sizeof(_lib.ConvDesc)}; }}\n"
        f"int64_t pcm_sizeof_exec(void) {{ return {ctypes.sizeof(_lib.Exec)}; }}\n"
    )
    library = tmp_path / "libstale.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def _import_error_with(library):
    env = {**os.environ, "PYCONVMPI_LIBRARY": str(library)}
    done = subprocess.run([sys.executable, "-c", "import pyconvmpi"], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_older_library_fails_import_by_name(tmp_path):
    message = _import_error_with(_stale_library(tmp_path, _lib.ABI_VERSION))
    assert message.startswith("ImportError:")
    assert "has no function pcm_" in message
    assert "rebuild" in message


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_other_abi_fails_import(tmp_path):
    message = _import_error_with(_stale_library(tmp_path, _lib.ABI_VERSION - 1))
    assert message.startswith("ImportError:")
    assert f"ABI version {_lib.ABI_VERSION - 1}" in message
