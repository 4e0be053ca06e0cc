"""``python -m merak.planner``: rank the cluster layouts for a model (see :mod:`merak.planner.cli`)."""

import sys

from merak.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
