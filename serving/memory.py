"""glibc's malloc, tuned per path: flat memory for batch scoring, no page faults for the server.

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

The server wants the other side of that trade. Its arrays are sized by the request, not by a
scene (7.5 MB of patch pairs for a 256x256 pair at stride 8, a few more of maps and buffers), and
a request's page faults are CPU taken from inference on the same cores: untuned, a 256x256
request faulted about 1,200 times (4.7 MB of pages), and cutting its patches cost 2.9 ms of CPU
instead of 1.6 (bench/serve_throughput.py's request, 16 clients). :data:`SERVING` keeps arrays up
to 32 MB in the heap and up to 128 MB of freed heap mapped, so that requests reuse the pages of
the requests before them; larger arrays (a streamed 16k pair) are still mmapped and given back.

:func:`tune_malloc` applies a setting to the running process (call it before the threads start
and before the big allocations); a value the environment sets wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
SERVING = {"arenas": 2, "mmap_threshold": 32 * 1024 * 1024, "trim_threshold": 128 * 1024 * 1024}
"""The server's setting (see above), for ``tune_malloc(**SERVING)``."""

_PARAMETERS = {  # name -> (mallopt parameter, environment variable that wins)
    "arenas": (M_ARENA_MAX, "MALLOC_ARENA_MAX"),
    "mmap_threshold": (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
    "trim_threshold": (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
}


def tune_malloc(
    arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int | None = None
) -> dict[str, bool]:
    """Cap the arenas, fix the mmap threshold and (if given) the trim threshold, each unless its
    environment variable (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``) is set; says which were set here. Nothing is set without glibc.
    The defaults are the batch path's."""
    values = {"arenas": arenas, "mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    done = {name: False for name, value in values.items() if value is not None}
    mallopt = _mallopt()
    if mallopt is None:
        return done
    for name in done:
        parameter, variable = _PARAMETERS[name]
        if not os.environ.get(variable):
            done[name] = bool(mallopt(parameter, values[name]))
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
