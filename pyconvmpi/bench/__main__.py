"""Command line of ``python -m pyconvmpi.bench``; see ``--help``."""

import argparse
import logging
import platform
import sys
from pathlib import Path

import numpy as np

from .. import __version__, _lib, conv, layers
from ..plan import Plan, desc_struct
from ..errors import UnsupportedError
from .. import _validate
from . import cases, report, timing

logger = logging.getLogger(__name__)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m pyconvmpi.bench",
        description="Time pyconvmpi's local convolutions per layer: milliseconds, GFLOP/s, "
                    "percent of this machine's measured FMA peak, and PyTorch's time in the "
                    "same process when PyTorch is installed.",
    )
    parser.add_argument("--set", dest="layer_set", default="resnet50",
                        choices=sorted(layers.LAYER_SETS), help="named layer set (default resnet50)")
    parser.add_argument("--shape", action="append", default=[],
                        help=f"extra layer in the format {layers.SHAPE_FORMAT}; repeatable; "
                             "replaces --set when given")
    parser.add_argument("--op", choices=("forward", "backward"), default="forward",
                        help="forward, or backward (input and weight gradients)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP threads for pyconvmpi and torch.set_num_threads (default 1)")
    parser.add_argument("--algorithm", default="auto", choices=tuple(_lib.ALGORITHMS),
                        help="algorithm pyconvmpi runs (default auto, the library's heuristic)")
    parser.add_argument("--batch-scale", type=float, default=1.0,
                        help="multiply every layer's batch by this factor (at least 1 image); "
                             "the output says when it is not 1")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per layer (median)")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="keep repeating until the timed calls take this many seconds")
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    if not args.batch_scale > 0:
        parser.error(f"--batch-scale must be positive; got {args.batch_scale}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    # Bad layers and output paths are reported before the peak measurement and the timed
    # runs, instead of as a traceback in the middle or at the end of the run.
    for text in args.shape:
        problem = shape_problem(text)
        if problem is not None:
            parser.error(problem)
    if args.json is not None and not Path(args.json).parent.is_dir():
        parser.error(f"--json: directory {str(Path(args.json).parent)!r} not found")
    return args


def shape_problem(text):
    """Return why conv2d cannot run the layer given as text, or None if it can."""
    try:
        layer = layers.parse_shape(text)
        _validate.geometry(layer.input_shape, layer.weight_shape, layer.stride, layer.padding,
                           layer.dilation, layer.groups, f"--shape {text}")
    except ValueError as exc:
        return str(exc)
    return None


def layer_list(args):
    if args.shape:
        try:
            return [layers.parse_shape(text) for text in args.shape]
        except ValueError as exc:
            raise SystemExit(f"python -m pyconvmpi.bench: {exc}") from None
    return [cases.scaled(layer, args.batch_scale) for layer in layers.layer_set(args.layer_set)]


def chosen_algorithm(layer, op, dtype, threads, algorithm):
    geo = _validate.geometry(layer.input_shape, layer.weight_shape, layer.stride, layer.padding,
                             layer.dilation, layer.groups, "bench")
    exec_ = Plan(threads=threads, algorithm=algorithm).exec_struct()
    desc = desc_struct(geo)
    if op == "forward":
        return _lib.choose_algorithm("forward", desc, exec_)
    data = _lib.choose_algorithm("backward_data", desc, exec_)
    weight = _lib.choose_algorithm("backward_weight", desc, exec_)
    return data if data == weight else f"{data}+{weight}"


def shape_text(layer):
    text = f"{layer.n}x{layer.c}x{layer.h}x{layer.w}:{layer.k}x{layer.r}x{layer.s}"
    if layer.stride != 1:
        text += f":s{layer.stride}"
    if layer.padding not in (0, "valid"):
        text += f":p{layer.padding}"
    if layer.dilation != 1:
        text += f":d{layer.dilation}"
    if layer.groups != 1:
        text += f":g{layer.groups}"
    return text


def bench_layer(layer, args, dtype, peak, use_torch):
    arrays = cases.make_arrays(layer, dtype)
    call = cases.ours(layer, args.op, arrays, args.threads, args.algorithm)
    result = call()
    torch_call = expected = None
    if use_torch:
        torch_call = cases.theirs(layer, args.op, arrays)
        expected = torch_call()
        # Alternate the two libraries' calls so that load from other processes hits both.
        seconds, torch_seconds = timing.median_times_interleaved(
            [call, torch_call], warmup=1, repeats=args.repeats, min_seconds=args.min_time)
    else:
        seconds = timing.median_time(call, warmup=1, repeats=args.repeats,
                                     min_seconds=args.min_time)
    flops = layer.flops(args.op)
    row = {
        "layer": layer.name, "shape": shape_text(layer), "n": layer.n,
        "algorithm": chosen_algorithm(layer, args.op, dtype, args.threads, args.algorithm),
        "seconds": seconds, "flops": flops, "gflops": flops / seconds / 1e9,
        "percent_peak": 100.0 * flops / seconds / 1e9 / peak,
        "torch_seconds": None, "speedup": None, "max_error": None,
    }
    if use_torch:
        row["max_error"] = cases.max_relative_error(result if args.op == "forward"
                                                    else (result.input, result.weight), expected)
        row["torch_seconds"] = torch_seconds
        row["speedup"] = torch_seconds / seconds
    return row


def _warm_up(layers, args, dtype, peak, use_torch):
    """Time the first layer once and drop the result.

    With two threads, the first layer timed in a process ran about 10 times slower in both
    libraries than the same layer timed again later, so that first measurement is discarded.
    The cause is not identified; the start of the two OpenMP thread pools is the likely one.
    """
    for layer in layers:
        try:
            bench_layer(layer, args, dtype, peak, use_torch)
            return
        except UnsupportedError:
            continue


def tiny_call_overhead(dtype, threads, use_torch):
    x = np.ones((1, 1, 8, 8), dtype=dtype)
    w = np.ones((1, 1, 3, 3), dtype=dtype)
    plan = Plan(threads=threads)
    ours = timing.per_call_seconds(lambda: conv.conv2d(x, w, plan=plan))
    ours_auto = timing.per_call_seconds(lambda: conv.conv2d(x, w))
    theirs = None
    if use_torch:
        import torch

        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        with torch.no_grad():
            theirs = timing.per_call_seconds(lambda: torch.nn.functional.conv2d(xt, wt))
    return {"plan_given_us": ours * 1e6, "default_us": ours_auto * 1e6,
            "torch_us": None if theirs is None else theirs * 1e6}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = np.dtype(args.dtype)
    use_torch = not args.no_torch and cases.torch_available()
    if use_torch:
        import torch

        torch.set_num_threads(args.threads)

    peak = _lib.peak_gflops(_lib.FLOAT32 if dtype == np.float32 else _lib.FLOAT64, args.threads,
                            1.0)
    out = sys.stdout
    out.write(f"pyconvmpi {__version__} bench: set={args.layer_set if not args.shape else 'shapes'} "
              f"op={args.op} dtype={args.dtype} threads={args.threads} algorithm={args.algorithm}\n")
    out.write(f"SIMD {_lib.simd_level()}, measured FMA peak {peak:.1f} GFLOP/s "
              f"({args.threads} thread(s), {args.dtype}), CPU {platform.processor() or platform.machine()}\n")
    if args.batch_scale != 1.0:
        out.write(f"NOTE: batches scaled by {args.batch_scale} (--batch-scale)\n")
    if not use_torch:
        out.write("PyTorch not timed (not importable or --no-torch)\n")
    out.flush()

    rows = []
    lines = report.table([])
    out.write("\n".join(lines) + "\n")
    _warm_up(layer_list(args), args, dtype, peak, use_torch)
    for layer in layer_list(args):
        try:
            row = bench_layer(layer, args, dtype, peak, use_torch)
        except UnsupportedError as exc:
            out.write(f"{layer.name}: skipped, {exc}\n")
            continue
        rows.append(row)
        out.write(report.table([row])[2] + "\n")
        out.flush()

    speedups = [row["speedup"] for row in rows]
    geomean = report.geometric_mean(speedups)
    overhead = tiny_call_overhead(dtype, args.threads, use_torch)
    if geomean is not None:
        out.write(f"geometric mean speedup over PyTorch (torch time / pyconvmpi time): {geomean:.2f}\n")
    out.write(f"tiny call (1x1x8x8 input, 3x3 kernel): {overhead['plan_given_us']:.1f} us with a plan, "
              f"{overhead['default_us']:.1f} us default")
    if overhead["torch_us"] is not None:
        out.write(f", PyTorch {overhead['torch_us']:.1f} us")
    out.write("\n")

    if args.json:
        record = {
            "version": __version__, "abi": _lib.ABI_VERSION, "simd": _lib.simd_level(),
            "peak_gflops": peak, "args": vars(args), "rows": rows,
            "geomean_speedup": geomean, "tiny_call": overhead,
            "torch_version": __import__("torch").__version__ if use_torch else None,
        }
        report.write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
