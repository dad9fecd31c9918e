"""Memory layouts: every layout gives the same result as a contiguous copy and stays unchanged."""

import numpy as np
import pytest

import pyconvmpi

from cases import LAYOUTS, assert_unchanged, in_layout, snapshot
from conftest import requires_torch

OPTIONS = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)


def _arrays(dtype, batched=True):
    rng = np.random.default_rng(42)
    x = rng.standard_normal((3, 4, 9, 11) if batched else (4, 9, 11)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    return x, w, b


def _expected(x, w, b):
    out = pyconvmpi.conv2d(x, w, b, **OPTIONS)
    go = np.random.default_rng(7).standard_normal(out.shape).astype(x.dtype)
    return out, go, pyconvmpi.conv2d_backward(go, x, w, **OPTIONS)


def _unaligned(a):
    buffer = np.zeros(a.nbytes + 1, np.uint8)
    view = np.frombuffer(buffer, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    view[...] = a
    return view


def _broadcast(a):
    # Zero strides along the batch axis: every batch item is the first one.
    return np.broadcast_to(a[:1], a.shape) if a.ndim == 4 else a


EXTRA_LAYOUTS = {"unaligned": _unaligned, "broadcast": _broadcast}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS) + list(EXTRA_LAYOUTS))
def test_layout_matches_contiguous(layout, dtype, batched):
    x, w, b = _arrays(dtype, batched)
    convert = EXTRA_LAYOUTS.get(layout) or (lambda a: in_layout(a, layout))
    lx, lw, lb = convert(x), convert(w), convert(b)
    x, w, b = (np.array(np.asarray(a), dtype=dtype, order="C") for a in (lx, lw, lb))
    out, go, _ = _expected(x, w, b)
    lgo = convert(go)
    go = np.array(np.asarray(lgo), dtype=dtype, order="C")
    grads = pyconvmpi.conv2d_backward(go, x, w, **OPTIONS)
    saved = [snapshot(a) for a in (lx, lw, lb, lgo)]

    result = pyconvmpi.conv2d(lx, lw, lb, **OPTIONS)
    result_grads = pyconvmpi.conv2d_backward(lgo, lx, lw, **OPTIONS)

    np.testing.assert_array_equal(result, out)
    assert result.dtype == np.dtype(dtype)
    for name in ("input", "weight", "bias"):
        np.testing.assert_array_equal(getattr(result_grads, name), getattr(grads, name),
                                      err_msg=name)
        assert getattr(result_grads, name).dtype == np.dtype(dtype)
    for name, value, before in zip(("input", "weight", "bias", "grad_output"),
                                   (lx, lw, lb, lgo), saved):
        assert_unchanged(value, before, name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_read_only_inputs_accepted(dtype):
    x, w, b = _arrays(dtype)
    out, go, grads = _expected(x, w, b)
    for array in (x, w, b, go):
        array.flags.writeable = False

    np.testing.assert_array_equal(pyconvmpi.conv2d(x, w, b, **OPTIONS), out)
    result = pyconvmpi.conv2d_backward(go, x, w, **OPTIONS)

    np.testing.assert_array_equal(result.input, grads.input)
    np.testing.assert_array_equal(result.weight, grads.weight)


@pytest.mark.parametrize("order", [">", "<"], ids=["big_endian", "little_endian"])
def test_explicit_byte_order(order):
    x, w, b = _arrays("float64")
    out, _, _ = _expected(x, w, b)
    swapped = [a.astype(a.dtype.newbyteorder(order)) for a in (x, w, b)]

    result = pyconvmpi.conv2d(*swapped, **OPTIONS)

    np.testing.assert_array_equal(result, out)
    assert result.dtype == np.float64
    assert result.dtype.isnative


def test_mixed_byte_order_same_dtype_accepted():
    # '>f4' and '<f4' are both float32: no cast, so no TypeError.
    x, w, b = _arrays("float32")
    out, _, _ = _expected(x, w, b)

    result = pyconvmpi.conv2d(x.astype(">f4"), w, b.astype(">f4"), **OPTIONS)

    np.testing.assert_array_equal(result, out)


def test_result_never_aliases_input():
    x, w, _ = _arrays("float64")
    w1 = np.ones((4, 4, 1, 1))

    out = pyconvmpi.conv2d(x, w1)

    assert not np.shares_memory(out, x)


def test_memmap_input(tmp_path):
    x, w, b = _arrays("float32")
    out, _, _ = _expected(x, w, b)
    mapped = np.memmap(tmp_path / "input.bin", dtype=np.float32, mode="w+", shape=x.shape)
    mapped[...] = x
    mapped.flush()
    read_only = np.memmap(tmp_path / "input.bin", dtype=np.float32, mode="r", shape=x.shape)

    np.testing.assert_array_equal(pyconvmpi.conv2d(read_only, w, b, **OPTIONS), out)


@requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_tensor_inputs(dtype):
    import torch

    x, w, b = _arrays(dtype)
    out, go, grads = _expected(x, w, b)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tw = torch.nn.Parameter(torch.from_numpy(w.copy()))
    tb = torch.from_numpy(b.copy())
    tgo = torch.from_numpy(go.copy())

    result = pyconvmpi.conv2d(tx, tw, tb, **OPTIONS)
    result_grads = pyconvmpi.conv2d_backward(tgo, tx, tw, **OPTIONS)

    assert type(result) is np.ndarray
    np.testing.assert_array_equal(result, out)
    np.testing.assert_array_equal(result_grads.input, grads.input)
    np.testing.assert_array_equal(result_grads.weight, grads.weight)
    assert tx.grad is None
    assert tw.grad is None
    np.testing.assert_array_equal(tx.detach().numpy(), x)


@requires_torch
def test_torch_transposed_and_offset_views():
    import torch

    x, w, b = _arrays("float32")
    out, _, _ = _expected(x, w, b)
    nhwc = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2)
    offset = torch.from_numpy(np.concatenate([x, x]))[3:]
    stepped = torch.from_numpy(np.repeat(x, 2, axis=3))[..., ::2]

    for tensor in (nhwc, offset, stepped):
        np.testing.assert_array_equal(pyconvmpi.conv2d(tensor, w, b, **OPTIONS), out)


@requires_torch
def test_torch_negated_and_conjugated_views():
    import torch

    x, w, b = _arrays("float64")
    out, _, _ = _expected(-x, w, b)
    negated = torch._neg_view(torch.from_numpy(x.copy()))

    np.testing.assert_array_equal(pyconvmpi.conv2d(negated, w, b, **OPTIONS), out)


def test_inputs_unchanged_after_error():
    x, w, b = _arrays("float32")
    saved = [snapshot(a) for a in (x, w, b)]

    with pytest.raises(ValueError):
        pyconvmpi.conv2d(x, w, b, **OPTIONS, placement="nowhere")
    with pytest.raises(ValueError):
        pyconvmpi.conv2d(x, w, b[:-1], **OPTIONS)

    for name, value, before in zip(("input", "weight", "bias"), (x, w, b), saved):
        assert_unchanged(value, before, name)
