"""64-bit indexing: arrays with more than 2**31 elements, forward and both backward passes.

Each test uses one array of 2049 x 1024 x 1024 float32 elements (8.6 GB, 2**31 + 2**20
elements), so an index computed in 32 bits would wrap. Values are small integers, so every sum
is exact in float32 and sampled elements are compared for equality with float64 NumPy. A test
is skipped when /proc/meminfo reports less available memory than it needs.
"""

import numpy as np
import pytest

import pyconvmpi

pytestmark = pytest.mark.slow

CHANNELS, SIDE = 2049, 1024
BIG_SHAPE = (1, CHANNELS, SIDE, SIDE)
BIG_BYTES = CHANNELS * SIDE * SIDE * 4
assert CHANNELS * SIDE * SIDE > 2**31


def _available_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def needs_memory(gigabytes):
    return pytest.mark.skipif(_available_bytes() < gigabytes * 2**30,
                              reason=f"needs {gigabytes} GiB of available memory")


def _pattern(c, y, x):
    """Input value at channel c, row y, column x: an integer in [0, 3]."""
    return (c + 2 * y + 3 * x) % 4


def _channel_weights():
    return ((np.arange(CHANNELS) % 3) - 1).astype(np.float32)


def _big_input():
    """Return the (1, 2049, 1024, 1024) float32 input filled with _pattern, plane by plane."""
    x = np.empty(BIG_SHAPE, np.float32)
    rows = np.arange(SIDE)[:, None]
    cols = np.arange(SIDE)[None, :]
    base = (2 * rows + 3 * cols) % 4
    for c in range(4):
        x[0, c::4] = (base + c) % 4
    return x


SAMPLES = [(0, 0), (0, SIDE - 1), (SIDE - 1, 0), (SIDE - 1, SIDE - 1), (517, 333), (1000, 7)]
CHANNEL_SAMPLES = [0, 1, 2, 1023, 2047, CHANNELS - 1]


@needs_memory(10)
def test_forward_output_past_2_31_elements():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(1, 1, SIDE, SIDE)).astype(np.float32)
    w = _channel_weights().reshape(CHANNELS, 1, 1, 1) + 2
    b = np.arange(CHANNELS, dtype=np.float32) % 5

    out = pyconvmpi.conv2d(x, w, b)

    assert out.shape == (1, CHANNELS, SIDE, SIDE)
    for k in CHANNEL_SAMPLES:
        for y, col in SAMPLES:
            assert out[0, k, y, col] == w[k, 0, 0, 0] * x[0, 0, y, col] + b[k], (k, y, col)
    np.testing.assert_array_equal(out[0, -1], w[-1, 0, 0, 0] * x[0, 0] + b[-1])


@needs_memory(10)
def test_forward_input_past_2_31_elements():
    x = _big_input()
    w = _channel_weights().reshape(1, CHANNELS, 1, 1)

    out = pyconvmpi.conv2d(x, w, stride=(1, 3))

    assert out.shape == (1, 1, SIDE, (SIDE - 1) // 3 + 1)
    for y, col in SAMPLES:
        col = col - col % 3
        expected = float(np.dot(w[0, :, 0, 0].astype(np.float64),
                                x[0, :, y, col].astype(np.float64)))
        assert out[0, 0, y, col // 3] == expected, (y, col)
    # The last output column reads the last input column stride 3 reaches.
    expected_row = np.einsum("c,cx->x", w[0, :, 0, 0].astype(np.float64),
                             x[0, :, SIDE - 1, ::3].astype(np.float64))
    np.testing.assert_array_equal(out[0, 0, SIDE - 1], expected_row)


@needs_memory(10)
def test_backward_input_past_2_31_elements():
    rng = np.random.default_rng(1)
    go = rng.integers(-3, 4, size=(1, 1, SIDE, SIDE)).astype(np.float32)
    # The gradient of input reads only the input's shape. np.zeros maps zero pages that are
    # never touched, so this input costs no memory.
    x = np.zeros(BIG_SHAPE, np.float32)
    w = _channel_weights().reshape(1, CHANNELS, 1, 1)

    grad_input = pyconvmpi.conv2d_backward(go, x, w, need=("input",)).input

    assert grad_input.shape == BIG_SHAPE
    for c in CHANNEL_SAMPLES:
        for y, col in SAMPLES:
            assert grad_input[0, c, y, col] == w[0, c, 0, 0] * go[0, 0, y, col], (c, y, col)
    np.testing.assert_array_equal(grad_input[0, -1], w[0, -1, 0, 0] * go[0, 0])


@needs_memory(10)
def test_backward_weight_reads_input_past_2_31_elements():
    x = _big_input()
    go = np.ones((1, 1, SIDE, SIDE), np.float32)
    go[0, 0, ::2] = 2.0
    w = np.zeros((1, CHANNELS, 1, 1), np.float32)

    grads = pyconvmpi.conv2d_backward(go, x, w, need=("weight", "bias"))

    assert grads.weight.shape == (1, CHANNELS, 1, 1)
    for c in CHANNEL_SAMPLES:
        expected = float(np.sum(go[0, 0].astype(np.float64) * x[0, c]))
        assert grads.weight[0, c, 0, 0] == expected, c
    assert grads.bias[0] == float(go.sum(dtype=np.float64))
