"""asyncio against sync in the same run: acreate (one by one, and from 100 concurrent tasks)
against create one by one, and ``await promise`` against ``promise.wait()`` for the tombstone
round trip (a worker runs the no-op jobs)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any


def _rate(n: int, seconds: float) -> float:
    return n / seconds


def bench_acreate(n: int) -> dict[str, float]:
    from benchmarks.benchapp import kq

    kq.create("noop", 0)  # connected, scripts loaded
    start = time.perf_counter()
    for i in range(n):
        kq.create("noop", i)
    sync = _rate(n, time.perf_counter() - start)

    async def one_by_one() -> float:
        await kq.acreate("noop", 0)
        start = time.perf_counter()
        for i in range(n):
            await kq.acreate("noop", i)
        return _rate(n, time.perf_counter() - start)

    async def concurrent(tasks: int = 100) -> float:
        await kq.acreate("noop", 0)
        queue = iter(range(n))

        async def creator() -> None:
            for i in queue:
                await kq.acreate("noop", i)

        start = time.perf_counter()
        await asyncio.gather(*(creator() for _ in range(tasks)))
        return _rate(n, time.perf_counter() - start)

    return {"create": sync, "acreate": asyncio.run(one_by_one()), "acreate_100": asyncio.run(concurrent())}


def bench_await(n: int, env: dict[str, str], celery_worker: Any) -> dict[str, float]:
    from benchmarks.benchapp import kq

    waited: list[float] = []
    awaited: list[float] = []

    async def awaiting(i: int) -> None:
        t = time.perf_counter()
        job = await kq.acreate("noop", i, tombstone=True, tombstone_timeout=30)
        assert job.promise is not None
        await job.promise
        awaited.append(time.perf_counter() - t)

    async def run() -> None:
        for i in range(n):
            t = time.perf_counter()
            job = kq.create("noop", i, tombstone=True, tombstone_timeout=30)
            assert job is not None and job.promise is not None
            job.promise.wait()
            waited.append(time.perf_counter() - t)
            await awaiting(i)

    with celery_worker(env, concurrency=2, queues=kq.task_name("noop")):
        kq.create("noop", 0, tombstone=True, tombstone_timeout=30).promise.wait()  # warm up
        asyncio.run(run())

    def pct(samples: list[float], p: int) -> float:
        return statistics.quantiles(samples, n=100)[p - 1] * 1000

    return {"wait_p50_ms": pct(waited, 50), "await_p50_ms": pct(awaited, 50),
            "wait_p99_ms": pct(waited, 99), "await_p99_ms": pct(awaited, 99)}
