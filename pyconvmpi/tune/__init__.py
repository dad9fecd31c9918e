"""The auto-tuner: ``python -m pyconvmpi.tune`` searches plans per layer and writes the profile.

Modules: ``space`` (the search space as data), ``measure`` (timing on every rank together),
``search`` (the Optuna study of one layer and direction), ``driver`` (commands shared by the
ranks) and ``cli`` (the command line).
"""
