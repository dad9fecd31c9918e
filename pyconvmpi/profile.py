"""Tuned-profile cache: plans found by ``python -m pyconvmpi.tune``, looked up per layer.

The profile is one JSON file, at ``$PYCONVMPI_PROFILE`` or ``profile.json`` in the user cache
directory (``$XDG_CACHE_HOME/pyconvmpi`` or ``~/.cache/pyconvmpi``)::

    {"schema": "pyconvmpi-profile", "schema_version": 1,
     "entries": {"<canonical JSON of the key>": {"key": {...}, "plan": {...},
                 "time_s": ..., "default_time_s": ..., "default_plan": {...}, ...}}}

An entry's key contains the direction, the full layer geometry and options, the dtype, the
communicator size, the ranks per node, the hardware fingerprint (CPU model, SIMD level, cores)
and the library version and ABI. ``lookup`` loads the file once, keeps the entries that are
valid on this machine in a dictionary, and reloads only when the file's modification time or
size changes. A file that cannot be used, or entries that no longer validate, cost one logged
warning per load and fall back to the heuristic plan.

Writers (the tuner's rank 0) hold an exclusive ``fcntl.flock`` on ``<profile>.lock``, merge
their entries with whatever the file holds at that moment, and replace the file atomically
with a temporary file in the same directory and ``os.replace``.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from . import _lib
from ._version import __version__

logger = logging.getLogger(__name__)

CHECK_INTERVAL = 0.5  # seconds between checks of the profile file by lookup()
SCHEMA = "pyconvmpi-profile"
SCHEMA_VERSION = 1
ENV_VAR = "PYCONVMPI_PROFILE"

# "backward" is the plan conv2d_backward uses for all gradients; the other two are tuned apart.
DIRECTIONS = ("forward", "backward_data", "backward_weight", "backward")
# Directions the library's algorithm_supported() must accept for an entry to stay valid.
_SUPPORT_OPS = {
    "forward": ("forward",),
    "backward_data": ("backward_data",),
    "backward_weight": ("backward_weight",),
    "backward": ("backward_data", "backward_weight"),
}
_TILE_LIMITS = (("block_k", "output channels per group"), ("block_c", "input channels per group"),
                ("block_w", "output columns"))


_paths = {}


def default_path():
    """Return the profile path: ``$PYCONVMPI_PROFILE``, else the user cache directory's."""
    environ = os.environ
    settings = (environ.get(ENV_VAR), environ.get("XDG_CACHE_HOME"), environ.get("HOME"))
    path = _paths.get(settings)
    if path is None:
        if settings[0]:
            path = Path(settings[0])
        else:
            cache = settings[1] or os.path.join(os.path.expanduser("~"), ".cache")
            path = Path(cache) / "pyconvmpi" / "profile.json"
        _paths[settings] = path
    return path


_fingerprint = None


def hardware_fingerprint():
    """Return ``{"cpu", "simd", "cores"}`` of this machine (computed once per process)."""
    global _fingerprint
    if _fingerprint is None:
        model = "unknown"
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if line.lower().startswith(("model name", "cpu model", "processor\t: ")):
                        value = line.split(":", 1)[1].strip()
                        if value and not value.isdigit():
                            model = value
                            break
        except OSError:
            pass
        _fingerprint = {"cpu": model, "simd": _lib.simd_level(), "cores": os.cpu_count() or 1}
    return dict(_fingerprint)


def launcher_ranks_per_node():
    """Return how many processes of this MPI job share the node, from the launcher's environment.

    MPICH's hydra sets ``MPI_LOCALNRANKS`` and Open MPI ``OMPI_COMM_WORLD_LOCAL_SIZE``; without
    them (no launcher, or another one) it returns 1. Reading the environment keeps local calls
    free of MPI collectives.
    """
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


_dtype_names = {}


def dtype_name(dtype):
    """Return ``"float32"`` or ``"float64"`` for a numpy dtype or its name."""
    # numpy builds dtype.name anew on every access (microseconds), so names are cached.
    name = _dtype_names.get(dtype)
    if name is None:
        import numpy as np

        name = _dtype_names[dtype] = np.dtype(dtype).name
    return name


def layer_key(geo, direction, dtype, comm_size, ranks_per_node):
    """Return the machine-independent part of a key as a hashable tuple."""
    return (
        direction, geo.n, geo.c, geo.h, geo.w, geo.k, geo.r, geo.s,
        tuple(geo.stride), tuple(geo.padding), tuple(geo.dilation), geo.groups,
        dtype_name(dtype), int(comm_size), int(ranks_per_node),
    )


def key_dict(geo, direction, dtype, comm_size, ranks_per_node):
    """Return the full JSON key of an entry (layer, dtype, communicator, machine, library)."""
    if direction not in DIRECTIONS:
        raise ValueError(
            f"profile: direction must be one of {', '.join(map(repr, DIRECTIONS))}; got {direction!r}"
        )
    return {
        "direction": direction,
        "input": [geo.n, geo.c, geo.h, geo.w],
        "weight": [geo.k, geo.c // geo.groups, geo.r, geo.s],
        "stride": list(geo.stride),
        "padding": list(geo.padding),
        "dilation": list(geo.dilation),
        "groups": geo.groups,
        "dtype": dtype_name(dtype),
        "comm_size": int(comm_size),
        "ranks_per_node": int(ranks_per_node),
        "hardware": hardware_fingerprint(),
        "version": __version__,
        "abi": _lib.ABI_VERSION,
    }


def key_string(key):
    """Return the canonical JSON text of a key dictionary, used as the entry's name."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _tuple_from_key(key):
    n, c, h, w = key["input"]
    k, _, r, s = key["weight"]
    return (
        key["direction"], n, c, h, w, k, r, s, tuple(key["stride"]), tuple(key["padding"]),
        tuple(key["dilation"]), key["groups"], key["dtype"], key["comm_size"],
        key["ranks_per_node"],
    )


def _desc_from_key(key):
    n, c, h, w = key["input"]
    k, _, r, s = key["weight"]
    stride_h, stride_w = key["stride"]
    top, bottom, left, right = key["padding"]
    dil_h, dil_w = key["dilation"]
    out_h = (h + top + bottom - dil_h * (r - 1) - 1) // stride_h + 1
    out_w = (w + left + right - dil_w * (s - 1) - 1) // stride_w + 1
    desc = _lib.ConvDesc(n, c, h, w, k, r, s, out_h, out_w, stride_h, stride_w, top, left,
                         bottom, right, dil_h, dil_w, key["groups"])
    return desc, out_w


def entry_problem(entry):
    """Return why an entry cannot be used on this machine and library, or None if it can.

    Checks the key's fingerprint, version and ABI, the plan's fields, tiles against the layer,
    ranks and grid against the communicator, threads against the cores, and the algorithm
    against what the library supports for the layer.
    """
    from .plan import Plan

    try:
        key = entry["key"]
        if key["hardware"] != hardware_fingerprint():
            return "recorded on other hardware"
        if key["version"] != __version__ or key["abi"] != _lib.ABI_VERSION:
            return "recorded with another library version"
        plan = Plan.from_dict(entry["plan"], source="profile")
        desc, out_w = _desc_from_key(key)
        groups = key["groups"]
        limits = {"block_k": desc.k // groups, "block_c": desc.c // groups, "block_w": out_w}
        for name, what in _TILE_LIMITS:
            if getattr(plan, name) > limits[name]:
                return f"{name}={getattr(plan, name)} exceeds the layer's {limits[name]} {what}"
        comm_size, per_node = key["comm_size"], key["ranks_per_node"]
        if plan.active_ranks > comm_size:
            return f"active_ranks={plan.active_ranks} exceeds the communicator size {comm_size}"
        if plan.strategy == "hybrid" and plan.grid[0] * plan.grid[1] > plan.active_ranks:
            return f"grid {plan.grid} needs more than the {plan.active_ranks} active ranks"
        if plan.strategy == "local" and comm_size != 1:
            return "a local plan for a communicator of several ranks"
        cores = hardware_fingerprint()["cores"]
        if plan.threads * min(plan.active_ranks, per_node) > cores:
            return f"threads={plan.threads} oversubscribes the {cores} cores"
        for op in _SUPPORT_OPS[key["direction"]]:
            if not _lib.algorithm_supported(plan.algorithm, op, desc):
                return f"algorithm {plan.algorithm!r} no longer supports this layer"
        _tuple_from_key(key)
    except (KeyError, TypeError, ValueError, IndexError, ArithmeticError) as exc:
        # ArithmeticError: a stride or groups of zero divides by zero in the size formulas.
        return f"malformed entry ({type(exc).__name__}: {exc})"
    return None


def read_file(path):
    """Read a profile file and return ``(entries, problem)``.

    ``entries`` maps key strings to entries and is empty if the file is missing or unusable.
    ``problem`` is None, or a short text that says why the whole file was ignored.
    """
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"cannot be read ({exc.strerror})"
    try:
        # json.loads decodes bytes itself; bytes that are not UTF-8 raise UnicodeDecodeError,
        # a ValueError, so a binary file is reported like any other corrupt file.
        data = json.loads(text)
    except ValueError:
        return {}, "is not valid JSON (corrupt or truncated)"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return {}, f"is not a pyconvmpi profile (schema {SCHEMA!r} expected)"
    if data.get("schema_version") != SCHEMA_VERSION:
        return {}, (f"has schema version {data.get('schema_version')!r}; "
                    f"this pyconvmpi reads version {SCHEMA_VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}, "has no 'entries' object"
    return entries, None


class _Cache:
    """The loaded profile: valid entries by layer tuple, and the file state they came from."""

    def __init__(self):
        self.path = None
        self.state = None
        self.index = {}
        self.checked = None  # time.monotonic() of the last check of path and file


_cache = _Cache()
_disabled = 0


@contextlib.contextmanager
def disabled():
    """Make ``lookup`` return None inside the block (the tuner times the heuristic this way)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _load(path, state):
    entries, problem = read_file(path)
    index, skipped = {}, {}
    if problem is None:
        for name, entry in entries.items():
            reason = entry_problem(entry) if isinstance(entry, dict) else "not an object"
            if reason is None:
                from .plan import Plan

                index[_tuple_from_key(entry["key"])] = Plan.from_dict(entry["plan"], source="profile")
            else:
                skipped[reason] = skipped.get(reason, 0) + 1
    if problem is not None:
        logger.warning("profile %s %s; using heuristic plans (run python -m pyconvmpi.tune "
                       "to rewrite it)", path, problem)
    elif skipped:
        reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        logger.warning("profile %s: skipped %d of %d entries that do not validate here (%s); "
                       "those layers use heuristic plans", path, sum(skipped.values()),
                       len(entries), reasons)
    _cache.path, _cache.state, _cache.index = path, state, index


def reload():
    """Make the next ``lookup`` check the profile path and file again, without waiting."""
    _cache.checked = None


def _refresh(now):
    path = default_path()
    try:
        info = os.stat(path)
        state = (info.st_mtime_ns, info.st_size, info.st_ino)
    except OSError:
        state = None
    if path != _cache.path or state != _cache.state:
        if state is None:
            _cache.path, _cache.state, _cache.index = path, None, {}
        else:
            _load(path, state)
    _cache.checked = now


def lookup(geo, op, dtype, comm_size=1, ranks_per_node=1):
    """Return the tuned Plan for this layer and communicator size, or None.

    Parameters
    ----------
    geo : Geometry
        A validated geometry (``pyconvmpi._validate.geometry``).
    op : {"forward", "backward", "backward_data", "backward_weight"}
    dtype : numpy dtype or name
    comm_size, ranks_per_node : int
        Ranks of the communicator the call runs on, and how many of them share a node.

    Returns
    -------
    Plan or None
        The profile's plan with ``source="profile"``, or None when the profile has no valid
        entry for this key. The file is read on the first call. Later calls check the path
        and the file's modification time at most every ``CHECK_INTERVAL`` seconds (a stat
        costs several microseconds on some machines) and reload the file when it changed.
    """
    if _disabled:
        return None
    now = time.monotonic()
    if _cache.checked is None or now - _cache.checked > CHECK_INTERVAL:
        _refresh(now)
    if not _cache.index:
        return None
    return _cache.index.get(layer_key(geo, op, dtype, comm_size, ranks_per_node))


@contextlib.contextmanager
def _locked(path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write_atomic(path, entries):
    path = Path(path)
    data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "entries": entries}
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def make_entry(key, plan, time_s, default_plan, default_time_s, **extra):
    """Return a profile entry; ``extra`` adds fields such as the layer name or trial count."""
    entry = {
        "key": key,
        "plan": {name: value for name, value in plan.to_dict().items() if name != "source"},
        "time_s": float(time_s),
        "default_plan": {n: v for n, v in default_plan.to_dict().items() if n != "source"},
        "default_time_s": float(default_time_s),
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    entry.update(extra)
    return entry


def update(entries, path=None):
    """Merge ``entries`` (a list from ``make_entry``) into the profile file and return its path.

    The file lock is held from reading the current file to replacing it, so entries that other
    jobs wrote in the meantime are kept. An unreadable file is replaced, with a warning.
    """
    path = Path(path) if path is not None else default_path()
    with _locked(path):
        current, problem = read_file(path)
        if problem is not None:
            logger.warning("profile %s %s; replacing it", path, problem)
        merged = dict(current)
        for entry in entries:
            merged[key_string(entry["key"])] = entry
        _write_atomic(path, merged)
    reload()
    return path


def clear(path=None):
    """Delete the profile file (under the lock); return whether there was one."""
    path = Path(path) if path is not None else default_path()
    with _locked(path):
        try:
            path.unlink()
        except FileNotFoundError:
            return False
    reload()
    return True
