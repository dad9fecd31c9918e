"""Seeded convolution cases and memory layouts shared by the parity tests.

A case is drawn from ``numpy.random.default_rng(seed)``, so a failing test id such as
``seed=17-float32`` reproduces exactly. Layouts turn a C-contiguous array into an equal array
with other strides, byte order or type, to check that every layout gives the same result.
"""

import dataclasses

import numpy as np

from conftest import HAS_TORCH


@dataclasses.dataclass
class Case:
    """One convolution: shapes, options, dtype, layout, and whether it has a bias."""

    x_shape: tuple
    w_shape: tuple
    options: dict
    dtype: str = "float32"
    layout: str = "contiguous"
    bias: bool = True

    @property
    def batched(self):
        return len(self.x_shape) == 4

    def arrays(self, seed):
        """Return float64 input, weight and bias (None without bias) drawn from ``seed``."""
        rng = np.random.default_rng(seed + 1_000_000)
        x = rng.standard_normal(self.x_shape)
        w = rng.standard_normal(self.w_shape)
        b = rng.standard_normal(self.w_shape[0]) if self.bias else None
        return x, w, b


def _padding(rng, stride):
    kind = rng.choice(["int", "pair", "one_list", "same", "valid"])
    if kind == "same" and stride == (1, 1):
        return "same"
    if kind == "valid":
        return "valid"
    if kind == "one_list":
        return [int(rng.integers(0, 3))]
    if kind == "pair":
        return (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    return int(rng.integers(0, 3))


def _int_or_pair(rng, low, high):
    if rng.random() < 0.5:
        return int(rng.integers(low, high))
    return (int(rng.integers(low, high)), int(rng.integers(low, high)))


def random_case(seed, dtype, layouts):
    """Draw a valid convolution from ``seed``: every option at random, alone or combined."""
    rng = np.random.default_rng(seed)
    layout = layouts[seed % len(layouts)]
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        depthwise = rng.random() < 0.15
        cg = 1 if depthwise else int(rng.integers(1, 4))
        kg = int(rng.integers(1, 4))
        n = int(rng.choice([0, 1, 1, 2, 3]))
        h, w = (int(v) for v in rng.integers(1, 14, size=2))
        r, s = (int(v) for v in rng.integers(1, 6, size=2))
        stride = _int_or_pair(rng, 1, 4)
        dilation = _int_or_pair(rng, 1, 4)
        stride_pair = stride if isinstance(stride, tuple) else (stride, stride)
        dilation_pair = dilation if isinstance(dilation, tuple) else (dilation, dilation)
        padding = _padding(rng, stride_pair)
        if padding == "same" or padding == "valid":
            pad_h = pad_w = 0 if padding == "valid" else None
        elif isinstance(padding, list):
            pad_h = pad_w = padding[0]
        elif isinstance(padding, tuple):
            pad_h, pad_w = padding
        else:
            pad_h = pad_w = padding
        eff_r = dilation_pair[0] * (r - 1) + 1
        eff_s = dilation_pair[1] * (s - 1) + 1
        if pad_h is not None and (h + 2 * pad_h < eff_r or w + 2 * pad_w < eff_s):
            continue
        batched = rng.random() < 0.85
        x_shape = (n, groups * cg, h, w) if batched else (groups * cg, h, w)
        options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return Case(x_shape, (groups * kg, cg, r, s), options, dtype, layout,
                    bias=bool(rng.random() < 0.7))


def _negative_strides(a):
    flip = tuple(slice(None, None, -1) for _ in range(min(a.ndim, 2)))
    flipped = a[(..., *flip)].copy()
    return flipped[(..., *flip)]


def _steps(a):
    big = np.full(tuple(2 * d + 1 for d in a.shape), np.nan, dtype=a.dtype)
    view = big[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def _nhwc(a):
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if a.ndim == 3:
        return np.ascontiguousarray(a.transpose(1, 2, 0)).transpose(2, 0, 1)
    return a


def _readonly(a):
    b = a.copy()
    b.flags.writeable = False
    return b


def _big_endian(a):
    return a.astype(a.dtype.newbyteorder(">"))


def _torch(a):
    import torch

    return torch.from_numpy(a.copy())


def _torch_channels_last(a):
    import torch

    t = torch.from_numpy(a.copy())
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


LAYOUTS = {
    "contiguous": lambda a: a.copy(),
    "fortran": np.asfortranarray,
    "negative_strides": _negative_strides,
    "steps": _steps,
    "nhwc": _nhwc,
    "readonly": _readonly,
    "big_endian": _big_endian,
}
if HAS_TORCH:
    LAYOUTS["torch"] = _torch
    LAYOUTS["torch_channels_last"] = _torch_channels_last


def in_layout(array, layout):
    """Return ``array`` (an ndarray of the final dtype) in the named memory layout."""
    return LAYOUTS[layout](array)


def snapshot(value):
    """Return a copy of an argument's bytes and strides, to check later that it is unchanged."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        value = value.numpy()
    return (value.copy(), value.strides, value.dtype)


def assert_unchanged(value, saved, name):
    """Assert that ``value`` still equals its ``snapshot``, NaNs included."""
    if value is None:
        return
    if not isinstance(value, np.ndarray):
        value = value.numpy()
    copy, strides, dtype = saved
    assert value.strides == strides, f"{name}: strides changed"
    assert value.dtype == dtype, f"{name}: dtype changed"
    assert np.array_equal(value, copy, equal_nan=True), f"{name}: contents changed"


def _case(x_shape=(2, 4, 7, 6), w_shape=(4, 4, 3, 3), bias=True, **options):
    return Case(tuple(x_shape), tuple(w_shape), options, bias=bias)


# Every option of conv2d alone on one base layer, then a few combinations; names are test ids.
OPTION_CASES = {
    "base": _case(),
    "no_bias": _case(bias=False),
    "stride_2": _case(stride=2),
    "stride_pair": _case(stride=(1, 3)),
    "stride_one_element_list": _case(stride=[2]),
    "stride_skips_input": _case(w_shape=(4, 4, 2, 2), stride=3),
    "padding_1": _case(padding=1),
    "padding_pair": _case(padding=(2, 0)),
    "padding_one_element_list": _case(padding=[1]),
    "padding_same_odd_kernel": _case(padding="same"),
    "padding_same_even_kernel": _case(w_shape=(4, 4, 4, 2), padding="same"),
    "padding_same_even_dilated": _case(w_shape=(4, 4, 2, 4), padding="same", dilation=(3, 1)),
    "padding_same_large_kernel": _case(x_shape=(1, 4, 2, 3), w_shape=(4, 4, 6, 5), padding="same"),
    "padding_valid": _case(padding="valid"),
    "padding_valid_stride_2": _case(padding="valid", stride=2),
    "dilation_2": _case(dilation=2),
    "dilation_pair": _case(dilation=(1, 2)),
    "groups_2": _case(w_shape=(4, 2, 3, 3), groups=2),
    "groups_4_wide": _case(x_shape=(2, 8, 5, 5), w_shape=(8, 2, 3, 3), groups=4),
    "depthwise": _case(w_shape=(4, 1, 3, 3), groups=4),
    "channel_multiplier": _case(w_shape=(12, 1, 3, 3), groups=4),
    "channel_multiplier_grouped": _case(w_shape=(6, 2, 3, 3), groups=2),
    "unbatched": _case(x_shape=(4, 7, 6)),
    "batch_0": _case(x_shape=(0, 4, 7, 6)),
    "image_1x1": _case(x_shape=(2, 4, 1, 1), w_shape=(4, 4, 1, 1)),
    "image_1x1_padded": _case(x_shape=(2, 4, 1, 1), padding=1),
    "kernel_1x1": _case(w_shape=(4, 4, 1, 1)),
    "kernel_1x5": _case(w_shape=(4, 4, 1, 5)),
    "kernel_equals_input": _case(w_shape=(4, 4, 7, 6)),
    "kernel_equals_padded_input": _case(w_shape=(4, 4, 9, 10), padding=(1, 2)),
    "dilated_kernel_equals_padded_input": _case(w_shape=(4, 4, 3, 2), dilation=(4, 7), padding=1),
    "single_channel": _case(x_shape=(3, 1, 9, 9), w_shape=(2, 1, 3, 3)),
    "many_channels": _case(x_shape=(1, 40, 5, 5), w_shape=(33, 40, 3, 3), padding=1),
    "long_rows": _case(x_shape=(1, 2, 3, 300), w_shape=(3, 2, 3, 3), padding=1),
    "combined_strided": _case(w_shape=(6, 2, 3, 2), stride=(2, 1), padding=(1, 2),
                              dilation=(2, 1), groups=2),
    "combined_same_depthwise": _case(x_shape=(4, 7, 6), w_shape=(8, 1, 4, 3), padding="same",
                                     dilation=(1, 2), groups=4),
    "combined_valid_unbatched": _case(x_shape=(4, 7, 6), w_shape=(2, 2, 2, 3), padding="valid",
                                      stride=(3, 2), dilation=2, groups=2),
}


def geometry_desc(case):
    """Return the library's ``pcm_conv_desc`` for a case, as pyconvmpi builds it."""
    import importlib

    from pyconvmpi import _validate

    plan_module = importlib.import_module("pyconvmpi.plan")
    options = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **case.options}
    geo = _validate.geometry(case.x_shape, case.w_shape, options["stride"], options["padding"],
                             options["dilation"], options["groups"], "test")
    return plan_module.desc_struct(geo)


def forced_algorithms(case, op):
    """Return the explicit algorithms the library reports it can compute ``op`` for this case.

    ``op`` is "forward", "backward_data" or "backward_weight". New algorithms join the parity
    tests as soon as ``pcm_algorithm_supported`` accepts them.
    """
    from pyconvmpi import _lib

    desc = geometry_desc(case)
    return [name for name in _lib.ALGORITHMS
            if name != "auto" and _lib.algorithm_supported(name, op, desc)]
