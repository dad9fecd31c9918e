"""Argument rules of conv2d and conv2d_backward, the same as torch.nn.functional.conv2d.

Every check raises before any C call: TypeError for the wrong kind of object or dtype,
ValueError for a bad value or shape. Messages read ``<function>: <argument> <rule>; got <value>``.
"""

import logging
import numbers
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
GRADIENT_NAMES = ("input", "weight", "bias")


class Geometry(NamedTuple):
    """A validated convolution: shapes, options and derived output size."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    out_h: int
    out_w: int
    stride: tuple
    padding: tuple  # (top, bottom, left, right)
    dilation: tuple
    groups: int
    batched: bool

    @property
    def input_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def output_shape(self):
        return (self.n, self.k, self.out_h, self.out_w)

    @property
    def weight_shape(self):
        return (self.k, self.c // self.groups, self.r, self.s)


def _torch_to_numpy(value, name, fn):
    device = getattr(value, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise TypeError(
            f"{fn}: {name} is a tensor on device {str(device)!r}; pyconvmpi computes on the "
            "CPU, so move it with .cpu() first"
        )
    if getattr(value, "is_sparse", False) or getattr(value, "is_quantized", False):
        raise TypeError(f"{fn}: {name} must be a dense tensor; got layout {value.layout}")
    if value.is_conj() or value.is_neg():
        value = value.resolve_conj().resolve_neg()
    return value.detach().numpy()


def as_array(value, name, fn, allow_none=False):
    """Return ``value`` as a C-contiguous, native-byte-order float32 or float64 ndarray.

    Accepts numpy arrays and CPU torch tensors (through their zero-copy numpy view). Makes a
    contiguous copy only when needed and never changes the caller's object.
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray; got None")
    if not isinstance(value, np.ndarray):
        if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
            value = _torch_to_numpy(value, name, fn)
        else:
            raise TypeError(f"{fn}: {name} must be a numpy.ndarray; got {type(value).__name__}")
    dtype = value.dtype
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64; got {dtype}")
    if not dtype.isnative:
        logger.debug("%s: copying %s to native byte order", fn, name)
        return value.astype(dtype.newbyteorder("="), order="C")
    if not value.flags.c_contiguous:
        logger.debug("%s: copying %s (shape %s) to a C-contiguous array", fn, name, value.shape)
        return np.ascontiguousarray(value)
    return value


def check_same_dtype(arrays, fn):
    """Raise TypeError unless every array given (name -> array or None) has one dtype."""
    first_name, first = None, None
    for name, array in arrays.items():
        if array is None:
            continue
        if first is None:
            first_name, first = name, array.dtype
        elif array.dtype != first:
            raise TypeError(
                f"{fn}: {name} has dtype {array.dtype} but {first_name} has dtype {first}; "
                "convert explicitly, pyconvmpi never casts silently"
            )


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_pair(value, name, fn, minimum):
    """Normalise an int or a sequence of one or two ints, each at least ``minimum``."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[-1]))
    else:
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints; got {value!r}")
    if min(pair) < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{fn}: {name} must be {rule}; got {value!r}")
    return pair


def positive_int(value, name, fn):
    """Return ``value`` as an int, requiring a positive integer."""
    if not _is_int(value):
        raise TypeError(f"{fn}: {name} must be a positive integer; got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer; got {value!r}")
    return int(value)


def padding_sides(padding, kernel, stride, dilation, fn):
    """Return (top, bottom, left, right) for an int, a pair, "same" or "valid"."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"{fn}: padding='same' requires stride 1, as in PyTorch; got stride {stride!r}"
                )
            # PyTorch puts the odd element of an even total on the bottom and right.
            total_h = dilation[0] * (kernel[0] - 1)
            total_w = dilation[1] * (kernel[1] - 1)
            return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        raise ValueError(
            f"{fn}: padding must be an int, a pair of ints, 'same' or 'valid'; got {padding!r}"
        )
    ph, pw = int_pair(padding, "padding", fn, minimum=0)
    return (ph, ph, pw, pw)


def geometry(input_shape, weight_shape, stride, padding, dilation, groups, fn):
    """Validate shapes and options; return the Geometry of a forward convolution.

    ``input_shape`` may be 3-D (unbatched) or 4-D. Raises TypeError or ValueError.
    """
    stride = int_pair(stride, "stride", fn, minimum=1)
    dilation = int_pair(dilation, "dilation", fn, minimum=1)
    groups = positive_int(groups, "groups", fn)
    if len(input_shape) not in (3, 4):
        raise ValueError(
            f"{fn}: input must be 3-D (C, H, W) or 4-D (N, C, H, W); got shape {tuple(input_shape)}"
        )
    if len(weight_shape) != 4:
        raise ValueError(
            f"{fn}: weight must be 4-D (out_channels, in_channels / groups, kH, kW); "
            f"got shape {tuple(weight_shape)}"
        )
    batched = len(input_shape) == 4
    n, c, h, w = (int(v) for v in (input_shape if batched else (1, *input_shape)))
    k, cg, r, s = (int(v) for v in weight_shape)
    if r < 1 or s < 1 or cg < 1:
        raise ValueError(
            f"{fn}: weight must have positive in_channels / groups and kernel size; "
            f"got shape {tuple(weight_shape)}"
        )
    if k < groups or k % groups != 0:
        raise ValueError(
            f"{fn}: weight's out_channels must be a positive multiple of groups={groups}; "
            f"got {k}"
        )
    if c != cg * groups:
        raise ValueError(
            f"{fn}: weight has {cg} input channels per group x groups={groups} = {cg * groups} "
            f"channels but input has {c}"
        )
    pad = padding_sides(padding, (r, s), stride, dilation, fn)
    eff_r, eff_s = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    padded_h, padded_w = h + pad[0] + pad[1], w + pad[2] + pad[3]
    if padded_h < eff_r or padded_w < eff_s:
        raise ValueError(
            f"{fn}: the dilated kernel ({eff_r} x {eff_s}) is larger than the padded input "
            f"({padded_h} x {padded_w})"
        )
    out_h = (padded_h - eff_r) // stride[0] + 1
    out_w = (padded_w - eff_s) // stride[1] + 1
    return Geometry(n, c, h, w, k, r, s, out_h, out_w, stride, pad, dilation, groups, batched)


def check_bias(bias, geo, fn):
    """Raise ValueError unless ``bias`` is None or has shape (out_channels,)."""
    if bias is not None and bias.shape != (geo.k,):
        raise ValueError(f"{fn}: bias must have shape ({geo.k},); got {bias.shape}")


def need_set(need, fn):
    """Normalise ``need`` to a frozenset of gradient names."""
    items = (need,) if isinstance(need, str) else need
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(
            f"{fn}: need must be a sequence of 'input', 'weight', 'bias'; got {need!r}"
        ) from None
    for item in items:
        if item not in GRADIENT_NAMES:
            raise ValueError(
                f"{fn}: need entries must be one of 'input', 'weight', 'bias'; got {item!r}"
            )
    return frozenset(items)
