"""Ghost runs: process_timeout, ghost_retry / ghost_times / ghost_interval."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from celery.worker import state as worker_state

from kickq_celery import JobFailed
from kickq_celery.testing import wait_for

REAPER_ERROR = "heartbeat lock expired"
SOFT_LIMIT_ERROR = "process_timeout passed"


def _final(kq, job_id, timeout=20.0):
    return wait_for(lambda: (r := kq.get(job_id)).complete and r, timeout, 0.05, f"job {job_id} to finish")


@pytest.fixture
def release():
    """An event that lets the sleeping handlers return, so the worker stops quickly."""
    event = threading.Event()
    yield event
    event.set()


def test_timed_out_runs_become_ghosts_then_the_job_fails(kickq, kickq_worker, release):
    finished = []

    @kickq.process("slow")
    def slow(job):
        release.wait(5)  # "sleeps 5 s"; the test lets it go early to finish fast
        finished.append(job.run)
        return "late"

    kickq_worker(pool="threads", concurrency=4)
    started = time.monotonic()
    job = kickq.create("slow", tombstone=True, tombstone_timeout=15,
                       process_timeout=0.5, ghost_times=1, ghost_interval=0)

    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    elapsed = time.monotonic() - started
    assert info.value.job_id == job.id
    assert REAPER_ERROR in info.value.error
    # the threads pool cannot stop a handler: the reaper ghosted both runs at their
    # process_timeout deadline, long before the handlers' 5 s sleep ended
    assert elapsed < 4.5
    assert finished == []

    record = _final(kickq, job.id)
    assert record.state == "fail"
    assert [(run.number, run.state) for run in record.runs] == [(1, "ghost"), (2, "ghost")]
    for run in record.runs:
        assert REAPER_ERROR in run.error
        assert 0.45 <= run.duration < 3.0
    stats = kickq.stats("slow").names["slow"]
    assert (stats.ghosts, stats.failed, stats.succeeded) == (2, 1, 0)

    # both handler threads still run; when they return, their late finish is ignored
    release.set()
    wait_for(lambda: len(finished) == 2, 10, 0.02, "the handlers to return")
    wait_for(lambda: not worker_state.active_requests, 10, 0.02, "the tasks to end")
    record = kickq.get(job.id)
    assert record.state == "fail"
    assert record.result is None
    assert [run.state for run in record.runs] == ["ghost", "ghost"]
    with pytest.raises(JobFailed):
        job.promise.wait()


def test_ghost_retry_false_fails_at_the_first_ghost(kickq, kickq_worker, release):
    @kickq.process("slow-once")
    def slow(job):
        release.wait(5)

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("slow-once", process_timeout=0.5, ghost_retry=False, ghost_interval=0)
    record = _final(kickq, job.id, timeout=10)
    assert record.state == "fail"
    assert [run.state for run in record.runs] == ["ghost"]


def test_prefork_soft_time_limit_stops_the_run(kickq, kickq_redis_url, kickq_namespace, worker_process):
    r = redis.Redis.from_url(kickq_redis_url)
    prefix = f"test:{kickq_namespace}:"
    worker_process(concurrency=1)  # one pool process: the next job proves it is free

    job = kickq.create("stoppable", 10, tombstone=True, tombstone_timeout=30,
                       process_timeout=1, ghost_retry=False)
    with pytest.raises(JobFailed) as info:
        job.promise.wait()  # settled by the worker subprocess, through the same result store
    assert info.value.job_id == job.id

    record = _final(kickq, job.id)
    assert record.state == "fail"
    [run] = record.runs
    assert run.state == "ghost"
    # either the soft time limit or the reaper (same deadline) recorded it; both are ghosts
    assert SOFT_LIMIT_ERROR in run.error or REAPER_ERROR in run.error
    assert run.duration < 5  # the handler would have slept 10 s
    # the soft time limit interrupted the handler's sleep inside the pool process
    wait_for(lambda: r.lrange(prefix + "stopped", 0, -1) == [job.id.encode()], 5, 0.05,
             "the handler to see SoftTimeLimitExceeded")
    assert r.lrange(prefix + "runs", 0, -1) == []

    # the only pool process is free again: another job runs now, not after the 10 s sleep
    after = kickq.create("record", "next")
    assert _final(kickq, after.id, timeout=6).result == "next"
    assert kickq.get(job.id).state == "fail"
