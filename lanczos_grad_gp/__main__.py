"""``python -m lanczos_grad_gp``: the command line of :mod:`lanczos_grad_gp.app.cli`."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
