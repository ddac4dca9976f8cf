"""Tombstoning: a Promise of a job's final outcome, over Celery's AsyncResult.

The worker stores a tombstoned job's outcome in the Celery result backend under the
job id only when the outcome is final, so the promise settles once. ``wait()`` blocks
on the ``AsyncResult``; ``await promise`` listens without a thread (see
:mod:`~kickq_celery.waiters`); both read the stored meta the same way
(:func:`response_from_meta`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from . import waiters
from .exceptions import JobFailed, TombstoneTimeout


@dataclass(frozen=True)
class Response:
    """The outcome of a job that completed."""

    id: str
    job_name: str
    complete: bool
    state: str
    result: Any


#: what a settle produced: (the response, None) or (None, the JobFailed to raise)
Outcome = tuple[Response | None, JobFailed | None]


def response_from_meta(job_id: str, job_name: str, meta: Mapping[str, Any]) -> Response:
    """The :class:`Response` of a final outcome stored in the result backend (its decoded
    meta: ``status``, a Celery ready state, and ``result``); raises the :class:`JobFailed`
    (or :class:`JobDeleted`) a failed job holds."""
    value = meta.get("result")
    if meta.get("status") == states.SUCCESS:
        return Response(job_id, job_name, True, "success", value)
    if isinstance(value, JobFailed):
        raise value
    raise JobFailed(f"job {job_id} failed: {value}", job_id, str(value))


def tombstone_timeout(job_id: str, job_name: str) -> TombstoneTimeout:
    return TombstoneTimeout(f"job {job_id} ({job_name}) did not finish within its tombstone_timeout",
                            job_id, "tombstone timeout")


def _capture(settle: Callable[[], Response]) -> Outcome:
    try:
        return settle(), None
    except JobFailed as exc:
        return None, exc


class Promise:
    """The final outcome of a tombstoned job; settles once.

    ``wait()`` returns a :class:`Response` or raises :class:`JobFailed`,
    :class:`JobDeleted` or :class:`TombstoneTimeout`; ``then()`` runs callbacks
    on a background thread; ``await promise`` works inside asyncio.

    ``await promise`` holds no thread while it waits when the app's result backend is
    Celery's Redis backend (``redis://``, ``rediss://``, ``redis+socket://`` or
    ``sentinel://``, as kickq supplies): the running event loop's one listener
    (:mod:`~kickq_celery.waiters`) subscribes to the job's result key, then reads it
    once (a job that finished before the await settles too), and a loop timer keeps
    the tombstone deadline. With another result backend, ``await`` runs ``wait()`` in
    the loop's default executor (a thread per pending await). The promise ``then()``
    returns is awaited on its callback thread's future. Whichever settles first
    (``wait()`` or ``await``), later waits and awaits return the same outcome without I/O.
    """

    def __init__(self, job_id: str, job_name: str, async_result: AsyncResult | None,
                 deadline: float, settle: Callable[[], Response] | None = None) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self.async_result = async_result
        self.deadline = deadline
        self._custom_settle = settle is not None
        self._settle = settle or self._from_async_result
        #: the future of the callback thread, for a promise that then() returned
        self._future: Future[Response] | None = None
        self._lock = threading.Lock()  # one blocking settle at a time
        self._settled = threading.Lock()  # guards _outcome (held for no I/O)
        self._outcome: Outcome | None = None

    def _from_async_result(self) -> Response:
        assert self.async_result is not None
        remaining = self.deadline - time.time()
        try:
            if remaining <= 0 and not self.async_result.ready():
                raise CeleryTimeoutError()
            value = self.async_result.get(timeout=max(remaining, 0.001), propagate=False,
                                          disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise tombstone_timeout(self.job_id, self.job_name) from None
        return response_from_meta(self.job_id, self.job_name,
                                  {"status": self.async_result.state, "result": value})

    def _record(self, outcome: Outcome) -> Outcome:
        """Keep the first outcome; return the one kept."""
        with self._settled:
            if self._outcome is None:
                self._outcome = outcome
            return self._outcome

    def _result(self) -> Response:
        assert self._outcome is not None
        response, error = self._outcome
        if error is not None:
            raise error
        assert response is not None
        return response

    def wait(self) -> Response:
        """Block until the job's final outcome or the tombstone deadline."""
        if self._outcome is None:
            with self._lock:
                if self._outcome is None:
                    self._record(_capture(self._settle))
        return self._result()

    def then(self, on_complete: Callable[[Response], Any] | None = None,
             on_failed: Callable[[JobFailed], Any] | None = None) -> Promise:
        """Call ``on_complete(response)`` or ``on_failed(exc)`` once settled.

        Returns a new Promise of the callback's return value.
        """
        future: Future[Response] = Future()

        def settle() -> None:
            try:
                response = self.wait()
            except JobFailed as exc:
                if on_failed is None:
                    future.set_exception(exc)
                    return
                outcome = on_failed(exc)
            else:
                outcome = on_complete(response) if on_complete else response.result
            future.set_result(Response(self.job_id, self.job_name, True, "success", outcome))

        def call() -> None:
            try:
                settle()
            except BaseException as exc:  # a callback raised: the derived promise fails
                if not future.done():
                    future.set_exception(exc if isinstance(exc, JobFailed)
                                         else JobFailed(repr(exc), self.job_id, repr(exc)))

        threading.Thread(target=call, name=f"kickq-promise-{self.job_id}", daemon=True).start()
        derived = Promise(self.job_id, self.job_name, None, self.deadline, future.result)
        derived._future = future
        return derived

    def __await__(self) -> Generator[Any, None, Response]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> Response:
        if self._outcome is None:
            self._record(await self._settle_async())
        return self._result()

    async def _settle_async(self) -> Outcome:
        if self._future is not None:  # then()'s promise: its callback thread settles the future
            try:
                # shielded: a cancelled await must not cancel the future other waiters share
                return await asyncio.shield(asyncio.wrap_future(self._future)), None
            except JobFailed as exc:
                return None, exc
        backend = None if self._custom_settle or self.async_result is None else self.async_result.backend
        listener = None if backend is None else waiters.listener_for(backend)
        if backend is None or listener is None:  # not a Redis result backend: a thread waits
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, _capture, self.wait)

        def final(payload: bytes) -> dict[str, Any] | None:
            meta: dict[str, Any] = backend.decode_result(payload)
            return meta if meta.get("status") in states.READY_STATES else None

        try:
            meta = await listener.wait(backend.get_key_for_task(self.job_id),
                                       self.deadline - time.time(), final)
        except TimeoutError:
            return None, tombstone_timeout(self.job_id, self.job_name)
        return _capture(lambda: response_from_meta(self.job_id, self.job_name, meta))

    def __repr__(self) -> str:
        return f"<Promise job={self.job_id} name={self.job_name!r}>"
