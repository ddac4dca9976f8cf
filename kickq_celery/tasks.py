"""Celery-style tasks on kickq jobs: ``@kq.task`` for existing ``@app.task`` functions.

A :class:`KickqTaskFunction` maps a Celery task call onto the job API: ``delay`` and
``apply_async`` create a job of the task's name whose data is ``{"args": [...],
"kwargs": {...}}``, and return a :class:`KickqResult`; the worker runs it through the
same run guard, limits, retries and ghosts as any job (its handler unpacks the data).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery import states
from celery.result import AsyncResult

from .exceptions import InvalidJobOptions, JobDeleted, JobFailed, KickqError
from .options import FLAG_NAMES, canonical
from .plan import dumps
from .promise import Promise, response_from_meta
from .records import Job

if TYPE_CHECKING:
    from .client import Kickq

#: the kickq states as Celery names them
CELERY_STATES = {"queued": states.PENDING, "delayed": states.PENDING, "processing": states.STARTED,
                 "retry": states.RETRY, "ghost": states.RETRY, "success": states.SUCCESS,
                 "fail": states.FAILURE}
#: process options (the rest of ``kq.task``'s keyword arguments are job flags)
PROCESS_OPTIONS = ("max_jobs_num", "maxJobsNum", "rate_limit", "rateLimit", "max_jobs_per_key",
                   "maxJobsPerKey")
#: Celery's publish options that have nothing to do here: a create writes, or raises
IGNORED_CALL_OPTIONS = ("retry", "retry_policy", "serializer", "compression", "headers")
UNSUPPORTED_HINT = ("canvas (signatures, chains, groups, chords), links, queues and routing are not "
                    "supported: a kickq task is one job, in its own queue")


class KickqResult(AsyncResult):  # type: ignore[misc]
    """The Celery ``AsyncResult`` of a kickq task's job (its ``id`` is the job id).

    ``get()`` waits for the final outcome (a failed run that will be retried does not end
    it), ``state`` follows the job record, ``revoke()`` is a durable ``kq.delete()``, and
    ``await result`` waits without a thread, as ``await job.promise`` does.
    """

    def __init__(self, job_id: str, kickq: Kickq, job_name: str) -> None:
        super().__init__(job_id, app=kickq.app)
        self.kickq = kickq
        self.job_name = job_name

    def _promise(self, timeout: float | None) -> Promise:
        deadline = math.inf if timeout is None else time.time() + timeout
        return Promise(self.id, self.job_name, AsyncResult(self.id, app=self.app), deadline)

    def get(self, timeout: float | None = None, propagate: bool = True, **_: Any) -> Any:
        """The job's result once final; raises :class:`JobFailed` after its last failed run,
        :class:`JobDeleted` after a revoke, :class:`TombstoneTimeout` after ``timeout``
        seconds (with ``propagate=False``, the failure is returned instead)."""
        try:
            return self._promise(timeout).wait().result
        except JobFailed as exc:
            if propagate or exc.has_timeout:
                raise
            return exc

    wait = get

    def __copy__(self) -> KickqResult:
        return KickqResult(self.id, self.kickq, self.job_name)

    def __reduce__(self) -> Any:
        raise TypeError("a KickqResult holds its Kickq and cannot be pickled: pass its id, and make "
                        "one with task.AsyncResult(id)")

    def __await__(self) -> Generator[Any, None, Any]:
        return self._get_async().__await__()

    async def _get_async(self) -> Any:
        return (await self._promise(None)).result

    def _stored(self) -> tuple[str, Any]:
        """(Celery state, result) from the job record, or from the result backend once the
        record is gone (purged, or deleted: REVOKED)."""
        record = self.kickq.store.get(self.id)
        if record is not None:
            state = CELERY_STATES[record.state]
            if state == states.FAILURE:
                return state, JobFailed(f"job {self.id} failed: {record.last_error}", self.id,
                                        record.last_error or "")
            return state, record.result if state == states.SUCCESS else None
        meta = self.backend.get_task_meta(self.id)
        if meta.get("status") not in states.READY_STATES:
            return states.PENDING, None
        try:
            return states.SUCCESS, response_from_meta(self.id, self.job_name, meta).result
        except JobDeleted as exc:
            return states.REVOKED, exc
        except JobFailed as exc:
            return states.FAILURE, exc

    @property
    def state(self) -> str:
        return self._stored()[0]

    status = state

    @property
    def result(self) -> Any:
        return self._stored()[1]

    info = result

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return bool(self._stored()[0] == states.SUCCESS)

    def failed(self) -> bool:
        return bool(self._stored()[0] == states.FAILURE)

    def revoke(self, connection: Any = None, terminate: bool = False, signal: Any = None,
               wait: bool = False, timeout: float | None = None) -> None:
        """Delete the job for good (``terminate=True`` also stops a running run)."""
        self.kickq.delete(self.id, terminate=terminate)

    def __repr__(self) -> str:
        return f"<KickqResult: {self.id} ({self.job_name})>"


def job_data(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A task call's job data; InvalidJobData when it is not JSON-serializable."""
    if args is not None and (isinstance(args, (str, bytes)) or not isinstance(args, Sequence)):
        raise InvalidJobOptions(f"args must be a list or tuple, got {args!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidJobOptions(f"kwargs must be a mapping, got {kwargs!r}")
    data = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    dumps(data, "task arguments")  # InvalidJobData before anything is written
    return data


def countdown_of(countdown: float | None, eta: datetime | None) -> float | None:
    """Seconds from now for Celery's ``countdown`` or ``eta`` (naive: UTC, as Celery takes it)."""
    if countdown is not None and eta is not None:
        raise InvalidJobOptions("give countdown or eta, not both")
    if eta is None:
        return None if countdown is None else max(0.0, float(countdown))
    if not isinstance(eta, datetime):
        raise InvalidJobOptions(f"eta must be a datetime, got {eta!r}")
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    return max(0.0, (eta - datetime.now(timezone.utc)).total_seconds())


class KickqTaskFunction:
    """What ``@kq.task`` returns: a Celery-style task whose calls are kickq jobs."""

    def __init__(self, kickq: Kickq, fn: Callable[..., Any], name: str, bind: bool,
                 flags: Mapping[str, Any]) -> None:
        self.kickq = kickq
        self.fn = fn
        self.name = name
        self.bind = bind
        self.flags = dict(flags)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now, as calling a Celery task does (bound: with a job
        context that is not a job in Redis)."""
        if self.bind:
            job = Job("", self.name, "processing", data={"args": list(args), "kwargs": kwargs})
            return self.fn(job, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def run_job(self, job: Job) -> Any:
        """The job handler: the function called with the job's args and kwargs."""
        data = job.data if isinstance(job.data, Mapping) else {}
        args, kwargs = data.get("args", []), data.get("kwargs", {})
        if self.bind:
            return self.fn(job, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> KickqResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
                    countdown: float | None = None, eta: datetime | None = None,
                    task_id: str | None = None, **flags: Any) -> KickqResult:
        """Create the job of this call: Celery's ``countdown`` / ``eta`` are its delay, ``task_id``
        its (idempotent) ``job_id``, any other keyword a kickq job flag, except Celery's publish
        options (``retry``, ``retry_policy``...: a create writes or raises), which are ignored.
        Job retries are set in ``@kq.task(retry=...)``."""
        flags = {key: value for key, value in flags.items() if key not in IGNORED_CALL_OPTIONS}
        unsupported = [key for key in flags if _camel_flag(key) is None]
        if unsupported:
            raise InvalidJobOptions(f"apply_async option(s) {unsupported} not supported: {UNSUPPORTED_HINT}")
        if (countdown, eta) != (None, None) and any(_camel_flag(key) == "delay" for key in flags):
            raise InvalidJobOptions("give delay, countdown or eta, not two of them")
        data = job_data(args, kwargs)
        given = {**self.flags, **flags}
        delay = countdown_of(countdown, eta)
        if delay is not None:
            given["delay"] = delay
        given.setdefault("tombstone", True)  # KickqResult.get() waits on the stored outcome
        job = self.kickq.create(self.name, data, job_id=task_id, **given)
        assert job is not None
        return KickqResult(job.id, self.kickq, self.name)

    def AsyncResult(self, task_id: str) -> KickqResult:  # noqa: N802 (Celery's name)
        return KickqResult(task_id, self.kickq, self.name)

    def _unsupported(self, *_: Any, **__: Any) -> Any:
        raise KickqError(UNSUPPORTED_HINT)

    s = si = signature = map = starmap = chunks = _unsupported

    def __repr__(self) -> str:
        return f"<kickq task {self.name}>"


def _camel_flag(key: str) -> str | None:
    try:
        return canonical(key, InvalidJobOptions, FLAG_NAMES)
    except InvalidJobOptions:
        return None


def make_task(kickq: Kickq, fn: Callable[..., Any], name: str | None, bind: bool,
              options: Mapping[str, Any]) -> KickqTaskFunction:
    """Register ``fn`` as the handler of job ``name`` (default: its module-qualified name),
    with the process options and job flags of ``options``."""
    process = {key: value for key, value in options.items() if key in PROCESS_OPTIONS}
    flags = {key: value for key, value in options.items() if key not in PROCESS_OPTIONS}
    for key in flags:
        if _camel_flag(key) is None:
            raise InvalidJobOptions(f"kq.task option {key!r} is neither a process option "
                                    f"({', '.join(PROCESS_OPTIONS[::2])}) nor a job flag")
        if canonical(key, InvalidJobOptions, FLAG_NAMES) == "delay":
            raise InvalidJobOptions("delay is given per call (countdown=, eta=), not to kq.task")
    job_name = name or f"{fn.__module__}.{fn.__qualname__}"
    task = KickqTaskFunction(kickq, fn, job_name, bind, flags)
    kickq.process(job_name, task.run_job, **process)
    return task
