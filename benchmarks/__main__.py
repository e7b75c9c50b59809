"""``python -m benchmarks``: see ``benchmarks.cli``."""
import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":  # importing this module (for ``main``) must not run the command line
    sys.exit(main())
