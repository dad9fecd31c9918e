"""The terminal table and the JSON record of a benchmark run."""

import json
import math
import re


COLUMNS = [
    ("layer", "{:<16}"), ("shape", "{:<30}"), ("algo", "{:<8}"), ("ms", "{:>9.3f}"),
    ("GFLOP/s", "{:>8.1f}"), ("%peak", "{:>6.1f}"), ("torch ms", "{:>9.3f}"),
    ("speedup", "{:>8.2f}"), ("max err", "{:>8.1e}"),
]


def geometric_mean(values):
    """Return the geometric mean of positive values, or None for none."""
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _cell(fmt, value):
    if value is None:
        # The width is the first number of the format: 9 in "{:>9.3f}", not the 93 that
        # joining all its digits gives.
        width = re.search(r"\d+", fmt)
        return "-".rjust(int(width.group()) if width else 0)
    return fmt.format(value)


def table(rows):
    """Return the rows as aligned text lines."""
    header = " ".join(fmt.replace(".1f", "").replace(".3f", "").replace(".2f", "")
                      .replace(".1e", "").format(name) for name, fmt in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = [row["layer"], row["shape"], row["algorithm"], row["seconds"] * 1e3,
                  row["gflops"], row["percent_peak"],
                  None if row["torch_seconds"] is None else row["torch_seconds"] * 1e3,
                  row["speedup"], row["max_error"]]
        lines.append(" ".join(_cell(fmt, v) for (_, fmt), v in zip(COLUMNS, values)))
    return lines


def write_json(path, record):
    """Write the run's record as indented JSON."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
