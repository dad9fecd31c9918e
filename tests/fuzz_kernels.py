"""Random fuzzer of the C kernels against the float64 reference (not collected by pytest).

Calls the C entry points through pyconvmpi._lib with outputs allocated over NaN garbage and
with asymmetric padding, and checks for every case and every algorithm the library accepts:
- the result against tests/reference.py within tests/tolerances.py;
- a second call over different garbage gives the same bits (the output is fully written);
- NaN placed in input elements no output reads changes nothing (no over-reads);
- the result at other thread counts stays within the bound.

Usage, with PYTHONPATH set to the repository and its tests folder:
    python tests/fuzz_kernels.py FAMILY CASES SEED [THREADS...]
FAMILY is depthwise, fewchan, general, f64weight or wide. The script prints one line per failure and
a summary. THREADS-BITS lines are expected for weight gradients: their sums are split by thread.
Set PYCONVMPI_SIMD=avx2 or scalar before the run to test the other tile sets.
"""

import sys

import numpy as np

from pyconvmpi import _lib

import reference
from tolerances import ALGORITHM_FACTOR, REFERENCE_FACTOR, bound

EDGE_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 63, 64, 65, 70]


def size(rng):
    return int(rng.choice(EDGE_SIZES)) if rng.random() < 0.7 else int(rng.integers(1, 71))


def random_case(rng, family):
    """Return a dict of shapes and options for one case of ``family``."""
    n = int(rng.choice([0, 1, 1, 1, 2, 3, 9])) if rng.random() < 0.3 else int(rng.integers(1, 3))
    dtype = np.float32 if rng.random() < 0.6 else np.float64
    r, s = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    if rng.random() < 0.5:
        r = s = 3
    sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    if rng.random() < 0.5:
        sh = sw = int(rng.choice([1, 2]))
    dh, dw = (1, 1) if rng.random() < 0.6 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))

    if family == "depthwise":
        groups = int(rng.choice([1, 2, 3, 7, 8, 16, 17, 32, 64, 100, 600])) \
            if rng.random() < 0.7 else int(rng.integers(1, 601))
        c = groups
        k = groups * int(rng.choice([1, 1, 1, 2, 3]))
    elif family == "fewchan":
        cg = int(rng.integers(1, 5))
        kg = int(rng.integers(1, 17))
        groups = int(rng.choice([1, 1, 1, 2, 3]))
        c, k = cg * groups, kg * groups
        if rng.random() < 0.6:
            sw = 1
    elif family == "f64weight":
        dtype = np.float64
        groups = int(rng.choice([1, 1, 2]))
        c = groups * int(rng.integers(1, 21))
        k = groups * int(rng.integers(1, 21))
    elif family == "wide":
        # Long reductions for the blocked sums of the register tiles.
        groups = int(rng.choice([1, 1, 2]))
        c = groups * int(rng.integers(1, 300))
        k = groups * int(rng.integers(1, 40))
    else:
        groups = int(rng.choice([1, 1, 1, 2, 4]))
        c = groups * int(rng.integers(1, 6))
        k = groups * int(rng.integers(1, 6))

    # Large depthwise channel counts get small images so a case stays fast.
    if c * max(n, 1) > 64:
        h, w = int(rng.integers(1, 20)), int(rng.integers(1, 20))
    elif rng.random() < 0.15:
        # Pixel tiles: around 256 and 4096 output pixels.
        h, w = [(16, 16), (16, 17), (15, 17), (64, 64), (64, 65), (63, 65), (1, 256),
                (1, 257), (2, 129)][int(rng.integers(0, 9))]
        n = min(n, 1)
    else:
        h, w = size(rng), size(rng)
    pads = [int(v) for v in rng.integers(0, 4, size=4)]
    if rng.random() < 0.4:
        pads = [pads[0], pads[0], pads[2], pads[2]]
    return dict(n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=(sh, sw), dilation=(dh, dw),
                pads=pads, groups=groups, dtype=dtype, unbatched=False)


def out_size(size_, before, after, kernel, dilation, stride):
    return (size_ + before + after - dilation * (kernel - 1) - 1) // stride + 1


def make_desc(case):
    top, bottom, left, right = case["pads"]
    out_h = out_size(case["h"], top, bottom, case["r"], case["dilation"][0], case["stride"][0])
    out_w = out_size(case["w"], left, right, case["s"], case["dilation"][1], case["stride"][1])
    if out_h < 1 or out_w < 1:
        return None
    return _lib.ConvDesc(case["n"], case["c"], case["h"], case["w"], case["k"], case["r"],
                         case["s"], out_h, out_w, case["stride"][0], case["stride"][1], top, left,
                         bottom, right, case["dilation"][0], case["dilation"][1], case["groups"])


class Reference:
    """Float64 results and error scales of one case, with explicit asymmetric padding."""

    def __init__(self, case, x, w, b, go):
        top, bottom, left, right = case["pads"]
        self.options = dict(stride=case["stride"], dilation=case["dilation"],
                            groups=case["groups"], padding=0)
        self.pad = ((0, 0), (0, 0), (top, bottom), (left, right))
        xp = np.pad(x.astype(np.float64), self.pad)
        self.case = case
        self.x, self.w, self.go = x, w, go
        self.forward = reference.forward(xp, w, b, **self.options)
        self.forward_scale = reference.abs_forward(xp, w, b, **self.options)
        gxp = reference.backward_input(go, xp.shape, w, **self.options)
        self.grad_input = self.crop(gxp)
        self.grad_input_scale = self.crop(
            reference.abs_backward_input(go, xp.shape, w, **self.options))
        self.grad_weight = reference.backward_weight(go, xp, w.shape, **self.options)
        self.grad_weight_scale = reference.abs_backward_weight(go, xp, w.shape, **self.options)
        self.grad_bias = reference.backward_bias(go)
        self.grad_bias_scale = reference.backward_bias(np.abs(go))
        mask = reference.read_mask(xp.shape, w.shape, **self.options)
        self.read = self.crop(mask)

    def crop(self, padded):
        top, _, left, _ = self.case["pads"]
        return padded[:, :, top:top + self.case["h"], left:left + self.case["w"]]


def run(op, algorithm, threads, desc, arrays, fill):
    """Run one C entry point over outputs filled with ``fill``; return the outputs."""
    x, w, b, go = arrays
    exec_ = _lib.Exec(_lib.ALGORITHMS[algorithm], threads, 0, 0, 0)
    if op == "forward":
        out = np.full(go.shape, fill, dtype=x.dtype)
        _lib.conv2d_forward(desc, exec_, x, w, b, out)
        return (out,)
    if op == "backward_data":
        out = np.full(x.shape, fill, dtype=x.dtype)
        _lib.conv2d_backward_data(desc, exec_, go, w, out)
        return (out,)
    gw = np.full(w.shape, fill, dtype=x.dtype)
    gb = np.full((w.shape[0],), fill, dtype=x.dtype)
    _lib.conv2d_backward_weight(desc, exec_, go, x, gw, gb)
    return gw, gb


def errors(got, expected, scale, dtype, terms, factor):
    """Return (number of elements out of bound, worst ratio error / bound)."""
    got64 = got.astype(np.float64)
    err = np.abs(got64 - expected)
    limit = bound(dtype, terms, scale, factor + REFERENCE_FACTOR)
    bad = ~(err <= limit)
    ratio = np.where(limit > 0, err / np.where(limit > 0, limit, 1), np.where(err > 0, np.inf, 0))
    ratio = np.where(np.isnan(err), np.inf, ratio)
    return int(bad.sum()), float(ratio.max()) if ratio.size else 0.0


def check_case(case, rng, threads_list, report):
    desc = make_desc(case)
    if desc is None:
        return 0
    dtype = case["dtype"]
    n, c, h, wd, k = case["n"], case["c"], case["h"], case["w"], case["k"]
    cg = c // case["groups"]
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = rng.standard_normal((k, cg, case["r"], case["s"])).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    go = rng.standard_normal((n, k, desc.out_h, desc.out_w)).astype(dtype)
    ref = Reference(case, x, w, b, go)
    kg = k // case["groups"]
    terms = {"forward": cg * case["r"] * case["s"] + 1,
             "backward_data": kg * case["r"] * case["s"],
             "backward_weight": n * desc.out_h * desc.out_w}

    # Inputs with NaN in every element no output reads.
    x_nan = x.copy()
    x_nan[~ref.read] = np.nan

    ran = 0
    for op in ("forward", "backward_data", "backward_weight"):
        for algorithm in ("auto", "direct", "gemm", "winograd"):
            if not _lib.algorithm_supported(algorithm, op, desc):
                continue
            label = f"{op} {algorithm} {describe(case)}"
            results = {}
            for threads in threads_list:
                try:
                    first = run(op, algorithm, threads, desc, (x, w, b, go), np.nan)
                    second = run(op, algorithm, threads, desc, (x, w, b, go), 1e30)
                except Exception as error:  # noqa: BLE001 - reported, then the fuzzer goes on
                    report(f"ERROR {label} threads={threads}: {error}")
                    continue
                ran += 1
                for a, bb in zip(first, second):
                    if not np.array_equal(a, bb, equal_nan=True):
                        diff = np.argwhere(~((a == bb) | (np.isnan(a) & np.isnan(bb))))
                        report(f"UNWRITTEN {label} threads={threads}: {len(diff)} elements "
                               f"differ over garbage, first {tuple(diff[0])}")
                results[threads] = first
                factor = ALGORITHM_FACTOR[algorithm]
                if op == "forward":
                    checks = [(first[0], ref.forward, ref.forward_scale, "output")]
                elif op == "backward_data":
                    checks = [(first[0], ref.grad_input, ref.grad_input_scale, "grad_input")]
                else:
                    checks = [(first[0], ref.grad_weight, ref.grad_weight_scale, "grad_weight"),
                              (first[1], ref.grad_bias, ref.grad_bias_scale, "grad_bias")]
                for got, expected, scale, name in checks:
                    bad, worst = errors(got, expected, scale, dtype, terms[op], factor)
                    if bad:
                        idx = np.unravel_index(
                            np.argmax(np.nan_to_num(np.abs(got.astype(np.float64) - expected),
                                                    nan=np.inf)), got.shape)
                        report(f"WRONG {label} threads={threads} {name}: {bad}/{got.size} off, "
                               f"worst ratio {worst:.3g} at {idx}: got {got[idx]!r} expected "
                               f"{expected[idx]!r}")
                # Over-reads: NaN in unread input elements must not reach any result.
                if op != "backward_data" and (~ref.read).any():
                    nan_run = run(op, algorithm, threads, desc, (x_nan, w, b, go), 0.0)
                    for got, name in zip(nan_run, ("output" if op == "forward" else
                                                   "grad_weight", "grad_bias")):
                        if not np.array_equal(got, first[0] if name in ("output", "grad_weight")
                                              else first[1]):
                            report(f"OVERREAD {label} threads={threads} {name}: "
                                   f"{int(np.isnan(got).sum())} NaN")
            base = results.get(threads_list[0])
            for threads, other in results.items():
                if base is not None and threads != threads_list[0]:
                    for a, bb in zip(base, other):
                        if not np.array_equal(a, bb):
                            report(f"THREADS-BITS {label} threads={threads_list[0]} vs {threads}: "
                                   f"max diff {np.nanmax(np.abs(a.astype(float) - bb)):.3g}")
    return ran


def describe(case):
    return (f"n={case['n']} c={case['c']} h={case['h']} w={case['w']} k={case['k']} "
            f"r={case['r']} s={case['s']} stride={case['stride']} dilation={case['dilation']} "
            f"pads(t,b,l,r)={case['pads']} groups={case['groups']} "
            f"{np.dtype(case['dtype']).name}")


def main():
    family, cases, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threads_list = [int(v) for v in sys.argv[4:]] or [1]
    rng = np.random.default_rng(seed)
    failures = []

    def report(line):
        failures.append(line)
        print(line, flush=True)

    runs = 0
    for _ in range(cases):
        case = random_case(rng, family)
        runs += check_case(case, rng, threads_list, report)
    print(f"SUMMARY {family} seed={seed} cases={cases} kernel-runs={runs} "
          f"failures={len(failures)} simd={_lib.simd_level()}", flush=True)


if __name__ == "__main__":
    main()
