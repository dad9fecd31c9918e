"""Wall-clock timing: warm-up calls, then the median of repeated calls."""

import statistics
import time


def median_time(call, warmup=1, repeats=5, min_seconds=0.0, max_repeats=50):
    """Return the median wall time in seconds of ``call()`` after ``warmup`` calls.

    At least ``repeats`` timed calls run, more (up to ``max_repeats``) until their total
    reaches ``min_seconds``.
    """
    for _ in range(warmup):
        call()
    times = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_call_seconds(call, calls=2000, rounds=5):
    """Return the best average time of ``calls`` back-to-back calls over ``rounds`` rounds."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def median_times_interleaved(calls, warmup=1, repeats=5, min_seconds=0.0, max_repeats=50):
    """Return the median wall time in seconds of each callable, timed in alternation.

    Each round runs every callable once, so a change of machine load during the measurement
    affects all of them alike. Rounds repeat as in ``median_time``, with ``min_seconds``
    applying to the first callable.
    """
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    while len(times[0]) < repeats or (sum(times[0]) < min_seconds and len(times[0]) < max_repeats):
        for call, record in zip(calls, times):
            start = time.perf_counter()
            call()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]
