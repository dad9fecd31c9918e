"""Collective conv2d over an mpi4py communicator: placements, strategies and row bands."""

import logging

from . import _lib

logger = logging.getLogger(__name__)

PLACEMENTS = tuple(_lib.PLACEMENTS)
STRATEGY_NAMES = ("auto",) + tuple(_lib.STRATEGIES)


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
    """Return the list of ``(start, stop)`` row bands of ``rows`` rows over ``ranks`` ranks."""
    return [_lib.row_band(rows, ranks, rank) for rank in range(ranks)]


def choose_plan(geo, op, dtype, comm, placement, strategy):
    raise NotImplementedError("distributed plans are not built yet")


def conv2d(*args, **kwargs):
    raise NotImplementedError("distributed conv2d is not built yet")


def conv2d_backward(*args, **kwargs):
    raise NotImplementedError("distributed conv2d_backward is not built yet")
