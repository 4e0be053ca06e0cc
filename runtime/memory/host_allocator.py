"""Keep freed host memory in the process: a caching policy for CPU training with glibc.

Why: PyTorch's CPU allocator has no cache (unlike CUDA's); every activation, gradient and
received buffer is a fresh ``malloc`` and its release a ``free``. glibc hands big blocks back to
the operating system - through ``munmap`` above the mmap threshold and by trimming the heap top
above the trim threshold - so the next micro-batch's tensors are fresh pages again, and every
4 KiB page costs a page fault that zeroes it (3.4 µs each on this project's VM). A 1F1B stage
of the GPT-2 throughput benchmark took ~35 000 faults per step, ~0.1 s of a 2 s step; with
freed memory kept for reuse it takes ~7 000 (the allocation pattern repeats every micro-batch,
so reuse is nearly perfect).

What it does: ``mallopt`` raises the trim threshold (freed heap memory is kept), pads heap
growth (fewer ``brk`` calls), and pins the mmap threshold at its maximum (32 MiB on 64-bit) so
tensors up to that size come from the reusable heap. The price is that the resident size stays
at its high-water mark - the same trade PyTorch's CUDA caching allocator makes. It is
process-wide, applied once by :func:`merak.init` on CPU, and skipped where it cannot apply
(non-glibc C libraries, other systems). ``MERAK_HOST_ALLOCATOR=system`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["OPT_OUT_ENV", "keep_freed_host_memory"]

#: Set to ``system`` to leave the C library's allocator settings alone.
OPT_OUT_ENV = "MERAK_HOST_ALLOCATOR"

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit systems.
_MAX_MMAP_THRESHOLD = 32 * 2**20

_applied = False


def keep_freed_host_memory(*, trim_threshold: int = 2**30, top_pad: int = 64 * 2**20,
                           mmap_threshold: int = _MAX_MMAP_THRESHOLD) -> bool:
    """Configure glibc malloc to keep freed memory for reuse; ``True`` if it was applied (now or
    by an earlier call), ``False`` where it does not apply or was opted out of."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_ENV, "").lower() == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad),
                (_M_MMAP_THRESHOLD, min(mmap_threshold, _MAX_MMAP_THRESHOLD)))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not _applied:
        logger.debug("mallopt refused the host allocator settings; glibc defaults stay")
    return _applied


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (``mallopt`` and its parameter numbers are glibc's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has neither), or no C library found
        return None
    return libc if libc.gnu_get_libc_version() else None
