"""Exception hierarchy: one class per library status, each also the matching builtin."""

__all__ = [
    "PyconvmpiError",
    "InvalidArgumentError",
    "UnsupportedError",
    "OutOfMemoryError",
    "MPIError",
    "InternalError",
    "RemoteRankError",
]


class PyconvmpiError(RuntimeError):
    """Failure reported by the C library; ``status`` and ``status_name`` identify it."""

    status = None
    status_name = None

    def __init__(self, message, status=None, status_name=None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if status_name is not None:
            self.status_name = status_name


class InvalidArgumentError(PyconvmpiError, ValueError):
    """The library rejected an argument (``PCM_ERR_INVALID_ARGUMENT``)."""

    status, status_name = 1, "PCM_ERR_INVALID_ARGUMENT"


class UnsupportedError(PyconvmpiError, NotImplementedError):
    """A valid request this build does not implement (``PCM_ERR_UNSUPPORTED``)."""

    status, status_name = 2, "PCM_ERR_UNSUPPORTED"


class OutOfMemoryError(PyconvmpiError, MemoryError):
    """A workspace could not be allocated (``PCM_ERR_OUT_OF_MEMORY``)."""

    status, status_name = 3, "PCM_ERR_OUT_OF_MEMORY"


class MPIError(PyconvmpiError):
    """An MPI call inside the library failed (``PCM_ERR_MPI``)."""

    status, status_name = 4, "PCM_ERR_MPI"


class InternalError(PyconvmpiError):
    """A broken internal invariant (``PCM_ERR_INTERNAL``); please report it."""

    status, status_name = 5, "PCM_ERR_INTERNAL"


class RemoteRankError(PyconvmpiError):
    """Another rank of the communicator failed, so this rank stopped too (``PCM_ERR_REMOTE``)."""

    status, status_name = 6, "PCM_ERR_REMOTE"


# Status number -> exception class; the single table _lib.check() uses.
STATUS_CLASSES = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        UnsupportedError,
        OutOfMemoryError,
        MPIError,
        InternalError,
        RemoteRankError,
    )
}
