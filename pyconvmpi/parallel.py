"""Data-parallel training of any PyTorch model over MPI ranks, with mpi4py.

Every rank keeps a full replica of the model and trains on its own part of each global
batch. ``DataParallel`` broadcasts rank 0's parameters and buffers at the start and, after
each backward pass, reduces the gradients across ranks. Gradients travel in a few large
buckets (25 MiB by default), one ``Allreduce`` per bucket, rather than one message per
tensor, because the latency of many small messages dominates for models with many small
parameters.

The traffic here is control-sized compared with a convolution, so it uses mpi4py directly
instead of the C library. This module imports PyTorch; the package itself does not.

Typical loop::

    model = DataParallel(model, MPI.COMM_WORLD)     # rank 0's initial weights everywhere
    for x, y in local_batches:                        # this rank's share of a global batch
        optimizer.zero_grad()
        loss_fn(model.module(x), y).backward()        # mean over the local samples
        model.average_gradients(weight=len(x))        # mean over all samples of all ranks
        optimizer.step()
"""

import logging
import math
import numbers

import numpy as np
import torch

from .errors import RemoteRankError

logger = logging.getLogger(__name__)

__all__ = ["DataParallel"]

DEFAULT_BUCKET_BYTES = 25 * 2**20


def _mpi():
    from mpi4py import MPI

    return MPI


def _library_reduced_parameters(module, comm):
    """Return the ids of parameters whose gradients pyconvmpi layers already sum over ranks.

    A ``pyconvmpi.torch.Conv2d`` with a communicator in the ``batch`` or ``rows`` placement
    returns weight and bias gradients summed over its ranks, identical on all of them.
    Raises ValueError for pyconvmpi layers that cannot take part in data-parallel training.
    """
    from . import torch as pcm_torch

    MPI = _mpi()
    fn = "DataParallel"
    ids = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, pcm_torch.Conv2d) or layer.comm is None:
            continue
        if layer.placement in ("replicated", "root"):
            raise ValueError(
                f"{fn}: layer {name!r} has placement={layer.placement!r}, which expects the "
                "same input on every rank (or rank 0's alone), but data-parallel ranks hold "
                "different samples; use placement='batch' or comm=None"
            )
        if MPI.Comm.Compare(layer.comm, comm) not in (MPI.IDENT, MPI.CONGRUENT):
            raise ValueError(
                f"{fn}: layer {name!r} must use the same group of ranks as DataParallel, "
                "because its gradients are summed over its own communicator"
            )
        ids.update(id(p) for p in layer.parameters(recurse=False))
    return ids


def _check_model_tensors(module, named, fn):
    """Raise TypeError for parameters DataParallel cannot reduce."""
    for name, parameter in named:
        if parameter.device.type != "cpu" or parameter.layout != torch.strided:
            raise TypeError(
                f"{fn}: parameter {name!r} must be a dense CPU tensor; got device "
                f"{str(parameter.device)!r}, layout {parameter.layout}"
            )
    for name, submodule in module.named_modules():
        if getattr(submodule, "sparse", False) is True:
            raise TypeError(
                f"{fn}: layer {name!r} ({type(submodule).__name__}) has sparse=True and so "
                "produces sparse gradients, which DataParallel does not reduce; use sparse=False"
            )


class _Bucket:
    """One flat buffer holding the gradients of several parameters of one dtype."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.parameters = []
        self.offsets = []
        self.numel = 0
        self.buffer = None

    def add(self, parameter):
        self.parameters.append(parameter)
        self.offsets.append(self.numel)
        self.numel += parameter.numel()

    def allocate(self):
        self.buffer = torch.empty(self.numel, dtype=self.dtype)

    def views(self):
        for parameter, offset in zip(self.parameters, self.offsets):
            yield parameter, self.buffer[offset:offset + parameter.numel()].view_as(parameter)


def _make_buckets(parameters, bucket_bytes):
    """Group parameters by dtype into buckets of at most ``bucket_bytes`` (or one parameter)."""
    open_buckets = {}
    buckets = []
    for parameter in parameters:
        bucket = open_buckets.get(parameter.dtype)
        size = parameter.numel() * parameter.element_size()
        if bucket is not None and (bucket.numel * parameter.element_size() + size > bucket_bytes):
            bucket = None
        if bucket is None:
            bucket = _Bucket(parameter.dtype)
            open_buckets[parameter.dtype] = bucket
            buckets.append(bucket)
        bucket.add(parameter)
    for bucket in buckets:
        bucket.allocate()
    return buckets


def _check_weight(weight, fn):
    """Return an error message for a bad local weight, or None."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return f"{fn}: weight must be a non-negative real number; got {weight!r}"
    if not math.isfinite(weight) or weight < 0:
        return f"{fn}: weight must be a non-negative finite number; got {weight!r}"
    return None


class DataParallel:
    """Keep the replicas of a model on every rank in step: same start, reduced gradients.

    The constructor broadcasts rank 0's parameters and buffers to the other ranks, so every
    replica starts from the same weights. After each backward pass, call
    ``average_gradients`` (gradients of a per-rank mean loss) or ``sum_gradients`` (gradients
    of a loss already divided by the global batch size); every rank then has the same
    gradients and an optimizer step keeps the replicas equal.

    Parameters of ``pyconvmpi.torch.Conv2d`` layers with a communicator in the ``batch`` or
    ``rows`` placement already hold gradients summed over the ranks by the library; they are
    not sent again (see ``sum_gradients`` and ``average_gradients``).

    Parameters
    ----------
    module : torch.nn.Module
        The model, with the same parameter names, shapes and dtypes on every rank, on the CPU.
    comm : mpi4py intracommunicator, optional
        Defaults to ``MPI.COMM_WORLD``. Construction and every reduction are collective.
    bucket_bytes : int
        Maximum size of one gradient message in bytes; a parameter larger than this
        travels alone.
    broadcast : bool
        Broadcast rank 0's parameters and buffers at construction (default True).

    Raises
    ------
    TypeError
        ``module`` is not a module, ``comm`` not an intracommunicator, or a parameter is not
        a dense CPU tensor.
    ValueError
        ``bucket_bytes`` is not positive; pyconvmpi layers whose placement or communicator
        cannot take part in data-parallel training.
    RemoteRankError
        The ranks' models differ in parameter names, shapes or dtypes; raised on every rank.
    """

    def __init__(self, module, comm=None, *, bucket_bytes=DEFAULT_BUCKET_BYTES, broadcast=True):
        fn = "DataParallel"
        MPI = _mpi()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{fn}: module must be a torch.nn.Module; got {type(module).__name__}")
        comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"{fn}: comm must be an mpi4py intracommunicator; got {type(comm).__name__}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"{fn}: bucket_bytes must be a positive integer; got {bucket_bytes!r}")
        self.module = module
        self.comm = comm

        named = list(module.named_parameters())
        reduced_ids = set()
        error = None
        try:
            reduced_ids = _library_reduced_parameters(module, comm)
            _check_model_tensors(module, named, fn)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree_on_model(named, error, fn)

        trainable = [p for _, p in named if p.requires_grad]
        self._reduced = [p for p in trainable if id(p) in reduced_ids]
        self._buckets = _make_buckets(
            [p for p in trainable if id(p) not in reduced_ids], bucket_bytes
        )
        self._bucketed = [p for bucket in self._buckets for p in bucket.parameters]
        self._index = {id(p): i for i, p in enumerate(self._bucketed)}
        logger.debug(
            "%s: rank %d of %d, %d parameters in %d buckets, %d summed by pyconvmpi layers",
            fn, comm.Get_rank(), comm.Get_size(), len(trainable) - len(self._reduced),
            len(self._buckets), len(self._reduced),
        )
        if broadcast:
            self.broadcast_parameters()

    def __call__(self, *args, **kwargs):
        """Run the wrapped module's forward pass."""
        return self.module(*args, **kwargs)

    def _agree_on_model(self, named, error, fn):
        """Raise on every rank if any rank's model is invalid or differs from rank 0's.

        One allgather of each rank's error message and parameter and buffer signature, so
        that no rank starts a reduction its peers will not match.
        """
        signature = [("parameter", name, tuple(p.shape), str(p.dtype), p.requires_grad)
                     for name, p in named]
        signature += [("buffer", name, tuple(b.shape), str(b.dtype), False)
                      for name, b in self.module.named_buffers()]
        replies = self.comm.allgather((None if error is None else str(error), signature))
        if error is not None:
            raise error
        for other_rank, (message, _) in enumerate(replies):
            if message is not None:
                raise RemoteRankError(f"{fn}: rank {other_rank} rejected its model: {message}")
        reference = replies[0][1]
        for other_rank, (_, other) in enumerate(replies):
            if other != reference:
                differing = sorted(set(other) ^ set(reference), key=str)[:3]
                raise RemoteRankError(
                    f"{fn}: rank {other_rank}'s model differs from rank 0's in parameter or "
                    f"buffer names, shapes, dtypes or requires_grad; first differences: "
                    f"{differing}"
                )

    def broadcast_parameters(self, root=0):
        """Copy rank ``root``'s parameters and buffers into every other rank's model.

        Collective. Parameters are changed in place, so optimizers keep their references.
        """
        with torch.no_grad():
            for tensor in list(self.module.parameters()) + list(self.module.buffers()):
                array = tensor.detach().numpy()
                if tensor.is_contiguous():
                    self.comm.Bcast(array, root=root)
                else:
                    staging = np.ascontiguousarray(array)
                    self.comm.Bcast(staging, root=root)
                    tensor.copy_(torch.from_numpy(staging))

    def _exchange(self, weight, fn, weighted=True):
        """Agree on every rank's weight and on which gradients exist on at least one rank.

        One small allgather; a bad weight on any rank raises on every rank before any
        gradient moves. Returns (weights, present) with ``present`` a boolean per bucketed
        parameter.
        """
        error = _check_weight(weight, fn) if weighted else None
        local_present = np.packbits([p.grad is not None for p in self._bucketed]).tobytes()
        replies = self.comm.allgather((error, weight if error is None else None, local_present))
        if error is not None:
            raise ValueError(error)
        for rank, (message, _, _) in enumerate(replies):
            if message is not None:
                raise RemoteRankError(f"{fn}: rank {rank} rejected its arguments: {message}")
        present = np.zeros(len(self._bucketed), dtype=bool)
        for _, _, bits in replies:
            present |= np.unpackbits(np.frombuffer(bits, dtype=np.uint8),
                                     count=len(self._bucketed)).astype(bool)
        weights = [reply[1] for reply in replies]
        return weights, present

    def average_gradients(self, weight=1.0):
        """Replace every gradient with its mean over the ranks, weighted by ``weight``.

        Collective. With each rank's loss the mean over its own samples and ``weight`` the
        number of those samples, the result is the gradient of the mean loss over all
        samples of all ranks, also when ranks hold different numbers of samples. A rank
        with weight 0 contributes nothing (its gradients may be missing).

        Parameters whose gradients pyconvmpi layers already summed over the ranks are
        divided by the number of ranks. That is their mean only when all weights are equal,
        so unequal weights then raise ValueError. Use ``sum_gradients`` with the loss divided
        by the global batch size instead.

        Parameters
        ----------
        weight : float
            This rank's non-negative weight, usually its local batch size.

        Raises
        ------
        ValueError
            A negative or non-finite weight, all weights 0, or unequal weights with
            library-summed parameters.
        RemoteRankError
            Another rank's weight was invalid.
        """
        fn = "DataParallel.average_gradients"
        weights, present = self._exchange(weight, fn)
        weights = [float(w) for w in weights]
        total = sum(weights)
        if total == 0:
            raise ValueError(f"{fn}: the weights of all ranks are 0, so there is no mean")
        if self._reduced and len(set(weights)) > 1:
            raise ValueError(
                f"{fn}: pyconvmpi layers in placement 'batch' or 'rows' sum their gradients "
                f"over ranks without weights, so unequal weights {weights} cannot be averaged; "
                "divide the loss by the global batch size and call sum_gradients()"
            )
        self._reduce(present, scale=float(weight) / total, include=float(weight) > 0)
        for parameter in self._reduced:
            if parameter.grad is not None:
                parameter.grad.div_(len(weights))

    def sum_gradients(self):
        """Replace every gradient with its sum over the ranks.

        Collective. Use it when each rank's loss is already divided by the global batch
        size (the sum of the local batch sizes): the sum is then the gradient of the mean
        loss over all samples. Parameters summed by pyconvmpi layers are left as they are.
        A rank whose gradient is missing contributes zeros.
        """
        _, present = self._exchange(None, "DataParallel.sum_gradients", weighted=False)
        self._reduce(present, scale=1.0, include=True)

    def _reduce(self, present, scale, include):
        """Allreduce-sum ``scale`` x each gradient (zeros where missing or not ``include``).

        A gradient missing on every rank stays None, as in single-process training, so
        optimizers skip that parameter.
        """
        MPI = _mpi()
        index = self._index
        with torch.no_grad():
            for bucket in self._buckets:
                for parameter, view in bucket.views():
                    if include and parameter.grad is not None:
                        view.copy_(parameter.grad)
                    else:
                        view.zero_()
                if scale != 1.0:
                    bucket.buffer.mul_(scale)
                self.comm.Allreduce(MPI.IN_PLACE, bucket.buffer.numpy(), op=MPI.SUM)
                for parameter, view in bucket.views():
                    if not present[index[id(parameter)]]:
                        continue
                    if parameter.grad is None:
                        parameter.grad = view.clone()
                    else:
                        parameter.grad.copy_(view)
