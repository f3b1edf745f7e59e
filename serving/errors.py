"""The errors rarechange raises on purpose.

Every deliberate failure is a subclass of :class:`RareChangeError`, so the gRPC layer can map
them to status codes in one place and treat anything else as a bug (INTERNAL). Each class
also derives from the closest built-in exception, so callers that know nothing about
rarechange (``except ValueError``, ``except TimeoutError``) still behave sensibly.

Messages are shown to clients: say what was wrong and what to do next, never leak paths or
stack traces.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "DeadlineExceeded",
    "InvalidInput",
    "ModelLoadError",
    "ModelNotFound",
    "Overloaded",
    "RareChangeError",
]


class RareChangeError(Exception):
    """Root of every error rarechange raises on purpose."""


class InvalidInput(RareChangeError, ValueError):
    """The request itself is wrong (bad bytes, shapes, dtypes); retrying it unchanged won't help.

    Maps to INVALID_ARGUMENT.
    """


class ModelNotFound(RareChangeError, LookupError):
    """The client asked for a model name or version this server does not serve.

    Maps to NOT_FOUND.
    """


class ModelLoadError(RareChangeError, OSError):
    """A model artifact is missing, corrupt or incompatible.

    At start-up the server refuses to start; at runtime (reload) it maps to FAILED_PRECONDITION.
    """


class Overloaded(RareChangeError, RuntimeError):
    """The server is at capacity (queue full, memory budget); the client should back off and retry.

    Maps to RESOURCE_EXHAUSTED.
    """


class DeadlineExceeded(RareChangeError, TimeoutError):
    """The work could not finish within the client's deadline.

    Maps to DEADLINE_EXCEEDED.
    """


class BackendUnavailable(RareChangeError, ConnectionError):
    """An inference backend (e.g. a remote Triton) is unreachable; retrying later may succeed.

    Maps to UNAVAILABLE.
    """
