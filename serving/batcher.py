"""The dynamic batcher shared by every request to one model.

Requests submit all the patch pairs of an image pair as one job; worker threads (one per model
instance, each with its own backend session) pack patches from the front of the queue, across jobs,
into batches of at most ``max_batch_size``, waiting at most ``max_queue_delay_us`` for a batch to
fill. The queue is bounded in patches (``max_queue_size``): a job that does not fit is refused at
once with :class:`Overloaded`, so latency never grows without bound. Jobs whose deadline has passed
or that were cancelled are dropped before inference. The knobs are named after Triton's.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.errors import DeadlineExceeded, InvalidInput, Overloaded, RareChangeError

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(eq=False)
class Job:
    """The patches of one request; filled in by whichever batches its patches land in."""

    before: np.ndarray  # (N, C, P, P)
    after: np.ndarray  # (N, C, P, P)
    deadline: float | None  # time.monotonic() seconds, None = no deadline
    enqueued: float = field(default_factory=time.monotonic)
    probabilities: np.ndarray = field(init=False)
    remaining: int = field(init=False)
    error: BaseException | None = None
    cancelled: bool = False
    first_batch_at: float | None = None
    inference_s: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.probabilities = np.full(len(self.before), np.nan, np.float32)
        self.remaining = len(self.before)

    @property
    def queue_s(self) -> float:
        return (self.first_batch_at or time.monotonic()) - self.enqueued

    def cancel(self) -> None:
        """The client went away: its remaining patches are skipped, not inferred."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> np.ndarray:
        if not self.done.wait(timeout):
            self.cancel()
            raise DeadlineExceeded("the deadline passed while the patches were queued or scored")
        if self.error is not None:
            raise self.error
        return self.probabilities


class DynamicBatcher:
    def __init__(
        self,
        instances: Sequence[InferFn],
        *,
        max_batch_size: int = 256,
        max_queue_delay_us: int = 2000,
        max_queue_size: int = 65536,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        on_queued: Callable[[float], None] | None = None,
    ) -> None:
        if not instances:
            raise ValueError("the batcher needs at least one model instance")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
        if max_queue_size < max_batch_size:
            raise ValueError(
                f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})"
            )
        self.instances = list(instances)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.max_queue_size = max_queue_size
        self.name = name
        # metrics hooks, plain callables so that the batcher needs no metrics library:
        self.on_batch = on_batch  # (batch size, inference seconds) per successful batch
        self.on_queued = on_queued  # (seconds queued) per job, when its first patch is batched
        self._queue: collections.deque[list] = collections.deque()  # [job, next index]
        self._queued = 0  # patches waiting
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> DynamicBatcher:
        for i, fn in enumerate(self.instances):
            t = threading.Thread(
                target=self._worker, args=(fn,), name=f"{self.name}-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def __enter__(self) -> DynamicBatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def queued_patches(self) -> int:
        return self._queued

    def warm_up(self, patch_shape: Sequence[int], dtype: str | np.dtype) -> None:
        """Run one full batch of zero patches through every instance, bypassing the queue and
        the metrics hooks: the first calls of a session allocate and tune, so they must not land
        on a client's request (nor be counted as traffic)."""
        zeros = np.zeros((self.max_batch_size, *patch_shape), dtype=dtype)
        for i, infer in enumerate(self.instances):
            t0 = time.perf_counter()
            out = np.asarray(infer(zeros, zeros)).reshape(-1)
            if len(out) != len(zeros):
                raise RuntimeError(
                    f"{self.name}: warm-up returned {len(out)} outputs for {len(zeros)} inputs"
                )
            spent = time.perf_counter() - t0
            log.info("%s instance %d warmed up: %d patches, %.3f s", self.name, i, len(out), spent)

    # ------------------------------------------------------------------ submit
    def check_room(self, n: int) -> None:
        """Refuse (Overloaded) a job of ``n`` patches the queue cannot hold now, before the caller
        spends CPU on cutting them out: under overload that work is what refused calls cost."""
        with self._cond:
            self._refuse_unless_room(n)

    def _refuse_unless_room(self, n: int) -> None:
        if self._stopping:
            raise Overloaded("the server is shutting down; retry on another replica")
        if self._queued + n > self.max_queue_size:
            raise Overloaded(
                f"queue full ({self._queued} of {self.max_queue_size} patches waiting); "
                "retry with backoff"
            )

    def submit(self, before: np.ndarray, after: np.ndarray, deadline: float | None = None) -> Job:
        """Queue one request's patches, or refuse at once when the queue cannot hold them."""
        n = len(before)
        if n != len(after):
            raise InvalidInput(f"{n} before patches but {len(after)} after patches")
        if n > self.max_queue_size:
            raise InvalidInput(
                f"the pair needs {n} patches, more than the queue holds ({self.max_queue_size}); "
                "use a larger stride, a smaller image, or the streaming/batch scoring path"
            )
        job = Job(before, after, deadline)
        if n == 0:
            job.done.set()
            return job
        with self._cond:
            self._refuse_unless_room(n)
            self._queue.append([job, 0])
            self._queued += n
            self._cond.notify()
        return job

    # ------------------------------------------------------------------ workers
    def _take(self) -> list[tuple[Job, int, int]] | None:
        """Block until a batch is ready; return its (job, start, stop) slices, None to exit."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            oldest = self._queue[0][0].enqueued
            flush_at = oldest + self.max_queue_delay_us / 1e6
            while self._queued < self.max_batch_size and not self._stopping:
                left = flush_at - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            slices: list[tuple[Job, int, int]] = []
            room = self.max_batch_size
            now = time.monotonic()
            while self._queue and room > 0:
                entry = self._queue[0]
                job, start = entry
                failed = job.error is not None  # an earlier batch of this job already failed
                if failed or job.cancelled or (job.deadline is not None and now > job.deadline):
                    self._queue.popleft()
                    self._queued -= len(job.before) - start
                    self._finish_dropped(job)
                    continue
                stop = min(len(job.before), start + room)
                slices.append((job, start, stop))
                room -= stop - start
                self._queued -= stop - start
                if stop == len(job.before):
                    self._queue.popleft()
                else:
                    entry[1] = stop
            if self._queue:
                self._cond.notify()  # more work: wake another instance
            return slices

    @staticmethod
    def _public_error(exc: BaseException) -> BaseException:
        """A RareChangeError passes as is; anything else is 'inference failed', caused by it."""
        if isinstance(exc, RareChangeError):
            return exc
        err = RuntimeError("inference failed")
        err.__cause__ = exc
        return err

    def _isolate(self, infer: InferFn, slices: list[tuple[Job, int, int]]) -> None:
        for job, a, b in slices:
            t0 = time.perf_counter()
            try:
                out = np.asarray(infer(job.before[a:b], job.after[a:b]), dtype=np.float32)
                out = out.reshape(-1)
                if len(out) != b - a:
                    raise RuntimeError(f"backend returned {len(out)} outputs for {b - a} inputs")
            except BaseException as exc:
                log.exception("inference failed for %d patches of one request", b - a)
                job.error = job.error or self._public_error(exc)
                job.done.set()
                continue
            spent = time.perf_counter() - t0
            self._notify(self.on_batch, b - a, spent)  # a retry is an execution like any other
            job.probabilities[a:b] = out
            job.inference_s += spent
            job.remaining -= b - a
            if job.remaining == 0 or job.error is not None:
                job.done.set()

    @staticmethod
    def _finish_dropped(job: Job) -> None:
        if job.error is None:
            job.error = (
                DeadlineExceeded("the deadline passed before the patches were scored")
                if not job.cancelled
                else DeadlineExceeded("the request was cancelled")
            )
        job.done.set()

    @staticmethod
    def _notify(callback: Callable[..., None] | None, *args: float) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # metrics must never take a worker down
            log.exception("metrics callback %r failed", callback)

    def _worker(self, infer: InferFn) -> None:
        while True:
            slices = self._take()
            if slices is None:
                return
            if not slices:
                continue
            now = time.monotonic()
            for job, _, _ in slices:
                if job.first_batch_at is None:
                    job.first_batch_at = now
                    self._notify(self.on_queued, now - job.enqueued)
            if len(slices) == 1:  # one request's patches: a contiguous view, no copy
                job, a, b = slices[0]
                before, after = job.before[a:b], job.after[a:b]
            else:
                before = np.concatenate([j.before[a:b] for j, a, b in slices])
                after = np.concatenate([j.after[a:b] for j, a, b in slices])
            t0 = time.perf_counter()
            try:
                out = np.asarray(infer(before, after), dtype=np.float32).reshape(-1)
                if len(out) != len(before):
                    raise RuntimeError(
                        f"backend returned {len(out)} outputs for {len(before)} inputs"
                    )
            except BaseException as exc:
                log.exception("inference failed for a batch of %d patches", len(before))
                if len({id(job) for job, _, _ in slices}) > 1:
                    # requests that shared the batch are retried alone, so that one bad request
                    # fails only itself
                    self._isolate(infer, slices)
                    continue
                job = slices[0][0]
                job.error = job.error or self._public_error(exc)
                job.done.set()
                continue
            spent = time.perf_counter() - t0
            self._notify(self.on_batch, len(before), spent)
            offset = 0
            for job, a, b in slices:
                job.probabilities[a:b] = out[offset : offset + b - a]
                offset += b - a
                job.inference_s += spent
                job.remaining -= b - a
                if job.remaining == 0 or job.error is not None:
                    job.done.set()
