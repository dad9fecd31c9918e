"""Arrays and timed calls for one layer: pyconvmpi's and, when importable, PyTorch's."""

import numpy as np

from .. import conv
from ..plan import Plan


def scaled(layer, batch_scale):
    """Return the layer with its batch multiplied by ``batch_scale`` (at least 1 image)."""
    if batch_scale == 1.0:
        return layer
    return layer._replace(n=max(1, int(round(layer.n * batch_scale))))


def make_arrays(layer, dtype, seed=0):
    """Return seeded input, weight, bias and output-gradient arrays for ``layer``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(layer.input_shape, dtype=np.float32).astype(dtype)
    w = (rng.standard_normal(layer.weight_shape, dtype=np.float32) * 0.1).astype(dtype)
    b = rng.standard_normal((layer.k,), dtype=np.float32).astype(dtype)
    y = conv.conv2d(x, w, b, **layer.options())
    g = rng.standard_normal(y.shape, dtype=np.float32).astype(dtype)
    return x, w, b, g, y


def ours(layer, op, arrays, threads, algorithm):
    """Return a zero-argument callable running ``op`` on pyconvmpi, and its result."""
    x, w, b, g, _ = arrays
    plan = Plan(threads=threads, algorithm=algorithm)
    options = layer.options()
    if op == "forward":
        def call():
            return conv.conv2d(x, w, b, plan=plan, **options)
    else:
        def call():
            return conv.conv2d_backward(g, x, w, need=("input", "weight"), plan=plan, **options)
    return call


def torch_available():
    """Return whether PyTorch can be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def theirs(layer, op, arrays):
    """Return a zero-argument callable running ``op`` on PyTorch (same arrays, no copies)."""
    import torch

    x, w, b, g, _ = (torch.from_numpy(a) for a in arrays)
    padding = layer.padding
    options = dict(stride=layer.stride, padding=padding, dilation=layer.dilation,
                   groups=layer.groups)
    if op == "forward":
        def call():
            with torch.no_grad():
                return torch.nn.functional.conv2d(x, w, b, **options)
        return call

    pad = padding if isinstance(padding, int) else None
    if pad is None:
        # convolution_backward takes numbers; "same"/"valid" go through autograd instead.
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()

        def call():
            xr.grad = wr.grad = None
            torch.nn.functional.conv2d(xr, wr, None, **options).backward(g)
            return xr.grad, wr.grad
        return call

    def call():
        return torch.ops.aten.convolution_backward(
            g, x, w, None, [layer.stride] * 2, [pad] * 2, [layer.dilation] * 2, False, [0, 0],
            layer.groups, [True, True, False])[:2]
    return call


def max_relative_error(result, expected):
    """Return max |a - b| / max |b| over the arrays of two results (tuples or arrays)."""
    if not isinstance(result, (tuple, list)):
        result, expected = (result,), (expected,)
    worst = 0.0
    for a, b in zip(result, expected):
        if a is None or b is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b.numpy() if hasattr(b, "numpy") else b, dtype=np.float64)
        if b.size:
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst
