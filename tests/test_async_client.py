"""The asyncio calls (acreate, acreate_many, aget, adelete, astats): the same arguments,
validation, results and errors as the sync ones, on a redis.asyncio client, never blocking
the event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kickq_celery import InvalidJobData, InvalidJobOptions, JobDeleted, JobNotFound, Kickq, RedisUnavailable
from kickq_celery.testing import make_app, purge_namespace, wait_for
from tests.faultproxy import FaultProxy, SilentServer, script_call
from tests.test_guard import snapshot


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_acreate_aget_astats_match_the_sync_calls(kickq: Kickq, kickq_worker: Any) -> None:
    @kickq.process("double")
    def double(job: Any) -> Any:
        return job.data * 2

    kickq_worker()

    async def flow() -> Any:
        job = await kickq.acreate("double", 21, tombstone=True)
        delayed = await kickq.acreate("double", 1, {"delay": 60})
        many = await kickq.acreate_many("double", [1, 2, 3], retry=True)
        return job, delayed, many, await job.promise

    job, delayed, many, response = run(flow())
    assert response.result == 42 and job.created and job.data == 21
    assert (delayed.state, [j.state for j in many]) == ("delayed", ["queued"] * 3)
    wait_for(lambda: all(kickq.get(j.id).complete for j in many), 10, 0.05, "the jobs")
    record = run(kickq.aget(job.id))
    assert record == kickq.get(job.id) and record.result == 42
    assert run(kickq.aget(many[0].id)).flags["retry"] is True
    assert run(kickq.astats()).to_dict() == kickq.stats().to_dict()
    assert run(kickq.astats("double")).names["double"].created == 5
    with pytest.raises(JobNotFound):
        run(kickq.aget("no-such-job"))


def test_adelete(kickq: Kickq) -> None:
    async def flow() -> Any:
        job = await kickq.acreate("gone", 1, tombstone=True, tombstone_timeout=5)
        return job, await kickq.adelete(job.id), await kickq.adelete(job.id), await kickq.adelete("nope")

    job, first, again, unknown = run(flow())
    assert (first, again, unknown) == (True, False, False)
    with pytest.raises(JobNotFound):
        kickq.get(job.id)
    with pytest.raises(JobDeleted):  # the waiter is told, as by delete()
        job.promise.wait()


@pytest.mark.parametrize(("call", "error"), [
    (lambda kq: kq.acreate("", 1), InvalidJobOptions),
    (lambda kq: kq.acreate("j", object()), InvalidJobData),
    (lambda kq: kq.acreate("j", 1, bogus=True), InvalidJobOptions),
    (lambda kq: kq.acreate_many("j", [1, {2}, 3]), InvalidJobData),
    (lambda kq: kq.acreate("j", 1, retry_count=-1), InvalidJobOptions),
], ids=["name", "data", "flag", "many", "value"])
def test_bad_input_raises_the_same_errors_and_writes_nothing(kickq: Kickq, call: Any, error: Any) -> None:
    kickq.create("existing", 1)
    before = snapshot(kickq)
    with pytest.raises(error):
        run(call(kickq))
    assert snapshot(kickq) == before


def test_concurrent_acreates_each_write_their_job(kickq: Kickq) -> None:
    """Creates made at once go out together (merged where they can be), each job as if alone."""
    async def flow() -> Any:
        return await asyncio.gather(*(kickq.acreate("many", n, delay=n % 2 * 60) for n in range(300)),
                                    kickq.acreate("other", "x"))

    jobs = run(flow())
    assert len({job.id for job in jobs}) == 301
    for n, job in enumerate(jobs[:300]):
        record = kickq.get(job.id)
        assert record.data == n and record.state == ("delayed" if n % 2 else "queued")
    stats = kickq.stats()
    assert (stats["many"].created, stats["many"].queued, stats["many"].delayed) == (300, 150, 150)
    # one message per queued job, none for the delayed ones
    assert kickq.redis.llen(kickq.task_name("many")) == 150
    assert kickq.redis.llen(kickq.task_name("other")) == 1


def test_a_silent_redis_raises_in_time_and_the_loop_stays_responsive() -> None:
    with SilentServer() as silent:
        app = make_app(silent.url)
        kq = Kickq(app, redis=silent.url, redis_namespace="silent", redis_timeout=0.5)

        async def flow() -> tuple[list[float], float]:
            lags: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                while not stop.is_set():
                    before = time.monotonic()
                    await asyncio.sleep(0.01)
                    lags.append(time.monotonic() - before - 0.01)

            tick = asyncio.create_task(ticker())
            took = []
            for call in (lambda: kq.acreate("j", 1), lambda: kq.aget("x"), lambda: kq.adelete("x"),
                         lambda: kq.astats()):
                start = time.monotonic()
                with pytest.raises(RedisUnavailable):
                    await call()
                took.append(time.monotonic() - start)
            stop.set()
            await tick
            return took, max(lags)

        took, worst_lag = run(flow())
        app.close()
    assert all(0.4 < t < 1.0 for t in took), took  # within 2 x redis_timeout
    assert worst_lag < 0.05, worst_lag


def test_a_dropped_reply_of_acreate_writes_the_job_once(kickq_redis_url: str, kickq_namespace: str) -> None:
    host, port = "127.0.0.1", int(kickq_redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(host, port) as proxy:
        app = make_app(proxy.url)
        kq = Kickq(app, redis=proxy.url, redis_namespace=kickq_namespace)
        try:
            run(kq.acreate("warm", 0))  # scripts loaded, connections made
            proxy.drop_reply_once(script_call())
            job = run(kq.acreate("once", {"n": 1}))
            assert proxy.dropped == 1
            assert kq.get(job.id).data == {"n": 1}
            assert kq.stats("once")["once"].created == 1
            assert kq.redis.llen(kq.task_name("once")) == 1  # pushed by the script with its record
        finally:
            purge_namespace(kq)
            app.close()
