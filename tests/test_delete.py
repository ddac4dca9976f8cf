"""Kickq.delete: a deleted job never runs (queued, delayed, across a SIGKILLed and
restarted worker), waiters get JobDeleted; and finished records expiring after
purge_timeout (or kept with purge_jobs=False)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kickq_celery import JobDeleted, JobFailed, Kickq
from kickq_celery.testing import purge_namespace, wait_for
from tests.conftest import gone


def runs(kq: Kickq, ns: str) -> list[str]:
    """Job ids the worker subprocess's "record" handler ran, in order."""
    return [x.decode() for x in kq.redis.lrange(f"test:{ns}:runs", 0, -1)]


def test_delete_return_values(kickq, kickq_app, kickq_redis_url):
    queued = kickq.create("d", 1)
    countdown = kickq.create("d", 2, delay=3)
    parked = kickq.create("d", 3, delay=3600)
    for job in (queued, countdown, parked):
        assert kickq.delete(job.id) is True
        assert gone(kickq, job.id)
        assert kickq.delete(job.id) is False  # only once
    assert kickq.redis.zscore(kickq.keys.delayed, parked.id) is None
    assert kickq.delete("no-such-job") is False
    assert kickq.delete(None) is False
    assert kickq.stats("d").total.deleted == 3
    assert kickq.stats("d").total.queued == 0 and kickq.stats("d").total.delayed == 0
    # an id of another namespace is unknown here, and stays there
    other = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=kickq.keys.namespace + "-other")
    try:
        theirs = other.create("d", 4)
        assert kickq.delete(theirs.id) is False
        assert other.get(theirs.id).data == 4
        assert other.delete(theirs.id) is True
    finally:
        purge_namespace(other)


def test_waiters_of_a_deleted_job_get_job_deleted(kickq):
    job = kickq.create("d", 1, tombstone=True)
    assert kickq.delete(job.id) is True
    with pytest.raises(JobDeleted) as info:
        job.promise.wait()
    err = info.value
    assert isinstance(err, JobFailed) and err.job_id == job.id and err.has_timeout is False


def test_deleted_waiting_jobs_never_run_once_a_worker_starts(kickq, kickq_namespace, kickq_redis_url,
                                                             worker_process):
    """Deleted while no worker runs: a queued job (its message is in the queue) and a job
    parked in Redis for the promoter. Sentinels created after each show that the worker
    got past them."""
    # a short horizon parks even short delays in Redis (the worker's promoter publishes them)
    parking = Kickq(kickq.app, redis=kickq_redis_url, redis_namespace=kickq_namespace, delay_horizon=0.5)
    queued = kickq.create("record", "deleted")
    parked = parking.create("record", "deleted", delay=1.5)
    queued_sentinel = kickq.create("record", "sentinel")
    parked_sentinel = parking.create("record", "sentinel", delay=1.5)
    assert kickq.redis.zscore(kickq.keys.delayed, parked.id) is not None
    assert kickq.delete(queued.id) and kickq.delete(parked.id)
    assert kickq.redis.llen(kickq.task_name("record")) == 2  # the deleted job's message is still there

    worker = worker_process(concurrency=2)
    wait_for(lambda: set(runs(kickq, kickq_namespace)) == {queued_sentinel.id, parked_sentinel.id}, 20,
             0.1, "both sentinels to run")
    # the deleted job's message was consumed, and dropped by the run guard (no false success)
    done = f"{kickq.task_name('record')}[{queued.id}] ignored"
    wait_for(lambda: done in worker.log.read_text(errors="replace"), 10, 0.1, "the deleted job's message")
    assert kickq.redis.llen(kickq.task_name("record")) == 0
    assert set(runs(kickq, kickq_namespace)) == {queued_sentinel.id, parked_sentinel.id}
    assert gone(kickq, queued.id) and gone(kickq, parked.id)
    assert kickq.redis.zcard(kickq.keys.delayed) == 0


def test_deleted_delayed_job_never_runs_across_a_killed_worker(kickq, kickq_namespace, worker_process):
    """The worker holds the delayed job's message (unacknowledged, waiting for its ETA) when
    it is SIGKILLed; the job is deleted; a new worker gets the message redelivered and must
    not run the job, before or after it was due. (Only with a delay_horizon does a worker hold
    a delayed job's message; by default it is published when due.)"""
    delay = 3.0
    Kickq.config(delay_horizon=5)
    first = worker_process(concurrency=1, delay_horizon=5)
    job = kickq.create("record", "deleted", delay=delay)
    received = f"{kickq.task_name('record')}[{job.id}] received"
    wait_for(lambda: received in first.log.read_text(errors="replace"), 10, 0.1,
             "the worker to take the message")
    first.kill()
    assert kickq.delete(job.id) is True
    # a short visibility timeout, swept every second: the new worker restores the dead worker's
    # unacked message however soon after the kill it starts
    second = worker_process(concurrency=1, visibility_timeout=1, restore_interval=1, delay_horizon=5)
    wait_for(lambda: received in second.log.read_text(errors="replace"), 15, 0.1,
             "the message to be redelivered to the new worker")
    done = f"{kickq.task_name('record')}[{job.id}] ignored"
    wait_for(lambda: done in second.log.read_text(errors="replace"), delay + 10, 0.1,
             "the redelivered message to be dropped")
    # a sentinel queued behind it runs: the worker is healthy and past the deleted job
    sentinel = kickq.create("record", "sentinel")
    wait_for(lambda: runs(kickq, kickq_namespace), 15, 0.1, "the sentinel to run")
    assert runs(kickq, kickq_namespace) == [sentinel.id]
    assert gone(kickq, job.id)


def test_deleting_a_running_job(kickq, kickq_worker):
    """Not interrupted, not retried; its record goes when the run ends."""
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @kickq.process("long")
    def long(job):
        calls.append(job.run)
        started.set()
        assert release.wait(20)
        raise RuntimeError("fails, and would be retried")

    kickq_worker()
    job = kickq.create("long", None, tombstone=True, retry=True, retry_interval=0)
    assert started.wait(20)
    assert kickq.delete(job.id) is True
    assert kickq.get(job.id).state == "processing"  # still running
    with pytest.raises(JobDeleted):
        job.promise.wait()
    release.set()
    wait_for(lambda: gone(kickq, job.id), 10, 0.05, "the record to go after the run")
    assert kickq.delete(job.id) is False
    assert calls == [1]
    assert kickq.stats("long").total.retried == 0


# --- purging finished records -----------------------------------------------------------


def test_finished_records_expire_after_purge_timeout(kickq, kickq_app, kickq_redis_url, kickq_worker):
    ns = kickq.keys.namespace
    purging = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=ns, purge_timeout=1)
    keeping = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=ns, purge_timeout=1, purge_jobs=False)

    def handler(job: Any) -> Any:
        if job.data == "fail":
            raise ValueError("failed runs are purged too")
        return job.data

    purging.process("purged", handler)
    keeping.process("kept", handler)
    kickq_worker()
    ok, failed = purging.create("purged", "ok"), purging.create("purged", "fail")
    kept = keeping.create("kept", "ok")
    for job, state in ((ok, "success"), (failed, "fail"), (kept, "success")):
        record = wait_for(lambda job=job: (r := kickq.get(job.id)).complete and r, 10, 0.05,
                          "the job to finish")
        assert record.state == state
        if job is not kept:
            # not removed on the spot: kept for purge_timeout (1 s) after it finished
            assert 0 < kickq.redis.pttl(kickq.keys.job(job.id)) <= 1000
    # purged: the record is gone within a few seconds
    wait_for(lambda: gone(kickq, ok.id) and gone(kickq, failed.id), 6, 0.1, "the records to expire")
    assert kickq.jobs(state="success", name="purged") == []
    # kept: no expiry at all, and still there after the purged ones went
    assert kickq.redis.ttl(kickq.keys.job(kept.id)) == -1
    assert kickq.get(kept.id).result == "ok"
    assert [r.id for r in kickq.jobs(state="success", name="kept")] == [kept.id]
