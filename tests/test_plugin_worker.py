"""The step worker runs the callback's deferred jobs in order, off the training thread, and counts their faults."""

from __future__ import annotations

import threading

import numpy as np
from forkwatch.plugin import metrics
from forkwatch.plugin.monitor import Faults
from forkwatch.plugin.worker import StepWorker


def test_jobs_run_in_order_on_another_thread_and_return_values():
    faults = Faults()
    worker = StepWorker(faults.guard)
    seen: list[tuple[int, str]] = []
    jobs = [worker.submit("w", lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(5)]
    assert [j.result(10) for j in jobs] == list(range(5))
    assert [i for i, _ in seen] == list(range(5))
    assert all(name != threading.current_thread().name for _, name in seen)
    worker.close()


def test_a_failing_job_is_counted_and_later_jobs_still_run():
    faults = Faults()
    worker = StepWorker(faults.guard)
    bad = worker.submit("records", lambda: 1 / 0)
    good = worker.submit("records", lambda: "ok")
    assert good.result(10) == "ok" and bad.result(10) is None
    assert faults.counts["records"] == 1
    worker.close()


def test_close_runs_queued_jobs_and_later_submits_run_inline():
    worker = StepWorker(Faults().guard)
    gate = threading.Event()
    done: list[int] = []
    worker.submit("w", gate.wait)
    worker.submit("w", lambda: done.append(1))
    gate.set()
    worker.close()
    assert done == [1]
    assert worker.submit("w", lambda: 7).result(0) == 7  # closed: no thread left, so it runs here
    worker.close()  # twice is fine


def test_percentiles_equal_numpy_linear_quantiles_bit_for_bit():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 4097):
        values = rng.standard_normal(n).astype(np.float32)
        expected = np.quantile(values.astype(np.float64), metrics.PERCENTILES)
        assert metrics.percentiles(values) == expected.tolist()
