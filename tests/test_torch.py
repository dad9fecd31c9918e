"""pyconvmpi.torch in one process: gradcheck, parity with torch.nn.Conv2d, convert, errors."""

import copy
import itertools
import types

import numpy as np
import pytest

from conftest import requires_torch

pytestmark = requires_torch

torch = pytest.importorskip("torch")
F = torch.nn.functional

import pyconvmpi  # noqa: E402
import pyconvmpi.conv  # noqa: E402
import pyconvmpi.torch as pt  # noqa: E402

# Tolerances against PyTorch. Both compute the same sums in different orders. float32
# rounding grows with the reduction length, which is at most a few hundred terms here, so
# 1e-5 relative with a small absolute floor covers it. float64 differences are near 1e-15.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# (input shape, out_channels, kernel, stride, padding, dilation, groups, bias); kept small
# because gradcheck evaluates the function twice per input element.
GRADCHECK_CASES = [
    ((2, 2, 4, 5), 2, 3, 1, 0, 1, 1, True),
    ((1, 2, 5, 4), 3, 3, 1, 1, 1, 1, False),
    ((1, 2, 6, 5), 2, 3, 2, 1, 1, 1, True),
    ((1, 1, 6, 5), 2, (2, 3), (2, 1), (1, 2), 1, 1, True),
    ((1, 2, 5, 5), 2, 3, 1, "same", 2, 1, True),
    ((1, 1, 5, 4), 2, (2, 4), 1, "same", 1, 1, False),
    ((2, 1, 5, 4), 2, 3, 1, "valid", 1, 1, True),
    ((1, 4, 4, 4), 6, 3, 1, 1, 1, 2, True),
    ((1, 4, 5, 5), 4, 3, 2, 1, 1, 4, False),
    ((1, 2, 6, 5), 4, 3, (1, 2), 2, (2, 1), 2, True),
    ((2, 4, 4), 3, 3, 1, 1, 1, 1, True),              # unbatched
    ((3, 5, 4), 3, (1, 2), 1, "same", (1, 2), 3, True),  # unbatched, grouped
    ((0, 2, 5, 5), 2, 3, 1, 1, 1, 1, True),           # empty batch
]


def _case_id(case):
    shape, k, kernel, stride, padding, dilation, groups, bias = case
    return (f"x{'x'.join(map(str, shape))}-k{k}-r{kernel}-s{stride}-p{padding}-d{dilation}"
            f"-g{groups}-{'bias' if bias else 'nobias'}").replace(" ", "")


def _random(shape, dtype, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator, dtype=dtype)
    return tensor.requires_grad_(requires_grad)


def _case_tensors(case, dtype, seed, requires_grad=True):
    shape, k, kernel, stride, padding, dilation, groups, bias = case
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    channels = shape[-3]
    x = _random(shape, dtype, seed, requires_grad)
    w = _random((k, channels // groups, *kernel), dtype, seed + 1, requires_grad)
    b = _random((k,), dtype, seed + 2, requires_grad) if bias else None
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, options


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=_case_id)
def test_conv2d_gradcheck_float64(case):
    x, w, b, options = _case_tensors(case, torch.float64, seed=10)
    inputs = (x, w) if b is None else (x, w, b)

    def function(x, w, b=None):
        return pt.conv2d(x, w, b, **options)

    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_conv2d_matches_torch_forward_and_grads(case, dtype):
    x, w, b, options = _case_tensors(case, dtype, seed=20)
    tensors = [t for t in (x, w, b) if t is not None]
    ours = pt.conv2d(x, w, b, **options)
    theirs = F.conv2d(x, w, b, **options)
    torch.testing.assert_close(ours, theirs, **TOLERANCES[dtype])
    assert ours.dtype == dtype
    assert ours.shape == theirs.shape

    grad_output = _random(theirs.shape, dtype, seed=21)
    our_grads = torch.autograd.grad(ours, tensors, grad_output)
    their_grads = torch.autograd.grad(theirs, tensors, grad_output)
    for name, mine, reference in zip(("input", "weight", "bias"), our_grads, their_grads):
        torch.testing.assert_close(mine, reference, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")


def test_conv2d_strided_inputs_match_contiguous():
    x = _random((2, 8, 9, 3), torch.float64, seed=30).permute(0, 3, 1, 2)  # NHWC memory
    w = _random((4, 3, 3, 3), torch.float64, seed=31)[:, :, ::1, :].transpose(2, 3)
    assert not x.is_contiguous()
    assert not w.is_contiguous()
    expected = F.conv2d(x.contiguous(), w.contiguous(), padding=1)
    torch.testing.assert_close(pt.conv2d(x, w, padding=1), expected, rtol=1e-12, atol=1e-12)


def test_conv2d_channels_last_gradients_match_torch():
    x = _random((2, 3, 6, 6), torch.float64, seed=32).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = _random((4, 3, 3, 3), torch.float64, seed=33, requires_grad=True)
    ours = torch.autograd.grad(pt.conv2d(x, w, padding=1).sum(), (x, w))
    theirs = torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), (x, w))
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)


def test_conv2d_inputs_not_modified():
    x = _random((2, 3, 6, 6), torch.float32, seed=34, requires_grad=True)
    w = _random((4, 3, 3, 3), torch.float32, seed=35, requires_grad=True)
    b = _random((4,), torch.float32, seed=36, requires_grad=True)
    saved = [t.detach().clone() for t in (x, w, b)]
    pt.conv2d(x, w, b, padding=1).sum().backward()
    for before, after in zip(saved, (x, w, b)):
        assert torch.equal(before, after.detach())


class _Spy:
    """Records the arguments of a real library function and calls it."""

    def __init__(self, function):
        self.function = function
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.function(*args, **kwargs)


def test_conv2d_shares_memory_with_library(monkeypatch):
    forward = _Spy(pyconvmpi.conv.conv2d)
    monkeypatch.setattr(pt._conv, "conv2d", forward)
    x = _random((2, 3, 6, 6), torch.float32, seed=37)
    w = _random((4, 3, 3, 3), torch.float32, seed=38)
    output = pt.conv2d(x, w)
    (x_array, w_array, _), _ = forward.calls[0]
    assert np.shares_memory(x_array, x.numpy())
    assert np.shares_memory(w_array, w.numpy())
    # The result is the library's array itself, seen as a tensor.
    output.numpy()[0, 0, 0, 0] = 42.0
    assert output[0, 0, 0, 0].item() == 42.0


@pytest.mark.parametrize(
    "grad_input, grad_weight, bias, expected",
    [
        (True, True, "trainable", ("input", "weight", "bias")),
        (False, True, "trainable", ("weight", "bias")),
        (True, False, None, ("input",)),
        (False, True, None, ("weight",)),
        (True, True, "frozen", ("input", "weight")),
        (False, False, "trainable", ("bias",)),
    ],
)
def test_conv2d_backward_requests_only_needed_grads(monkeypatch, grad_input, grad_weight, bias,
                                                    expected):
    backward = _Spy(pyconvmpi.conv.conv2d_backward)
    monkeypatch.setattr(pt._conv, "conv2d_backward", backward)
    x = _random((1, 2, 5, 5), torch.float64, seed=40, requires_grad=grad_input)
    w = _random((3, 2, 3, 3), torch.float64, seed=41, requires_grad=grad_weight)
    b = None if bias is None else _random((3,), torch.float64, seed=42,
                                          requires_grad=bias == "trainable")
    pt.conv2d(x, w, b).sum().backward()
    assert backward.calls[0][1]["need"] == expected


def test_conv2d_double_backward_raises_unsupported():
    x = _random((1, 2, 5, 5), torch.float64, seed=43, requires_grad=True)
    w = _random((3, 2, 3, 3), torch.float64, seed=44, requires_grad=True)
    with pytest.raises(pyconvmpi.UnsupportedError, match="double backward.*not supported"):
        torch.autograd.grad(pt.conv2d(x, w).sum(), x, create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_conv2d_double_backward_is_not_implemented_error():
    x = _random((1, 2, 5, 5), torch.float64, seed=45, requires_grad=True)
    w = _random((3, 2, 3, 3), torch.float64, seed=46, requires_grad=True)
    loss = pt.conv2d(x, w).square().sum()
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        loss.backward(create_graph=True)


def test_conv2d_meta_tensor_raises_device_error():
    x = torch.empty((1, 2, 5, 5), device="meta")
    w = torch.empty((3, 2, 3, 3))
    with pytest.raises(TypeError, match=r"input is on device 'meta'.*\.cpu\(\)"):
        pt.conv2d(x, w)


def test_check_device_names_cuda_device():
    # No CUDA device exists here, so a stand-in object carries a real torch.device("cuda:0").
    stand_in = types.SimpleNamespace(device=torch.device("cuda:0"))
    with pytest.raises(TypeError, match=r"weight is on device 'cuda:0'; .*\.cpu\(\)"):
        pt.check_device(stand_in, "weight", "pyconvmpi.torch.conv2d")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.complex64,
                                   torch.bool], ids=str)
def test_conv2d_unsupported_dtype_raises_type_error(dtype):
    x = torch.zeros((1, 2, 5, 5), dtype=dtype)
    w = torch.zeros((3, 2, 3, 3), dtype=dtype)
    with pytest.raises(TypeError, match=f"input must have dtype torch.float32 or torch.float64; got {dtype}"):
        pt.conv2d(x, w)


def test_conv2d_mixed_dtypes_raise_type_error():
    x = torch.zeros((1, 2, 5, 5), dtype=torch.float32)
    w = torch.zeros((3, 2, 3, 3), dtype=torch.float64)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but input has dtype torch.float32"):
        pt.conv2d(x, w)


def test_conv2d_sparse_tensor_raises_type_error():
    x = torch.zeros((1, 2, 5, 5)).to_sparse()
    with pytest.raises(TypeError, match="input must be a dense"):
        pt.conv2d(x, torch.zeros((3, 2, 3, 3)))


def test_conv2d_numpy_input_raises_type_error():
    with pytest.raises(TypeError, match="input must be a torch.Tensor; got ndarray"):
        pt.conv2d(np.zeros((1, 2, 5, 5), np.float32), torch.zeros((3, 2, 3, 3)))


def test_conv2d_bad_option_raises_library_value_error():
    x, w = torch.zeros((1, 2, 5, 5)), torch.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match="stride must be positive"):
        pt.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="padding='same' requires stride 1"):
        pt.conv2d(x, w, stride=2, padding="same")


def test_conv2d_unknown_placement_raises_value_error():
    x, w = torch.zeros((1, 2, 5, 5)), torch.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match="placement must be one of .*; got 'everywhere'"):
        pt.conv2d(x, w, placement="everywhere")
    with pytest.raises(ValueError, match="strategy must be one of .*; got 'fastest'"):
        pt.conv2d(x, w, strategy="fastest")


def test_conv2d_bad_comm_raises_type_error():
    x, w = torch.zeros((1, 2, 5, 5)), torch.zeros((3, 2, 3, 3))
    with pytest.raises(TypeError, match="comm must be an mpi4py intracommunicator or None; got int"):
        pt.conv2d(x, w, comm=0)


def test_conv2d_root_placement_without_comm_is_differentiable():
    # Without a communicator the call runs on this process alone and placement is unused.
    x = _random((1, 2, 5, 5), torch.float64, seed=47, requires_grad=True)
    w = _random((3, 2, 3, 3), torch.float64, seed=48)
    grad, = torch.autograd.grad(pt.conv2d(x, w, placement="root").sum(), x)
    expected, = torch.autograd.grad(F.conv2d(x, w).sum(), x)
    torch.testing.assert_close(grad, expected, **TOLERANCES[torch.float64])


def test_conv2d_root_placement_with_grad_raises_value_error():
    from mpi4py import MPI

    x = torch.zeros((1, 2, 5, 5), requires_grad=True)
    w = torch.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match="placement='root' supports inference only"):
        pt.conv2d(x, w, comm=MPI.COMM_SELF, placement="root")


# --- the Conv2d module -------------------------------------------------------------------

MODULE_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), groups=2),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=2, out_channels=4, kernel_size=4, padding="same"),
    dict(in_channels=2, out_channels=3, kernel_size=2, padding="valid", stride=2),
]


def _module_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels",))


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("kwargs", MODULE_CASES, ids=_module_id)
def test_module_gradcheck_float64(kwargs, padding_mode):
    torch.manual_seed(50)
    layer = pt.Conv2d(**kwargs, padding_mode=padding_mode, dtype=torch.float64)
    x = _random((1, kwargs["in_channels"], 6, 5), torch.float64, seed=51, requires_grad=True)
    parameters = [p for p in layer.parameters()]

    def function(x, *values):
        return torch.func.functional_call(layer, dict(zip(("weight", "bias"), values)), (x,))

    # fast_mode checks random projections of the Jacobian, which takes a few calls instead
    # of two per element. The full Jacobian is checked for the function above, and the
    # module's gradients are compared with torch.nn.Conv2d's below.
    assert torch.autograd.gradcheck(function, (x, *parameters), fast_mode=True)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("kwargs", MODULE_CASES, ids=_module_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_module_matches_torch_conv2d(kwargs, padding_mode, dtype):
    torch.manual_seed(60)
    reference = torch.nn.Conv2d(**kwargs, padding_mode=padding_mode, dtype=dtype)
    ours = pt.Conv2d(**kwargs, padding_mode=padding_mode, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = _random((2, kwargs["in_channels"], 9, 8), dtype, seed=61, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)

    out, out_reference = ours(x), reference(x_reference)
    torch.testing.assert_close(out, out_reference, **TOLERANCES[dtype])
    grad_output = _random(out.shape, dtype, seed=62)
    out.backward(grad_output)
    out_reference.backward(grad_output)
    torch.testing.assert_close(x.grad, x_reference.grad, **TOLERANCES[dtype])
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, parameter.grad, **TOLERANCES[dtype],
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_module_unbatched_input_matches_torch(padding_mode):
    torch.manual_seed(63)
    reference = torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode=padding_mode, dtype=torch.float64)
    ours = pt.Conv2d(3, 2, 3, padding=1, padding_mode=padding_mode, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    x = _random((3, 6, 5), torch.float64, seed=64)
    torch.testing.assert_close(ours(x), reference(x), **TOLERANCES[torch.float64])


def test_module_same_initialisation_as_torch():
    for kwargs in MODULE_CASES:
        torch.manual_seed(70)
        reference = torch.nn.Conv2d(**kwargs)
        torch.manual_seed(70)
        ours = pt.Conv2d(**kwargs)
        assert [name for name, _ in ours.named_parameters()] == \
            [name for name, _ in reference.named_parameters()]
        for (name, mine), (_, theirs) in zip(ours.named_parameters(), reference.named_parameters()):
            assert torch.equal(mine, theirs), f"{kwargs}: {name} differs"


def test_module_state_dict_loads_both_ways():
    torch.manual_seed(71)
    reference = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ours = pt.Conv2d(4, 6, 3, padding=1, groups=2)
    assert ours.state_dict().keys() == reference.state_dict().keys()

    ours.load_state_dict(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)

    fresh = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    with torch.no_grad():
        ours.weight.mul_(2.0)
    fresh.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_module_state_dict_without_bias_round_trips():
    reference = torch.nn.Conv2d(2, 3, 3, bias=False)
    ours = pt.Conv2d(2, 3, 3, bias=False)
    assert list(ours.state_dict()) == ["weight"]
    ours.load_state_dict(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    assert ours.bias is None


def test_module_is_a_torch_conv2d():
    layer = pt.Conv2d(2, 3, 3)
    assert isinstance(layer, torch.nn.Conv2d)
    assert layer.placement == "replicated"
    assert layer.strategy == "auto"
    assert layer.comm is None


def test_module_non_cpu_device_raises_type_error():
    with pytest.raises(TypeError, match="Conv2d: device must be 'cpu'.*got 'cuda'"):
        pt.Conv2d(2, 3, 3, device="cuda")
    with pytest.raises(TypeError, match="got 'meta'"):
        pt.Conv2d(2, 3, 3, device=torch.device("meta"))


def test_module_cpu_device_accepted():
    layer = pt.Conv2d(2, 3, 3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64


def test_module_half_dtype_raises_type_error():
    with pytest.raises(TypeError, match="Conv2d: dtype must be torch.float32 or torch.float64; got torch.float16"):
        pt.Conv2d(2, 3, 3, dtype=torch.float16)


def test_module_half_after_construction_raises_at_forward():
    layer = pt.Conv2d(2, 3, 3).half()
    with pytest.raises(TypeError, match="must have dtype torch.float32 or torch.float64"):
        layer(torch.zeros((1, 2, 5, 5), dtype=torch.float16))


def test_module_torch_argument_checks_still_apply():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        pt.Conv2d(2, 3, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        pt.Conv2d(3, 4, 3, groups=2)


def test_module_rows_placement_with_reflect_raises_value_error():
    from mpi4py import MPI

    with pytest.raises(ValueError, match="placement='rows' supports only padding_mode='zeros'; got 'reflect'"):
        pt.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", comm=MPI.COMM_SELF, placement="rows")


def test_module_repr_shows_distribution():
    from mpi4py import MPI

    layer = pt.Conv2d(2, 3, 3, comm=MPI.COMM_SELF, placement="batch", strategy="batch")
    assert "placement='batch'" in repr(layer)
    assert "strategy='batch'" in repr(layer)


def test_module_deepcopy_shares_communicator():
    from mpi4py import MPI

    comm = MPI.COMM_SELF.Dup()
    try:
        layer = pt.Conv2d(2, 3, 3, comm=comm, placement="batch")
        duplicate = copy.deepcopy(layer)
        assert duplicate.comm is comm
        assert duplicate.weight is not layer.weight
        assert torch.equal(duplicate.weight, layer.weight)
    finally:
        comm.Free()


# --- convert -----------------------------------------------------------------------------

class _Block(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.branches = torch.nn.ModuleList(
            [torch.nn.Conv2d(channels, channels, 1), torch.nn.Sequential(
                torch.nn.ReLU(), torch.nn.Conv2d(channels, channels, 3, padding="same", bias=False))]
        )

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.branches[0](x) + self.branches[1](x)


class _CustomConv(torch.nn.Conv2d):
    """A subclass with its own forward, which convert must leave alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


def _nested_model():
    torch.manual_seed(80)
    shared = torch.nn.Conv2d(4, 4, 3, padding=1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, stride=2, padding=1),
        _Block(4),
        torch.nn.Sequential(shared, torch.nn.ReLU(), shared),
        _CustomConv(4, 4, 1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).double()


def test_convert_replaces_nested_conv2d_layers():
    model = _nested_model()
    converted = pt.convert(model)
    assert converted is model
    kinds = {name: type(module) for name, module in model.named_modules(remove_duplicate=False)}
    for name in ("0", "1.conv", "1.branches.0", "1.branches.1.1", "2.0", "2.2"):
        assert kinds[name] is pt.Conv2d, name
    assert kinds["3"] is _CustomConv


def test_convert_keeps_outputs_and_gradients():
    original = _nested_model()
    model = copy.deepcopy(original)
    pt.convert(model)
    x = _random((2, 2, 9, 9), torch.float64, seed=81)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    model(x).sum().backward()
    original(x).sum().backward()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")


def test_convert_keeps_parameter_objects_and_sharing():
    model = _nested_model()
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pt.convert(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(before[name] is after[name] for name in before)
    assert model[2][0] is model[2][2]
    x = _random((1, 2, 8, 8), torch.float64, seed=82)
    model(x).sum().backward()
    weight_before = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model[0].weight, weight_before)


def test_convert_keeps_hooks_and_training_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)).double().eval()
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(type(module)))
    pt.convert(model)
    model(_random((1, 1, 5, 5), torch.float64, seed=83))
    assert seen == [pt.Conv2d]
    assert not model[0].training


def test_convert_leaves_converted_layers_alone():
    model = _nested_model()
    pt.convert(model)
    layers = [module for module in model.modules() if isinstance(module, pt.Conv2d)]
    pt.convert(model)
    assert [module for module in model.modules() if isinstance(module, pt.Conv2d)] == layers


def test_convert_root_conv2d_returns_new_layer():
    layer = torch.nn.Conv2d(2, 3, 3)
    converted = pt.convert(layer)
    assert type(converted) is pt.Conv2d
    assert type(layer) is torch.nn.Conv2d
    assert converted.weight is layer.weight


def test_convert_passes_distribution_options():
    from mpi4py import MPI

    model = pt.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)), comm=MPI.COMM_SELF,
                       placement="batch", strategy="channels")
    assert model[0].comm is MPI.COMM_SELF
    assert (model[0].placement, model[0].strategy) == ("batch", "channels")


def test_convert_half_model_raises_and_leaves_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3).half()))
    with pytest.raises(TypeError, match=r"convert: 1\.0\.weight has dtype torch.float16"):
        pt.convert(model)
    assert type(model[0]) is torch.nn.Conv2d


def test_convert_non_module_raises_type_error():
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module; got dict"):
        pt.convert({})


def test_convert_rows_placement_with_reflect_raises_value_error():
    from mpi4py import MPI

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="placement='rows' supports only padding_mode='zeros'"):
        pt.convert(model, comm=MPI.COMM_SELF, placement="rows")


def test_package_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pyconvmpi; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("options", list(itertools.product((1, 2), ("zeros", "circular"))),
                         ids=lambda o: f"stride{o[0]}-{o[1]}")
def test_module_trains_like_torch_for_a_step(options):
    stride, padding_mode = options
    torch.manual_seed(90)
    reference = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=stride, padding=1, padding_mode=padding_mode),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2)).double()
    x = _random((4, 1, 8, 8), torch.float64, seed=91)
    reference(x)
    model = pt.convert(copy.deepcopy(reference))
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        net(x).square().mean().backward()
        optimizer.step()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
