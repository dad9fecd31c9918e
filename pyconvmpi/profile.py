"""Tuned-profile cache: plans found by ``python -m pyconvmpi.tune``, looked up per layer."""

import logging

logger = logging.getLogger(__name__)


def lookup(geo, op, dtype, comm_size=1, ranks_per_node=1):
    """Return the tuned Plan for this layer and communicator size, or None."""
    return None
