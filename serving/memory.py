"""glibc's malloc, tuned for the batch path so that its memory stays flat in the scene's size.

Two habits of glibc made a 16k x 16k scene peak well above a 1k one (bench/score_geotiff.py):

* each thread that allocates under contention gets an arena of its own (up to 8 per core) and
  keeps what is freed in it; the batch path's threads (batcher, staging, COG copies) each
  allocate blocks of megabytes. ``MALLOC_ARENA_MAX=2`` caps them (the container images set it
  for the server too).
* freed blocks of megabytes are first given back to the system (they are mmapped), but each free
  raises glibc's mmap threshold to that size (up to 32 MB), so the next blocks come from the heap,
  where they fragment and stay: RSS then tracks the largest moment of overlap between threads over
  the whole run, which a scene of many blocks reaches and a one-block scene does not. A fixed
  threshold (``MALLOC_MMAP_THRESHOLD_``, 256 KiB here) keeps every block-sized array mmapped and
  given back when freed. The cost is a page fault per 4 KiB of each new array: the patch arrays,
  the largest and most frequent, are reused instead (``blocks.Buffers``); the rest cost about
  5 % of throughput at stride 8 against a 2 MiB threshold, which measured 1k -> 16k growth of
  +8.7 % instead of +6.3 % (docs/benchmarks_notes.md).

:func:`tune_malloc` applies both to the running process (call it before the threads start and
before the big allocations); a value the environment sets wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024


def tune_malloc(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD) -> dict[str, bool]:
    """Cap the arenas and fix the mmap threshold, each unless its environment variable
    (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``) is set; says which were set here.
    Nothing is set without glibc."""
    mallopt = _mallopt()
    done = {"arenas": False, "mmap_threshold": False}
    if mallopt is None:
        return done
    if not os.environ.get("MALLOC_ARENA_MAX"):
        done["arenas"] = bool(mallopt(M_ARENA_MAX, arenas))
    if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        done["mmap_threshold"] = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    return done


def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]
