"""Async handlers (``async def``, or a handler returning an awaitable): awaited in every pool
(prefork, solo, threads) on an event loop of the pool process's or thread's own, reused between
jobs; a result, a failure and prefork's soft time limit count as for sync handlers."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections import defaultdict
from typing import Any

from kickq_celery.testing import wait_for
from kickq_celery.worker.task import event_loop, run_awaitable
from tests.conftest import listed


def finished(kq: Any, job_id: str, timeout: float = 15) -> Any:
    return wait_for(lambda: (r := kq.get(job_id)).complete and r, timeout, 0.05, f"job {job_id} to finish")


def loops_by_process(entries: list[str]) -> dict[str, set[str]]:
    """``<pid>:<loop id>`` entries -> the loop ids each process used."""
    found: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        pid, loop = entry.split(":")
        found[pid].add(loop)
    return found


def assert_failed_with_traceback(record: Any) -> None:
    assert record.state == "fail"
    [run] = record.runs
    assert run.state == "fail"
    assert run.error == "ValueError: the async handler fails on purpose"
    assert "in asleep" in run.traceback  # the coroutine's own frame
    assert "ValueError: the async handler fails on purpose" in run.traceback


# --- subprocess workers (tests/workerapp.py's asleep) ---------------------------------------


def test_prefork_awaits_the_handler_on_one_loop_per_pool_process(kickq, kickq_namespace, r,
                                                                 worker_process):
    worker = worker_process(concurrency=2, pool="prefork")
    tombstoned = kickq.create("asleep", tombstone=True, tombstone_timeout=15)
    jobs = [kickq.create("asleep") for _ in range(4)]
    failing = kickq.create("asleep", "fail")

    response = tombstoned.promise.wait()
    assert (response.state, response.result["slept"]) == ("success", None)
    results = [finished(kickq, job.id).result for job in jobs]
    assert all(result["slept"] is None for result in results)
    assert_failed_with_traceback(finished(kickq, failing.id))

    by_process = loops_by_process(listed(r, kickq_namespace, "loops"))
    assert sum(len(loops) for loops in by_process.values()) <= 2  # one loop per pool process...
    assert all(len(loops) == 1 for loops in by_process.values())  # ...kept for all its jobs
    assert str(worker.proc.pid) not in by_process  # awaited in the pool processes, after the fork
    assert {result["loop"] for result in results} <= set(listed(r, kickq_namespace, "loops"))


def test_solo_awaits_the_handler_on_one_loop(kickq, kickq_namespace, r, worker_process):
    worker = worker_process(concurrency=1, pool="solo")
    jobs = [kickq.create("asleep", 0.05) for _ in range(3)]
    failing = kickq.create("asleep", "fail")
    results = [finished(kickq, job.id).result for job in jobs]
    assert [result["slept"] for result in results] == [0.05] * 3
    assert_failed_with_traceback(finished(kickq, failing.id))
    # the worker's own process, one loop for every job (the failed one too)
    assert set(listed(r, kickq_namespace, "loops")) == {results[0]["loop"]}
    assert results[0]["loop"].startswith(f"{worker.proc.pid}:")


def test_prefork_soft_time_limit_stops_an_async_handler_as_a_ghost(kickq, kickq_namespace, r,
                                                                   worker_process):
    worker_process(concurrency=1, pool="prefork")  # one pool process: the next job proves it free
    job = kickq.create("asleep", 10, process_timeout=1, ghost_retry=False)
    record = finished(kickq, job.id)
    [run] = record.runs
    assert (record.state, run.state) == ("fail", "ghost")
    assert "process_timeout passed" in run.error or "heartbeat lock expired" in run.error
    assert run.duration < 5  # the handler would have slept 10 s
    # the coroutine was cancelled, not left on the loop to go on during the next job
    wait_for(lambda: listed(r, kickq_namespace, "stopped") == [job.id], 5, 0.05,
             "the coroutine to be cancelled")
    after = kickq.create("asleep")
    assert finished(kickq, after.id, timeout=6).state == "success"
    assert listed(r, kickq_namespace, "runs") == [after.id]
    stopped_loop, next_loop = listed(r, kickq_namespace, "loops")
    assert stopped_loop == next_loop  # the same loop, still usable


# --- the in-process threads pool ------------------------------------------------------------


def test_threads_await_the_handler_on_one_loop_per_thread(kickq, kickq_worker):
    seen: list[tuple[int, int]] = []

    @kickq.process("nap")
    async def nap(job: Any) -> Any:
        await asyncio.sleep(0.05)
        seen.append((threading.get_ident(), id(asyncio.get_running_loop())))
        if job.data == "fail":
            raise ValueError("the async handler fails on purpose")
        return {"napped": job.data}

    async def later(value: Any) -> Any:
        await asyncio.sleep(0.01)
        return value

    @kickq.process("returns-awaitable")
    def returns_awaitable(job: Any) -> Any:
        return later(job.data)  # a sync handler returning an awaitable: awaited too

    kickq_worker(pool="threads", concurrency=2)
    tombstoned = kickq.create("nap", "t", tombstone=True, tombstone_timeout=15)
    jobs = [kickq.create("nap", i) for i in range(5)]
    failing = kickq.create("nap", "fail")
    awaitable = kickq.create("returns-awaitable", [1, 2])

    assert tombstoned.promise.wait().result == {"napped": "t"}
    assert [finished(kickq, job.id).result for job in jobs] == [{"napped": i} for i in range(5)]
    record = finished(kickq, failing.id)
    assert record.state == "fail" and record.runs[0].state == "fail"
    assert record.runs[0].error == "ValueError: the async handler fails on purpose"
    assert "in nap" in record.runs[0].traceback
    assert finished(kickq, awaitable.id).result == [1, 2]

    assert len(seen) == 7
    assert len({loop for _, loop in seen}) <= 2  # at most one loop per thread of the pool
    per_thread: dict[int, set[int]] = defaultdict(set)
    for thread, loop in seen:
        per_thread[thread].add(loop)
    assert all(len(loops) == 1 for loops in per_thread.values())


# --- the loop itself --------------------------------------------------------------------------


def test_each_thread_has_its_loop_closed_when_the_thread_ends() -> None:
    mine = event_loop()
    assert event_loop() is mine and not mine.is_running()
    theirs: list[asyncio.AbstractEventLoop] = []
    thread = threading.Thread(target=lambda: theirs.append(event_loop()))
    thread.start()
    thread.join(5)
    [other] = theirs
    assert other is not mine
    del thread
    gc.collect()
    assert other.is_closed() and not mine.is_closed()
    assert run_awaitable(asyncio.sleep(0, "done")) == "done"


def test_a_forked_process_makes_its_own_loop() -> None:
    parent = event_loop()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a loop of its own, usable, the parent's left open
        try:
            child = event_loop()
            ok = child is not parent and run_awaitable(asyncio.sleep(0, 7)) == 7 and not parent.is_closed()
            os.write(writer, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"1"
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert event_loop() is parent and not parent.is_closed()
