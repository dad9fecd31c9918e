"""Command line of ``python -m pyconvmpi.tune``: arguments, the run on every rank, tables."""

import argparse
import faulthandler
import logging
import sys
import time

from .. import layers as _layers
from .. import profile
from . import search as _search
from . import space as sp
from .driver import AgreedError, Session, resolve_threads

logger = logging.getLogger("pyconvmpi.tune")

DIRECTIONS_OF_OP = {
    "forward": ("forward",),
    "backward": ("backward_data", "backward_weight"),
    "backward_data": ("backward_data",),
    "backward_weight": ("backward_weight",),
}

DESCRIPTION = """\
Find the fastest plan for each layer shape on this machine and this number of ranks, and store
it in the profile that conv2d and conv2d_backward use with strategy="auto".

Run it as `mpiexec -n RANKS python -m pyconvmpi.tune [LAYERS ...]`. Rank 0 owns one Optuna
study per layer, dtype and direction (forward, backward data, backward weights); every rank
times each proposed plan together (warm-up calls, then the median of repeats, each call
counted as its maximum over ranks). The heuristic default plan is the first trial, and the
best few plans are re-timed with the default before the fastest is written. For the
backward op, the two backward winners are also timed on the full backward pass, which
gives the plan conv2d_backward uses.

Threads: each trial runs with its plan's threads per rank (the library's num_threads
clause), whatever the value of OMP_NUM_THREADS. OMP_NUM_THREADS only affects the default plan,
which uses the OpenMP default.
"""


def _epilog():
    sets = ", ".join(_layers.LAYER_SETS)
    return (
        f"layers: names of layer sets ({sets}) or shapes as {_layers.SHAPE_FORMAT},\n"
        "  for example 8x64x56x56:64x3x3:p1 (padding 1) or 1x32x112x112:32x3x3:p1:g32.\n\n"
        "search parameters (pin one with --fix NAME=VALUE):\n" + sp.describe() + "\n\n"
        f"profile: ${profile.ENV_VAR}, else $XDG_CACHE_HOME/pyconvmpi/profile.json "
        "(~/.cache/pyconvmpi/profile.json)."
    )


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {text!r}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}")
    return value


def _choice_list(allowed):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return tuple(dict.fromkeys(values))
    return parse


def build_parser():
    """Return the argument parser (its help is generated from the search-space table)."""
    parser = argparse.ArgumentParser(
        prog="python -m pyconvmpi.tune", description=DESCRIPTION, epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layers", nargs="*", default=["resnet18"], metavar="LAYERS",
                        help="layer set names or shapes (default: resnet18)")
    parser.add_argument("--dtype", type=_choice_list(("float32", "float64")),
                        default=("float32",), help="float32, float64 or both, comma-separated "
                        "(default: float32)")
    parser.add_argument("--ops", type=_choice_list(tuple(DIRECTIONS_OF_OP)),
                        default=("forward", "backward"),
                        help="comma-separated ops: forward, backward (both backward directions "
                        "and their combined plan), backward_data, backward_weight "
                        "(default: forward,backward)")
    parser.add_argument("--trials", type=_positive_int, default=10,
                        help="distinct plans measured per layer, dtype and direction, "
                        "the default plan included (default: 10)")
    parser.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                        help="wall-clock limit of the whole run in seconds; layers not reached "
                        "are skipped and what was tuned is kept (default: none)")
    parser.add_argument("--trial-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                        help="seconds one call may take before its trial is recorded as failed "
                        "(default: 30)")

    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the samplers and the test arrays (default: 0)")
    parser.add_argument("--warmup", type=_non_negative_int, default=1,
                        help="untimed calls before each measurement (default: 1)")
    parser.add_argument("--repeats", type=_positive_int, default=3,
                        help="timed calls per measurement; their median counts (default: 3)")
    parser.add_argument("--retime", type=_non_negative_int, default=2,
                        help="best plans re-timed with the default before choosing (default: 2)")

    parser.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                        help="pin a search parameter to one value (repeatable)")
    parser.add_argument("--allow-winograd", action="store_true",
                        help="also search the Winograd algorithm: faster on some 3x3 layers, "
                        "but with several times the rounding error of the others, and infinite "
                        "inputs give NaN (default: left out)")
    parser.add_argument("--mode", choices=("auto", "collective", "local"), default="auto",
                        help="collective: one call over all ranks, searching ranks and "
                        "strategies; local: every rank runs its own local call, as in data-"
                        "parallel training; auto: collective when there are several ranks and "
                        "distributed conv2d is available (default: auto)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="measure every plan of the search space instead of sampling")

    parser.add_argument("--start-timeout", type=_positive_float, default=120.0,
                        metavar="SECONDS", help="seconds to wait for every rank to start; if a "
                        "rank fails before joining, the others print their stack and exit after "
                        "this (default: 120)")
    parser.add_argument("--profile", default=None, metavar="PATH",
                        help="profile file to write, show or clear (default: see below)")
    parser.add_argument("--storage", default=None, metavar="PATH",
                        help="Optuna journal file; rerunning the same command resumes the "
                        "studies it holds (default: in memory, no resume)")

    parser.add_argument("--show", action="store_true",
                        help="print the profile as a table and exit")
    parser.add_argument("--clear", action="store_true", help="delete the profile and exit")
    return parser


def resolve_layers(names):
    """Return the Layer list of set names and shape texts; raises ValueError."""
    found = []
    for name in names:
        if name in _layers.LAYER_SETS:
            found.extend(_layers.layer_set(name))
        elif ":" in name:
            found.append(_layers.parse_shape(name))
        else:
            raise ValueError(f"layer must be a set name ({', '.join(_layers.LAYER_SETS)}) or a "
                             f"shape as {_layers.SHAPE_FORMAT}; got {name!r}")
    return found


def format_table(headers, rows):
    """Return a plain-text table with aligned columns."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _speedup(tuned, default):
    return "-" if not tuned or not default else f"{default / tuned:.2f}x"


def shape_text(key):
    """Return a profile key's layer in the command line's shape format."""
    n, c, h, w = key["input"]
    k, _, r, s = key["weight"]
    text = f"{n}x{c}x{h}x{w}:{k}x{r}x{s}"
    stride, padding, dilation = key["stride"], key["padding"], key["dilation"]
    if stride != [1, 1]:
        text += f":s{stride[0]}" if stride[0] == stride[1] else f":s{stride}"
    if any(padding):
        top, bottom, left, right = padding
        text += f":p{top}" if len(set(padding)) == 1 else f":p{top},{bottom},{left},{right}"
    if dilation != [1, 1]:
        text += f":d{dilation[0]}" if dilation[0] == dilation[1] else f":d{dilation}"
    if key["groups"] != 1:
        text += f":g{key['groups']}"
    return text


def show(path):
    """Return the profile at ``path`` as a table (with entries unusable here marked)."""
    from ..plan import Plan

    entries, problem = profile.read_file(path)
    if problem is not None:
        return f"profile {path} {problem}\n"
    if not entries:
        return f"profile {path} has no entries\n"
    rows = []
    for entry in sorted(entries.values(), key=lambda e: (e["key"]["dtype"], shape_text(e["key"]),
                                                          e["key"]["direction"])):
        key = entry["key"]
        reason = profile.entry_problem(entry)
        try:
            chosen = sp.label(Plan.from_dict(entry["plan"]))
        except (TypeError, ValueError):
            chosen = "invalid plan"
        rows.append([entry.get("layer", ""), shape_text(key), key["direction"], key["dtype"],
                     f"{key['comm_size']}/{key['ranks_per_node']}", chosen,
                     _ms(entry.get("time_s")), _ms(entry.get("default_time_s")),
                     _speedup(entry.get("time_s"), entry.get("default_time_s")),
                     reason or "ok"])
    headers = ["layer", "shape", "direction", "dtype", "ranks/node", "plan", "tuned ms",
               "default ms", "speedup", "status"]
    return f"profile {path}\n" + format_table(headers, rows)


def _setup_logging(rank):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"pyconvmpi.tune[{rank}]: %(levelname)s: %(message)s"))
    package = logging.getLogger("pyconvmpi")
    package.addHandler(handler)
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class Progress:
    """Progress output of rank 0: a line updated per trial on a terminal, one per search."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.live = stream.isatty()
        self.prefix = ""

    def trial(self, measured, budget, best):
        if self.live:
            self.stream.write(f"\r{self.prefix}: trial {measured}/{budget}, best {_ms(best)} ms ")
            self.stream.flush()

    def done(self, text):
        self.stream.write(("\r" if self.live else "") + f"{self.prefix}: {text}\n")
        self.stream.flush()


def main(argv=None):
    """Run the tuner on every rank; return the exit status (0 on success)."""
    started = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        layers = resolve_layers(args.layers)
        fixed = sp.parse_fixed(args.fix)
    except ValueError as exc:
        parser.error(str(exc))
    path = args.profile or profile.default_path()

    # MPICH's MPI_Init waits for every rank, so a rank that dies before initialising MPI
    # would leave this one in the import below forever. MPI_Init holds the GIL, so the
    # watchdog is faulthandler's C thread: it prints the stack ("Timeout ...") and exits.
    faulthandler.dump_traceback_later(args.start_timeout, exit=True)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    _setup_logging(rank)
    faulthandler.cancel_dump_traceback_later()
    _wait_for_ranks(comm, args.start_timeout)
    if args.show or args.clear:
        if rank == 0:
            if args.clear:
                removed = profile.clear(path)
                sys.stdout.write(f"{'removed' if removed else 'no profile at'} {path}\n")
            if args.show:
                sys.stdout.write(show(path))
                if profile.read_file(path)[1] is not None:
                    return 1  # the file exists but cannot be used
        return 0

    try:
        session = Session(comm, args, collective=False,
                          ranks_per_node=comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size())
        if rank == 0:
            _drive(session, layers, fixed, path, started)
        else:
            session.serve()
        return 0
    except AgreedError as exc:
        if rank == 0:
            sys.stderr.write(f"pyconvmpi.tune: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"pyconvmpi.tune: rank {rank}: interrupted\n")
        if comm.Get_size() > 1:
            comm.Abort(130)
        return 130
    except Exception as exc:  # not agreed between ranks: the last resort is MPI_Abort
        logger.exception("rank %d failed", rank)
        if comm.Get_size() > 1:
            sys.stderr.write(f"pyconvmpi.tune: rank {rank} failed ({type(exc).__name__}: {exc}); "
                             "aborting every rank\n")
            sys.stderr.flush()
            comm.Abort(1)
        return 1


def _wait_for_ranks(comm, timeout):
    """Return once every rank has started, or abort the job after ``timeout`` seconds.

    A rank that fails before it initialises MPI (the package cannot load there, say) is
    invisible to the others, which would wait in their first collective forever. A
    non-blocking barrier polled against a deadline turns that into a clear error.
    """
    if comm.Get_size() == 1:
        return
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            sys.stderr.write(f"pyconvmpi.tune: rank {comm.Get_rank()}: not every rank started "
                             f"within {timeout:.0f} s (--start-timeout); a rank probably failed "
                             "before joining, see its output above; aborting every rank\n")
            sys.stderr.flush()
            comm.Abort(1)
        time.sleep(0.01)


def _drive(session, layers, fixed, path, started):
    """Rank 0's side: choose the mode, run every search, write the profile, print tables."""
    try:
        summary = _tune(session, layers, fixed, path, started)
    except AgreedError:
        raise
    except BaseException as exc:
        if session.size > 1:
            message = f"rank 0 failed: {type(exc).__name__}: {exc}"
            session.comm.bcast(("abort", message), root=0)
            logger.error("%s", message)
            raise AgreedError(message) from exc
        raise
    if session.size > 1:
        session.comm.bcast(("stop",), root=0)
    sys.stdout.write("\n" + summary)


def _choose_mode(session):
    args = session.args
    if args.mode == "local" or session.size == 1:
        return False
    works, kinds = session.run(("probe",))
    if works:
        return True
    if args.mode == "collective":
        session.run(("abort", f"--mode collective: distributed conv2d failed ({kinds[0]})"))
    logger.warning("distributed conv2d is not available (%s); tuning local calls on each of "
                   "the %d ranks instead", kinds[0], session.size)
    return False


def _tune(session, layers, fixed, path, started):
    args = session.args
    collective = _choose_mode(session)
    session.run(("mode", collective))
    storage = _search.open_storage(args.storage)
    deadline = started + args.timeout if args.timeout else None
    directions = tuple(dict.fromkeys(d for op in args.ops for d in DIRECTIONS_OF_OP[op]))
    comm_size = session.size if collective else 1
    per_node = session.ranks_per_node
    cores = profile.hardware_fingerprint()["cores"]
    progress = Progress()
    rows, written = [], 0
    sys.stdout.write(
        f"tuning {len(layers)} layers x {len(args.dtype)} dtypes x {len(directions)} directions "
        f"on {session.size} ranks ({'collective' if collective else 'local'} calls, "
        f"{per_node} ranks per node, {cores} cores); profile {path}\n")

    for dtype in args.dtype:
        for index, layer in enumerate(layers):
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("--timeout reached; skipping %s %s", layer.name, dtype)
                continue
            session.run(("layer", layer, dtype, args.seed + index))
            geo = session.workload.geo
            entries, winners = [], {}
            for direction in directions:
                default = session.run(("default", direction))
                ctx = sp.Context(geo, direction, comm_size, per_node, cores, collective, fixed,
                                 allow_winograd=args.allow_winograd)
                space = sp.Space(ctx)
                key = profile.key_dict(geo, direction, dtype, comm_size, per_node)
                name = profile.key_string(key) + f"|seed={args.seed}"
                name += "|winograd" if args.allow_winograd else ""
                study = _search.make_study(storage, name + ("|grid" if args.exhaustive else ""),
                                           args.seed)
                ranks_here = min(default.active_ranks, per_node) if collective else per_node
                progress.prefix = f"{layer.name} {direction} {dtype}"

                def evaluate(plan, repeats, direction=direction):
                    return session.run(("time", direction, plan.to_dict(), repeats))

                result = _search.search(
                    space, evaluate, study, args.trials, default,
                    start_plan=resolve_threads(default, ranks_here, cores), deadline=deadline,
                    retime=args.retime, exhaustive=args.exhaustive, progress=progress.trial)
                failed = sum(result.failures.values())
                progress.done(
                    f"{result.measured} of {len(space)} plans measured, {failed} failed; "
                    f"{_ms(result.seconds)} ms vs default {_ms(result.default_seconds)} ms "
                    f"({_speedup(result.seconds, result.default_seconds)}) in "
                    f"{result.elapsed:.1f} s")
                rows.append(_row(layer, direction, dtype, result.default_plan,
                                 result.default_seconds, result.plan, result.seconds,
                                 result.measured, result.elapsed))
                chosen = _storable(result.plan, result.default_plan, space, ranks_here, cores)
                if chosen is None:
                    continue
                winners[direction] = chosen
                entries.append(profile.make_entry(
                    key, chosen, result.seconds, result.default_plan,
                    result.default_seconds, layer=layer.name, measured=result.measured,
                    space_size=len(space), failures=result.failures,
                    tuning_seconds=round(result.elapsed, 3), seed=args.seed))
            if "backward_data" in winners and "backward_weight" in winners:
                entries.append(_combined_backward(session, layer, dtype, geo, comm_size,
                                                  per_node, winners, rows, progress))
            entries = [e for e in entries if e is not None and _writable(e)]
            if entries:
                profile.update(entries, path)
                written += len(entries)

    headers = ["layer", "direction", "dtype", "default plan", "default ms", "tuned plan",
               "tuned ms", "speedup", "measured", "seconds"]
    return (f"summary ({session.size} ranks, {written} profile entries written to {path})\n"
            + format_table(headers, rows))


def _storable(plan, default_plan, space, ranks_here, cores):
    """Return the plan to store for a search's winner, or None to keep the heuristic.

    A winning default plan is stored with its thread count resolved, so the entry does not
    depend on OMP_NUM_THREADS at call time. If that resolved plan lies outside the search
    space (because it oversubscribes the cores, say), nothing is stored and calls keep the
    heuristic.
    """
    if plan is None or plan is not default_plan:
        return plan
    resolved = resolve_threads(plan, ranks_here, cores)
    valid = {sp.config_key(c) for c in space.configs}
    return resolved if sp.config_key(sp.from_plan(resolved)) in valid else None


def _writable(entry):
    """Return whether lookup() would accept ``entry``; log why not otherwise."""
    problem = profile.entry_problem(entry)
    if problem is not None:
        logger.warning("not writing the %s %s entry of %s: %s", entry["key"]["direction"],
                       entry["key"]["dtype"], entry.get("layer"), problem)
    return problem is None


def _row(layer, direction, dtype, default_plan, default_seconds, plan, seconds, measured,
         elapsed):
    return [layer.name, direction, dtype, sp.label(default_plan), _ms(default_seconds),
            sp.label(plan) if plan is not None else "all failed", _ms(seconds),
            _speedup(seconds, default_seconds), measured, f"{elapsed:.1f}"]


def _combined_backward(session, layer, dtype, geo, comm_size, per_node, winners, rows, progress):
    """Time both backward winners and the default on the full backward pass; pick the fastest."""
    started = time.monotonic()
    default = session.run(("default", "backward"))

    def evaluate(plan, repeats):
        return session.run(("time", "backward", plan.to_dict(), repeats))

    plans = [winners["backward_data"], winners["backward_weight"], default]
    plan, seconds, timings = _search.pick(evaluate, plans)
    default_seconds = timings[-1][1].seconds
    elapsed = time.monotonic() - started
    progress.prefix = f"{layer.name} backward {dtype}"
    progress.done(f"combined plan {_ms(seconds)} ms vs default {_ms(default_seconds)} ms "
                  f"({_speedup(seconds, default_seconds)})")
    rows.append(_row(layer, "backward", dtype, default, default_seconds, plan, seconds,
                     len({sp.config_key(sp.from_plan(p)) for p, _ in timings}), elapsed))
    if plan is None or default_seconds is None:
        return None
    if plan is default:
        plan = resolve_threads(default, min(default.active_ranks, per_node) if comm_size > 1
                               else per_node, profile.hardware_fingerprint()["cores"])
    key = profile.key_dict(geo, "backward", dtype, comm_size, per_node)
    return profile.make_entry(key, plan, seconds, default, default_seconds, layer=layer.name,
                              measured=len(timings), tuning_seconds=round(elapsed, 3))
