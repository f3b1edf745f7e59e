"""serving.memory: glibc's malloc arenas capped for the batch path, unless the environment says."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = "from serving.memory import limit_arenas; print(limit_arenas())"


def probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's mallopt is Linux's",
)
def test_arenas_are_capped_unless_the_environment_sets_them() -> None:
    assert probe() == "True"
    assert probe(MALLOC_ARENA_MAX="4") == "False"  # the images' setting wins
