"""Every invalid-argument rule of conv2d and conv2d_backward: exception type and message.

The table below lists one bad argument per row. Each row is checked against both functions,
and, where PyTorch is installed, against torch.nn.functional.conv2d: whatever PyTorch rejects,
pyconvmpi must reject with ValueError or TypeError naming the argument.
"""

import numpy as np
import pytest

import pyconvmpi

from conftest import HAS_TORCH, requires_torch

X = np.ones((1, 2, 5, 5), np.float32)
W = np.ones((2, 2, 3, 3), np.float32)
B = np.ones(2, np.float32)
GO = np.ones((1, 2, 3, 3), np.float32)  # the output shape of X and W with default options


def _bad(name, exc, words, input=X, weight=W, bias=None, **options):
    return pytest.param(dict(input=input, weight=weight, bias=bias, options=options), exc, words,
                        id=name)


# (id, exception, words the message must contain, arguments)
BAD_ARGUMENTS = [
    # input and weight objects and dtypes
    _bad("input_none", TypeError, ["input", "numpy.ndarray", "None"], input=None),
    _bad("input_list", TypeError, ["input", "numpy.ndarray", "list"], input=X.tolist()),
    _bad("weight_scalar", TypeError, ["weight", "numpy.ndarray", "float"], weight=1.0),
    _bad("input_int32", TypeError, ["input", "float32 or float64", "int32"], input=X.astype(np.int32)),
    _bad("input_int64", TypeError, ["input", "float32 or float64", "int64"], input=X.astype(np.int64)),
    _bad("input_float16", TypeError, ["input", "float32 or float64", "float16"],
         input=X.astype(np.float16)),
    _bad("input_longdouble", TypeError, ["input", "float32 or float64"],
         input=X.astype(np.longdouble)),
    _bad("input_complex64", TypeError, ["input", "float32 or float64", "complex64"],
         input=X.astype(np.complex64)),
    _bad("input_bool", TypeError, ["input", "float32 or float64", "bool"], input=X.astype(bool)),
    _bad("input_object", TypeError, ["input", "float32 or float64", "object"],
         input=X.astype(object)),
    _bad("weight_float16", TypeError, ["weight", "float32 or float64", "float16"],
         weight=W.astype(np.float16)),
    _bad("weight_complex128", TypeError, ["weight", "float32 or float64", "complex128"],
         weight=W.astype(np.complex128)),
    _bad("weight_int8", TypeError, ["weight", "float32 or float64", "int8"], weight=W.astype(np.int8)),
    _bad("bias_int64", TypeError, ["bias", "float32 or float64", "int64"], bias=B.astype(np.int64)),
    _bad("bias_list", TypeError, ["bias", "numpy.ndarray", "list"], bias=[1.0, 1.0]),
    _bad("mixed_float64_weight", TypeError, ["weight", "float64", "input", "float32", "casts"],
         weight=W.astype(np.float64)),
    _bad("mixed_float64_input", TypeError, ["weight", "float32", "input", "float64"],
         input=X.astype(np.float64)),
    _bad("mixed_float64_bias", TypeError, ["bias", "float64", "input", "float32"],
         bias=B.astype(np.float64)),
    _bad("masked_input", TypeError, ["input", "masked array"],
         input=np.ma.masked_array(X, mask=X > 0)),
    # shapes
    _bad("input_2d", ValueError, ["input", "3-D", "4-D", "(5, 5)"], input=X[0, 0]),
    _bad("input_5d", ValueError, ["input", "3-D", "4-D", "(1, 1, 2, 5, 5)"],
         input=X.reshape(1, 1, 2, 5, 5)),
    _bad("input_0d", ValueError, ["input", "got shape ()"], input=np.array(1.0, np.float32)),
    _bad("weight_3d", ValueError, ["weight", "4-D", "(2, 2, 3)"], weight=W[..., 0]),
    _bad("weight_5d", ValueError, ["weight", "4-D"], weight=W[None]),
    _bad("weight_zero_kernel", ValueError, ["weight", "kernel size", "(2, 2, 0, 3)"],
         weight=np.ones((2, 2, 0, 3), np.float32)),
    _bad("weight_zero_in_channels", ValueError, ["weight", "in_channels", "(2, 0, 3, 3)"],
         weight=np.ones((2, 0, 3, 3), np.float32)),
    _bad("weight_zero_out_channels", ValueError, ["out_channels", "groups=1", "got 0"],
         weight=np.ones((0, 2, 3, 3), np.float32)),
    _bad("channel_mismatch", ValueError, ["weight", "input has 2", "3 channels"],
         weight=np.ones((2, 3, 3, 3), np.float32)),
    _bad("channel_mismatch_unbatched", ValueError, ["weight", "input has 3"],
         input=np.ones((3, 5, 5), np.float32)),
    _bad("kernel_larger_than_input", ValueError, ["weight", "dilation", "padding", "6 x 6", "5 x 5"],
         weight=np.ones((2, 2, 6, 6), np.float32)),
    _bad("kernel_larger_than_padded_input", ValueError, ["weight", "8 x 8", "7 x 7"],
         weight=np.ones((2, 2, 8, 8), np.float32), padding=1),
    _bad("dilated_kernel_too_large", ValueError, ["weight", "dilation=(3, 3)", "7 x 7", "5 x 5"],
         dilation=3),
    _bad("empty_image", ValueError, ["input", "one row", "(1, 2, 0, 5)"],
         input=np.ones((1, 2, 0, 5), np.float32)),
    _bad("empty_rows_padded", ValueError, ["input", "one row", "(1, 2, 0, 5)"],
         input=np.ones((1, 2, 0, 5), np.float32), weight=np.ones((2, 2, 1, 1), np.float32),
         padding=1),
    _bad("empty_columns_unbatched", ValueError, ["input", "one column", "(2, 3, 0)"],
         input=np.ones((2, 3, 0), np.float32), weight=np.ones((2, 2, 1, 1), np.float32),
         padding=1),
    _bad("bias_wrong_length", ValueError, ["bias", "(2,)", "(3,)"], bias=np.ones(3, np.float32)),
    _bad("bias_2d", ValueError, ["bias", "(2,)", "(2, 1)"], bias=np.ones((2, 1), np.float32)),
    # stride
    _bad("stride_0", ValueError, ["stride", "positive", "0"], stride=0),
    _bad("stride_negative", ValueError, ["stride", "positive", "-1"], stride=-1),
    _bad("stride_pair_0", ValueError, ["stride", "positive", "(1, 0)"], stride=(1, 0)),
    _bad("stride_float", TypeError, ["stride", "int", "1.0"], stride=1.0),
    _bad("stride_bool", TypeError, ["stride", "int", "True"], stride=True),
    _bad("stride_numpy_bool", TypeError, ["stride", "int", "True"], stride=np.True_),
    _bad("stride_string", TypeError, ["stride", "int", "'1'"], stride="1"),
    _bad("stride_none", TypeError, ["stride", "int", "None"], stride=None),
    _bad("stride_triple", TypeError, ["stride", "pair", "(1, 1, 1)"], stride=(1, 1, 1)),
    _bad("stride_empty", TypeError, ["stride", "pair", "()"], stride=()),
    _bad("stride_float_in_list", TypeError, ["stride", "pair", "[1, 2.0]"], stride=[1, 2.0]),
    _bad("stride_ndarray", TypeError, ["stride", "pair"], stride=np.array([1, 2])),
    # padding
    _bad("padding_negative", ValueError, ["padding", "non-negative", "-1"], padding=-1),
    _bad("padding_pair_negative", ValueError, ["padding", "non-negative", "(0, -1)"],
         padding=(0, -1)),
    _bad("padding_four_sides", TypeError, ["padding", "pair", "(1, 2, 3, 4)"], padding=(1, 2, 3, 4)),
    _bad("padding_float", TypeError, ["padding", "int", "1.5"], padding=1.5),
    _bad("padding_bool", TypeError, ["padding", "int", "True"], padding=True),
    _bad("padding_none", TypeError, ["padding", "int", "None"], padding=None),
    _bad("padding_upper_case", ValueError, ["padding", "'same' or 'valid'", "'SAME'"],
         padding="SAME"),
    _bad("padding_unknown_string", ValueError, ["padding", "'same' or 'valid'", "'full'"],
         padding="full"),
    _bad("padding_same_in_tuple", TypeError, ["padding", "pair", "('same',)"],
         padding=("same",)),
    _bad("padding_same_stride_2", ValueError, ["padding='same'", "stride", "(2, 2)"],
         padding="same", stride=2),
    _bad("padding_same_stride_pair", ValueError, ["padding='same'", "stride", "(1, 2)"],
         padding="same", stride=(1, 2)),
    _bad("padding_huge", ValueError, ["padding", "at most", str(2**60)], padding=2**60),
    _bad("padding_huge_output", ValueError, ["output", "padding", "at most"], padding=2**40),
    # dilation
    _bad("dilation_0", ValueError, ["dilation", "positive", "0"], dilation=0),
    _bad("dilation_pair_negative", ValueError, ["dilation", "positive", "(-1, 1)"],
         dilation=(-1, 1)),
    _bad("dilation_float", TypeError, ["dilation", "int", "2.0"], dilation=2.0),
    _bad("dilation_triple", TypeError, ["dilation", "pair", "(1, 1, 1)"], dilation=(1, 1, 1)),
    # groups
    _bad("groups_0", ValueError, ["groups", "positive", "0"], groups=0),
    _bad("groups_negative", ValueError, ["groups", "positive", "-2"], groups=-2),
    _bad("groups_float", TypeError, ["groups", "integer", "2.0"], groups=2.0),
    _bad("groups_bool", TypeError, ["groups", "integer", "True"], groups=True),
    _bad("groups_none", TypeError, ["groups", "integer", "None"], groups=None),
    _bad("groups_pair", TypeError, ["groups", "integer", "(1, 1)"], groups=(1, 1)),
    _bad("groups_not_dividing_out_channels", ValueError, ["out_channels", "groups=2", "got 3"],
         weight=np.ones((3, 1, 3, 3), np.float32), groups=2),
    _bad("groups_more_than_out_channels", ValueError, ["out_channels", "groups=4", "got 2"],
         input=np.ones((1, 4, 5, 5), np.float32), weight=np.ones((2, 1, 3, 3), np.float32),
         groups=4),
    _bad("groups_not_dividing_in_channels", ValueError, ["weight", "groups=2", "input has 2"],
         groups=2),
]


def _run(function, arguments):
    options = arguments["options"]
    if function == "conv2d":
        return pyconvmpi.conv2d(arguments["input"], arguments["weight"], arguments["bias"],
                                **options)
    if arguments["bias"] is not None:
        pytest.skip("conv2d_backward takes no bias")
    return pyconvmpi.conv2d_backward(GO, arguments["input"], arguments["weight"], **options)


@pytest.mark.parametrize("function", ["conv2d", "conv2d_backward"])
@pytest.mark.parametrize("arguments, exc, words", BAD_ARGUMENTS)
def test_bad_argument_raises(arguments, exc, words, function):
    with pytest.raises(exc) as info:
        _run(function, arguments)

    message = str(info.value)
    assert message.startswith(f"{function}: "), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def _torch_arguments(arguments):
    """Return the row's arrays as tensors; raises TypeError for dtypes torch cannot hold."""
    import torch

    converted = {}
    for name in ("input", "weight", "bias"):
        value = arguments[name]
        if isinstance(value, np.ndarray) and value.dtype != object and not isinstance(
                value, np.ma.MaskedArray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        converted[name] = value
    return converted


@requires_torch
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arguments, exc, words", BAD_ARGUMENTS)
def test_torch_rejections_are_rejected(arguments, exc, words):
    import torch

    try:
        tensors = _torch_arguments(arguments)
        torch.nn.functional.conv2d(tensors["input"], tensors["weight"], tensors["bias"],
                                   **arguments["options"])
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        torch_rejects = True
    else:
        torch_rejects = False

    if torch_rejects:
        with pytest.raises((TypeError, ValueError)):
            _run("conv2d", arguments)
    else:
        pytest.skip("PyTorch accepts this case")


@pytest.mark.parametrize("value", [np.int64(2), np.int32(2), [np.int16(2)], (2, np.uint8(2))],
                         ids=["int64", "int32", "list_int16", "pair_uint8"])
def test_numpy_integers_accepted(value):
    out = pyconvmpi.conv2d(X, W, stride=value, padding=value, dilation=value)

    assert out.shape == (1, 2, 3, 3)


@requires_torch
def test_integer_tensor_options_accepted():
    import torch

    out = pyconvmpi.conv2d(X, np.ones((2, 1, 3, 3), np.float32), stride=torch.tensor(2),
                           padding=[torch.tensor(1)], groups=torch.tensor(2))
    expected = pyconvmpi.conv2d(X, np.ones((2, 1, 3, 3), np.float32), stride=2, padding=1,
                                groups=2)

    np.testing.assert_array_equal(out, expected)


def test_empty_image_in_empty_batch_accepted():
    # PyTorch returns an empty result of the padded shape here, so pyconvmpi does too.
    out = pyconvmpi.conv2d(np.ones((0, 2, 0, 5), np.float32), np.ones((3, 2, 1, 1), np.float32),
                           padding=1)

    assert out.shape == (0, 3, 2, 7)


def test_huge_stride_gives_one_output():
    # PyTorch accepts any stride; past the input size it only leaves the first window.
    out = pyconvmpi.conv2d(X, W, stride=2**64 + 1)

    np.testing.assert_array_equal(out, pyconvmpi.conv2d(X, W, stride=3))


def test_huge_dilation_of_one_tap_axis_accepted():
    w = np.ones((2, 2, 1, 3), np.float32)

    out = pyconvmpi.conv2d(X, w, dilation=(2**60, 1))

    np.testing.assert_array_equal(out, pyconvmpi.conv2d(X, w))


@pytest.mark.parametrize("function", [pyconvmpi.conv2d, pyconvmpi.conv2d_backward])
def test_unknown_keyword_rejected(function):
    with pytest.raises(TypeError, match="unexpected keyword argument 'strides'"):
        function(GO, X, W, strides=2)


@pytest.mark.parametrize("function", [pyconvmpi.conv2d, pyconvmpi.conv2d_backward])
def test_too_many_positional_arguments_rejected(function):
    # comm, placement, strategy and plan are keyword-only.
    with pytest.raises(TypeError, match="positional argument"):
        function(GO, X, W, 1, 0, 1, 1, None, None)


def test_conv2d_rejects_need():
    with pytest.raises(TypeError, match="unexpected keyword argument 'need'"):
        pyconvmpi.conv2d(X, W, need=("input",))


@pytest.mark.parametrize("shape", [(1, 2, 4, 3), (2, 2, 3, 3), (2, 3, 3), (1, 2, 3, 3, 1)],
                         ids=["rows", "batch", "unbatched", "5d"])
def test_grad_output_shape_rule(shape):
    with pytest.raises(ValueError) as info:
        pyconvmpi.conv2d_backward(np.ones(shape, np.float32), X, W)

    message = str(info.value)
    assert message.startswith("conv2d_backward: grad_output")
    assert "(1, 2, 3, 3)" in message
    assert str(shape) in message


def test_grad_output_unbatched_shape_rule():
    with pytest.raises(ValueError, match=r"grad_output .*\(2, 3, 3\); got \(1, 2, 3, 3\)"):
        pyconvmpi.conv2d_backward(GO, X[0], W)


@pytest.mark.parametrize("bad", [GO.astype(np.float64), GO.astype(np.int32), GO.astype(np.float16)],
                         ids=["float64", "int32", "float16"])
def test_grad_output_dtype_rule(bad):
    with pytest.raises(TypeError, match="conv2d_backward: grad_output"):
        pyconvmpi.conv2d_backward(bad, X, W)


def test_grad_output_none_rule():
    with pytest.raises(TypeError, match="conv2d_backward: grad_output must be a numpy.ndarray; got None"):
        pyconvmpi.conv2d_backward(None, X, W)


@pytest.mark.parametrize("need, exc, words", [
    (("input", "grad"), ValueError, ["need", "'input', 'weight', 'bias'", "'grad'"]),
    ("inputs", ValueError, ["need", "'inputs'"]),
    (3, TypeError, ["need", "sequence", "3"]),
    (None, TypeError, ["need", "None"]),
    ((None,), ValueError, ["need", "None"]),
], ids=["unknown_name", "misspelt_string", "int", "none", "none_entry"])
def test_need_rule(need, exc, words):
    with pytest.raises(exc) as info:
        pyconvmpi.conv2d_backward(GO, X, W, need=need)

    message = str(info.value)
    assert message.startswith("conv2d_backward: ")
    for word in words:
        assert word in message


@pytest.mark.parametrize("function", ["conv2d", "conv2d_backward"])
@pytest.mark.parametrize("keyword, value, exc, words", [
    ("placement", "everywhere", ValueError, ["placement", "'replicated'", "'everywhere'"]),
    ("placement", None, ValueError, ["placement", "None"]),
    ("strategy", "fastest", ValueError, ["strategy", "'auto'", "'fastest'"]),
    ("plan", "direct", TypeError, ["plan", "pyconvmpi.Plan", "str"]),
    ("plan", {"algorithm": "direct"}, TypeError, ["plan", "dict"]),
], ids=["placement", "placement_none", "strategy", "plan_string", "plan_dict"])
def test_distribution_keyword_rules(function, keyword, value, exc, words):
    with pytest.raises(exc) as info:
        if function == "conv2d":
            pyconvmpi.conv2d(X, W, **{keyword: value})
        else:
            pyconvmpi.conv2d_backward(GO, X, W, **{keyword: value})

    message = str(info.value)
    assert message.startswith(f"{function}: ")
    for word in words:
        assert word in message


@pytest.mark.parametrize("field, value, words", [
    ("algorithm", "fft", ["algorithm", "'direct'", "'fft'"]),
    ("threads", -1, ["threads", "non-negative", "-1"]),
    ("block_k", 1.5, ["block_k", "1.5"]),
    ("strategy", "diagonal", ["strategy", "'diagonal'"]),
    ("block_k", 2**63 - 1, ["block_k", "at most", str(2**63 - 1)]),
    ("threads", 2**64 + 1, ["threads", "at most", str(2**64 + 1)]),
])
def test_plan_rules(field, value, words):
    with pytest.raises(ValueError) as info:
        pyconvmpi.Plan(**{field: value})

    for word in words:
        assert word in str(info.value)


def test_validation_happens_before_any_work():
    # A bad option after valid arrays must raise before the input is read: a read-only,
    # NaN-filled input stays untouched and no output is produced.
    x = np.full((1, 2, 5, 5), np.nan, np.float32)
    x.flags.writeable = False

    with pytest.raises(ValueError, match="stride"):
        pyconvmpi.conv2d(x, W, stride=0)

    assert np.isnan(x).all()


@requires_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64", "complex64", "bool"])
def test_torch_tensor_dtype_rule(dtype):
    import torch

    tensor = torch.ones((1, 2, 5, 5), dtype=getattr(torch, dtype))

    with pytest.raises(TypeError, match=f"conv2d: input must have dtype float32 or float64; "
                                        f"got torch.{dtype}"):
        pyconvmpi.conv2d(tensor, W)


@requires_torch
def test_torch_meta_device_rule():
    import torch

    tensor = torch.ones((1, 2, 5, 5), device="meta")

    with pytest.raises(TypeError, match="conv2d: input is a tensor on device 'meta'.*cpu"):
        pyconvmpi.conv2d(tensor, W)


@requires_torch
def test_torch_sparse_rule():
    import torch

    tensor = torch.ones((1, 2, 5, 5)).to_sparse()

    with pytest.raises(TypeError, match="conv2d: input must be a dense tensor; got layout torch.sparse_coo"):
        pyconvmpi.conv2d(tensor, W)

