"""Keep freed model buffers from staying in the process's resident memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024


def use_fixed_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of `threshold` bytes or more with mmap, so free returns them at once.

    glibc raises its mmap threshold each time a large mmapped block is freed, up to 32 MiB
    on 64-bit systems. After that, the tensors of the next model update come from the heap,
    and memory freed there often stays resident, so a process that loads one model file
    after another grows. Setting the threshold explicitly turns that adjustment off.
    Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %s) failed; memory may grow", threshold)
        return False
    return True
