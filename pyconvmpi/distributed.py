"""Collective conv2d over an mpi4py communicator: placements, strategies and row bands.

Every call follows the same steps on every rank of the communicator:

1. validate this rank's arguments (nothing is sent yet);
2. agree: one ``allgather`` of (error or None, signature of shapes and options, local extent);
   if any rank failed or the ranks disagree, every rank raises ValueError naming the rank;
3. derive the global geometry and the plan (identical on every rank);
4. one C call, which duplicates the communicator, agrees once more on its own checks and then
   moves all data and computes.

The auto heuristic (used when no tuned profile has the layer) tries these in order:

- ``batch`` when the batch has at least one item per rank;
- ``rows`` when the output has at least 8 rows per rank, so halos stay small next to bands;
- ``channels`` when there is at least one output channel per rank;
- ``rows`` when there is at least one output row per rank;
- else ``batch``, and ranks without items stay idle.
"""

import logging
import os
import threading

import numpy as np

from . import _lib
from . import _validate as V
from .plan import Plan, desc_struct, env_threads

logger = logging.getLogger(__name__)

PLACEMENTS = tuple(_lib.PLACEMENTS)
STRATEGY_NAMES = ("auto",) + tuple(_lib.STRATEGIES)
ROWS_PER_RANK_FOR_AUTO = 8


class RankArgumentError(TypeError, ValueError):
    """A TypeError on the rank that passed the bad argument; still a ValueError like on peers."""


def check_names(placement, strategy, fn):
    """Raise ValueError for an unknown placement or strategy name."""
    if placement not in PLACEMENTS:
        raise ValueError(
            f"{fn}: placement must be one of {', '.join(map(repr, PLACEMENTS))}; got {placement!r}"
        )
    if strategy not in STRATEGY_NAMES:
        raise ValueError(
            f"{fn}: strategy must be one of {', '.join(map(repr, STRATEGY_NAMES))}; got {strategy!r}"
        )


def row_bands(rows, ranks):
    """Return the list of ``(start, stop)`` row bands of ``rows`` rows over ``ranks`` ranks.

    The first ``rows % ranks`` ranks get one row more. For ``placement="rows"`` rank ``r``
    passes input rows ``row_bands(H, size)[r]`` and receives output rows
    ``row_bands(H_out, size)[r]``.

    Raises TypeError unless both are integers (bools excluded), and ValueError unless
    ``rows`` is in [0, 2**56] and ``ranks`` is positive.
    """
    fn = "row_bands"
    number = V._as_int(rows)
    if number is None:
        raise TypeError(f"{fn}: rows must be a non-negative integer; got {rows!r}")
    if not 0 <= number <= V.MAX_VALUE:
        raise ValueError(f"{fn}: rows must be in [0, {V.MAX_VALUE}]; got {rows!r}")
    count = V.positive_int(ranks, "ranks", fn)
    return [_lib.row_band(number, count, rank) for rank in range(count)]


# ----------------------------------------------------------------------------------------------
# Threads per rank


_keyval = None
_keyval_lock = threading.Lock()
_ranks_per_node_fallback = {}


def ranks_per_node(comm):
    """Return how many ranks of ``comm`` share this rank's node (collective on first use).

    The count comes from ``Split_type(COMM_TYPE_SHARED)`` and is cached on the communicator as
    an MPI attribute, so later calls cost a dictionary lookup and no communication.
    """
    global _keyval
    from mpi4py import MPI

    # Two threads creating the key at once would cache counts under different keys, and a rank
    # that then missed its cache would run Split_type alone while its peers did not.
    with _keyval_lock:
        if _keyval is None:
            _keyval = MPI.Comm.Create_keyval()
    cached = comm.Get_attr(_keyval)
    if cached is not None:
        return cached
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        count = shared.Get_size()
    finally:
        shared.Free()
    comm.Set_attr(_keyval, count)
    return count


def default_threads(comm):
    """Return OpenMP threads per rank: OMP_NUM_THREADS if set, else node cores / node ranks.

    A rank that the launcher bound to fewer cores than the node has uses its own cores.
    """
    from_env = env_threads()
    if from_env:
        return from_env
    cores = os.cpu_count() or 1
    try:
        bound = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - sched_getaffinity is Linux-only
        bound = cores
    if bound < cores:
        return max(1, bound)
    return max(1, cores // ranks_per_node(comm))


# ----------------------------------------------------------------------------------------------
# Plans


def default_grid(geo, size):
    """Return the (batch, channels) grid of the hybrid strategy: as many batch rows as the
    batch allows among the divisors of ``size``."""
    best = (1, size)
    for rows in range(1, size + 1):
        if size % rows == 0 and rows <= max(geo.n, 1) and size // rows <= max(geo.k, 1):
            best = (rows, size // rows)
    return best


def heuristic_strategy(geo, size):
    """Return the auto strategy for replicated and root placements (see the module notes)."""
    if geo.n >= size:
        return "batch"
    if geo.out_h >= ROWS_PER_RANK_FOR_AUTO * size:
        return "rows"
    if geo.k >= size:
        return "channels"
    if geo.out_h >= size:
        return "rows"
    return "batch"


def choose_plan(geo, op, dtype, comm, placement="replicated", strategy="auto"):
    """Return the Plan of a collective call: the tuned profile's, else the heuristic's.

    ``geo`` is the global geometry. The profile is consulted only for ``strategy="auto"`` and
    the replicated and root placements; ``batch`` and ``rows`` placements fix the strategy.
    """
    from . import profile

    size = comm.Get_size()
    node_ranks = ranks_per_node(comm)
    threads = default_threads(comm)
    if placement in ("batch", "rows"):
        return Plan(strategy=placement, active_ranks=size, threads=threads, source="heuristic")
    if strategy == "auto":
        tuned = profile.lookup(geo, op, dtype, size, node_ranks)
        if tuned is not None:
            try:
                check_plan(tuned, placement, size)
                return tuned
            except ValueError as exc:
                # Every rank reads the same profile, so every rank falls back together.
                logger.warning("rank %d: ignoring the tuned plan %s: %s", comm.Get_rank(),
                               tuned, exc)
        strategy = heuristic_strategy(geo, size)
    grid = default_grid(geo, size) if strategy == "hybrid" else (0, 0)
    return Plan(strategy=strategy, active_ranks=size, threads=threads, grid=grid,
                source="heuristic")


def check_plan(plan, placement, size):
    """Raise ValueError if a user's Plan cannot run on ``size`` ranks with ``placement``."""
    if placement in ("batch", "rows"):
        if plan.strategy != placement:
            raise ValueError(
                f"decompose: placement={placement!r} needs plan.strategy={placement!r}; "
                f"got {plan.strategy!r}"
            )
    elif plan.strategy == "local":
        raise ValueError(
            "decompose: plan.strategy 'local' runs without a communicator; use 'batch', "
            "'channels', 'rows' or 'hybrid' with comm"
        )
    if plan.active_ranks > size:
        raise ValueError(
            f"decompose: plan.active_ranks must be at most the communicator size {size}; "
            f"got {plan.active_ranks}"
        )
    if plan.strategy == "hybrid":
        rows, cols = plan.grid
        if rows < 1 or cols < 1:
            raise ValueError(f"decompose: a hybrid plan needs a grid of positive sizes; got {plan.grid}")
        if rows * cols > size:
            raise ValueError(
                f"decompose: a {rows}x{cols} process grid needs {rows * cols} ranks; "
                f"communicator has {size}"
            )


# ----------------------------------------------------------------------------------------------
# Agreement


def _check_comm(comm, fn):
    # Limitation: a rank whose comm is not a usable communicator raises alone, because it has no
    # way to reach its peers, and they wait for it until the job is killed.
    from mpi4py import MPI

    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"{fn}: comm must be an mpi4py intracommunicator; got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError(f"{fn}: comm must not be MPI.COMM_NULL")
    _lib.ensure_same_mpi()


def _strip(message, fn):
    prefix = f"{fn}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _rank_list(ranks):
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def agree(comm, fn, error, signature, extent):
    """Exchange every rank's (error, signature, extent); raise on every rank if any is bad.

    ``error`` is None or an exception raised by this rank's validation. Returns the list of
    every rank's ``(signature, extent)``.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    own_error = None if error is None else str(error)
    if error is not None and not isinstance(error, (TypeError, ValueError)):
        # The argument's own code failed, for example an __index__ or tensor method that raised.
        own_error = f"{fn}: {type(error).__name__} while checking the arguments: {_strip(own_error, fn)}"
    records = comm.allgather((own_error, signature, extent))

    failed = [r for r, (message, _, _) in enumerate(records) if message is not None]
    if failed:
        first = records[failed[0]][0]
        same = [r for r in failed if records[r][0] == first]
        text = f"{fn}: {_rank_list(same)} of {size}: {_strip(first, fn)}"
        others = [r for r in failed if r not in same]
        if others:
            text += f" (and other errors on {_rank_list(others)})"
        cls = RankArgumentError if isinstance(error, TypeError) else ValueError
        raise cls(text) from error

    reference = records[0][1]
    for r, (_, other, _) in enumerate(records[1:], start=1):
        for key in reference:
            if other.get(key) != reference.get(key):
                raise ValueError(
                    f"{fn}: ranks disagree on {key}: rank {r} has {other.get(key)!r} but rank 0 "
                    f"has {reference.get(key)!r}; every rank must pass the same {key}"
                )
    return [(sig, ext) for _, sig, ext in records]


def _options_signature(stride, padding, dilation, groups, fn):
    """Validate and normalise the options alone (for ranks whose arrays are not read)."""
    stride = V.int_pair(stride, "stride", fn, minimum=1)
    dilation = V.int_pair(dilation, "dilation", fn, minimum=1)
    groups = V.positive_int(groups, "groups", fn)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(
                f"{fn}: padding must be an int, a pair of ints, 'same' or 'valid'; got {padding!r}"
            )
    else:
        padding = V.int_pair(padding, "padding", fn, minimum=0)
    return {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}


def _local_geometry(x_shape, w_shape, options, placement, fn):
    """Validate this rank's shapes; ``rows`` bands may be thinner than the kernel."""
    shape = tuple(x_shape)
    if placement == "rows" and len(shape) in (3, 4):
        # Only the global height decides whether the kernel fits, so a thin band is valid here.
        shape = shape[:-2] + (10**9, shape[-1])
    geo = V.geometry(shape, tuple(w_shape), options["stride"], options["padding"],
                     options["dilation"], options["groups"], fn)
    if placement == "batch" and not geo.batched:
        raise ValueError(f"{fn}: placement='batch' needs 4-D input (N, C, H, W); got shape {tuple(x_shape)}")
    return geo


def _global_geometry(signature, extents, placement, fn):
    """Return the global Geometry every rank derives from the agreed records."""
    sig = signature
    n, c, h, w = sig["input_shape"]
    if placement == "batch":
        n = sum(ext["n"] for ext in extents)
    if placement == "rows":
        h = sum(ext["h"] for ext in extents)
    shape = (n, c, h, w) if sig["batched"] else (c, h, w)
    geo = V.geometry(shape, sig["weight_shape"], sig["stride"], sig["padding"], sig["dilation"],
                     sig["groups"], fn)
    if placement == "rows":
        bands = row_bands(h, len(extents))
        for r, ext in enumerate(extents):
            start, stop = bands[r]
            if ext["h"] != stop - start:
                # The total height comes from every rank's band, so the first rank that differs
                # may not be the wrong one. The message lists what each rank passed.
                passed = [e["h"] for e in extents]
                expected = [q - p for p, q in bands]
                raise ValueError(
                    f"{fn}: rank {r} passed {ext['h']} input rows but its band of the {h} rows "
                    f"is row_bands({h}, {len(extents)})[{r}] = {bands[r]} ({stop - start} rows); "
                    f"ranks passed {passed} rows, row_bands expects {expected}"
                )
    return geo


def _resolve_plan(plan, geo, op, dtype, comm, placement, strategy):
    # Split_type is collective, so every rank runs it on first use even where OMP_NUM_THREADS
    # makes the count unnecessary. Otherwise a rank that skipped it would leave others waiting.
    ranks_per_node(comm)
    if plan is None:
        chosen = choose_plan(geo, op, dtype, comm, placement, strategy)
    else:
        chosen = plan
    if chosen.strategy == "local":  # a profile entry for one rank
        chosen = Plan(strategy="batch", active_ranks=1, threads=chosen.threads,
                      algorithm=chosen.algorithm, block_k=chosen.block_k,
                      block_c=chosen.block_c, block_w=chosen.block_w, source=chosen.source)
    threads = chosen.threads or default_threads(comm)
    exec_ = _lib.Exec(_lib.ALGORITHMS[chosen.algorithm], threads, chosen.block_k, chosen.block_c,
                      chosen.block_w)
    logger.debug("rank %d: %s plan %s", comm.Get_rank(), op, chosen)
    return chosen, exec_


def _band_geometry(geo, placement, comm, extents):
    """Local output shape of this rank (and the local input's leading size) under a placement."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if placement == "batch":
        n = extents[rank]["n"]
        return (n, geo.k, geo.out_h, geo.out_w), (n, geo.c, geo.h, geo.w)
    if placement == "rows":
        y0, y1 = _lib.row_band(geo.out_h, size, rank)
        p, q = _lib.row_band(geo.h, size, rank)
        return (geo.n, geo.k, y1 - y0, geo.out_w), (geo.n, geo.c, q - p, geo.w)
    return geo.output_shape, geo.input_shape


def _desc(geo, placement, comm, extents):
    if placement == "batch":
        geo = geo._replace(n=extents[comm.Get_rank()]["n"])
    return desc_struct(geo)


def _dtype_code(dtype_name):
    return _lib.FLOAT32 if dtype_name == "float32" else _lib.FLOAT64


def _reads_arrays(placement, rank):
    return placement != "root" or rank == 0


def _squeeze(array, geo):
    return array if array is None or geo.batched else array[0]


def _check_call_names(placement, strategy, plan, fn):
    """Validate placement, strategy and plan before the agreement."""
    check_names(placement, strategy, fn)
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"{fn}: plan must be a pyconvmpi.Plan or None; got {type(plan).__name__}")
    if placement in ("batch", "rows") and strategy not in ("auto", placement):
        raise ValueError(
            f"{fn}: placement={placement!r} fixes the split; strategy must be 'auto' or "
            f"{placement!r}; got {strategy!r}"
        )


def _validate_plan_argument(plan, placement, comm):
    if plan is not None:
        check_plan(plan, placement, comm.Get_size())
        return plan.to_dict()
    return None


# ----------------------------------------------------------------------------------------------
# Public collective calls


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, comm,
           placement="replicated", strategy="auto", plan=None):
    """Collective forward convolution; see ``pyconvmpi.conv2d`` for the arguments."""
    fn = "conv2d"
    _check_comm(comm, fn)
    rank = comm.Get_rank()
    error, signature, extent, arrays = None, {}, {}, None
    try:
        _check_call_names(placement, strategy, plan, fn)
        signature = {"placement": placement, "strategy": strategy,
                     "plan": _validate_plan_argument(plan, placement, comm)}
        signature.update(_options_signature(stride, padding, dilation, groups, fn))
        if _reads_arrays(placement, rank):
            x = V.as_array(input, "input", fn)
            w = V.as_array(weight, "weight", fn)
            b = V.as_array(bias, "bias", fn, allow_none=True)
            V.check_same_dtype({"input": x, "weight": w, "bias": b}, fn)
            geo = _local_geometry(x.shape, w.shape, signature, placement, fn)
            V.check_bias(b, geo, fn)
            arrays = (x, w, b)
            data = {"dtype": x.dtype.name, "weight_shape": w.shape, "has_bias": b is not None,
                    "batched": geo.batched, "input_shape": _shared_shape(geo, placement)}
            if placement == "root":
                extent = data
            else:
                signature.update(data)
            extent = dict(extent, n=geo.n, h=x.shape[-2])
    except Exception as exc:  # noqa: BLE001 - any failure here must reach the agreement
        # An exception that escaped here would leave the other ranks waiting in agree().
        error = exc
    records = agree(comm, fn, error, signature, extent)

    signature = _root_signature(records, placement)
    extents = [ext for _, ext in records]
    geo = _global_geometry(signature, extents, placement, fn)
    dtype = np.dtype(signature["dtype"])
    chosen, exec_ = _resolve_plan(plan, geo, "forward", dtype, comm, placement, strategy)

    out_shape, _ = _band_geometry(geo, placement, comm, extents)
    x = w = b = output = None
    if _reads_arrays(placement, rank):
        x, w, b = arrays
        output = np.empty(out_shape, dtype=dtype)
    _lib.mpi_conv2d_forward(
        comm.py2f(), placement, chosen.strategy, chosen.grid, chosen.active_ranks,
        _dtype_code(signature["dtype"]), _desc(geo, placement, comm, extents), exec_,
        x, w, b, output, context=fn,
    )
    return _squeeze(output, geo)


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    need=frozenset(("input", "weight", "bias")), comm, placement="replicated",
                    strategy="auto", plan=None):
    """Collective backward pass; see ``pyconvmpi.conv2d_backward`` for the arguments."""
    from .conv import Conv2dGrads

    fn = "conv2d_backward"
    _check_comm(comm, fn)
    rank = comm.Get_rank()
    needed = frozenset()
    error, signature, extent, arrays = None, {}, {}, None
    try:
        needed = V.need_set(need, fn)
        _check_call_names(placement, strategy, plan, fn)
        signature = {"placement": placement, "strategy": strategy, "need": sorted(needed),
                     "plan": _validate_plan_argument(plan, placement, comm)}
        signature.update(_options_signature(stride, padding, dilation, groups, fn))
        if _reads_arrays(placement, rank):
            go = V.as_array(grad_output, "grad_output", fn)
            x = V.as_array(input, "input", fn)
            w = V.as_array(weight, "weight", fn)
            V.check_same_dtype({"grad_output": go, "input": x, "weight": w}, fn)
            geo = _local_geometry(x.shape, w.shape, signature, placement, fn)
            if placement not in ("rows",):
                from .conv import check_grad_output_shape

                check_grad_output_shape(go, geo, fn)
            arrays = (go, x, w)
            data = {"dtype": x.dtype.name, "weight_shape": w.shape, "batched": geo.batched,
                    "input_shape": _shared_shape(geo, placement)}
            if placement == "root":
                extent = data
            else:
                signature.update(data)
            extent = dict(extent, n=geo.n, h=x.shape[-2], grad_output_shape=go.shape)
    except Exception as exc:  # noqa: BLE001 - any failure here must reach the agreement
        # An exception that escaped here would leave the other ranks waiting in agree().
        error = exc
    records = agree(comm, fn, error, signature, extent)

    signature = _root_signature(records, placement)
    extents = [ext for _, ext in records]
    geo = _global_geometry(signature, extents, placement, fn)
    if placement == "rows":
        _check_grad_output_bands(geo, extents, comm.Get_size(), fn)
    dtype = np.dtype(signature["dtype"])
    chosen, exec_ = _resolve_plan(plan, geo, "backward", dtype, comm, placement, strategy)

    _, in_shape = _band_geometry(geo, placement, comm, extents)
    go = x = w = grad_input = grad_weight = grad_bias = None
    if _reads_arrays(placement, rank):
        go, x, w = arrays
    receives = _reads_arrays(placement, rank)
    if receives and "input" in needed:
        grad_input = np.empty(in_shape, dtype=dtype)
    if receives and "weight" in needed:
        grad_weight = np.empty(geo.weight_shape, dtype=dtype)
    if receives and "bias" in needed:
        grad_bias = np.empty((geo.k,), dtype=dtype)
    _lib.mpi_conv2d_backward(
        comm.py2f(), placement, chosen.strategy, chosen.grid, chosen.active_ranks,
        _dtype_code(signature["dtype"]), needed, _desc(geo, placement, comm, extents), exec_,
        go, x, w, grad_input, grad_weight, grad_bias, context=fn,
    )
    return Conv2dGrads(_squeeze(grad_input, geo), grad_weight, grad_bias)


def plan(input_shape, weight_shape, stride, padding, dilation, groups, *, dtype, op, comm,
         placement):
    """Collective ``pyconvmpi.plan``: validate on every rank and agree before choosing."""
    from .plan import check_plan_arguments

    fn = "plan"
    _check_comm(comm, fn)
    error, signature, geo, np_dtype = None, {}, None, None
    try:
        check_names(placement, "auto", fn)
        geo, np_dtype = check_plan_arguments(input_shape, weight_shape, stride, padding,
                                             dilation, groups, dtype, op, fn)
        shape = geo.input_shape if geo.batched else geo.input_shape[1:]
        signature = {"placement": placement, "op": op, "dtype": np_dtype.name,
                     "input_shape": shape, "weight_shape": geo.weight_shape,
                     "stride": geo.stride, "padding": geo.padding, "dilation": geo.dilation,
                     "groups": geo.groups}
    except Exception as exc:  # noqa: BLE001 - any failure here must reach the agreement
        error = exc
    # Without the agreement a rank with bad arguments would raise alone, and the others would
    # wait in the first call's Split_type of ranks_per_node.
    agree(comm, fn, error, signature, {})
    return choose_plan(geo, op, np_dtype, comm, placement)


def _shared_shape(geo, placement):
    """The part of the input shape that must match on every rank (rank 0's alone for root)."""
    n = None if placement == "batch" else geo.n
    h = None if placement == "rows" else geo.h
    return (n, geo.c, h, geo.w)


def _root_signature(records, placement):
    """Rank 0's signature, with rank 0's data description for root placement."""
    signature = dict(records[0][0])
    if placement == "root":
        signature.update(records[0][1])
    return signature


def _check_grad_output_bands(geo, extents, size, fn):
    bands = row_bands(geo.out_h, size)
    for r, ext in enumerate(extents):
        start, stop = bands[r]
        expected = (geo.n, geo.k, stop - start, geo.out_w)
        if not geo.batched:
            expected = expected[1:]
        if tuple(ext["grad_output_shape"]) != expected:
            raise ValueError(
                f"{fn}: rank {r} passed grad_output of shape {tuple(ext['grad_output_shape'])} "
                f"but its band of the {geo.out_h} output rows needs {expected}"
            )
