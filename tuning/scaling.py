"""MPI scaling study: each strategy on 1 rank x 1 thread, 2 ranks x 1 thread, 1 rank x 2 threads.

Usage (from the repository root, with the library built or installed):

    python tuning/scaling.py                      # large layers and the seed workloads
    python tuning/scaling.py --layers large --ops forward --repeats 5 --json results.json

The launcher starts one ``mpiexec -n R python -m mpi4py tuning/scaling.py --worker ...`` run per
configuration (always under ``timeout``, with OMP_NUM_THREADS set) and prints one table. A time
is the minimum over repeats of the slowest rank's time, each repeat between barriers, after one
warm-up call. The table uses the minimum rather than the median because other processes on a
shared machine only ever add time. The JSON output keeps every repeat and the median.

On a machine that other jobs load, wall time mostly measures them, so the table also gives the
CPU-time speedup of 2 ranks: process CPU time of 1x1 over the slowest rank's CPU time on 2x1.
With one thread per rank and MPICH polling while it waits, that CPU time contains the rank's
compute, its communication and its waiting for the other rank, so the ratio estimates the
speedup on an otherwise idle machine. It is an estimate, not a measured wall time. Peak memory per rank is VmHWM from /proc/self/status, reset through
/proc/self/clear_refs before each variant allocates its arrays, so it covers this variant's
arrays plus the interpreter and libraries (the baseline column).
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("scaling")

CONFIGS = [("1x1", 1, 1), ("2x1", 2, 1), ("1x2", 1, 2)]  # (name, ranks, threads per rank)

# (placement, strategy): the two data-parallel placements, the four strategies on replicated
# data, and root placement with the automatic choice (scatter and gather included).
VARIANTS = [
    ("batch", "auto"), ("rows", "auto"),
    ("replicated", "batch"), ("replicated", "channels"), ("replicated", "rows"),
    ("replicated", "hybrid"), ("root", "auto"),
]


def layer_groups(scale):
    """Return {group name: [Layer]}; the seed workloads are shrunk by ``scale`` in the batch."""
    from pyconvmpi.layers import Layer, layer_set

    resnet50 = {layer.name: layer for layer in layer_set("resnet50")}
    resnet18 = {layer.name: layer for layer in layer_set("resnet18")}
    rgb_n = max(2, round(80 * scale))
    grey_n = max(2, round(160_000 * scale))
    return {
        "large": [resnet50["layer2.3x3"], resnet18["layer1.3x3"]],
        "seed": [
            Layer(f"rgb1024 x{rgb_n}", rgb_n, 3, 1024, 1024, 3, 3, 3, 1, 1),
            Layer(f"grey32 x{grey_n}", grey_n, 1, 32, 32, 1, 3, 3, 1, 1),
        ],
    }


# ----------------------------------------------------------------------------------------------
# Worker: runs inside every rank


def _reset_peak_memory():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # pragma: no cover - clear_refs needs Linux >= 4.0
        pass


def _memory_mb(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _local_arrays(layer, placement, comm, op, dtype):
    """This rank's arrays for a placement: its share for batch and rows, full otherwise."""
    import numpy as np

    from pyconvmpi.distributed import row_bands

    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(rank)
    n, c, h, w = layer.input_shape
    weight = rng.standard_normal(layer.weight_shape).astype(dtype)
    geo_out_h = _output_height(layer)
    shape, grad_shape = list(layer.input_shape), [n, layer.k, geo_out_h, _output_width(layer)]
    if placement == "batch":
        n0, n1 = row_bands(n, size)[rank]
        shape[0] = grad_shape[0] = n1 - n0
    elif placement == "rows":
        p, q = row_bands(h, size)[rank]
        y0, y1 = row_bands(geo_out_h, size)[rank]
        shape[2], grad_shape[2] = q - p, y1 - y0
    elif placement == "root" and rank != 0:
        return None, weight, None
    x = rng.standard_normal(shape).astype(dtype)
    grad = rng.standard_normal(grad_shape).astype(dtype) if op == "backward" else None
    return x, weight, grad


def _output_height(layer):
    from pyconvmpi import _validate as V

    return V.geometry(layer.input_shape, layer.weight_shape, layer.stride, layer.padding,
                      layer.dilation, layer.groups, "scaling").out_h


def _output_width(layer):
    from pyconvmpi import _validate as V

    return V.geometry(layer.input_shape, layer.weight_shape, layer.stride, layer.padding,
                      layer.dilation, layer.groups, "scaling").out_w


def _time_variant(comm, layer, op, placement, strategy, repeats, dtype):
    import gc

    import pyconvmpi as pcm

    gc.collect()
    _reset_peak_memory()
    x, weight, grad = _local_arrays(layer, placement, comm, op, dtype)
    options = layer.options()

    def call():
        if op == "forward":
            return pcm.conv2d(x, weight, None, **options, comm=comm, placement=placement,
                              strategy=strategy)
        return pcm.conv2d_backward(grad, x, weight, **options, comm=comm, placement=placement,
                                   strategy=strategy)

    call()
    times, cpu_times = [], []
    for _ in range(repeats):
        comm.Barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        times.append(comm.allreduce(elapsed, op=_max_op()))
        cpu_times.append(comm.allreduce(cpu, op=_max_op()))
    plan = pcm.plan(layer.input_shape, layer.weight_shape, **options, dtype=dtype,
                    op=op, comm=comm, placement=placement)
    peaks = comm.gather(_memory_mb("VmHWM"), root=0)
    return {"time": statistics.median(times), "min_time": min(times), "times": times,
            "min_cpu_time": min(cpu_times), "cpu_times": cpu_times,
            "peak_mb": peaks,
            "plan": plan.strategy if strategy == "auto" else strategy}


def _max_op():
    from mpi4py import MPI

    return MPI.MAX


def worker(args):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    groups = layer_groups(args.scale)
    baseline = comm.gather(_memory_mb("VmRSS"), root=0)
    load_before = os.getloadavg()[0]
    results = []
    for group in args.layers:
        for layer in groups[group]:
            for op in args.ops:
                for placement, strategy in VARIANTS:
                    record = _time_variant(comm, layer, op, placement, strategy, args.repeats,
                                           args.dtype)
                    record.update(group=group, layer=layer.name, op=op, placement=placement,
                                  strategy=strategy, flops=layer.flops(op))
                    results.append(record)
                    if comm.Get_rank() == 0:
                        logger.info("%s %s %s/%s: %.3f s", layer.name, op, placement, strategy,
                                    record["time"])
    if comm.Get_rank() == 0:
        load = [load_before, os.getloadavg()[0]]
        Path(args.json).write_text(json.dumps({"baseline_mb": baseline, "load_average": load,
                                               "results": results}))


# ----------------------------------------------------------------------------------------------
# Launcher


def run_config(name, ranks, threads, args, output):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [
        "timeout", "--signal=KILL", str(args.timeout), str(mpiexec), "-n", str(ranks),
        sys.executable, "-m", "mpi4py", str(Path(__file__).resolve()), "--worker",
        "--json", str(output), "--layers", *args.layers, "--ops", *args.ops,
        "--repeats", str(args.repeats), "--scale", str(args.scale), "--dtype", args.dtype,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    logger.info("running %s: %s", name, " ".join(command))
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(
            f"scaling run {name} failed with exit status {completed.returncode}:\n"
            f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )
    logger.info("%s finished in %.0f s", name, time.perf_counter() - started)
    return json.loads(Path(output).read_text())


def format_table(runs):
    header = (f"{'layer':<16} {'op':<8} {'placement/strategy':<22} {'1x1 s':>8} {'2x1 s':>8} "
              f"{'2x1 speedup':>11} {'2x1 CPU':>10} {'1x2 s':>8} {'1x2 speedup':>11} {'peak MB 1x1':>11} "
              f"{'peak MB/rank 2x1':>17}")
    lines = [header, "-" * len(header)]
    for index, base in enumerate(runs["1x1"]["results"]):
        two = runs["2x1"]["results"][index]
        threads = runs["1x2"]["results"][index]
        t1, t2, t12 = base["min_time"], two["min_time"], threads["min_time"]
        cpu_speedup = base["min_cpu_time"] / two["min_cpu_time"]
        label = f"{base['placement']}/{two['plan']}"
        peaks = "/".join(f"{mb:.0f}" for mb in two["peak_mb"])
        lines.append(
            f"{base['layer']:<16} {base['op']:<8} {label:<22} {t1:8.3f} {t2:8.3f} "
            f"{t1 / t2:10.2f}x {cpu_speedup:9.2f}x {t12:8.3f} {t1 / t12:10.2f}x "
            f"{base['peak_mb'][0]:11.0f} {peaks:>17}"
        )
    for name, run in runs.items():
        before, after = run["load_average"]
        lines.append(f"{name}: 1-minute load average {before:.1f} at the start, {after:.1f} at the end "
                     f"(the machine's other processes share its cores)")
    baseline = runs["2x1"]["baseline_mb"]
    lines.append(f"baseline RSS per rank before any array (MB): "
                 + "/".join(f"{mb:.0f}" for mb in baseline))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=["large", "seed"], choices=["large", "seed"],
                        help="layer groups: 'large' (ResNet 3x3 layers) and 'seed' (image workloads)")
    parser.add_argument("--ops", nargs="+", default=["forward", "backward"],
                        choices=["forward", "backward"], help="directions to time")
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per variant (count)")
    parser.add_argument("--scale", type=float, default=0.1,
                        help="fraction of the seed workloads' batch (80 RGB and 160,000 grey images)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--timeout", type=int, default=1200,
                        help="seconds before one configuration's mpiexec run is killed")
    parser.add_argument("--json", help="write the raw results of every configuration here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        worker(args)
        return 0
    runs = {}
    with tempfile.TemporaryDirectory(prefix="pyconvmpi-scaling-") as scratch:
        for name, ranks, threads in CONFIGS:
            runs[name] = run_config(name, ranks, threads, args, Path(scratch) / f"{name}.json")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    print(format_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
