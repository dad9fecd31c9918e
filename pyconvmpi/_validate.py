"""Argument rules of conv2d and conv2d_backward, the same as torch.nn.functional.conv2d.

Every check raises before any C call: TypeError for the wrong kind of object or dtype,
ValueError for a bad value or shape. Messages read ``<function>: <argument> <rule>; got <value>``.
"""

import logging
import operator
import sys
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
GRADIENT_NAMES = ("input", "weight", "bias")
TORCH_DTYPES = ("torch.float32", "torch.float64")

# Largest stride, padding or dilation accepted, and the largest element count of the output:
# the C library rejects sizes above 2**56 so that products of them cannot overflow int64.
MAX_VALUE = 2**56


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
    if str(value.layout) != "torch.strided":
        raise TypeError(f"{fn}: {name} must be a dense tensor; got layout {value.layout}")
    if str(value.dtype) not in TORCH_DTYPES:
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64; got {value.dtype}")
    if value.is_conj() or value.is_neg():
        value = value.resolve_conj().resolve_neg()
    return value.detach().numpy()


def as_array(value, name, fn, allow_none=False):
    """Return ``value`` as a C-contiguous, native-byte-order float32 or float64 ndarray.

    Accepts numpy arrays and CPU torch tensors (through their zero-copy numpy view). Makes a
    contiguous copy only when needed and never changes the caller's object.
    """
    if type(value) is not np.ndarray:
        value = _other_to_numpy(value, name, fn, allow_none)
        if value is None:
            return None
    dtype = value.dtype
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64; got {dtype}")
    if not dtype.isnative:
        logger.debug("%s: copying %s to native byte order", fn, name)
        return value.astype(dtype.newbyteorder("="), order="C")
    flags = value.flags
    if not (flags.c_contiguous and flags.aligned):
        # C kernels may assume elements aligned to their size, as C requires.
        logger.debug("%s: copying %s (shape %s) to an aligned C-contiguous array", fn, name,
                     value.shape)
        return np.array(value, order="C", copy=True)
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


def _other_to_numpy(value, name, fn, allow_none):
    """Return a CPU torch tensor or ndarray subclass as an ndarray; None stays None if allowed."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray; got None")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{fn}: {name} must be a numpy.ndarray, not a masked array, because the mask "
            "would be ignored; pass value.filled(0) or value.data"
        )
    if isinstance(value, np.ndarray):
        return value
    # A tensor exists only once torch is imported, so the package never imports it here.
    # isinstance also accepts tensor subclasses defined outside torch, as PyTorch does.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _torch_to_numpy(value, name, fn)
    raise TypeError(f"{fn}: {name} must be a numpy.ndarray; got {type(value).__name__}")


def _as_int(value):
    """Return ``value`` as an int if it is an integer other than a bool, else None.

    Like PyTorch, accepts anything with ``__index__``: numpy integers and one-element integer
    tensors.
    """
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        result = operator.index(value)
    except TypeError:
        return None
    return None if isinstance(result, bool) else result


def _check_range(value, number, name, fn, minimum, maximum):
    if number < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{fn}: {name} must be {rule}; got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{fn}: {name} must be at most {maximum}; got {value!r}")


def int_pair(value, name, fn, minimum, maximum=None):
    """Normalise an int or a sequence of one or two ints, each in [minimum, maximum]."""
    if type(value) is int and minimum <= value and (maximum is None or value <= maximum):
        return (value, value)
    number = _as_int(value)
    if number is not None:
        pair = (number, number)
    elif isinstance(value, (tuple, list)) and len(value) in (1, 2):
        pair = tuple(_as_int(v) for v in value)
        if None in pair:
            raise TypeError(f"{fn}: {name} must be an int or a pair of ints; got {value!r}")
        pair = (pair[0], pair[-1])
    else:
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints; got {value!r}")
    for number in pair:
        _check_range(value, number, name, fn, minimum, maximum)
    return pair


def positive_int(value, name, fn):
    """Return ``value`` as an int, requiring a positive integer."""
    number = _as_int(value)
    if number is None:
        raise TypeError(f"{fn}: {name} must be a positive integer; got {value!r}")
    if number < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer; got {value!r}")
    return number


def shape_tuple(value, name, fn):
    """Return a shape given by the caller (a sequence of non-negative ints) as a tuple of ints."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a sequence of integers; got {value!r}")
    try:
        entries = tuple(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be a sequence of integers; got {value!r}") from None
    numbers = tuple(_as_int(v) for v in entries)
    if None in numbers:
        raise TypeError(f"{fn}: {name} must contain integers; got {entries!r}")
    if any(number < 0 for number in numbers):
        raise ValueError(f"{fn}: {name} must contain non-negative integers; got {entries!r}")
    return numbers


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
    ph, pw = int_pair(padding, "padding", fn, minimum=0, maximum=MAX_VALUE)
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
    if (h == 0 or w == 0) and n > 0:
        # PyTorch computes an image of zero rows or columns only for an empty batch.
        raise ValueError(
            f"{fn}: input must have at least one row and one column unless its batch is empty; "
            f"got shape {tuple(input_shape)}"
        )
    pad = padding_sides(padding, (r, s), stride, dilation, fn)
    eff_r, eff_s = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    padded_h, padded_w = h + pad[0] + pad[1], w + pad[2] + pad[3]
    if padded_h < eff_r or padded_w < eff_s:
        raise ValueError(
            f"{fn}: weight's kernel, dilated by dilation={dilation}, must fit in the input "
            f"padded by padding={padding!r}; got a {eff_r} x {eff_s} kernel and a "
            f"{padded_h} x {padded_w} padded input"
        )
    out_h = (padded_h - eff_r) // stride[0] + 1
    out_w = (padded_w - eff_s) // stride[1] + 1
    if n * k * out_h * out_w > MAX_VALUE:
        raise ValueError(
            f"{fn}: the output must have at most {MAX_VALUE} elements; got shape "
            f"({n}, {k}, {out_h}, {out_w}) from padding={padding!r}"
        )
    # PyTorch accepts any stride, and any dilation of a one-tap kernel axis. Past these limits
    # the value no longer changes the result, so it is reduced to fit the C library's int64.
    stride = (min(stride[0], padded_h - eff_r + 1), min(stride[1], padded_w - eff_s + 1))
    dilation = (dilation[0] if r > 1 else 1, dilation[1] if s > 1 else 1)
    if max(dilation) > MAX_VALUE:
        raise ValueError(f"{fn}: dilation must be at most {MAX_VALUE}; got {dilation!r}")
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
