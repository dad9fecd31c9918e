"""Write tests/data/tune_replay.json, the measurements the tuner tests replay.

Run from the repository root with the library built:
    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/data/record_replay.py

``local_forward`` is measured: every configuration of one small layer's local forward space,
timed on this machine with the tuner's own timing function. ``collective`` is synthetic: a
4-rank space priced by a simple cost model (work over ranks and threads, a communication
cost per strategy, a tile effect, a fixed pseudo-random spread) with a few failures, because
distributed conv2d cannot be timed where this file was recorded.
"""

import json
import zlib
from pathlib import Path

from pyconvmpi import layers
from pyconvmpi.tune import space as sp
from pyconvmpi.tune.measure import Workload, time_call


def measured_local():
    layer = layers.parse_shape("4x32x28x28:64x3x3:p1")
    work = Workload(layer, "float32", comm=None, seed=0)
    ctx = sp.Context(work.geo, "forward", comm_size=1, ranks_per_node=1, cores=2)
    rows = []
    for config in sp.enumerate_configs(ctx):
        result = time_call(work.call("forward", sp.to_plan(config)), None, 1, 5, 30.0)
        rows.append({"config": config, "seconds": result.seconds, "failure": result.failure})
    return {"layer": layer.name, "direction": "forward", "comm_size": 1, "ranks_per_node": 1,
            "cores": 2, "source": "measured", "rows": rows}


def synthetic_collective():
    layer = layers.parse_shape("8x64x28x28:64x3x3:p1")
    work = Workload(layer, "float32", comm=None, seed=0)
    ctx = sp.Context(work.geo, "forward", comm_size=4, ranks_per_node=4, cores=4,
                     collective=True)
    comm_cost = {"batch": 0.4e-3, "channels": 1.1e-3, "rows": 0.7e-3, "hybrid": 0.9e-3}
    rows = []
    for config in sp.enumerate_configs(ctx):
        ranks, threads = config["active_ranks"], config["threads"]
        seconds = 40e-3 / (ranks * threads ** 0.9)
        seconds += comm_cost[config["strategy"]] * (ranks > 1)
        seconds *= {0: 1.0, 4: 1.15, 8: 0.92, 16: 0.88, 32: 0.95, 64: 1.05}[config["block_k"]]
        seconds *= 1.0 if config["algorithm"] == "direct" else 1.03
        seconds *= 1.0 + (zlib.crc32(json.dumps(config, sort_keys=True).encode()) % 97) / 2000
        failure = None
        if config["strategy"] == "rows" and config["block_k"] == 64:
            failure = "PCM_ERR_UNSUPPORTED"
        elif config["strategy"] == "hybrid" and threads == 1:
            failure = "timeout"
        rows.append({"config": config, "seconds": None if failure else seconds,
                     "failure": failure})
    return {"layer": layer.name, "direction": "forward", "comm_size": 4, "ranks_per_node": 4,
            "cores": 4, "source": "synthetic", "rows": rows}


if __name__ == "__main__":
    data = {"local_forward": measured_local(), "collective": synthetic_collective()}
    path = Path(__file__).with_name("tune_replay.json")
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
