"""Plans: how one convolution runs (strategy, ranks, threads, algorithm, tiles) and why.

``plan()`` is the public way to see the choice a call would make; ``conv2d`` and
``conv2d_backward`` accept a Plan through ``plan=`` to force one.
"""

import dataclasses
import logging
import os

import numpy as np

from . import _lib

logger = logging.getLogger(__name__)

OPS = ("forward", "backward")
ALGORITHMS = tuple(_lib.ALGORITHMS)
STRATEGIES = ("local",) + tuple(_lib.STRATEGIES)
SOURCES = ("profile", "heuristic", "user")
MAX_SETTING = 2**31 - 1  # largest thread count, rank count or tile size a Plan accepts


@dataclasses.dataclass(frozen=True)
class Plan:
    """Execution choices for one convolution and where they came from.

    Attributes
    ----------
    strategy : str
        ``"local"`` for one process, else ``"batch"``, ``"channels"``, ``"rows"`` or ``"hybrid"``.
    active_ranks : int
        Ranks that compute; the rest of the communicator only takes part in collectives.
    threads : int
        OpenMP threads per rank; 0 means the OpenMP default.
    algorithm : str
        One of ``"auto"``, ``"direct"``, ``"gemm"``, ``"winograd"``, ``"reference"``.
    block_k, block_c, block_w : int
        Tile sizes (output channels, input channels, output columns); 0 lets the kernel choose.
    grid : tuple of int
        ``(batch, channels)`` process grid of the hybrid strategy, else ``(0, 0)``.
    source : str
        Where the choice came from: ``"profile"``, ``"heuristic"`` or ``"user"``.
    """

    strategy: str = "local"
    active_ranks: int = 1
    threads: int = 0
    algorithm: str = "auto"
    block_k: int = 0
    block_c: int = 0
    block_w: int = 0
    grid: tuple = (0, 0)
    source: str = "user"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Plan: strategy must be one of {', '.join(map(repr, STRATEGIES))}; got {self.strategy!r}"
            )
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"Plan: algorithm must be one of {', '.join(map(repr, ALGORITHMS))}; got {self.algorithm!r}"
            )
        if self.source not in SOURCES:
            raise ValueError(
                f"Plan: source must be one of {', '.join(map(repr, SOURCES))}; got {self.source!r}"
            )
        for name in ("active_ranks", "threads", "block_k", "block_c", "block_w", "grid"):
            # numpy integers become ints, so that to_dict() stays JSON-ready.
            object.__setattr__(self, name, _plain_ints(getattr(self, name)))
        for name in ("active_ranks", "threads", "block_k", "block_c", "block_w"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Plan: {name} must be a non-negative integer; got {value!r}")
            # ctypes would wrap larger values silently, and kernels add tile sizes to sizes.
            if value > MAX_SETTING:
                raise ValueError(f"Plan: {name} must be at most {MAX_SETTING}; got {value!r}")
        if (
            not isinstance(self.grid, tuple)
            or len(self.grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.grid)
        ):
            raise ValueError(f"Plan: grid must be a pair of non-negative integers; got {self.grid!r}")

    def exec_struct(self):
        """Return the ``pcm_exec`` mirror for this plan."""
        return _lib.Exec(
            _lib.ALGORITHMS[self.algorithm], self.threads, self.block_k, self.block_c, self.block_w
        )

    def to_dict(self):
        """Return the plan as a JSON-ready dictionary."""
        data = dataclasses.asdict(self)
        data["grid"] = list(self.grid)
        return data

    @classmethod
    def from_dict(cls, data, source=None):
        """Build a Plan from ``to_dict()`` output; raises ValueError on unknown or bad fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Plan: unknown fields {sorted(unknown)}; known fields are {sorted(known)}")
        values = dict(data)
        if "grid" in values:
            values["grid"] = tuple(values["grid"])
        if source is not None:
            values["source"] = source
        return cls(**values)


def _plain_ints(value):
    """Return numpy integers as ints, and a list or tuple of them as a tuple; others unchanged."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) if isinstance(v, np.integer) else v for v in value)
    return value


def env_threads():
    """Return OMP_NUM_THREADS's first value if it is a positive integer, else 0."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else 0


def local_plan(geo, op, dtype):
    """Return the heuristic plan of a call on this process alone."""
    return Plan(strategy="local", active_ranks=1, threads=0, algorithm="auto", source="heuristic")


def choose(geo, op, dtype, comm=None, placement="replicated", strategy="auto"):
    """Return the plan a call uses: the tuned profile's entry if any, else the heuristic.

    ``op`` is ``"forward"`` or ``"backward"``; ``dtype`` a numpy dtype.
    """
    from . import profile

    if comm is None:
        # A local call inside an MPI job shares the node with the job's other ranks, so its
        # profile key carries the launcher's ranks per node.
        tuned = profile.lookup(geo, op, dtype, 1, profile.launcher_ranks_per_node())
        return tuned if tuned is not None else local_plan(geo, op, dtype)
    from . import distributed

    return distributed.choose_plan(geo, op, dtype, comm, placement, strategy)


def plan(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, *,
         dtype="float32", op="forward", comm=None, placement="replicated"):
    """Return the Plan that ``conv2d`` (op="forward") or ``conv2d_backward`` would use.

    Parameters
    ----------
    input_shape, weight_shape : tuple of int
        Shapes as ``conv2d`` takes them; for ``placement="batch"`` or ``"rows"`` the global
        input shape.
    stride, padding, dilation, groups
        As for ``conv2d``.
    dtype : {"float32", "float64"}
    op : {"forward", "backward"}
    comm : mpi4py communicator, optional
        Collective when given: every rank must call it.
    placement : {"replicated", "root", "batch", "rows"}

    Returns
    -------
    Plan
        With ``source`` set to ``"profile"`` or ``"heuristic"``.

    Raises
    ------
    TypeError, ValueError
        For the same arguments ``conv2d`` rejects, an unknown dtype or op.
    """
    if comm is not None:
        from . import distributed

        return distributed.plan(input_shape, weight_shape, stride, padding, dilation, groups,
                                dtype=dtype, op=op, comm=comm, placement=placement)
    geo, np_dtype = check_plan_arguments(input_shape, weight_shape, stride, padding, dilation,
                                         groups, dtype, op, "plan")
    return choose(geo, op, np_dtype)


def check_plan_arguments(input_shape, weight_shape, stride, padding, dilation, groups, dtype, op,
                         fn):
    """Validate the arguments of ``plan()``; return the Geometry and the numpy dtype."""
    from . import _validate as V

    if op not in OPS:
        raise ValueError(f"{fn}: op must be one of {', '.join(map(repr, OPS))}; got {op!r}")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be 'float32' or 'float64'; got {dtype!r}") from None
    if np_dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be 'float32' or 'float64'; got {dtype!r}")
    input_shape = V.shape_tuple(input_shape, "input_shape", fn)
    weight_shape = V.shape_tuple(weight_shape, "weight_shape", fn)
    geo = V.geometry(input_shape, weight_shape, stride, padding, dilation, groups, fn)
    return geo, np_dtype


def desc_struct(geo):
    """Return the ``pcm_conv_desc`` mirror of a validated Geometry."""
    top, bottom, left, right = geo.padding
    return _lib.ConvDesc(
        geo.n, geo.c, geo.h, geo.w, geo.k, geo.r, geo.s, geo.out_h, geo.out_w,
        geo.stride[0], geo.stride[1], top, left, bottom, right,
        geo.dilation[0], geo.dilation[1], geo.groups,
    )
