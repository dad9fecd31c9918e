"""``python -m pyconvmpi.tune``: tune layer shapes and write the profile."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
