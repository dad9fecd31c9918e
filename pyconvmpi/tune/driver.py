"""Ranks working together: rank 0 drives the searches, every rank times the same calls.

Rank 0 sends each step as a command with ``bcast``; every rank, rank 0 included, runs it
through ``Session.handle``. Steps that can fail on one rank end with an ``allgather``, so
every rank learns the outcome and either records a failed trial or raises ``AgreedError``.
If rank 0 fails in its own work (the Optuna study, the profile file) it sends ``abort``
before raising, so no rank is left waiting in a collective.
"""

import logging
import sys
import time

import numpy as np

from .. import _lib, distributed, profile
from ..plan import Plan, choose, env_threads
from . import search as _search
from . import space as sp
from .measure import Workload, classify, time_call

logger = logging.getLogger(__name__)


class AgreedError(RuntimeError):
    """A failure agreed by every rank; each rank raises it with the same message."""


def _api_op(direction):
    return "forward" if direction == "forward" else "backward"


class Session:
    """State shared by the ranks: the communicator, timing settings and the current layer."""

    def __init__(self, comm, args, collective, ranks_per_node):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.args = args
        self.collective = collective
        self.ranks_per_node = ranks_per_node
        self.workload = None
        # The watchdog's limit for one call that never returns; it exceeds --trial-timeout
        # by a wide margin so that only a real hang ends the job.
        self.hard_limit = 4 * args.trial_timeout + 60

    def on_hang(self):
        """End every rank: one call ran past the hard limit and cannot be interrupted."""
        sys.stderr.write(f"pyconvmpi.tune: rank {self.rank}: a timed call ran longer than "
                         f"{self.hard_limit:.0f} s; aborting the job\n")
        sys.stderr.flush()
        self.comm.Abort(3)

    # Every rank runs the same commands in the same order.
    def run(self, command):
        """Send ``command`` from rank 0 to the other ranks and run it here too."""
        if self.size > 1:
            self.comm.bcast(command, root=0)
        return self.handle(command)

    def serve(self):
        """Run rank 0's commands until it sends ``stop`` (ranks other than 0)."""
        while True:
            command = self.comm.bcast(None, root=0)
            if command[0] == "stop":
                return
            self.handle(command)

    def handle(self, command):
        kind = command[0]
        if kind == "abort":
            raise AgreedError(command[1])
        if kind == "layer":
            _, layer, dtype, seed = command
            comm = self.comm if self.collective else None
            self.workload = self.agree(lambda: Workload(layer, dtype, comm, seed), "set up a layer")
            return None
        if kind == "default":
            return self.agree(lambda: self.default_plan(command[1]), "choose the default plan")
        if kind == "time":
            _, direction, plan_dict, repeats = command
            plan = Plan.from_dict(plan_dict)
            return time_call(self.workload.call(direction, plan), self.comm, self.args.warmup,
                             repeats or self.args.repeats, self.args.trial_timeout,
                             self.hard_limit, self.on_hang)
        if kind == "probe":
            return self.probe()
        if kind == "mode":
            self.collective = bool(command[1])
            return self.collective
        raise AgreedError(f"unknown command {kind!r}")

    def agree(self, function, what):
        """Run ``function`` on every rank; raise AgreedError on all if it failed on any."""
        try:
            value, problem = function(), None
        except Exception as exc:  # reported to every rank, then raised on each
            value, problem = None, f"rank {self.rank} could not {what}: {classify(exc)}: {exc}"
        problems = [p for p in self.comm.allgather(problem) if p is not None]
        if problems:
            raise AgreedError("; ".join(problems))
        return value

    def default_plan(self, direction):
        """Return the heuristic plan a call would use without a profile."""
        geo = self.workload.geo
        dtype = self.workload.input.dtype
        with profile.disabled():
            if self.collective:
                return distributed.choose_plan(geo, _api_op(direction), dtype, self.comm,
                                               "replicated", "auto")
            return choose(geo, _api_op(direction), dtype)

    def probe(self):
        """Return whether collective conv2d works here (every rank returns the same result)."""
        x = np.ones((2, 1, 4, 4), np.float32)
        w = np.ones((2, 1, 3, 3), np.float32)
        from ..conv import conv2d

        try:
            conv2d(x, w, comm=self.comm)
            kind = None
        except Exception as exc:  # an unbuilt API raises NotImplementedError; agreed below
            kind = classify(exc)
        kinds = self.comm.allgather(kind)
        return all(k is None for k in kinds), [k for k in kinds if k][:1]


def resolve_threads(plan, ranks_here, cores):
    """Return ``plan`` with threads=0 replaced by the count a call would really use."""
    if plan.threads:
        return plan
    threads = env_threads() or _lib.default_threads() or max(1, cores // ranks_here)
    import dataclasses

    return dataclasses.replace(plan, threads=threads)
