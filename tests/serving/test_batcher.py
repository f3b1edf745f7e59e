"""serving.batcher: packing across jobs, bounds, deadlines, cancellation, failures, shutdown.

Synchronisation is by events, barriers and joins only: a "gate" job blocks the single worker
inside infer so that what is queued behind it is known exactly when the gate opens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from serving.batcher import DynamicBatcher, Job
from serving.errors import DeadlineExceeded, InvalidInput, Overloaded, RareChangeError

WAIT = 10.0  # seconds: only ever reached when a test is about to fail


def patches(values: list[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 2, 2) before/after whose [:, 0, 0, 0] carries the value infer echoes back."""
    values = np.asarray(values, np.float32)
    before = np.zeros((len(values), 1, 2, 2), np.float32)
    before[:, 0, 0, 0] = values
    return before, before + 100


class Model:
    """An infer function that echoes before[:, 0, 0, 0] and records every batch it sees.

    ``gate``: the first call signals ``entered`` and then blocks until ``release`` is set.
    ``fail_on``: a value whose presence in a batch makes that batch raise ``error``.
    """

    def __init__(
        self,
        gate: bool = False,
        fail_on: float | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.batches: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.gate = gate
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on
        self.error = error or ValueError("boom at /secret/path/model.onnx")

    def __call__(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        values = before[:, 0, 0, 0].copy()
        assert np.array_equal(after[:, 0, 0, 0], values + 100), "before/after misaligned"
        with self.lock:
            first = not self.batches
            self.batches.append(values)
        if self.gate and first:
            self.entered.set()
            assert self.release.wait(WAIT), "the test never opened the gate"
        if self.fail_on is not None and (values == self.fail_on).any():
            raise self.error
        return values

    @property
    def sizes(self) -> list[int]:
        with self.lock:
            return [len(b) for b in self.batches]

    @property
    def seen(self) -> set[float]:
        with self.lock:
            return {float(v) for b in self.batches for v in b}


@pytest.fixture
def gated() -> Iterator[tuple[Model, DynamicBatcher]]:
    """One worker, held inside infer by a one-patch gate job until the test opens the gate."""
    model = Model(gate=True)
    batcher = DynamicBatcher([model], max_batch_size=8, max_queue_delay_us=1000, max_queue_size=16)
    batcher.start()
    gate_job = batcher.submit(*patches([-5.0]))
    assert model.entered.wait(WAIT)
    yield model, batcher
    model.release.set()
    batcher.stop(WAIT)
    assert gate_job.done.is_set()


def _result(job: Job) -> np.ndarray:
    return job.result(timeout=WAIT)


# --------------------------------------------------------------------------------------------
# packing


def test_jobs_share_batches_and_get_their_own_results(gated: tuple[Model, DynamicBatcher]) -> None:
    model, batcher = gated
    a = batcher.submit(*patches([1, 2, 3]))
    b = batcher.submit(*patches([10, 20]))
    c = batcher.submit(*patches([100, 200, 300, 400]))
    assert batcher.queued_patches == 9
    model.release.set()
    assert np.array_equal(_result(a), [1, 2, 3])
    assert np.array_equal(_result(b), [10, 20])
    assert np.array_equal(_result(c), [100, 200, 300, 400])
    assert _result(a).dtype == np.float32
    # gate, then one full batch packed from all three jobs in queue order, then c's last patch
    assert model.sizes == [1, 8, 1]
    assert np.array_equal(model.batches[1], [1, 2, 3, 10, 20, 100, 200, 300])
    assert np.array_equal(model.batches[2], [400])
    assert batcher.queued_patches == 0


def test_job_larger_than_a_batch_is_split_in_order() -> None:
    model = Model()
    with DynamicBatcher([model], max_batch_size=4, max_queue_delay_us=0) as batcher:
        job = batcher.submit(*patches(np.arange(10)))
        assert np.array_equal(_result(job), np.arange(10))
    assert model.sizes == [4, 4, 2]
    assert np.array_equal(np.concatenate(model.batches), np.arange(10))


def test_concurrent_submitters_respect_max_batch_size() -> None:
    model = Model()
    sizes_seen: list[int] = []
    n_threads, jobs_each = 8, 25
    results: dict[int, np.ndarray] = {}
    expected: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    batcher = DynamicBatcher(
        [model],
        max_batch_size=7,
        max_queue_delay_us=200,
        max_queue_size=10_000,
        on_batch=lambda n, s: sizes_seen.append(n),
    )

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        try:
            for i in range(jobs_each):
                key = k * 1000 + i
                values = key * 100 + np.arange(rng.integers(1, 20), dtype=np.float32)
                expected[key] = values
                results[key] = _result(batcher.submit(*patches(values)))
        except BaseException as exc:
            errors.append(exc)

    with batcher:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
    assert not errors
    assert len(results) == n_threads * jobs_each
    for key, values in expected.items():
        assert np.array_equal(results[key], values), key
    assert max(model.sizes) <= 7
    assert sizes_seen == model.sizes
    assert sum(model.sizes) == sum(len(v) for v in expected.values())


def test_two_instances_are_both_used() -> None:
    """Each instance's first call waits at a barrier only the other instance can pass."""
    barrier = threading.Barrier(2, timeout=WAIT)
    calls = [0, 0]
    scored = [0, 0]

    def instance(k: int):
        def infer(before: np.ndarray, after: np.ndarray) -> np.ndarray:
            calls[k] += 1
            scored[k] += len(before)
            if calls[k] == 1:
                barrier.wait()
            return before[:, 0, 0, 0].copy()

        return infer

    with DynamicBatcher(
        [instance(0), instance(1)], max_batch_size=2, max_queue_delay_us=0
    ) as batcher:
        jobs = [batcher.submit(*patches(np.arange(i, i + 5))) for i in range(0, 200, 5)]
        for i, job in zip(range(0, 200, 5), jobs, strict=True):
            assert np.array_equal(_result(job), np.arange(i, i + 5))
    assert calls[0] >= 1 and calls[1] >= 1
    assert sum(scored) == 200


# --------------------------------------------------------------------------------------------
# admission


def test_queue_full_is_refused_at_once(gated: tuple[Model, DynamicBatcher]) -> None:
    model, batcher = gated  # max_queue_size 16, the worker is busy with the gate
    big = batcher.submit(*patches(np.arange(12)))
    small = batcher.submit(*patches([50, 51, 52, 53]))
    assert batcher.queued_patches == 16
    t0 = time.monotonic()
    with pytest.raises(Overloaded, match="queue full"):
        batcher.submit(*patches([99]))
    assert time.monotonic() - t0 < 1.0
    assert batcher.queued_patches == 16
    with pytest.raises(Overloaded, match="queue full"):  # the check callers make before tiling
        batcher.check_room(1)
    batcher.check_room(0)
    model.release.set()
    assert np.array_equal(_result(big), np.arange(12))
    assert np.array_equal(_result(small), [50, 51, 52, 53])
    assert 99.0 not in model.seen
    # room again once the queue drained
    assert np.array_equal(_result(batcher.submit(*patches([99]))), [99])
    batcher.check_room(16)


def test_job_larger_than_the_queue_is_invalid() -> None:
    batcher = DynamicBatcher([Model()], max_batch_size=4, max_queue_size=8)
    with pytest.raises(InvalidInput, match="more than the queue holds"):
        batcher.submit(*patches(np.arange(9)))


def test_mismatched_before_after_is_invalid() -> None:
    batcher = DynamicBatcher([Model()], max_batch_size=4, max_queue_size=8)
    before, after = patches([1, 2, 3])
    with pytest.raises(InvalidInput, match="3 before patches but 2 after"):
        batcher.submit(before, after[:2])


def test_zero_patch_job_completes_immediately() -> None:
    batcher = DynamicBatcher([Model()], max_batch_size=4)  # not even started
    job = batcher.submit(*patches([]))
    assert job.done.is_set()
    out = job.result(timeout=0)
    assert out.shape == (0,) and out.dtype == np.float32


# --------------------------------------------------------------------------------------------
# deadlines and cancellation


def test_expired_deadline_is_dropped_before_inference(
    gated: tuple[Model, DynamicBatcher],
) -> None:
    model, batcher = gated
    late = batcher.submit(*patches([7, 8]), deadline=time.monotonic() - 1.0)
    on_time = batcher.submit(*patches([9]), deadline=time.monotonic() + 60.0)
    model.release.set()
    assert late.done.wait(WAIT)
    with pytest.raises(DeadlineExceeded, match="before the patches were scored"):
        late.result(timeout=0)
    assert np.array_equal(_result(on_time), [9])
    assert not {7.0, 8.0} & model.seen


def test_expired_deadline_without_a_busy_worker() -> None:
    model = Model()
    with DynamicBatcher([model], max_batch_size=4) as batcher:
        job = batcher.submit(*patches([7]), deadline=time.monotonic() - 1.0)
        assert job.done.wait(WAIT)
        with pytest.raises(DeadlineExceeded):
            job.result(timeout=0)
    assert model.sizes == []


def test_cancelled_job_is_not_inferred(gated: tuple[Model, DynamicBatcher]) -> None:
    model, batcher = gated
    gone = batcher.submit(*patches([31, 32, 33]))
    kept = batcher.submit(*patches([41, 42]))
    gone.cancel()
    model.release.set()
    assert np.array_equal(_result(kept), [41, 42])
    assert gone.done.wait(WAIT)
    with pytest.raises(DeadlineExceeded, match="cancelled"):
        gone.result(timeout=0)
    assert not {31.0, 32.0, 33.0} & model.seen
    assert batcher.queued_patches == 0


def test_result_timeout_cancels_the_rest(gated: tuple[Model, DynamicBatcher]) -> None:
    model, batcher = gated
    job = batcher.submit(*patches([61, 62]))
    with pytest.raises(DeadlineExceeded, match="while the patches were queued"):
        job.result(timeout=0)
    assert job.cancelled
    model.release.set()
    assert job.done.wait(WAIT)
    assert 61.0 not in model.seen


# --------------------------------------------------------------------------------------------
# failures


def test_failing_batch_fails_only_the_bad_request(gated: tuple[Model, DynamicBatcher]) -> None:
    model, batcher = gated
    model.fail_on = -1.0
    a = batcher.submit(*patches([1, 2]))
    poison = batcher.submit(*patches([-1.0]))
    model.release.set()
    # they shared a batch that failed; each is retried alone, so only the poison fails
    assert np.array_equal(_result(a), [1, 2])
    with pytest.raises(RuntimeError) as info:
        _result(poison)
    err = info.value
    assert type(err) is RuntimeError and not isinstance(err, RareChangeError)
    assert str(err) == "inference failed"  # nothing of the backend's message leaks
    assert isinstance(err.__cause__, ValueError)
    assert "secret" in str(err.__cause__)
    # the worker survived and later jobs succeed
    later = batcher.submit(*patches([3, 4]))
    assert np.array_equal(_result(later), [3, 4])
    assert model.sizes == [1, 3, 2, 1, 2]


def test_a_failing_batch_leaves_other_batches_alone() -> None:
    model = Model(fail_on=-1.0)
    with DynamicBatcher([model], max_batch_size=2, max_queue_delay_us=0) as batcher:
        # one job over three batches; only the middle batch fails, the job fails once
        job = batcher.submit(*patches([1, 2, -1, 4, 5, 6]))
        with pytest.raises(RuntimeError, match="inference failed"):
            _result(job)
        ok = batcher.submit(*patches([7]))
        assert np.array_equal(_result(ok), [7])


def test_rarechange_errors_from_infer_pass_through() -> None:
    model = Model(fail_on=-1.0, error=Overloaded("the accelerator is out of memory"))
    with DynamicBatcher([model], max_batch_size=4, max_queue_delay_us=0) as batcher:
        job = batcher.submit(*patches([-1.0]))
        with pytest.raises(Overloaded, match="out of memory") as info:
            _result(job)
    assert info.value is model.error
    assert info.value.__cause__ is not info.value  # no self-referential cause


@pytest.mark.parametrize("extra", [1, -1])
def test_wrong_number_of_outputs_fails_the_jobs(extra: int) -> None:
    def infer(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        return np.zeros(len(before) + extra, np.float32)

    with DynamicBatcher([infer], max_batch_size=4, max_queue_delay_us=0) as batcher:
        job = batcher.submit(*patches([1, 2, 3]))
        with pytest.raises(RuntimeError, match="inference failed") as info:
            _result(job)
    assert "outputs for 3 inputs" in str(info.value.__cause__)


def test_infer_output_shape_n_by_1_is_accepted() -> None:
    def infer(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        return before[:, 0, 0, :1].astype(np.float64)  # (N, 1) float64

    with DynamicBatcher([infer], max_batch_size=4, max_queue_delay_us=0) as batcher:
        out = _result(batcher.submit(*patches([1, 2, 3, 4, 5])))
    assert out.dtype == np.float32 and np.array_equal(out, [1, 2, 3, 4, 5])


# --------------------------------------------------------------------------------------------
# shutdown


def test_stop_drains_the_queue_then_joins(gated: tuple[Model, DynamicBatcher]) -> None:
    model, batcher = gated
    jobs = [batcher.submit(*patches([i, i + 0.5])) for i in range(5)]
    stopper = threading.Thread(target=batcher.stop, args=(WAIT,))
    stopper.start()
    with batcher._cond:  # stop() sets the flag and notifies under this condition
        assert batcher._cond.wait_for(lambda: batcher._stopping, WAIT)
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit(*patches([1]))
    assert batcher.queued_patches == 10  # still queued when stop() began
    model.release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    for i, job in enumerate(jobs):
        assert job.done.is_set()
        assert np.array_equal(job.result(timeout=0), [i, i + 0.5])
    assert batcher._threads == []


def test_context_manager_stops_workers() -> None:
    with DynamicBatcher([Model(), Model()], max_batch_size=2, name="ctx") as batcher:
        threads = list(batcher._threads)
        assert [t.name for t in threads] == ["ctx-0", "ctx-1"]
    assert not any(t.is_alive() for t in threads)


# --------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us must be >= 0, got -1"),
        (
            {"max_batch_size": 8, "max_queue_size": 7},
            r"max_queue_size \(7\) must be >= max_batch_size \(8\)",
        ),
    ],
)
def test_constructor_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DynamicBatcher([Model()], **kwargs)


def test_constructor_needs_an_instance() -> None:
    with pytest.raises(ValueError, match="at least one model instance"):
        DynamicBatcher([])


def test_rest_of_a_failed_job_is_not_inferred() -> None:
    seen: list[float] = []
    started = threading.Event()
    release = threading.Event()

    def infer(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        seen.extend(before[:, 0, 0, 0].tolist())
        if before[0, 0, 0, 0] == -1:
            started.set()
            release.wait(5)
            raise RuntimeError("boom")
        return before[:, 0, 0, 0]

    with DynamicBatcher([infer], max_batch_size=2, max_queue_delay_us=0) as batcher:
        job = batcher.submit(*patches([-1, 2, 3, 4, 5, 6]))
        assert started.wait(5)
        release.set()
        with pytest.raises(RuntimeError, match="inference failed"):
            _result(job)
        ok = batcher.submit(*patches([7]))
        assert np.array_equal(_result(ok), [7])
    assert 5.0 not in seen and 6.0 not in seen, seen


def test_a_failing_metrics_callback_does_not_stop_the_worker() -> None:
    def on_batch(size: int, seconds: float) -> None:
        raise ValueError("metrics broke")

    echo = lambda b, a: b[:, 0, 0, 0]  # noqa: E731
    with DynamicBatcher([echo], max_batch_size=2, max_queue_delay_us=0, on_batch=on_batch) as b:
        for value in (1.0, 2.0, 3.0):
            assert np.array_equal(_result(b.submit(*patches([value]))), [value])


def test_on_queued_reports_each_job_once_and_on_batch_each_batch(
    gated: tuple[Model, DynamicBatcher],
) -> None:
    model, batcher = gated
    queued: list[float] = []
    batches: list[int] = []
    batcher.on_queued = queued.append
    batcher.on_batch = lambda n, s: batches.append(n)
    # the gate job is already in the model; a 12-patch job spans two batches of at most 8
    jobs = [batcher.submit(*patches(list(range(10, 22)))), batcher.submit(*patches([5]))]
    model.release.set()
    for job in jobs:
        _result(job)
    assert len(queued) == 2 and all(q >= 0 for q in queued)  # not the gate job: batched before
    assert batches == model.sizes == [1, 8, 5]  # the gate, then 13 patches in batches of <= 8


def test_warm_up_runs_one_full_batch_on_every_instance_and_reports_nothing() -> None:
    calls: list[list[tuple[tuple[int, ...], str, bool]]] = [[], []]

    def instance(i: int):
        def infer(before: np.ndarray, after: np.ndarray) -> np.ndarray:
            calls[i].append((before.shape, before.dtype.name, not before.any() and not after.any()))
            return np.zeros(len(before), np.float32)

        return infer

    seen: list[float] = []
    batcher = DynamicBatcher(
        [instance(0), instance(1)],
        max_batch_size=4,
        on_batch=lambda n, s: seen.append(n),
        on_queued=seen.append,
    )
    batcher.warm_up((3, 2, 2), "uint8")  # before start: it needs no worker thread
    assert calls == [[((4, 3, 2, 2), "uint8", True)]] * 2
    assert seen == []
