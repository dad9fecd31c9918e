"""PyTorch integration: an autograd function, a drop-in for torch.nn.Conv2d, and convert().

``conv2d`` computes forward and backward with the pyconvmpi library on float32 and float64
CPU tensors. Tensors reach the library through their zero-copy numpy views (a contiguous
copy is made only for strided or non-contiguous tensors) and results come back through
``torch.from_numpy`` without a copy. ``Conv2d`` subclasses ``torch.nn.Conv2d``, so it has
the same constructor, parameter names, initialisation and ``state_dict``, plus the
``comm``, ``placement`` and ``strategy`` options of ``pyconvmpi.conv2d``.

This module imports PyTorch; the package itself does not, so PyTorch stays optional.
"""

import copy
import logging

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import conv as _conv
from . import distributed as _distributed
from .errors import RemoteRankError, UnsupportedError

logger = logging.getLogger(__name__)

__all__ = ["conv2d", "Conv2d", "convert"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_device(tensor, name, fn):
    """Raise TypeError unless ``tensor.device`` is the CPU."""
    device = tensor.device
    if device.type != "cpu":
        raise TypeError(
            f"{fn}: {name} is on device {str(device)!r}; pyconvmpi computes on the CPU, so "
            "move the tensors and the model there with .cpu()"
        )


def check_tensor(tensor, name, fn, allow_none=False):
    """Raise TypeError unless ``tensor`` is a dense float32 or float64 CPU tensor."""
    if tensor is None:
        if allow_none:
            return
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got None")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(tensor).__name__}")
    check_device(tensor, name, fn)
    if tensor.layout != torch.strided:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor; got layout {tensor.layout}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have dtype torch.float32 or torch.float64; got {tensor.dtype}"
        )


def _check_tensors(input, weight, bias, fn):
    check_tensor(input, "input", fn)
    check_tensor(weight, "weight", fn)
    check_tensor(bias, "bias", fn, allow_none=True)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != input.dtype:
            raise TypeError(
                f"{fn}: {name} has dtype {tensor.dtype} but input has dtype {input.dtype}; "
                "convert explicitly, pyconvmpi never casts silently"
            )


def _check_comm(comm, fn):
    if comm is None:
        return
    from mpi4py import MPI

    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(
            f"{fn}: comm must be an mpi4py intracommunicator or None; got {type(comm).__name__}"
        )


def _agree(comm, error, fn):
    """Raise ``error`` here, or RemoteRankError, on every rank of ``comm`` if any rank has one.

    Checks made in this module run before the library's own agreement. A bad tensor on one
    rank must therefore stop the others here too, or they would wait in the library's
    collective for a rank that never arrives. Costs one small allgather per call.
    """
    if comm is None:
        if error is not None:
            raise error
        return
    messages = comm.allgather(None if error is None else str(error))
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise RemoteRankError(f"{fn}: rank {rank} rejected its arguments: {message}")


def _strides_like_channels_last(tensor):
    """Return whether a 4-D tensor's strides order it like torch.channels_last.

    Follows ``is_channels_last_strides_2d`` of PyTorch's c10/core/MemoryFormat.h, which
    decides the memory format that torch.nn.functional.conv2d gives its output. Ambiguous
    tensors, such as those with one channel and a 1 x 1 image, count as contiguous, as there.
    """
    if tensor.dim() != 4:
        return False
    sizes, strides = tensor.shape, tensor.stride()
    smallest = 0
    for dim in (1, 3, 2, 0):
        if sizes[dim] == 0 or strides[dim] < smallest:
            return False
        if dim == 0 and smallest == strides[1]:
            return False
        smallest = strides[dim] * (sizes[dim] if sizes[dim] > 1 else 1)
    return True


def _numpy(tensor):
    # numpy() refuses tensors with the lazy negation or conjugation bit set (from
    # torch._neg_view, for example); resolving them copies only such tensors.
    return None if tensor is None else tensor.detach().resolve_neg().resolve_conj().numpy()


def _from_numpy(array):
    return None if array is None else torch.from_numpy(array)


class _Options:
    """Non-tensor arguments of one conv2d call, carried from forward to backward."""

    __slots__ = ("stride", "padding", "dilation", "groups", "comm", "placement", "strategy")

    def __init__(self, stride, padding, dilation, groups, comm, placement, strategy):
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.comm = comm
        self.placement = placement
        self.strategy = strategy

    def conv_kwargs(self):
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            comm=self.comm, placement=self.placement, strategy=self.strategy,
        )


class _Conv2dFunction(torch.autograd.Function):
    """Autograd node whose forward and backward are single pyconvmpi library calls."""

    @staticmethod
    def forward(ctx, input, weight, bias, options):
        # PyTorch returns a channels_last output when the input (with a batch dimension added
        # if it has none) or the weight is channels_last, and later layers keep that format.
        batched = input.dim() == 4
        channels_last = _strides_like_channels_last(
            input if batched else input.unsqueeze(0)) or _strides_like_channels_last(weight)
        # A strided view is copied once here and backward uses the copy, so the backward
        # pass does not copy it again.
        input = input.contiguous()
        weight = weight.contiguous()
        output = _conv.conv2d(
            _numpy(input), _numpy(weight), _numpy(bias), **options.conv_kwargs()
        )
        ctx.save_for_backward(input, weight)
        ctx.options = options
        ctx.has_bias = bias is not None
        output = torch.from_numpy(output)
        if channels_last and batched:
            output = output.contiguous(memory_format=torch.channels_last)
        elif channels_last:
            output = output.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # Backward runs with grad mode on only under create_graph=True, i.e. for a
            # second derivative, which the library does not compute.
            raise UnsupportedError(
                "pyconvmpi.torch.conv2d: double backward (create_graph=True, gradients of "
                "gradients) is not supported; use torch.nn.functional.conv2d for "
                "higher-order derivatives"
            )
        input, weight = ctx.saved_tensors
        names = ("input", "weight", "bias")
        need = tuple(
            name for name, needed in zip(names, ctx.needs_input_grad[:3])
            if needed and (name != "bias" or ctx.has_bias)
        )
        if not need:
            return None, None, None, None
        grads = _conv.conv2d_backward(
            _numpy(grad_output), _numpy(input), _numpy(weight), need=need,
            **ctx.options.conv_kwargs(),
        )
        return _from_numpy(grads.input), _from_numpy(grads.weight), _from_numpy(grads.bias), None


def _check_placement_differentiable(comm, input, weight, bias, fn):
    """Raise on every rank when a root-placement call would need gradients.

    Ranks other than 0 pass no tensors in the root placement, so they hold no autograd
    graph and could not join the collective backward call.
    """
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    error = None
    if wants_grad:
        error = ValueError(
            f"{fn}: placement='root' supports inference only, because ranks other than 0 hold "
            "no autograd graph; run it under torch.no_grad() or use placement='batch'"
        )
    _agree(comm, error, fn)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, comm=None,
           placement="replicated", strategy="auto"):
    """Apply a 2-D convolution to CPU tensors, differentiably, with the pyconvmpi library.

    Same semantics as ``torch.nn.functional.conv2d``. Forward and backward each make one
    library call; gradients are computed only for the tensors that require them.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, H, W)`` or unbatched ``(C, H, W)``, float32 or float64, on the CPU. With
        ``placement="batch"`` this rank's slice of the batch; with ``"rows"`` its band of
        rows (see ``pyconvmpi.distributed.row_bands``); with ``"root"``, None on ranks other
        than 0.
    weight : torch.Tensor
        ``(out_channels, C / groups, kH, kW)``, the input's dtype.
    bias : torch.Tensor of shape (out_channels,), optional
    stride, padding, dilation, groups
        As for ``torch.nn.functional.conv2d``, including ``padding="same"`` and ``"valid"``.
    comm : mpi4py communicator, optional
        Makes forward and backward collective over ``comm``: every rank calls this function
        and runs the backward pass in the same order.
    placement : {"replicated", "root", "batch", "rows"}
        Where the data lives across ranks; see ``pyconvmpi.conv2d``. With ``"batch"`` and
        ``"rows"`` the weight and bias gradients are summed over all ranks. ``"root"`` with a
        communicator is for inference only (no tensor may require a gradient).
    strategy : {"auto", "batch", "channels", "rows", "hybrid"}
        How ``replicated`` and ``root`` placements split the work.

    Returns
    -------
    torch.Tensor or None
        The output; None on ranks other than 0 with ``placement="root"``. As in PyTorch, it
        is channels_last when the input or the weight is, and then a copy of the library's
        result; otherwise it shares memory with that result.

    Raises
    ------
    TypeError
        A tensor on a device other than the CPU, of a dtype other than float32 or float64,
        sparse, or of a dtype other than the input's.
    ValueError
        A bad shape or option, as for ``pyconvmpi.conv2d``; ``placement="root"`` with a tensor
        that requires a gradient.
    RemoteRankError
        With ``comm``: another rank rejected its arguments.
    UnsupportedError
        During backward with ``create_graph=True``: double backward is not supported.
    """
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, comm, placement,
                   strategy)


def _conv2d(input, weight, bias, stride, padding, dilation, groups, comm, placement, strategy,
            error=None):
    """Run ``conv2d``; ``error``, raised earlier on this rank, is agreed on like a bad tensor."""
    fn = "pyconvmpi.torch.conv2d"
    _check_comm(comm, fn)
    options = _Options(stride, padding, dilation, groups, comm, placement, strategy)
    # Ranks other than 0 pass no tensors in the root placement.
    reads_tensors = comm is None or placement != "root" or comm.Get_rank() == 0

    if error is None:
        try:
            _distributed.check_names(placement, strategy, fn)
            if reads_tensors:
                _check_tensors(input, weight, bias, fn)
        except (TypeError, ValueError) as exc:
            error = exc
    _agree(comm, error, fn)

    if placement == "root" and comm is not None:
        _check_placement_differentiable(comm, input, weight, bias, fn)
        if not reads_tensors:
            _conv.conv2d(None, None, None, **options.conv_kwargs())
            return None
    return _Conv2dFunction.apply(input, weight, bias, options)


class _SharedHandle:
    """Holds a communicator that deep copies of a module share instead of copying.

    mpi4py refuses to copy or pickle a derived communicator, and a copied layer must take
    part in the same collectives as the original anyway.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


def _check_device_argument(device, fn):
    if device is not None and torch.device(device).type != "cpu":
        raise TypeError(
            f"{fn}: device must be 'cpu' (pyconvmpi computes on the CPU); got {str(device)!r}"
        )


def _check_dtype_argument(dtype, fn):
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: dtype must be torch.float32 or torch.float64; got {dtype}")


def _check_layer_options(comm, placement, strategy, padding_mode, fn):
    _check_comm(comm, fn)
    _distributed.check_names(placement, strategy, fn)
    if placement == "rows" and comm is not None and padding_mode != "zeros":
        # Limitation: padding modes other than zeros pad each rank's band of rows on its own,
        # which would pad interior band edges too, so this combination raises ValueError.
        raise ValueError(
            f"{fn}: placement='rows' supports only padding_mode='zeros'; got {padding_mode!r}"
        )


class Conv2d(torch.nn.Conv2d):
    """Drop-in for ``torch.nn.Conv2d`` computed by pyconvmpi, locally or over MPI ranks.

    The constructor takes the arguments of ``torch.nn.Conv2d`` (``device`` may only be the
    CPU and ``dtype`` float32 or float64), creates the same ``weight`` and ``bias``
    parameters with the same initialisation, so ``state_dict``s load in both directions.
    ``padding_mode`` other than ``"zeros"`` pads with ``torch.nn.functional.pad`` exactly as
    ``torch.nn.Conv2d`` does.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
    padding_mode, device, dtype
        As for ``torch.nn.Conv2d``.
    comm : mpi4py communicator, optional
        Makes the layer collective over ``comm``; see ``pyconvmpi.torch.conv2d``.
    placement : {"replicated", "root", "batch", "rows"}
        Where the layer's input lives across ranks. With ``"root"`` the layer is for
        inference and ranks other than 0 call it with None. ``"rows"`` requires
        ``padding_mode="zeros"``.
    strategy : {"auto", "batch", "channels", "rows", "hybrid"}

    Raises
    ------
    TypeError
        A device other than the CPU, a dtype other than float32 or float64, or a ``comm``
        that is not an mpi4py intracommunicator.
    ValueError
        The values ``torch.nn.Conv2d`` rejects, an unknown placement or strategy, or
        ``placement="rows"`` with a padding mode other than zeros.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 comm=None, placement="replicated", strategy="auto"):
        fn = "Conv2d"
        _check_device_argument(device, fn)
        _check_dtype_argument(dtype, fn)
        _check_layer_options(comm, placement, strategy, padding_mode, fn)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self._comm = _SharedHandle(comm)
        self.placement = placement
        self.strategy = strategy

    @property
    def comm(self):
        """The mpi4py communicator the layer is collective over, or None."""
        return self._comm.value

    @comm.setter
    def comm(self, value):
        _check_layer_options(value, self.placement, self.strategy, self.padding_mode, "Conv2d")
        self._comm = _SharedHandle(value)

    def _conv_forward(self, input, weight, bias):
        comm, placement, strategy = self.comm, self.placement, self.strategy
        if self.padding_mode == "zeros":
            return _conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                           self.groups, comm, placement, strategy)
        error = None
        if input is not None:
            try:
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            except Exception as exc:
                # F.pad raises RuntimeError for an input too small to reflect, among others.
                # Under a communicator the other ranks must raise too instead of waiting.
                if comm is None:
                    raise
                error = exc
        return _conv2d(input, weight, bias, self.stride, _pair(0), self.dilation, self.groups,
                       comm, placement, strategy, error)

    def extra_repr(self):
        text = super().extra_repr()
        if self.comm is not None:
            text += f", comm size={self.comm.Get_size()}, placement={self.placement!r}"
        if self.strategy != "auto":
            text += f", strategy={self.strategy!r}"
        return text


def _check_convertible(module, path):
    for name, tensor in (("weight", module.weight), ("bias", module.bias)):
        if tensor is None:
            continue
        where = f"convert: {path or 'model'}.{name}"
        check_device(tensor, where, "convert")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{where} has dtype {tensor.dtype}; pyconvmpi computes in torch.float32 or "
                "torch.float64, so call .float() or .double() first"
            )


def _converted(module, path, comm, placement, strategy):
    """Return a pyconvmpi Conv2d that shares ``module``'s parameters, buffers and hooks."""
    _check_convertible(module, path)
    _check_layer_options(comm, placement, strategy, module.padding_mode, "convert")
    new = Conv2d.__new__(Conv2d)
    # Copy the instance dictionary one level deep: the new layer owns its parameter, buffer
    # and hook tables but holds the same Parameter objects, so an optimizer built before
    # convert() keeps updating the weights the model uses.
    new.__dict__.update(
        {key: copy.copy(value) if isinstance(value, dict) else value
         for key, value in module.__dict__.items()}
    )
    new._comm = _SharedHandle(comm)
    new.placement = placement
    new.strategy = strategy
    return new


def convert(model, *, comm=None, placement="replicated", strategy="auto"):
    """Replace every ``torch.nn.Conv2d`` in ``model`` with ``pyconvmpi.torch.Conv2d``.

    Layers are found recursively. The new layers share the old ones' parameters (so weights,
    ``requires_grad`` and optimizer references are kept), buffers, hooks and training mode.
    A layer used at several places of the model becomes one shared new layer. Only modules
    whose type is exactly ``torch.nn.Conv2d`` are replaced: pyconvmpi layers, lazy and
    quantized convolutions and other subclasses, which may change the forward pass, stay.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place.
    comm, placement, strategy
        Given to every new layer; see ``Conv2d``.

    Returns
    -------
    torch.nn.Module
        ``model``, or the new layer when ``model`` itself is a ``torch.nn.Conv2d``.

    Raises
    ------
    TypeError
        ``model`` is not a module, or a layer's weight is not a float32 or float64 CPU tensor
        (the message names the layer); the model is then left unchanged.
    ValueError
        An unknown placement or strategy, or ``placement="rows"`` with a layer whose
        padding mode is not zeros.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module; got {type(model).__name__}")

    # Plan every replacement first so that an unconvertible layer leaves the model unchanged.
    replacements = {}
    parents = []
    for path, module in model.named_modules(remove_duplicate=False):
        # named_children() skips repeats of a shared child within one parent; _modules does not.
        for child_name, child in module._modules.items():
            if type(child) is torch.nn.Conv2d:
                if id(child) not in replacements:
                    child_path = f"{path}.{child_name}" if path else child_name
                    replacements[id(child)] = _converted(child, child_path, comm, placement,
                                                         strategy)
                parents.append((module, child_name, id(child)))
    root = None
    if type(model) is torch.nn.Conv2d:
        root = _converted(model, "", comm, placement, strategy)

    for parent, child_name, key in parents:
        setattr(parent, child_name, replacements[key])
    logger.debug("convert: replaced %d Conv2d layers", len(replacements) + (root is not None))
    return root if root is not None else model
