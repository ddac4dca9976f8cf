"""Tombstoning: the Promise of a job's final outcome (wait, then, await, callback)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kickq_celery import JobDeleted, JobFailed, JobNotFound, Promise, Response, TombstoneTimeout
from kickq_celery.testing import wait_for


@pytest.fixture
def release():
    """An event that lets blocked handlers return, so the worker stops quickly."""
    event = threading.Event()
    yield event
    event.set()


def _state(kq, job_id):
    try:
        return kq.get(job_id).state
    except JobNotFound:
        return None


def test_tombstone_timeout_when_the_handler_is_slow(kickq, kickq_worker, release):
    @kickq.process("slow")
    def slow(job):
        release.wait(10)
        return "too late"

    kickq_worker(pool="threads", concurrency=4)
    started = time.monotonic()
    job = kickq.create("slow", tombstone=True, tombstone_timeout=1)

    with pytest.raises(TombstoneTimeout) as info:
        job.promise.wait()
    elapsed = time.monotonic() - started
    exc = info.value
    assert isinstance(exc, JobFailed) and isinstance(exc, TimeoutError)
    assert exc.has_timeout is True
    assert exc.job_id == job.id
    assert 0.9 <= elapsed < 1 + 1.5  # the deadline counts from creation
    # the job itself goes on: the timeout is the waiter's, not the job's
    wait_for(lambda: _state(kickq, job.id) == "processing", 10, 0.02, "the run to start")


def test_job_deleted_while_delayed_and_someone_waits(kickq, kickq_worker):
    @kickq.process("later")
    def later(job):
        return "ran"

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("later", tombstone=True, tombstone_timeout=10, delay=3)
    assert job.state == "delayed"
    deleted = []
    threading.Timer(0.3, lambda: deleted.append(kickq.delete(job.id))).start()

    started = time.monotonic()
    with pytest.raises(JobDeleted) as info:
        job.promise.wait()
    assert time.monotonic() - started < 2.5  # settled by the delete, not by the delay or the timeout
    # the waiter may wake before delete() has returned to the timer thread
    wait_for(lambda: deleted == [True], 2, 0.01, "delete() to return True")
    assert info.value.job_id == job.id
    assert info.value.has_timeout is False
    with pytest.raises(JobNotFound):
        kickq.get(job.id)


def test_job_deleted_while_running(kickq, kickq_worker, release):
    @kickq.process("busy")
    def busy(job):
        release.wait(10)
        return "done anyway"

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("busy", tombstone=True, tombstone_timeout=10, retry=True, retry_interval=0)
    wait_for(lambda: _state(kickq, job.id) == "processing", 10, 0.02, "the run to start")
    deleted = []
    threading.Timer(0.2, lambda: deleted.append(kickq.delete(job.id))).start()

    started = time.monotonic()
    with pytest.raises(JobDeleted) as info:
        job.promise.wait()
    assert time.monotonic() - started < 3  # the run is still blocked: the delete settled it
    # the waiter may wake before delete() has returned to the timer thread
    wait_for(lambda: deleted == [True], 2, 0.01, "delete() to return True")
    assert info.value.has_timeout is False
    # the run is not interrupted; its record goes when the run ends, and the promise
    # keeps its one outcome (the run's success is not stored over it)
    assert kickq.get(job.id).state == "processing"
    release.set()
    wait_for(lambda: _state(kickq, job.id) is None, 10, 0.02, "the record to go")
    result = kickq.app.AsyncResult(job.id)
    assert result.state == "FAILURE"
    assert isinstance(result.get(propagate=False), JobDeleted)


def test_await_the_promise_in_asyncio(kickq, kickq_worker):
    @kickq.process("double")
    def double(job):
        return job.data * 2

    @kickq.process("fails")
    def fails(job):
        raise ValueError("bad input")

    kickq_worker(pool="threads", concurrency=4)

    async def main():
        jobs = [kickq.create("double", n, tombstone=True) for n in range(3)]
        responses = await asyncio.gather(*(job.promise for job in jobs))
        failing = kickq.create("fails", tombstone=True)
        try:
            await failing.promise
        except JobFailed as exc:
            return responses, exc
        return responses, None

    responses, exc = asyncio.run(main())
    assert [r.result for r in responses] == [0, 2, 4]
    assert all(r.complete and r.state == "success" and r.job_name == "double" for r in responses)
    assert isinstance(exc, JobFailed) and exc.error == "ValueError: bad input"


def test_then_calls_the_right_callback_once(kickq, kickq_worker):
    @kickq.process("echo")
    def echo(job):
        if job.data == "fail":
            raise RuntimeError("asked to fail")
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    calls = []

    def on_complete(response):
        calls.append(("complete", response))
        return f"got {response.result}"

    def on_failed(exc):
        calls.append(("failed", exc))
        return f"lost: {exc.error}"

    ok = kickq.create("echo", "hello", tombstone=True)
    derived = ok.promise.then(on_complete, on_failed)
    assert isinstance(derived, Promise)
    assert derived.wait().result == "got hello"
    assert [kind for kind, _ in calls] == ["complete"]
    assert calls[0][1] == Response(ok.id, "echo", True, "success", "hello")

    calls.clear()
    bad = kickq.create("echo", "fail", tombstone=True)
    derived = bad.promise.then(on_complete, on_failed)
    assert derived.wait().result == "lost: RuntimeError: asked to fail"
    assert [kind for kind, _ in calls] == ["failed"]
    assert isinstance(calls[0][1], JobFailed) and calls[0][1].job_id == bad.id

    # settled once: waiting on either promise again calls nothing more
    derived.wait()
    with pytest.raises(JobFailed):
        bad.promise.wait()
    assert len(calls) == 1


def test_create_with_callback_delivers_the_promise(kickq, kickq_worker):
    @kickq.process("cb")
    def handler(job):
        return {"seen": job.data}

    kickq_worker(pool="threads", concurrency=4)
    got = []
    job = kickq.create("cb", [1, 2], callback=lambda *args: got.append(args), tombstone=True)

    [(err, job_id, promise)] = got
    assert err is None
    assert job_id == job.id
    assert isinstance(promise, Promise)
    assert promise.wait() == Response(job.id, "cb", True, "success", {"seen": [1, 2]})


def test_wait_after_the_job_finished_settles_at_once(kickq, kickq_worker):
    @kickq.process("quick")
    def quick(job):
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("quick", 7, tombstone=True, tombstone_timeout=1)
    wait_for(lambda: kickq.app.AsyncResult(job.id).ready(), 10, 0.02, "the outcome to be stored")
    # stay past tombstone_timeout (bounded): a finished job must not turn into a timeout
    time.sleep(1.2)

    started = time.monotonic()
    response = job.promise.wait()
    assert time.monotonic() - started < 1.0
    assert response.result == 7
    # settled: later waits return the same response at once
    started = time.monotonic()
    assert job.promise.wait() is response
    assert time.monotonic() - started < 0.5


def test_works_when_the_app_has_no_result_backend(kickq, kickq_app, kickq_worker):
    assert not kickq_app.conf.result_backend  # the fixture app has none

    @kickq.process("answer")
    def answer(job):
        return {"answer": job.data}

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("answer", 42, tombstone=True)
    assert job.promise.wait().result == {"answer": 42}

    # kickq supplied a result backend on its own Redis, keyed under the namespace
    ns = kickq.options["redis_namespace"]
    key = f"{{{ns}}}:result:celery-task-meta-{job.id}".encode()
    assert kickq.keys.result_prefix == f"{{{ns}}}:result:"
    assert key in kickq.redis.keys(f"{{{ns}}}:result:*")
    assert kickq.redis.exists(f"celery-task-meta-{job.id}") == 0  # nothing outside the namespace

    # ordinary Celery tooling sees the same outcome
    result = kickq_app.AsyncResult(job.id)
    assert result.get(timeout=5) == {"answer": 42}
    assert result.state == "SUCCESS"
    assert job.promise.async_result.id == job.id


def test_worker_thread_that_ran_plain_jobs_first_still_settles(kickq, kickq_worker):
    # one pool thread: it runs a plain job (Celery caches a DisabledBackend in that
    # thread, as the app has no result backend yet), then the tombstoned one
    @kickq.process("echo")
    def echo(job):
        return job.data

    kickq_worker(pool="threads", concurrency=1)
    plain = kickq.create("echo", 1)
    wait_for(lambda: _state(kickq, plain.id) == "success", 10, 0.02, "the plain job")
    job = kickq.create("echo", 2, tombstone=True, tombstone_timeout=5)
    assert job.promise.wait().result == 2
