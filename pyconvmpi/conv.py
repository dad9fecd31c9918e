"""conv2d and conv2d_backward: validation, planning and one C call per convolution."""

import logging
from typing import NamedTuple

import numpy as np

from . import _lib
from . import _validate as V
from . import plan as _plan
from .errors import UnsupportedError

logger = logging.getLogger(__name__)

__all__ = ["conv2d", "conv2d_backward", "Conv2dGrads"]


class Conv2dGrads(NamedTuple):
    """Gradients of a convolution; an entry not requested through ``need`` is None."""

    input: object
    weight: object
    bias: object


def _check_distribution_names(placement, strategy, plan, fn):
    from . import distributed

    distributed.check_names(placement, strategy, fn)
    if plan is not None and not isinstance(plan, _plan.Plan):
        raise TypeError(f"{fn}: plan must be a pyconvmpi.Plan or None; got {type(plan).__name__}")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, comm=None,
           placement="replicated", strategy="auto", plan=None):
    """Apply a 2-D convolution (cross-correlation), with the semantics of
    ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    input : ndarray or CPU torch.Tensor, float32 or float64
        ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
    weight : ndarray, same dtype
        ``(out_channels, C / groups, kH, kW)``.
    bias : ndarray of shape (out_channels,), optional
    stride, dilation : int or pair of int, positive
    padding : int, pair of int, ``"same"`` or ``"valid"``
        ``"same"`` pads like PyTorch (the extra element of an odd total goes bottom and right)
        and requires stride 1.
    groups : int
        Divides both channel counts.
    comm : mpi4py communicator, optional
        Makes the call collective over ``comm``; see ``placement`` and ``strategy``.
    placement : {"replicated", "root", "batch", "rows"}
        Where the data lives across ranks (only with ``comm``).
    strategy : {"auto", "batch", "channels", "rows", "hybrid"}
        How ``replicated`` and ``root`` placements split the work.
    plan : Plan, optional
        Forces strategy, threads, algorithm and tiles.

    Returns
    -------
    ndarray
        ``(N, out_channels, H_out, W_out)`` (3-D for unbatched input) in the input's dtype;
        ``None`` on ranks other than 0 for ``placement="root"``. Subnormal inputs and results
        are flushed to zero, unlike PyTorch's default, except by the ``"reference"``
        algorithm; the caller's floating-point state is restored.

    Raises
    ------
    TypeError
        An argument of the wrong kind or dtype, including mixed dtypes.
    ValueError
        A bad shape or option value; under MPI, raised on every rank if any rank's is bad.
    UnsupportedError
        ``plan`` names an algorithm that cannot compute this shape.
    MPIError
        An MPI call failed.
    """
    fn = "conv2d"
    if comm is not None:
        # Collective: distributed checks every argument, names included, and reports a bad
        # value on one rank to all ranks instead of leaving them waiting.
        from . import distributed

        return distributed.conv2d(input, weight, bias, stride, padding, dilation, groups,
                                  comm=comm, placement=placement, strategy=strategy, plan=plan)
    if placement != "replicated" or strategy != "auto" or plan is not None:
        _check_distribution_names(placement, strategy, plan, fn)

    x = V.as_array(input, "input", fn)
    w = V.as_array(weight, "weight", fn)
    b = V.as_array(bias, "bias", fn, allow_none=True)
    V.check_same_dtype({"input": x, "weight": w, "bias": b}, fn)
    geo = V.geometry(x.shape, w.shape, stride, padding, dilation, groups, fn)
    V.check_bias(b, geo, fn)
    chosen = plan if plan is not None else _plan.choose(geo, "forward", x.dtype)

    desc = _plan.desc_struct(geo)
    check_algorithm(plan, desc, ("forward",), fn)

    output = np.empty(geo.output_shape, dtype=x.dtype)
    _lib.conv2d_forward(desc, chosen.exec_struct(), x, w, b, output)
    return output if geo.batched else output[0]


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    need=("input", "weight", "bias"), comm=None, placement="replicated",
                    strategy="auto", plan=None):
    """Compute the gradients of ``conv2d`` with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to ``conv2d``'s output, of that output's shape.
    input, weight, stride, padding, dilation, groups, comm, placement, strategy, plan
        As for ``conv2d``.
    need : sequence of {"input", "weight", "bias"}
        Gradients to compute; the others are returned as None.

    Returns
    -------
    Conv2dGrads
        ``(input, weight, bias)``. Input elements the forward pass never read get exactly zero.
        The bias gradient is the sum of ``grad_output`` over batch and space.

    Raises
    ------
    TypeError, ValueError, UnsupportedError, MPIError
        As for ``conv2d``; ValueError also when ``grad_output``'s shape does not match the
        forward output.
    """
    fn = "conv2d_backward"
    if comm is not None:
        from . import distributed

        return distributed.conv2d_backward(grad_output, input, weight, stride, padding, dilation,
                                           groups, need=need, comm=comm, placement=placement,
                                           strategy=strategy, plan=plan)
    needed = V.need_set(need, fn)
    if placement != "replicated" or strategy != "auto" or plan is not None:
        _check_distribution_names(placement, strategy, plan, fn)

    go = V.as_array(grad_output, "grad_output", fn)
    x = V.as_array(input, "input", fn)
    w = V.as_array(weight, "weight", fn)
    V.check_same_dtype({"input": x, "weight": w, "grad_output": go}, fn)
    geo = V.geometry(x.shape, w.shape, stride, padding, dilation, groups, fn)
    check_grad_output_shape(go, geo, fn)
    chosen = plan if plan is not None else _plan.choose(geo, "backward", x.dtype)
    desc, exec_ = _plan.desc_struct(geo), chosen.exec_struct()
    ops = (("backward_data",) if "input" in needed else ()) + (
        ("backward_weight",) if needed & {"weight", "bias"} else ())
    check_algorithm(plan, desc, ops, fn)

    grad_input = grad_weight = grad_bias = None
    if "input" in needed:
        grad_input = np.empty(geo.input_shape, dtype=x.dtype)
        _lib.conv2d_backward_data(desc, exec_, go, w, grad_input)
        if not geo.batched:
            grad_input = grad_input[0]
    if "weight" in needed or "bias" in needed:
        if "weight" in needed:
            grad_weight = np.empty(geo.weight_shape, dtype=x.dtype)
        if "bias" in needed:
            grad_bias = np.empty((geo.k,), dtype=x.dtype)
        _lib.conv2d_backward_weight(desc, exec_, go, x, grad_weight, grad_bias)
    return Conv2dGrads(grad_input, grad_weight, grad_bias)


def check_algorithm(plan, desc, ops, fn):
    """Raise UnsupportedError naming the algorithm if a forced one cannot compute ``ops``."""
    if plan is None or plan.algorithm == "auto":
        return
    for op in ops:
        if not _lib.algorithm_supported(plan.algorithm, op, desc):
            usable = [name for name in _lib.ALGORITHMS
                      if name != "auto" and _lib.algorithm_supported(name, op, desc)]
            raise UnsupportedError(
                f"{fn}: algorithm {plan.algorithm!r} cannot compute this convolution's {op} "
                f"in this build; usable here: {', '.join(map(repr, usable))} or 'auto'"
            )


def check_grad_output_shape(grad_output, geo, fn):
    """Raise ValueError unless grad_output has the forward output's shape."""
    expected = geo.output_shape if geo.batched else geo.output_shape[1:]
    if grad_output.shape != expected:
        raise ValueError(
            f"{fn}: grad_output must have the forward output's shape {expected}; "
            f"got {grad_output.shape}"
        )
