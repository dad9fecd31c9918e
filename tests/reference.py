"""Float64 NumPy reference of torch.nn.functional.conv2d, its three gradients and its options.

Written from the definition, independently of the C library and of pyconvmpi's own argument
handling: the input is zero-padded explicitly, and each kernel tap (i, j) contributes one
strided window of the padded input, contracted with the tap's weights by ``einsum`` per group.
The backward pass scatters the same windows back (gradient of input) or contracts them with the
output gradient (gradient of weight). Every function also returns, through ``abs_*`` variants,
the same sum over absolute values, which bounds the rounding error of any summation order.
"""

import numpy as np


def pair(value):
    """Return ``value`` (int, or a sequence of one or two ints) as a pair of ints."""
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def padding_sides(padding, kernel, dilation):
    """Return (top, bottom, left, right) padding as PyTorch applies it.

    "same" pads a total of dilation * (kernel - 1) per axis, the smaller half before and the
    larger half after, as ``torch.nn.functional.conv2d`` does for an even effective kernel.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        sides = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            sides.extend((total // 2, total - total // 2))
        return tuple(sides)
    ph, pw = pair(padding)
    return (ph, ph, pw, pw)


class Geometry:
    """Shapes and options of one convolution, with the output size derived from them."""

    def __init__(self, input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1):
        self.batched = len(input_shape) == 4
        self.n, self.c, self.h, self.w = input_shape if self.batched else (1, *input_shape)
        self.k, self.cg, self.r, self.s = weight_shape
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        self.groups = groups
        self.pad = padding_sides(padding, (self.r, self.s), self.dilation)
        top, bottom, left, right = self.pad
        eff_r = self.dilation[0] * (self.r - 1) + 1
        eff_s = self.dilation[1] * (self.s - 1) + 1
        self.out_h = (self.h + top + bottom - eff_r) // self.stride[0] + 1
        self.out_w = (self.w + left + right - eff_s) // self.stride[1] + 1

    @property
    def input_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def output_shape(self):
        return (self.n, self.k, self.out_h, self.out_w)

    def window(self, i, j):
        """Return the slices of the padded input that tap (i, j) reads for every output."""
        y0, x0 = i * self.dilation[0], j * self.dilation[1]
        rows = slice(y0, y0 + (self.out_h - 1) * self.stride[0] + 1, self.stride[0])
        cols = slice(x0, x0 + (self.out_w - 1) * self.stride[1] + 1, self.stride[1])
        return rows, cols

    def padded(self, x):
        top, bottom, left, right = self.pad
        return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))

    def unpadded(self, xp):
        top, _, left, _ = self.pad
        return xp[:, :, top:top + self.h, left:left + self.w]


def _batched(array, geo):
    array = np.asarray(array, dtype=np.float64)
    return array if geo.batched else array[None]


def _unbatched(array, geo):
    return array if geo.batched else array[0]


def _grouped_weight(weight, geo, i, j):
    """Return weight[:, :, i, j] as (groups, out_channels / groups, in_channels / groups)."""
    return weight[:, :, i, j].reshape(geo.groups, geo.k // geo.groups, geo.cg)


def forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Return conv2d(x, weight, bias, ...) in float64."""
    geo = Geometry(np.shape(x), np.shape(weight), stride, padding, dilation, groups)
    xp = geo.padded(_batched(x, geo))
    weight = np.asarray(weight, dtype=np.float64)
    out = np.zeros((geo.n, geo.groups, geo.k // geo.groups, geo.out_h, geo.out_w))
    for i in range(geo.r):
        for j in range(geo.s):
            rows, cols = geo.window(i, j)
            patch = xp[:, :, rows, cols].reshape(geo.n, geo.groups, geo.cg, geo.out_h, geo.out_w)
            out += np.einsum("ngcyx,gkc->ngkyx", patch, _grouped_weight(weight, geo, i, j))
    out = out.reshape(geo.output_shape)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    return _unbatched(out, geo)


def backward_input(grad_output, x_shape, weight, stride=1, padding=0, dilation=1, groups=1):
    """Return the gradient of conv2d with respect to its input, in float64.

    Elements that no output reads receive nothing, so they are exactly zero.
    """
    geo = Geometry(tuple(x_shape), np.shape(weight), stride, padding, dilation, groups)
    go = _batched(grad_output, geo).reshape(geo.n, geo.groups, geo.k // geo.groups,
                                           geo.out_h, geo.out_w)
    weight = np.asarray(weight, dtype=np.float64)
    top, bottom, left, right = geo.pad
    gxp = np.zeros((geo.n, geo.c, geo.h + top + bottom, geo.w + left + right))
    for i in range(geo.r):
        for j in range(geo.s):
            rows, cols = geo.window(i, j)
            contribution = np.einsum("ngkyx,gkc->ngcyx", go, _grouped_weight(weight, geo, i, j))
            gxp[:, :, rows, cols] += contribution.reshape(geo.n, geo.c, geo.out_h, geo.out_w)
    return _unbatched(geo.unpadded(gxp), geo)


def backward_weight(grad_output, x, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Return the gradient of conv2d with respect to its weight, in float64."""
    geo = Geometry(np.shape(x), tuple(weight_shape), stride, padding, dilation, groups)
    go = _batched(grad_output, geo).reshape(geo.n, geo.groups, geo.k // geo.groups,
                                           geo.out_h, geo.out_w)
    xp = geo.padded(_batched(x, geo))
    grad = np.zeros((geo.k, geo.cg, geo.r, geo.s))
    for i in range(geo.r):
        for j in range(geo.s):
            rows, cols = geo.window(i, j)
            patch = xp[:, :, rows, cols].reshape(geo.n, geo.groups, geo.cg, geo.out_h, geo.out_w)
            tap = np.einsum("ngkyx,ngcyx->gkc", go, patch)
            grad[:, :, i, j] = tap.reshape(geo.k, geo.cg)
    return grad


def backward_bias(grad_output, batched=True):
    """Return the gradient of conv2d with respect to its bias, in float64."""
    go = np.asarray(grad_output, dtype=np.float64)
    return go.sum(axis=(0, 2, 3)) if batched else go.sum(axis=(1, 2))


def abs_forward(x, weight, bias=None, **options):
    """Return the forward sum over absolute values of every term (a rounding-error scale)."""
    return forward(np.abs(x), np.abs(weight), None if bias is None else np.abs(bias), **options)


def abs_backward_input(grad_output, x_shape, weight, **options):
    """Return the input-gradient sum over absolute values of every term."""
    return backward_input(np.abs(grad_output), x_shape, np.abs(weight), **options)


def abs_backward_weight(grad_output, x, weight_shape, **options):
    """Return the weight-gradient sum over absolute values of every term."""
    return backward_weight(np.abs(grad_output), np.abs(x), weight_shape, **options)


def read_mask(x_shape, weight_shape, **options):
    """Return a boolean array of the input's shape: True where some output reads the element."""
    geo = Geometry(tuple(x_shape), tuple(weight_shape), **options)
    ones_out = np.ones(geo.output_shape if geo.batched else geo.output_shape[1:])
    return backward_input(ones_out, x_shape, np.ones(weight_shape), **options) > 0
