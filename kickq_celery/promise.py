"""Tombstoning: a Promise of a job's final outcome, over Celery's AsyncResult.

The worker stores a tombstoned job's outcome in the Celery result backend
under the job id only when the outcome is final, so the promise settles once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from .exceptions import JobFailed, TombstoneTimeout


@dataclass(frozen=True)
class Response:
    """The outcome of a job that completed."""

    id: str
    job_name: str
    complete: bool
    state: str
    result: Any


class Promise:
    """The final outcome of a tombstoned job; settles once.

    ``wait()`` returns a :class:`Response` or raises :class:`JobFailed`,
    :class:`JobDeleted` or :class:`TombstoneTimeout`; ``then()`` runs callbacks
    on a background thread; ``await promise`` works inside asyncio.
    """

    def __init__(self, job_id: str, job_name: str, async_result: AsyncResult | None,
                 deadline: float, settle: Callable[[], Response] | None = None) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self.async_result = async_result
        self.deadline = deadline
        self._settle = settle or self._from_async_result
        self._lock = threading.Lock()
        self._outcome: tuple[Response | None, BaseException | None] | None = None

    def _from_async_result(self) -> Response:
        assert self.async_result is not None
        remaining = self.deadline - time.time()
        try:
            if remaining <= 0 and not self.async_result.ready():
                raise CeleryTimeoutError()
            value = self.async_result.get(timeout=max(remaining, 0.001), propagate=False,
                                          disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise TombstoneTimeout(
                f"job {self.job_id} ({self.job_name}) did not finish within its tombstone_timeout",
                self.job_id, "tombstone timeout") from None
        if self.async_result.successful():
            return Response(self.job_id, self.job_name, True, "success", value)
        if isinstance(value, JobFailed):
            raise value
        raise JobFailed(f"job {self.job_id} failed: {value}", self.job_id, str(value))

    def wait(self) -> Response:
        """Block until the job's final outcome or the tombstone deadline."""
        with self._lock:
            if self._outcome is None:
                try:
                    self._outcome = (self._settle(), None)
                except JobFailed as exc:
                    self._outcome = (None, exc)
            response, error = self._outcome
        if error is not None:
            raise error
        assert response is not None
        return response

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
        return Promise(self.job_id, self.job_name, None, self.deadline, future.result)

    def __await__(self) -> Generator[Any, None, Response]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.wait).__await__()

    def __repr__(self) -> str:
        return f"<Promise job={self.job_id} name={self.job_name!r}>"
