"""glibc's malloc arenas, limited the way the container images limit them.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core)
and keeps what is freed in it. The batch path's threads (batcher, staging, COG copies) each
allocate blocks of megabytes, so a 16k x 16k scene ended 50 MB higher than a 1k one with the
default arenas and 10 % higher with two (measured by bench/score_geotiff.py). The images set
``MALLOC_ARENA_MAX=2`` for the server; a process started from a shell gets the same through
:func:`limit_arenas`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas unless ``MALLOC_ARENA_MAX`` already says how many; True if
    capped here. No-op (False) without glibc. Call it before the threads start."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arenas))
