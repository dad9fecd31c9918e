"""pyconvmpi: exact 2-D convolution forward and backward on CPUs, local or split over MPI."""

import logging

from ._version import __version__
from . import _lib  # noqa: F401  (loads the C library and checks its ABI)
from . import distributed  # noqa: F401  (pyconvmpi.distributed.row_bands is public)
from .conv import Conv2dGrads, conv2d, conv2d_backward
from .errors import (
    InvalidArgumentError,
    MPIError,
    PyconvmpiError,
    RemoteRankError,
    UnsupportedError,
)
from .plan import Plan, plan

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "conv2d",
    "conv2d_backward",
    "Conv2dGrads",
    "Plan",
    "plan",
    "PyconvmpiError",
    "InvalidArgumentError",
    "UnsupportedError",
    "MPIError",
    "RemoteRankError",
]
