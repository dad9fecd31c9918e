"""Tolerances of every numerical comparison in the suite, in one place, with their reasons.

A computed element is a sum of ``terms`` products. Whatever the summation order, rounding each
addition to the working precision moves the result by at most about ``terms * eps`` times the
sum of the absolute values of the terms (``scale`` below, computed by the float64 reference on
``|input|`` and ``|weight|``). For sums of rounding errors with random signs the typical error
grows like ``sqrt(terms) * eps * scale``, and kernels that block or split the sum do better, so
the bound used is

    |result - reference| <= factor * eps(dtype) * sqrt(terms) * scale

with ``factor`` per algorithm. Where ``scale`` is zero (an input element that no output reads,
a zero weight) the bound is zero, so such elements must be exactly zero.

Reduction lengths (``terms``):
- forward: in_channels / groups * kH * kW products (plus the bias);
- gradient of input: out_channels / groups * kH * kW products at most per element;
- gradient of weight and of bias: N * H_out * W_out products, the longest sums in a
  convolution, which is why they get the largest absolute errors in float32.
"""

import math

import numpy as np

# Multiplier of eps * sqrt(terms) * scale per algorithm.
ALGORITHM_FACTOR = {
    # Sums in float64 and rounds once: only the final rounding (0.5 eps) remains.
    "reference": 2.0,
    # Sums in the working precision in tap order. Measured errors stay below 0.6 eps *
    # sqrt(terms) on 300 random float32 cases, so 4 leaves room for unlucky sign patterns.
    "direct": 4.0,
    # Packed GEMM: the same products, summed in blocks of the reduction.
    "gemm": 4.0,
    # Winograd F(2x2, 3x3) transforms 4x4 input patches and the weights before the products
    # and 4x4 products back (coefficients 0, +-1, 1/2), so each output also carries the rounding
    # of values it does not depend on in exact arithmetic: its error follows the magnitudes of
    # its whole tile, not only of its own 9 taps. Measured maxima (float64 reference, units of
    # eps * sqrt(terms) * scale): 2.0 over tests/test_winograd.py with 5 seeds, 7.1 over the
    # parity suites (random grid seed 151, an output much smaller than its tile neighbours).
    # 20 leaves room for tiles with larger magnitude differences.
    "winograd": 20.0,
}
# "auto" may dispatch to any algorithm, so it gets the loosest bound.
ALGORITHM_FACTOR["auto"] = max(ALGORITHM_FACTOR.values())

# PyTorch's own CPU kernels (oneDNN or im2col + BLAS) round like a blocked GEMM.
TORCH_FACTOR = 4.0

# The float64 NumPy reference sums with einsum; its own error is covered by adding this much.
REFERENCE_FACTOR = 1.0


def eps(dtype):
    """Return the machine epsilon of a float dtype."""
    return float(np.finfo(dtype).eps)


def bound(dtype, terms, scale, factor):
    """Return the elementwise error bound ``factor * eps * sqrt(terms) * scale``."""
    return factor * eps(dtype) * math.sqrt(max(terms, 1)) * np.asarray(scale, dtype=np.float64)


def assert_close(result, expected, scale, *, dtype, terms, factor, label):
    """Assert |result - expected| <= bound elementwise; report the worst element on failure."""
    result = np.asarray(result)
    assert result.shape == np.shape(expected), (
        f"{label}: shape {result.shape} != {np.shape(expected)}")
    assert np.isfinite(result).all(), f"{label}: result contains NaN or infinity"
    error = np.abs(result.astype(np.float64) - expected)
    limit = bound(dtype, terms, scale, factor + REFERENCE_FACTOR)
    excess = error - limit
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{label}: {int((excess > 0).sum())} of {excess.size} elements off; worst at {worst}: "
            f"got {result[worst]!r}, expected {expected[worst]!r}, error {error[worst]:.3g} > "
            f"bound {limit[worst]:.3g} ({factor} x eps x sqrt({terms}) x scale {scale[worst]:.3g})"
        )
