"""Timing one configuration on every rank together, and classifying failures.

Every rank runs the same calls: a barrier, the timed call, then an ``allgather`` of the
elapsed time and the failure kind, so all ranks agree after each call on whether to go on.
A call counts as its maximum over ranks; a measurement is the median of the repeats after
the warm-up calls.
"""

import statistics
import threading
import time
from typing import NamedTuple, Optional

import numpy as np

from .. import errors
from ..conv import conv2d, conv2d_backward
from .._validate import geometry

TIMEOUT = "timeout"


class Measurement(NamedTuple):
    """Median seconds over repeats (max over ranks), or None with the failure kind."""

    seconds: Optional[float]
    failure: Optional[str] = None


def classify(exc):
    """Return the failure kind of an exception: its pyconvmpi status name, else its class name.

    Never looks at the message text, which may change between versions.
    """
    if isinstance(exc, errors.PyconvmpiError) and exc.status_name:
        return exc.status_name
    return type(exc).__name__


def agreed_failure(kinds):
    """Return the failure kind to record among the ranks' kinds (None entries succeeded).

    A rank that stopped only because another failed reports PCM_ERR_REMOTE; the cause is the
    other rank's kind, so that one is preferred.
    """
    found = [kind for kind in kinds if kind is not None]
    causes = [kind for kind in found if kind != errors.RemoteRankError.status_name]
    return (causes or found or [None])[0]


class Workload:
    """Seeded arrays of one layer and the calls each direction times.

    ``comm`` is passed to conv2d for collective trials and is None for local ones. Every rank
    builds the same arrays (the replicated placement).
    """

    # Limitation: trials use the replicated placement only. Profile keys carry no placement,
    # so a root-placement call with strategy="auto" uses the plan tuned for replicated data.

    def __init__(self, layer, dtype, comm=None, seed=0):
        self.layer, self.comm = layer, comm
        self.geo = geometry(layer.input_shape, layer.weight_shape, fn="tune", **layer.options())
        rng = np.random.default_rng(seed)
        self.input = rng.standard_normal(layer.input_shape).astype(dtype)
        self.weight = rng.standard_normal(layer.weight_shape).astype(dtype)
        self.bias = rng.standard_normal(layer.k).astype(dtype)
        self.grad_output = rng.standard_normal(self.geo.output_shape).astype(dtype)
        self.options = layer.options()

    def call(self, direction, plan):
        """Return a function of no arguments that runs ``direction`` with ``plan``."""
        common = dict(self.options, comm=self.comm, plan=plan)
        if direction == "forward":
            return lambda: conv2d(self.input, self.weight, self.bias, **common)
        need = {"backward_data": ("input",), "backward_weight": ("weight", "bias"),
                "backward": ("input", "weight", "bias")}[direction]
        return lambda: conv2d_backward(self.grad_output, self.input, self.weight, need=need,
                                       **common)


def time_call(function, comm, warmup, repeats, trial_timeout, hard_limit=None, on_hang=None):
    """Time ``function`` on every rank of ``comm`` together; return a Measurement.

    Parameters
    ----------
    function : callable
        The call to time; an exception it raises becomes the measurement's failure kind.
    comm : mpi4py communicator or None
        The ranks timing together (None: this process alone).
    warmup, repeats : int
        Untimed calls first, then timed ones whose median is returned.
    trial_timeout : float
        Seconds; a call slower than this on any rank ends the measurement as ``"timeout"``.
    hard_limit : float, optional
        Seconds after which ``on_hang()`` is called from a watchdog thread because the call
        has not returned (a call cannot be interrupted, so the caller decides what to do).
    """
    times = []
    for index in range(warmup + repeats):
        if comm is not None:
            comm.Barrier()
        watchdog = None
        if hard_limit is not None and on_hang is not None:
            watchdog = threading.Timer(hard_limit, on_hang)
            watchdog.daemon = True
            watchdog.start()
        kind = None
        start = time.perf_counter()
        try:
            function()
        except Exception as exc:  # any failure is a result of the trial, agreed below
            kind = classify(exc)
        elapsed = time.perf_counter() - start
        if watchdog is not None:
            watchdog.cancel()
        results = comm.allgather((elapsed, kind)) if comm is not None else [(elapsed, kind)]
        failure = agreed_failure([k for _, k in results])
        if failure is not None:
            return Measurement(None, failure)
        slowest = max(e for e, _ in results)
        if slowest > trial_timeout:
            return Measurement(None, TIMEOUT)
        if index >= warmup:
            times.append(slowest)
    return Measurement(statistics.median(times))
