"""``python -m pyconvmpi.bench``: time local convolutions against PyTorch and the machine's peak.

Modules: ``timing`` (warm-up and median of repeats), ``cases`` (arrays and the calls to time for
one layer), ``report`` (terminal table and JSON), ``__main__`` (command line).
"""
