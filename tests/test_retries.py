"""Retries: retry / retry_count / retry_interval, on a real in-process worker."""

from __future__ import annotations

import pytest

from kickq_celery import JobFailed, Kickq, Response
from kickq_celery.testing import wait_for

# Redis TIME and the worker's ETA clock are the same machine clock, but the countdown
# is rounded through floats and timers; allow this much when checking lower bounds.
CLOCK_SLACK = 0.05


def _final(kq, job_id, timeout=20.0):
    """The record once the job reached a final state."""
    return wait_for(lambda: (r := kq.get(job_id)).complete and r, timeout, 0.05, f"job {job_id} to finish")


def _gaps(record):
    starts = [run.started_at for run in record.runs]
    return [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]


def test_always_failing_job_runs_one_plus_retry_count_times(kickq, kickq_worker):
    @kickq.process("broken")
    def broken(job):
        raise RuntimeError(f"boom on run {job.run}")

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("broken", {"x": 1}, tombstone=True, retry=True, retry_count=2, retry_interval=0)

    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    exc = info.value
    assert type(exc) is JobFailed
    assert exc.job_id == job.id
    assert exc.error == "RuntimeError: boom on run 3"  # the last run's error
    assert exc.has_timeout is False

    record = _final(kickq, job.id)
    assert record.state == "fail"
    assert record.success is False
    assert [run.number for run in record.runs] == [1, 2, 3]
    assert [run.state for run in record.runs] == ["fail"] * 3
    assert [run.error for run in record.runs] == [f"RuntimeError: boom on run {n}" for n in (1, 2, 3)]
    assert record.last_error == "RuntimeError: boom on run 3"
    # settled once: waiting again gives the same rejection, not a new outcome
    with pytest.raises(JobFailed) as again:
        job.promise.wait()
    assert again.value is exc
    stats = kickq.stats("broken").names["broken"]
    assert (stats.retried, stats.failed, stats.succeeded) == (2, 1, 0)


def test_fails_twice_then_succeeds(kickq, kickq_worker):
    seen = []

    @kickq.process("flaky")
    def flaky(job):
        seen.append((job.run, [run.state for run in job.runs]))
        if job.run < 3:
            raise ValueError(f"not yet ({job.run})")
        return {"ok": True, "run": job.run}

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("flaky", "d", tombstone=True, retry=True, retry_count=3, retry_interval=0)

    response = job.promise.wait()
    assert response == Response(job.id, "flaky", True, "success", {"ok": True, "run": 3})
    # the handler sees its run number and the earlier runs
    assert seen == [(1, []), (2, ["fail"]), (3, ["fail", "fail"])]

    record = _final(kickq, job.id)
    assert record.state == "success"
    assert record.result == {"ok": True, "run": 3}
    assert [(run.number, run.state) for run in record.runs] == [(1, "fail"), (2, "fail"), (3, "success")]
    assert record.runs[0].error == "ValueError: not yet (1)"
    assert record.runs[2].error is None


def test_promise_does_not_settle_while_a_retry_is_pending(kickq, kickq_worker):
    @kickq.process("second-time-lucky")
    def lucky(job):
        if job.run == 1:
            raise RuntimeError("first run fails")
        return job.run

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("second-time-lucky", tombstone=True, retry=True, retry_count=1, retry_interval=1.5)

    # the job shows `retry` while it waits for its retry
    record = wait_for(lambda: (r := kickq.get(job.id)).state == "retry" and r, 10, 0.02, "state retry")
    assert [(run.number, run.state) for run in record.runs] == [(1, "fail")]
    assert record.complete is False
    assert record.last_error == "RuntimeError: first run fails"
    # the retry is scheduled retry_interval after the failed run ended
    run = record.runs[0]
    ended = run.started_at.timestamp() + run.duration
    assert record.scheduled_for.timestamp() == pytest.approx(ended + 1.5, abs=0.01)
    # a failed run that will be retried does not settle the promise
    assert job.promise.async_result.ready() is False
    assert kickq.get(job.id).state == "retry"  # still waiting, so the check above was meaningful

    assert job.promise.wait().result == 2
    assert job.promise.async_result.ready() is True
    record = _final(kickq, job.id)
    assert [run.state for run in record.runs] == ["fail", "success"]


def test_list_interval_one_per_retry_last_repeats(kickq, kickq_worker):
    @kickq.process("list-interval")
    def always_fails(job):
        raise RuntimeError("no")

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("list-interval", retry=True, retry_count=3, retry_interval=[0.5, 1.5])
    assert kickq.get(job.id).flags["retry_interval"] == [0.5, 1.5]

    record = _final(kickq, job.id)
    assert record.state == "fail"
    assert len(record.runs) == 4
    gaps = _gaps(record)
    assert gaps[0] >= 0.5 - CLOCK_SLACK
    # the first retry used 0.5, not the second entry (leaves ~1 s for worker latency)
    assert gaps[0] < 1.5 - CLOCK_SLACK
    assert gaps[1] >= 1.5 - CLOCK_SLACK
    assert gaps[2] >= 1.5 - CLOCK_SLACK  # the last interval repeats
    assert all(gap < interval + 5 for gap, interval in zip(gaps, [0.5, 1.5, 1.5], strict=True)), gaps


def test_callable_interval_gets_the_retry_number(kickq, kickq_worker):
    @kickq.process("callable-interval")
    def always_fails(job):
        raise RuntimeError("no")

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("callable-interval", retry=True, retry_count=2, retry_interval=lambda n: 0.5 * n)
    # the callable is evaluated at creation, so workers without it still know the intervals
    assert kickq.get(job.id).flags["retry_interval"] == [0.5, 1.0]

    record = _final(kickq, job.id)
    assert [run.state for run in record.runs] == ["fail", "fail", "fail"]
    gaps = _gaps(record)
    assert gaps[0] >= 0.5 - CLOCK_SLACK
    assert gaps[1] >= 1.0 - CLOCK_SLACK
    assert all(gap < interval + 5 for gap, interval in zip(gaps, [0.5, 1.0], strict=True)), gaps


def test_job_flags_in_camel_case_through_config(kickq, kickq_worker):
    Kickq.config({"jobFlags": {"flaky": {"retry": True, "retryCount": 2, "retryInterval": 0}}})

    @kickq.process(["flaky", "steady"])
    def always_fails(job):
        raise RuntimeError(job.name)

    kickq_worker(pool="threads", concurrency=4)
    flaky = kickq.create("flaky")
    steady = kickq.create("steady")  # no job_flags for this name: the defaults (no retry)

    flags = kickq.get(flaky.id).flags
    assert flags["retry"] is True
    assert flags["retry_count"] == 2
    assert flags["retry_interval"] == 0
    assert kickq.get(steady.id).flags["retry"] is False

    assert len(_final(kickq, flaky.id).runs) == 3
    assert len(_final(kickq, steady.id).runs) == 1

    # flags given to create() still win over job_flags
    once = kickq.create("flaky", retry_count=0)
    assert kickq.get(once.id).flags["retry_count"] == 0
    assert len(_final(kickq, once.id).runs) == 1
