"""``python -m merak.runtime.memory``: the per-stage memory table (see :mod:`.estimator`)."""

import sys

from merak.runtime.memory.estimator import main

if __name__ == "__main__":
    sys.exit(main())
