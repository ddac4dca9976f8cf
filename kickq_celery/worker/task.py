"""KickqTask: the Celery task of a job name, with the run guard and the heartbeat.

A Celery message only wakes a job up; the record in Redis decides. Each
message carries ``(job_id, attempt)``, and the "start run" script runs the
handler only when the record exists, is waiting, is at that attempt and a
``max_jobs_num`` slot is free. Duplicates (redelivery, visibility timeout,
a re-published parked job) are dropped there, so the handler runs once. A chunk's
message, ``(job_id, attempt, more)``, asks for several jobs: each goes through the
guard in turn, as if its own message had come.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded

from ..exceptions import RedisUnavailable
from ..records import Job, from_timestamp
from .heartbeat import heartbeat
from .loops import after_run

if TYPE_CHECKING:
    from ..client import Kickq
    from ..scripts import Ended, Started
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


@dataclass(frozen=True)
class Turn:
    """One job a message asks to run: its id and attempt, and the token of the run it may start."""

    job_id: str
    attempt: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


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

    def run_job(self, job_id: str, attempt: int = 1, more: Sequence[Sequence[Any]] = ()) -> Any:
        if more:
            return self._run_chunk([Turn(job_id, int(attempt)), *(Turn(str(i), int(a)) for i, a in more)])
        done, _ = self._run_one(Turn(job_id, int(attempt)))
        if done is None:
            raise Ignore()  # a duplicate, a deleted or finished job, one waiting: no success
        return self._report(*done)

    def _run_one(self, turn: Turn, started: Started | None = None, following: Turn | None = None,
                 in_chunk: bool = False) -> tuple[tuple[Job, Outcome, Ended] | None, Started | None]:
        """Start a run of the job if the guard lets it (unless ``started`` already), run and finish
        it; ``following``: start that job's run with the finish, and reply its start too. Returns
        (job, outcome, end) or None when the guard said no, and the following job's start."""
        kq = self.kickq
        store = kq.store
        options = kq.options
        job_id, token = turn.job_id, turn.token
        if started is None:
            started = store.start_run(job_id, turn.attempt, token, options["lock_timeout"])
        while started.status == "early" and started.wait <= 1.0:
            # the message came a moment before the job is due (see lua/start.lua)
            time.sleep(started.wait)
            started = store.start_run(job_id, turn.attempt, token, options["lock_timeout"])
        if started.status != "run":
            logger.debug("kickq: %s %s not run (%s)", self.job_name, job_id, started.status)
            return None, None
        job = Job(job_id, self.job_name, "processing", None, started.data,
                  len(started.runs) + 1, started.runs, from_timestamp(started.created_at),
                  recorder=lambda value_json: store.progress(job_id, token, value_json))
        heartbeat.hold(store, options["lock_timeout"], job_id, token, job)
        try:
            if in_chunk and started.process_timeout:
                heartbeat.limit(job_id, started.process_timeout)  # (a chunk's message has no time limit)
            ran = self._run_handler(job)
            ended, after = self._finish(store, turn, ran, following)
        finally:
            heartbeat.release(job_id)
        try:
            after_run(kq, ended, ran.result)
        except Exception:
            if after is None or after.status != "run":
                raise
            # the next job of the chunk has started: run it (this follow-up is lost either way)
            logger.exception("kickq: the follow-up of %s %s failed", self.job_name, job_id)
        return (job, ran, ended), after

    def _run_chunk(self, turns: Sequence[Turn]) -> dict[str, Any]:
        """Run the jobs of a chunk's message in turn, each as if its own message had come (its
        guard, limits, heartbeat, process_timeout, retries and delete), a job's finish and the
        next one's start in one round trip. Celery is told of the chunk: the first final failure
        of a job (raised once all ran; the others are logged), else the first retry, else the
        results of the jobs that ran; Ignore when none ran."""
        results: dict[str, Any] = {}
        failure: BaseException | None = None
        retry: Retry | None = None
        started: Started | None = None
        store, lock_timeout = self.kickq.store, self.kickq.options["lock_timeout"]
        # the jobs ahead are held at once (the redelivery sweep may look any moment), then by the
        # heartbeat while the chunk runs: should this worker die, they are published again
        store.heartbeat(lock_timeout, [], [turn.job_id for turn in turns[1:]])
        try:
            for index, turn in enumerate(turns):
                heartbeat.hold_ahead(turns[0].token, store, lock_timeout,
                                     [later.job_id for later in turns[index + 1:]])
                following = turns[index + 1] if index + 1 < len(turns) else None
                done, started = self._run_one(turn, started, following, in_chunk=True)
                if done is None:
                    continue
                job = done[0]
                try:
                    results[job.id] = self._report(*done)
                except Ignore:
                    pass
                except Retry as exc:
                    logger.info("kickq: %s", exc)
                    retry = retry or exc
                except Exception as exc:
                    if failure is None:
                        failure = exc
                    else:
                        logger.error("kickq: %s %s run %d failed", job.name, job.id, job.run, exc_info=exc)
        finally:
            heartbeat.hold_ahead(turns[0].token, store, lock_timeout, [])
        if failure is not None:
            raise failure
        if retry is not None:
            raise retry
        if not results:
            raise Ignore()
        return results

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

    def _finish(self, store: JobStore, turn: Turn, ran: Outcome,
                following: Turn | None) -> tuple[Ended, Started | None]:
        """The finish script (with the start of ``following``), sent again while Redis is away (or
        a write did not reach the replicas it must) for up to lock_timeout: the heartbeat still
        holds the run, and the same finish (or start) sent twice counts once."""
        options = self.kickq.options
        purge = options["purge_timeout"] if options["purge_jobs"] else 0
        deadline = time.monotonic() + options["lock_timeout"]
        while True:
            try:
                if following is None:
                    return store.finish_run(turn.job_id, turn.token, ran.outcome, ran.payload, purge,
                                            ran.traceback), None
                return store.finish_then_start(
                    turn.job_id, turn.token, ran.outcome, ran.payload, purge, ran.traceback,
                    (following.job_id, following.attempt, following.token, options["lock_timeout"]))
            except RedisUnavailable:
                if time.monotonic() > deadline:
                    raise
                logger.warning("kickq: finishing %s failed, trying again", turn.job_id)
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

    def run(self: KickqTask, job_id: str, attempt: int = 1, more: Sequence[Sequence[Any]] = ()) -> Any:
        return self.run_job(job_id, attempt, more)

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
