"""Single source of the version, read by pyproject.toml and CMake."""

__version__ = "0.1.0"
