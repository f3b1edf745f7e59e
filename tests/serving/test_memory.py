"""serving.memory: glibc's malloc tuned for the batch path and the server, unless the environment
says."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's mallopt is Linux's",
)

# glibc's own account of the heap, for the probes below
MALLINFO = """
import ctypes, json, resource, sys
import numpy as np
from serving.memory import SERVING, tune_malloc

class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
"""

# a freed 4 MB array, then a 1 MB one: is the 1 MB one mmapped (given back when freed)?
PROBE = (
    MALLINFO
    + """
done = tune_malloc() if sys.argv[1] == "tune" else {}
big = np.ones(4 << 20, np.uint8)
del big  # untuned glibc raises its mmap threshold to 4 MB here
held = libc.mallinfo2().hblkhd
small = np.ones(1 << 20, np.uint8)
print(json.dumps({"set": done, "mmapped": libc.mallinfo2().hblkhd - held >= (1 << 20)}))
"""
)


def probe(mode: str, script: str = PROBE, **env: str) -> dict:
    """Run ``script`` with ``mode`` in a fresh interpreter whose malloc variables are only
    ``env``'s, and return the JSON it prints."""
    keep = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    clean = {k: v for k, v in os.environ.items() if k not in keep}
    done = subprocess.run(
        [sys.executable, "-c", "import ctypes.util\n" + script, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_block_sized_arrays_are_given_back_once_tuned() -> None:
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33")
    # glibc's own habit, the reason for the tuning: the second array comes from the heap
    assert probe("plain")["mmapped"] is False
    tuned = probe("tune")
    assert tuned == {"set": {"arenas": True, "mmap_threshold": True}, "mmapped": True}


def test_the_environment_wins() -> None:
    assert probe("tune", MALLOC_ARENA_MAX="4")["set"] == {"arenas": False, "mmap_threshold": True}
    set_by_env = probe("tune", MALLOC_MMAP_THRESHOLD_="262144")
    assert set_by_env["set"] == {"arenas": True, "mmap_threshold": False}
    assert set_by_env["mmapped"] is True  # glibc read the variable itself


# request-sized arrays, allocated, written and freed four times: how many page faults does each
# round after the first take, and is an array past the server's threshold still mmapped?
FAULTS = (
    MALLINFO
    + """
done = tune_malloc(**SERVING) if sys.argv[1] == "serving" else tune_malloc()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = np.ones(4 << 20, np.uint8), np.ones(4 << 20, np.uint8)  # a request's patch pairs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del a, b
held = libc.mallinfo2().hblkhd
huge = np.ones(40 << 20, np.uint8)
print(json.dumps({"set": done, "faults": faults, "huge_mmapped": libc.mallinfo2().hblkhd > held}))
"""
)


def test_the_server_setting_reuses_request_sized_pages() -> None:
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33")
    pages = (8 << 20) // 4096
    batch = probe("batch", FAULTS)  # the batch path's setting: every round maps and faults afresh
    assert all(f > pages // 4 for f in batch["faults"]), batch
    served = probe("serving", FAULTS)
    assert served["set"] == {"arenas": True, "mmap_threshold": True, "trim_threshold": True}
    assert all(f < pages // 20 for f in served["faults"][1:]), served  # the same pages again
    assert served["huge_mmapped"]  # past 32 MB, still given back when freed
    by_env = probe("serving", FAULTS, MALLOC_TRIM_THRESHOLD_="0")
    assert by_env["set"]["trim_threshold"] is False  # the environment wins
    assert all(f > pages // 4 for f in by_env["faults"][1:]), by_env  # and trims every round
