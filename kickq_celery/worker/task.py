"""KickqTask: the Celery task of a job name, with the run guard and the heartbeat.

A Celery message only wakes a job up; the record in Redis decides. Each
message carries ``(job_id, attempt)``, and the "start run" script runs the
handler only when the record exists, is waiting, is at that attempt and a
``max_jobs_num`` slot is free. Duplicates (redelivery, visibility timeout,
a re-published parked job) are dropped there, so the handler runs once.

Celery is told what the run was, so its logs, signals, events (Flower) and error
trackers see the truth: a message that starts no run ends as ``Ignore``, a failed
run that will run again as ``Retry`` (``task_retry``), a final failure raises the
handler's own exception (``task_failure``, with its traceback), a success returns
the handler's result.

A handler may be ``async def`` (or return any awaitable): it is awaited on an event loop of
the thread's own, made on first use and kept for the next jobs (one per pool process with
prefork and solo, one per thread with threads; made again after a fork, closed when its
thread ends), and its outcome counts exactly as a sync handler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded

from ..exceptions import RedisUnavailable
from ..records import Job, from_timestamp
from .heartbeat import heartbeat
from .loops import after_run

if TYPE_CHECKING:
    from ..client import Kickq
    from ..scripts import Ended
    from ..store import JobStore

Handler = Callable[[Job], Any]

#: the longest traceback kept on a run (its last characters: the innermost frames)
MAX_TRACEBACK = 4000


@dataclass(frozen=True)
class Outcome:
    """What one call of a handler came to."""

    outcome: str  # success | fail | ghost
    payload: str  # the result as JSON, or the error text
    result: Any = None
    error: BaseException | None = None
    traceback: str = ""
    stopped: bool = False  # stopped by a delete with terminate (its outcome is discarded)

logger = logging.getLogger("kickq_celery")


class _ThreadLoop:
    """An event loop of one thread of one process, closed when its thread ends (or at exit)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        weakref.finalize(self, _close_loop, self.loop, self.pid)


def _close_loop(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    if os.getpid() == pid and not loop.is_running() and not loop.is_closed():
        loop.close()  # never a loop inherited through fork: it is the parent's


_loops = threading.local()


def event_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for async handlers: made on first use, then reused; a process
    forked from one that had a loop (prefork) makes its own."""
    held: _ThreadLoop | None = getattr(_loops, "held", None)
    if held is None or held.pid != os.getpid() or held.loop.is_closed():
        held = _loops.held = _ThreadLoop()
    return held.loop


def run_awaitable(awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` on this thread's event loop; its result, or it raises.

    When something stops the loop from outside the coroutine (prefork's soft time limit raising
    ``SoftTimeLimitExceeded`` while the loop waits), the coroutine is cancelled (it sees
    ``CancelledError``) before that exception goes on: no task of this job is left to run
    during the next one."""
    loop = event_loop()
    task = asyncio.ensure_future(awaitable, loop=loop)
    try:
        return loop.run_until_complete(task)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                loop.run_until_complete(task)


class KickqTask(Task):  # type: ignore[misc]
    """Base class of the task registered for each processed job name."""

    ignore_result = True  # the outcome is stored only when final, for tombstones
    kickq: Kickq
    job_name: str
    handler: Handler

    def run_job(self, job_id: str, attempt: int = 1) -> Any:
        kq = self.kickq
        store = kq.store
        options = kq.options
        token = uuid.uuid4().hex
        started = store.start_run(job_id, int(attempt), token, options["lock_timeout"])
        while started.status == "early" and started.wait <= 1.0:
            # the message came a moment before the job is due (see lua/start.lua)
            time.sleep(started.wait)
            started = store.start_run(job_id, int(attempt), token, options["lock_timeout"])
        if started.status != "run":
            logger.debug("kickq: %s %s not run (%s)", self.job_name, job_id, started.status)
            raise Ignore()  # a duplicate, a deleted or finished job, one waiting: no success
        job = Job(job_id, self.job_name, "processing", None, started.data,
                  len(started.runs) + 1, started.runs, from_timestamp(started.created_at),
                  recorder=lambda value_json: store.progress(job_id, token, value_json))
        heartbeat.hold(store, options["lock_timeout"], job_id, token, job)
        try:
            ran = self._run_handler(job)
            purge = options["purge_timeout"] if options["purge_jobs"] else 0
            ended = self._finish(store, job_id, token, ran, purge, options["lock_timeout"])
        finally:
            heartbeat.release(job_id)
        after_run(kq, ended, ran.result)
        return self._report(job, ran, ended)

    def _report(self, job: Job, ran: Outcome, ended: Ended) -> Any:
        """Tell Celery what the run was: return its result, or raise Retry, Ignore or its error."""
        if ended.verdict == "stale":
            logger.warning("kickq: %s %s run %d ended after it was reaped: its outcome is dropped",
                           job.name, job.id, job.run)
            raise Ignore()
        if ended.verdict == "deleted" and (ran.stopped or ended.terminated):
            logger.info("kickq: %s %s run %d was stopped: the job was deleted", job.name, job.id, job.run)
            raise Ignore()
        if ran.error is None:
            return ran.result
        if ended.verdict in ("retry", "ghost"):
            raise Retry(f"run {job.run} of {job.id} failed; run {job.run + 1} in {ended.due_in:g} s",
                        exc=ran.error, when=ended.due_in) from ran.error  # its traceback shows the handler
        raise ran.error  # the final failure (or a deleted job's last run): the handler's own error

    @staticmethod
    def _finish(store: JobStore, job_id: str, token: str, ran: Outcome, purge: float,
                patience: float) -> Ended:
        """The finish script, sent again while Redis is away (or a write did not reach the
        replicas it must) for up to ``patience`` seconds: the heartbeat still holds the run,
        and the same finish sent twice counts once."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return store.finish_run(job_id, token, ran.outcome, ran.payload, purge, ran.traceback)
            except RedisUnavailable:
                if time.monotonic() > deadline:
                    raise
                logger.warning("kickq: finishing %s failed, trying again", job_id)
                time.sleep(0.2)

    def _run_handler(self, job: Job) -> Outcome:
        """Call the handler while the heartbeat may stop it (a delete with terminate: on prefork,
        SoftTimeLimitExceeded raised in the handler, or just after it, which the stop then is)."""
        try:
            heartbeat.enter_handler(job.id)
            try:
                ran = self._call_handler(job)
            finally:
                stopped = heartbeat.leave_handler(job.id)
        except SoftTimeLimitExceeded as exc:  # it landed just after the handler
            stopped = heartbeat.stopped(job.id)
            ran = Outcome("ghost", "process_timeout passed: the run was stopped", None, exc)
        if stopped:
            return Outcome("fail", "the job was deleted: its run was stopped", stopped=True)
        return ran

    def _call_handler(self, job: Job) -> Outcome:
        try:
            result = self.handler(job)
            if inspect.isawaitable(result):  # an async def handler
                result = run_awaitable(result)
            return Outcome("success", json.dumps(result, allow_nan=False), result)
        except SoftTimeLimitExceeded as exc:
            return Outcome("ghost", "process_timeout passed: the run was stopped", None, exc,
                           traceback.format_exc()[-MAX_TRACEBACK:])
        except Exception as exc:  # any failure of the handler is a failed run (Celery logs it)
            return Outcome("fail", f"{type(exc).__name__}: {exc}", None, exc,
                           traceback.format_exc()[-MAX_TRACEBACK:])


def register_task(kq: Kickq, name: str, handler: Handler) -> KickqTask:
    """Register the Celery task (and its queue) of job ``name``."""
    task_name = kq.task_name(name)

    def run(self: KickqTask, job_id: str, attempt: int = 1) -> Any:
        return self.run_job(job_id, attempt)

    run.__doc__ = handler.__doc__
    task: KickqTask = kq.app.task(
        name=task_name, base=KickqTask, bind=True, shared=False, kickq=kq,
        job_name=name, handler=staticmethod(handler))(run)
    queues = kq.app.amqp.queues
    queue = kq.queue(name)
    # consumed by `celery worker` with no -Q; with -Q, only when selected
    if queues._consume_from is None:
        queues.select_add(queue)
    else:
        queues.add(queue)
    return task
