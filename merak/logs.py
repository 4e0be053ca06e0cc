"""Merak's logging defaults: rank-prefixed lines, rank 0 speaks, other ranks only warn.

With 8 ranks printing the same INFO line eight times, logs stop being read. ``merak.init``
calls :func:`configure` once: if the application has not configured the ``merak`` logger
itself (no handler on it), a stream handler is attached whose lines carry the rank, at INFO on
rank 0 and WARNING elsewhere. ``MERAK_LOG_LEVEL`` (e.g. ``DEBUG``) applies to every rank.
An application that sets up its own handlers is left alone.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "merak"


def configure(rank: int) -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    if log.handlers:  # the application already decided
        return log
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[merak rank {rank}] %(levelname)s %(message)s"))
    log.addHandler(handler)
    level = os.environ.get("MERAK_LOG_LEVEL")
    log.setLevel(level.upper() if level else (logging.INFO if rank == 0 else logging.WARNING))
    log.propagate = False
    return log
