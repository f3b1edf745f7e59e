"""The backend interface: score a batch of patch pairs, and close."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """Maps (N, C, P, P) before/after patches to (N,) float32 change probabilities."""

    name: str

    def infer(self, before: np.ndarray, after: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class FunctionBackend:
    """A backend made from a plain function: for tests and for wrapping other engines."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], name: str = "function"):
        self.fn = fn
        self.name = name

    def infer(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(before, after), dtype=np.float32)

    def close(self) -> None:
        pass

    def __enter__(self) -> FunctionBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
