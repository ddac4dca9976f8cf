"""Kickq: the configuration facade and the job API (create, process, delete, get, stats, cron).

A thin client: :mod:`.plan` validates and plans, :class:`~.store.JobStore` and
:class:`~.publisher.Publisher` do the I/O. The worker side (:mod:`.worker`) is
reached only to register handlers and to add the worker step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis
from celery import Celery
from celery.backends.redis import RedisBackend
from kombu.entity import Exchange, Queue
from redis.cluster import RedisCluster

from . import cron as crontab
from . import plan, registry, scripts, settings
from .connection import Client, async_client_for, client_for, close_all, redis_errors, same_server
from .exceptions import ConfigError, InvalidJobOptions, JobDeleted, JobNotFound, KickqError
from .keys import FINAL_STATES, STATES, Keys
from .options import Limits, process_limits
from .plan import CreatePlan
from .promise import Promise
from .publisher import Publisher, redis_broker_url
from .records import Job, JobRecord
from .stats import Stats
from .store import AsyncJobStore, JobStore
from .tasks import KickqTaskFunction, make_task
from .tombstones import asettle, ended_outcome, ensure_result_backend, settle
from .worker.bootstep import install
from .worker.task import Handler, register_task

logger = logging.getLogger("kickq_celery")

#: (scope, job name) of the names whose live workers this process looked up at their first create
_handled_checked: set[tuple[Any, str]] = set()
_handled_lock = threading.Lock()


class Kickq:
    """kickq for a Celery app: create, process, delete and inspect jobs by name.

    Args:
        app: the Celery app (default: ``celery.current_app``).
        **overrides: options for this instance (see ``Kickq.config``).
    """

    # --- the configuration facade -----------------------------------------

    @classmethod
    def config(cls, *args: Any, **kwargs: Any) -> None:
        """Merge options into the global config.

        Forms: ``config(mapping)``, ``config(key=value)``, ``config("key", value)``.
        Keys may be camelCase (kickq) or snake_case. Raises :class:`ConfigError`
        (naming the key) and changes nothing when any key or value is bad.
        """
        settings.merge(*args, **kwargs)

    @classmethod
    def reset(cls) -> None:
        """Back to the original defaults; closes kickq's Redis connections."""
        settings.clear()
        close_all()

    @classmethod
    def get_config(cls) -> dict[str, Any]:
        """A snake_case copy of the global config (defaults included)."""
        return settings.snapshot()

    # --- instance ----------------------------------------------------------

    def __init__(self, app: Celery | None = None, **overrides: Any) -> None:
        if app is None:
            from celery import current_app

            app = current_app._get_current_object()
        self.app: Celery = app
        self._options = settings.InstanceOptions(app, overrides)
        self._store: JobStore | None = None
        self._store_key: Any = None
        self._queues: dict[str, Queue] = {}
        self._publisher: Publisher | None = None
        #: event loop -> (settings, its asyncio store)
        self._astores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, AsyncJobStore]] = (
            weakref.WeakKeyDictionary())
        #: job name -> the limits of the names this instance has handlers for
        self.processed: dict[str, Limits] = {}
        #: job name -> its handler
        self.handlers: dict[str, Handler] = {}
        registry.register(app, self)
        install(app)

    @property
    def overrides(self) -> dict[str, Any]:
        """The options given to this instance (``Kickq(app, **overrides)``), validated."""
        return dict(self._options.overrides)

    @property
    def options(self) -> dict[str, Any]:
        """This instance's resolved options (everything but per-job flags)."""
        return self._options.get()

    @property
    def keys(self) -> Keys:
        return Keys(self.options["redis_namespace"])

    @property
    def scope(self) -> tuple[str, str]:
        """(Redis setting, namespace): instances with the same scope share all state."""
        options = self.options
        return repr(options["redis"]), options["redis_namespace"]

    @property
    def store(self) -> JobStore:
        options = self.options
        key = (self.scope, options["redis_timeout"], options["redis_wait_replicas"])
        if self._store is None or self._store_key != key:
            self._store = JobStore(client_for(options["redis"], options["redis_timeout"]),
                                   Keys(options["redis_namespace"]), options["redis_wait_replicas"],
                                   options["redis_timeout"])
            self._store_key = key
        return self._store

    @property
    def astore(self) -> AsyncJobStore:
        """The store of the running event loop, on an asyncio client of the same Redis."""
        options = self.options
        key = (self.scope, options["redis_timeout"], options["redis_wait_replicas"])
        loop = asyncio.get_running_loop()
        cached = self._astores.get(loop)
        if cached is None or cached[0] != key:
            client = async_client_for(options["redis"], options["redis_timeout"])
            cached = (key, AsyncJobStore(client, Keys(options["redis_namespace"]),
                                         options["redis_wait_replicas"], options["redis_timeout"]))
            self._astores[loop] = cached
        return cached[1]

    @property
    def redis(self) -> Client:
        """kickq's Redis client."""
        return self.store.client

    @property
    def horizon(self) -> float:
        """Delays up to this many seconds are Celery countdowns; longer ones wait in Redis."""
        return plan.horizon(self.options, self.app.conf)

    @property
    def publisher(self) -> Publisher:
        """Publishes this app's job messages (directly on a Redis broker)."""
        if self._publisher is None:
            url = redis_broker_url(self.app)
            broker = client_for(url, self.options["redis_timeout"]) if url else None
            assert broker is None or isinstance(broker, redis.Redis)  # a broker is never a Cluster
            self._publisher = Publisher(self.app, broker)
        return self._publisher

    def task_name(self, name: str) -> str:
        """The Celery task and queue name of job ``name``."""
        return self.keys.task_name(name)

    def queue(self, name: str) -> Queue:
        task_name = self.task_name(name)
        queue = self._queues.get(task_name)
        if queue is None:
            queue = Queue(task_name, Exchange(task_name), routing_key=task_name)  # type: ignore[no-untyped-call]
            self._queues[task_name] = queue
        return queue

    # --- creating ----------------------------------------------------------

    def create(self, name: str, data: Any = None, opts: Mapping[str, Any] | None = None,
               callback: Callable[[Exception | None, str | None, Promise | None], Any] | None = None,
               *, job_id: str | None = None, on_commit: bool = False, **flags: Any) -> Job | None:
        """Create a job; returns it (with a ``promise`` when tombstoned).

        ``job_id``: the caller's id; while a job with it exists, nothing is written and that
        job is returned (``created=False``). ``on_commit=True``: written when the current Django
        transaction commits (never if it rolls back); the returned job already has its id.
        With ``callback``, calls ``callback(err, job_id, promise)`` like kickq for
        Node, and on failure ``callback(exc, None, None)`` instead of raising.
        """
        try:
            ids = None if job_id is None else [job_id]
            if on_commit:
                job = self._create_on_commit(name, data, opts, flags, ids)
            else:
                job = self._create(name, [data], opts, flags, ids)[0]
        except KickqError as exc:
            if callback is None:
                raise
            callback(exc, None, None)
            return None
        if callback is not None:
            callback(None, job.id, job.promise)
        return job

    def create_many(self, name: str, items: Iterable[Any], opts: Mapping[str, Any] | None = None,
                    *, job_ids: Sequence[str] | None = None, **flags: Any) -> list[Job]:
        """Create one job per item (its data); validates all before writing any. ``job_ids``:
        the caller's ids, one per item (see ``create``'s ``job_id``)."""
        return self._create(name, list(items), opts, flags, job_ids)

    def _plan(self, name: str, items: Sequence[Any], given: Mapping[str, Any] | None,
              flags: Mapping[str, Any], job_ids: Sequence[str] | None = None) -> CreatePlan:
        """Validate and plan a create (sync or asyncio); a tombstone gets its result backend."""
        planned = plan.plan_create(self.options, self.horizon, name, items, given, flags, job_ids)
        if planned.jobs and planned.tombstone:
            ensure_result_backend(self.app, self.redis, self.keys)
        if planned.chosen_ids:
            planned = replace(planned, forget_prefix=self._result_key_prefix())
        return planned

    def _result_key_prefix(self) -> str:
        """The key prefix of the result backend's outcomes when they live in kickq's own Redis (not
        a Cluster), so that a create of a reused job_id drops an outcome its earlier job left.
        ('' otherwise: a result backend elsewhere keeps it until it expires.)"""
        if not self.app.conf.result_backend or isinstance(self.store.client, RedisCluster):
            return ""
        backend = self.app.backend
        try:
            if isinstance(backend, RedisBackend) and same_server(backend.client, self.store.client):
                return str(backend.get_key_for_task("-").decode()[:-1])  # (an id must not be empty)
        except Exception as exc:  # a backend that cannot say: nothing to drop
            logger.debug("kickq: could not compare the result backend with kickq's Redis: %s", exc)
        return ""

    def _create(self, name: str, items: Sequence[Any], given: Mapping[str, Any] | None,
                flags: Mapping[str, Any], job_ids: Sequence[str] | None = None) -> list[Job]:
        planned = self._plan(name, items, given, flags, job_ids)
        if not planned.jobs:
            return []
        return self._write_planned(planned)

    def _write_planned(self, planned: CreatePlan) -> list[Job]:
        """Write a planned create; the jobs to hand back (a job_id's ended job settles its promise)."""
        jobs = planned.created(self._write(planned), self._promise)
        self._settle_ended(planned, jobs)
        self._warn_if_unhandled(planned.name)
        return jobs

    def _create_on_commit(self, name: str, data: Any, given: Mapping[str, Any] | None,
                          flags: Mapping[str, Any], job_ids: Sequence[str] | None) -> Job:
        """Plan now (bad input raises here), write when the Django transaction commits."""
        try:
            from django.db import transaction
        except ImportError:
            raise ConfigError("on_commit=True needs Django (django.db.transaction.on_commit)") from None
        planned = self._plan(name, [data], given, flags, job_ids)
        job_id, data_json = planned.jobs[0]
        deadline = time.time() + float(planned.flags["tombstone_timeout"])
        promise = self._promise(job_id, planned.name, deadline) if planned.tombstone else None
        job = Job(job_id, planned.name, "delayed" if planned.delay > 0 else "queued", promise,
                  data=json.loads(data_json), created_at=None, created=True)

        transaction.on_commit(lambda: self._write_planned(planned))
        return job

    def _settle_ended(self, planned: CreatePlan, jobs: Sequence[Job]) -> None:
        """A tombstone asked of a job_id whose job had ended already: its promise gets that outcome
        (a job tombstoned from the start has it stored already; this stores it the same)."""
        for job in jobs:
            if job.created or not planned.tombstone or job.state not in FINAL_STATES:
                continue
            record = self.store.get(job.id)
            if record is not None:
                settle(self.app, self.store, self.options, job.id, ended_outcome(record))

    def _first_create(self, name: str) -> bool:
        """Whether this is the process's first create of ``name`` (whose workers are then looked
        up: only then, so the other creates make no extra round trip)."""
        key = (self.scope, name)
        with _handled_lock:
            if key in _handled_checked:
                return False
            _handled_checked.add(key)
            return True

    def _warn_if_unhandled(self, name: str) -> None:
        """At the first create of ``name`` in this process, warn when no live worker handles it.
        A process with a handler for the name is checked too: registering a handler does not
        make it a worker."""
        if self._first_create(name):
            try:
                self._warn_unless(self.store.live_workers([name])[name], name)
            except KickqError as exc:  # the job is written; this is only a hint
                logger.debug("kickq: could not look up the workers of job %r: %s", name, exc)

    def _warn_unless(self, live: Sequence[str], name: str) -> None:
        if not live:
            logger.warning("kickq: no live worker handles job %r in namespace %r; it waits in its "
                           "queue until one starts", name, self.options["redis_namespace"])

    def _calls(self, planned: CreatePlan, with_messages: bool) -> list[scripts.Call[scripts.Created]]:
        """The create's script calls, one per part (see CreatePlan.parts); ``with_messages``: each
        also pushes its jobs' messages (the broker is the same Redis)."""
        if not with_messages:
            return [part.call for part in planned.parts()]
        queue, task_name = self.queue(planned.name), self.task_name(planned.name)
        return [part.call_with(queue.name, self.publisher.encoded(
                    queue.name, task_name, planned.process_timeout, part.messages))
                for part in planned.parts()]

    def _with_messages(self, planned: CreatePlan) -> bool:
        """Whether the create script pushes the messages with the records: neither without the other."""
        broker = self.publisher.broker
        return bool(planned.messages) and broker is not None and same_server(broker, self.store.client)

    def _write(self, planned: CreatePlan) -> scripts.Created:
        """Write the records and publish the messages of a create; returns the create's reply."""
        store, with_messages = self.store, self._with_messages(planned)
        reply = scripts.Created.combine(store.run_all(self._calls(planned, with_messages)))
        if with_messages:
            return reply
        messages = planned.unwritten(reply)
        try:
            self.publisher.publish(self.queue(planned.name), self.task_name(planned.name),
                                   planned.process_timeout, messages)
        except Exception as exc:
            for message in messages:  # no record without its message
                store.delete(message.job_id)
            if isinstance(exc, KickqError):
                raise
            raise KickqError(f"could not publish to the Celery broker: {exc}") from exc
        return reply

    def _promise(self, job_id: str, name: str, deadline: float) -> Promise:
        return Promise(job_id, name, self.app.AsyncResult(job_id), deadline)

    # --- asyncio -------------------------------------------------------------

    async def acreate(self, name: str, data: Any = None, opts: Mapping[str, Any] | None = None,
                      *, job_id: str | None = None, **flags: Any) -> Job:
        """:meth:`create` for asyncio code: the same validation, job and errors, on an asyncio
        Redis client (the event loop is never blocked, no thread is used: see the README for a
        broker that is not Redis)."""
        return (await self._acreate(name, [data], opts, flags, None if job_id is None else [job_id]))[0]

    async def acreate_many(self, name: str, items: Iterable[Any], opts: Mapping[str, Any] | None = None,
                           *, job_ids: Sequence[str] | None = None, **flags: Any) -> list[Job]:
        """:meth:`create_many` for asyncio code."""
        return await self._acreate(name, list(items), opts, flags, job_ids)

    async def aget(self, job_id: str) -> JobRecord:
        """:meth:`get` for asyncio code."""
        record = await self.astore.get(job_id) if isinstance(job_id, str) else None
        if record is None:
            raise JobNotFound(f"no job {job_id!r} in namespace {self.options['redis_namespace']!r}")
        return record

    async def adelete(self, job_id: str, terminate: bool = False) -> bool:
        """:meth:`delete` for asyncio code."""
        if not isinstance(job_id, str):
            return False
        deleted = await self.astore.run(scripts.delete(job_id, terminate))
        if deleted.status and deleted.tombstone and not deleted.final:
            await asettle(self.app, self.store, self.astore, self.options, job_id,
                          JobDeleted(f"job {job_id} was deleted", job_id, "deleted"))
        return bool(deleted.status)

    async def astats(self, name: str | None = None) -> Stats:
        """:meth:`stats` for asyncio code."""
        store = self.astore
        names = [name] if name else await store.names()
        return Stats.from_raw(await store.raw_stats(names))

    async def _acreate(self, name: str, items: Sequence[Any], given: Mapping[str, Any] | None,
                       flags: Mapping[str, Any], job_ids: Sequence[str] | None) -> list[Job]:
        planned = self._plan(name, items, given, flags, job_ids)
        if not planned.jobs:
            return []
        jobs = planned.created(await self._awrite(planned), self._promise)
        for job in jobs:
            if not job.created and planned.tombstone and job.state in FINAL_STATES:
                record = await self.astore.get(job.id)
                if record is not None:
                    await asettle(self.app, self.store, self.astore, self.options, job.id,
                                  ended_outcome(record))
        if self._first_create(planned.name):
            try:
                self._warn_unless((await self.astore.live_workers([planned.name]))[planned.name],
                                  planned.name)
            except KickqError as exc:
                logger.debug("kickq: could not look up the workers of job %r: %s", planned.name, exc)
        return jobs

    async def _awrite(self, planned: CreatePlan) -> scripts.Created:
        """:meth:`_write` on the asyncio clients."""
        store, publisher, with_messages = self.astore, self.publisher, self._with_messages(planned)
        reply = scripts.Created.combine(await asyncio.gather(
            *(store.run(call) for call in self._calls(planned, with_messages))))
        if with_messages:
            return reply
        messages = planned.unwritten(reply)
        queue, task_name = self.queue(planned.name), self.task_name(planned.name)
        try:
            if messages and publisher.broker is not None:
                broker = async_client_for(redis_broker_url(self.app), self.options["redis_timeout"])
                with redis_errors(broker):
                    pipe = broker.pipeline(transaction=False)
                    publisher.push(pipe, queue, task_name, planned.process_timeout, messages)
                    await pipe.execute()
            else:  # another broker: kombu's producer, which has no asyncio side
                publisher.publish(queue, task_name, planned.process_timeout, messages)
        except Exception as exc:
            for message in messages:  # no record without its message
                await store.run(scripts.delete(message.job_id))
            if isinstance(exc, KickqError):
                raise
            raise KickqError(f"could not publish to the Celery broker: {exc}") from exc
        return reply

    # --- processing --------------------------------------------------------

    def process(self, names: str | Sequence[str], options: Any = None, handler: Any = None,
                **kwargs: Any) -> Any:
        """Register ``handler`` for job name(s); also usable as a decorator.

        Forms: ``process(names, options, handler)``, ``process(names, handler)``,
        ``@process(names, max_jobs_num=10)``. Options, each enforced across all workers:
        ``max_jobs_num`` (runs at once), ``rate_limit`` (starts per window: ``"100/m"``),
        ``max_jobs_per_key`` (runs at once of the jobs of one ``concurrency_key``).
        """
        if callable(options) and handler is None:
            options, handler = None, options
        limits = process_limits({**dict(options or {}), **kwargs})
        # anything but a list of names is one name (a bad one fails the name check)
        given = list(names) if isinstance(names, (list, tuple, set, frozenset)) else [names]
        job_names = [plan.check_name(name) for name in given]
        for name in job_names:
            if self.task_name(name) in self.app.tasks:
                raise ConfigError(f"job {name!r} already has a handler in this app")

        def register(fn: Handler) -> Handler:
            for name in job_names:
                if self.task_name(name) in self.app.tasks:
                    raise ConfigError(f"job {name!r} already has a handler in this app")
                register_task(self, name, fn)
                self.processed[name] = limits
                self.handlers[name] = fn
            return fn

        if handler is None:
            return register
        return register(handler)

    def task(self, fn: Callable[..., Any] | None = None, *, name: str | None = None, bind: bool = False,
             **options: Any) -> Any:
        """``@app.task`` for kickq: a Celery-style task (``delay``, ``apply_async``, a plain call)
        whose calls are jobs of ``name`` (default: the function's module-qualified name), with
        the process options (``max_jobs_num``, ``rate_limit``, ``max_jobs_per_key``) and job
        flags given. ``bind=True`` passes the job context first. See :mod:`.tasks`."""
        def decorate(function: Callable[..., Any]) -> KickqTaskFunction:
            return make_task(self, function, name, bind, options)

        if fn is None:
            return decorate
        return decorate(fn)

    # --- deleting and inspecting -------------------------------------------

    def delete(self, job_id: str, terminate: bool = False) -> bool:
        """Delete a job for good; True when it existed.

        A queued or delayed job never runs; a running one is not retried, and its record
        goes when the run ends. Waiters get :class:`JobDeleted`. ``terminate=True`` also
        stops a running run (prefork: within lock_timeout; other pools: ``job.deleted``
        turns True for the handler to check).
        """
        if not isinstance(job_id, str):
            return False
        deleted = self.store.delete(job_id, terminate)
        if deleted.status and deleted.tombstone and not deleted.final:
            settle(self.app, self.store, self.options, job_id,
                   JobDeleted(f"job {job_id} was deleted", job_id, "deleted"))
        return bool(deleted.status)

    def get(self, job_id: str) -> JobRecord:
        """The job's record; raises :class:`JobNotFound`."""
        record = self.store.get(job_id) if isinstance(job_id, str) else None
        if record is None:
            raise JobNotFound(f"no job {job_id!r} in namespace {self.options['redis_namespace']!r}")
        return record

    def jobs(self, state: str | None = None, name: str | None = None,
             offset: int = 0, limit: int = 50) -> list[JobRecord]:
        """Job records by state (all states when None) and name, oldest first, paged."""
        states = [state] if state else list(STATES)
        for each in states:
            if each not in STATES:
                raise InvalidJobOptions(f"unknown state {each!r}; one of {', '.join(STATES)}")
        return self.store.records(states, name, offset, limit)

    def stats(self, name: str | None = None) -> Stats:
        """Aggregate stats of one job name or of all (see :class:`Stats`)."""
        names = [name] if name else self.store.names()
        return Stats.from_raw(self.store.raw_stats(names))

    # --- cron ----------------------------------------------------------------

    def schedule(self, name: str, cron: str, data: Any = None,
                 opts: Mapping[str, Any] | None = None, tz: str = "UTC") -> str:
        """Create job ``name`` at every tick of ``cron``; returns the schedule's key.

        Fired by the workers themselves (no ``celery beat``), once per tick.
        Scheduling the same definition again returns the same key.
        """
        return crontab.schedule(self.store, name, cron, data, opts, tz)

    def unschedule(self, key: str) -> bool:
        """Remove a schedule; True when it existed."""
        return crontab.unschedule(self.store, key)

    def schedules(self) -> list[dict[str, Any]]:
        """Every schedule: key, name, cron, tz, next_run, last_run."""
        return crontab.schedules(self.store)

    def __repr__(self) -> str:
        return f"<Kickq namespace={self.options['redis_namespace']!r} app={self.app.main!r}>"
