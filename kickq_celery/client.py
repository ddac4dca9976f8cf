"""Kickq: the configuration facade and the job API (create, process, delete, get, stats, cron)."""

from __future__ import annotations

import json
import math
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import redis
from celery import Celery
from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend
from kombu.entity import Exchange, Queue

from . import options as opts
from .exceptions import (
    ConfigError,
    InvalidJobData,
    InvalidJobOptions,
    JobDeleted,
    JobFailed,
    JobNotFound,
    KickqError,
)
from .keys import Keys
from .promise import Promise
from .publisher import Message, Publisher, redis_broker_url
from .records import Job, JobRecord
from .stats import Stats
from .store import Claimed, Ended, JobStore, redis_errors

Handler = Callable[[Job], Any]
MAX_NAME_LENGTH = 200

_clients: dict[Any, redis.Redis] = {}
_clients_lock = threading.Lock()
#: Kickq instances of each Celery app, for the worker bootstep.
_instances: weakref.WeakKeyDictionary[Celery, list[Kickq]] = weakref.WeakKeyDictionary()


def _client_for(setting: Any) -> redis.Redis:
    """One shared client (connection pool) per Redis setting."""
    if isinstance(setting, redis.Redis):
        return setting
    key = setting if isinstance(setting, str) else json.dumps(setting, sort_keys=True, default=str)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry

            kwargs: dict[str, Any] = {
                "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 5),
                "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
                "socket_connect_timeout": 2,
                "health_check_interval": 30,
            }
            if isinstance(setting, str):
                client = redis.Redis.from_url(setting, **kwargs)
            else:
                client = redis.Redis(**{**kwargs, **setting})
            _clients[key] = client
    return client


def _same_server(a: redis.Redis, b: redis.Redis) -> bool:
    """Whether two clients talk to the same Redis server and database."""
    if a is b:
        return True
    ka, kb = a.connection_pool.connection_kwargs, b.connection_pool.connection_kwargs
    return all(ka.get(k) == kb.get(k) for k in ("host", "port", "path", "db"))


def _backend_url(client: redis.Redis) -> str:
    """A Celery result-backend URL for the server ``client`` talks to."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"redis+socket://{kw['path']}"
    scheme = "rediss" if client.connection_pool.connection_class is redis.SSLConnection else "redis"
    auth = f"{kw.get('username') or ''}:{kw['password']}@" if kw.get("password") else ""
    return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidJobData(f"{what} is not JSON-serializable: {exc}") from None


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidJobOptions(
            f"a job name must be a non-empty str of at most {MAX_NAME_LENGTH} characters, got {name!r}")
    return name


class Kickq:
    """kickq for a Celery app: create, process, delete and inspect jobs by name.

    Args:
        app: the Celery app (default: ``celery.current_app``).
        **overrides: options for this instance (see ``Kickq.config``).
    """

    _config: ClassVar[dict[str, Any]] = {}
    _config_version: ClassVar[int] = 0

    # --- the configuration facade -----------------------------------------

    @classmethod
    def config(cls, *args: Any, **kwargs: Any) -> None:
        """Merge options into the global config.

        Forms: ``config(mapping)``, ``config(key=value)``, ``config("key", value)``.
        Keys may be camelCase (kickq) or snake_case. Raises :class:`ConfigError`
        (naming the key) and changes nothing when any key or value is bad.
        """
        if len(args) == 2 and isinstance(args[0], str):
            values: dict[str, Any] = {args[0]: args[1]}
        elif len(args) == 1 and isinstance(args[0], Mapping):
            values = dict(args[0])
        elif args:
            raise ConfigError("Kickq.config takes a mapping, a key and a value, or keywords")
        else:
            values = {}
        values.update(kwargs)
        validated = opts.validate_options(values)
        if "job_flags" in validated:
            merged = {k: dict(v) for k, v in cls._config.get("job_flags", {}).items()}
            for job, flags in validated["job_flags"].items():
                merged.setdefault(job, {}).update(flags)
            validated["job_flags"] = merged
        cls._config = {**cls._config, **validated}
        cls._config_version += 1

    @classmethod
    def reset(cls) -> None:
        """Back to the original defaults; closes kickq's Redis connections."""
        cls._config = {}
        cls._config_version += 1
        with _clients_lock:
            for client in _clients.values():
                client.close()
                client.connection_pool.disconnect()
            _clients.clear()

    @classmethod
    def get_config(cls) -> dict[str, Any]:
        """A snake_case copy of the global config (defaults included)."""
        return opts.layer(cls._config)

    # --- instance ----------------------------------------------------------

    def __init__(self, app: Celery | None = None, **overrides: Any) -> None:
        if app is None:
            from celery import current_app

            app = current_app._get_current_object()
        self.app: Celery = app
        self._overrides = opts.validate_options(overrides)
        self._options: dict[str, Any] = {}
        self._options_version = -1
        self._store: JobStore | None = None
        self._store_key: Any = None
        self._queues: dict[str, Queue] = {}
        self._publisher: Publisher | None = None
        self.processed: dict[str, int | None] = {}
        _instances.setdefault(app, []).append(self)
        from .bootstep import install

        install(app)

    @property
    def options(self) -> dict[str, Any]:
        """This instance's resolved options (everything but per-job flags)."""
        if self._options_version != Kickq._config_version:
            layered = opts.layer(opts.app_options(self.app), Kickq._config, self._overrides)
            if layered["redis"] is None:
                broker = self.app.conf.broker_url or ""
                is_redis = isinstance(broker, str) and broker.startswith(("redis://", "rediss://"))
                layered["redis"] = broker if is_redis else "redis://localhost:6379/0"
            self._options = layered
            self._options_version = Kickq._config_version
        return self._options

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
        key = self.scope
        if self._store is None or self._store_key != key:
            self._store = JobStore(_client_for(options["redis"]), Keys(options["redis_namespace"]))
            self._store_key = key
        return self._store

    @property
    def redis(self) -> redis.Redis:
        """kickq's Redis client."""
        return self.store.client

    @property
    def horizon(self) -> float:
        """Delays up to this many seconds are Celery countdowns; longer ones wait in Redis.

        Kept under a quarter of the Redis transport's visibility_timeout, so no
        message waits in a worker long enough to be redelivered.
        """
        horizon = float(self.options["delay_horizon"])
        broker = self.app.conf.broker_url or ""
        if isinstance(broker, str) and broker.startswith(("redis", "sentinel")):
            transport = self.app.conf.broker_transport_options or {}
            horizon = min(horizon, float(transport.get("visibility_timeout", 3600)) / 4)
        return horizon

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
               **flags: Any) -> Job | None:
        """Create a job; returns it (with a ``promise`` when tombstoned).

        With ``callback``, calls ``callback(err, job_id, promise)`` like kickq for
        Node, and on failure ``callback(exc, None, None)`` instead of raising.
        """
        try:
            job = self._create(name, [data], opts, flags)[0]
        except KickqError as exc:
            if callback is None:
                raise
            callback(exc, None, None)
            return None
        if callback is not None:
            callback(None, job.id, job.promise)
        return job

    def create_many(self, name: str, items: Iterable[Any], opts: Mapping[str, Any] | None = None,
                    **flags: Any) -> list[Job]:
        """Create one job per item (its data); validates all before writing any."""
        return self._create(name, list(items), opts, flags)

    def _create(self, name: str, items: Sequence[Any], opts_: Mapping[str, Any] | None,
                flags: Mapping[str, Any]) -> list[Job]:
        _check_name(name)
        given = {**opts.validate_flags(opts_ or {}), **opts.validate_flags(flags)}
        resolved = self._job_flags(name, given)
        payloads = [_dumps(item, "job data") for item in items]
        if not payloads:
            return []
        delay = float(resolved["delay"] or 0.0)
        park = delay > self.horizon
        ids = [str(uuid.uuid4()) for _ in payloads]
        tombstone = resolved["tombstone"]
        if tombstone:
            self._ensure_result_backend()
        jobs = list(zip(ids, payloads, strict=True))
        args = (name, json.dumps(resolved), resolved["process_timeout"], tombstone, delay, park, jobs)
        messages = [Message(job_id, 1, delay) for job_id in ids]
        publisher = self.publisher
        if not park and publisher.broker is not None and _same_server(publisher.broker, self.redis):
            # records and messages in one MULTI: neither exists without the other
            with redis_errors(self.redis):
                pipe = self.redis.pipeline(transaction=True)
                self.store.create(*args, client=pipe)
                publisher.push(pipe, self.queue(name), self.task_name(name),
                               resolved["process_timeout"], messages)
                created = float(pipe.execute()[0])
        else:
            created = self.store.create(*args)
            if not park:
                try:
                    publisher.publish(self.queue(name), self.task_name(name),
                                      resolved["process_timeout"], messages)
                except Exception as exc:
                    for job_id in ids:  # no record without its message
                        self.store.delete(job_id)
                    if isinstance(exc, KickqError):
                        raise
                    raise KickqError(f"could not publish to the Celery broker: {exc}") from exc
        state = "delayed" if delay > 0 else "queued"
        deadline = created + float(resolved["tombstone_timeout"])
        return [
            Job(job_id, name, state,
                Promise(job_id, name, self.app.AsyncResult(job_id), deadline) if tombstone else None)
            for job_id in ids
        ]

    def _job_flags(self, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        resolved = opts.resolve_flags(self.options, name, given)
        interval = resolved["retry_interval"]
        if callable(interval):
            # the worker may not have the callable: store its value for each retry
            try:
                resolved["retry_interval"] = [
                    opts.seconds(interval(n)) for n in range(1, resolved["retry_count"] + 1)
                ] or [0.0]
            except (TypeError, ValueError) as exc:
                raise InvalidJobOptions(f"retry_interval callable: {exc}") from None
        return resolved

    @property
    def publisher(self) -> Publisher:
        """Publishes this app's job messages (directly on a Redis broker)."""
        if self._publisher is None:
            url = redis_broker_url(self.app)
            self._publisher = Publisher(self.app, _client_for(url) if url else None)
        return self._publisher

    def _publish(self, name: str, job_id: str, attempt: int, countdown: float,
                 process_timeout: float | None) -> None:
        """Publish one message for a job (a duplicate is harmless: the run guard drops it)."""
        self.publisher.publish(self.queue(name), self.task_name(name), process_timeout,
                               [Message(job_id, attempt, countdown)])

    def promote(self) -> int:
        """Publish the parked jobs that came within the horizon; returns how many."""
        total = 0
        while True:
            # the lease must outlast the horizon, or another promoter re-claims the job meanwhile
            claims = self.store.promote(self.horizon, lease=self.horizon + 30.0)
            if not claims:
                return total
            self._publish_claims(claims)
            total += len(claims)

    @property
    def redelivery_grace(self) -> float:
        """How long a due job may wait before its message is presumed lost."""
        return 2 * float(self.options["lock_timeout"]) + self.horizon

    def redeliver(self) -> int:
        """Publish again the messages of due jobs that seem lost; returns how many.

        A Redis broker loses a message now and then: one a worker had reserved when
        it died comes back only after the ``visibility_timeout`` (an hour by default),
        and one in flight when a consumer's connection drops may not come back.
        A job overdue by :attr:`redelivery_grace` whose queue is empty gets a new
        message; should the old one turn up after all, the run guard drops it.
        Other brokers give unacknowledged messages back themselves.
        """
        broker = self.publisher.broker
        if broker is None:
            return 0
        by_name: dict[str, list[Claimed]] = {}
        for claim in self.store.overdue(self.redelivery_grace):
            by_name.setdefault(claim.name, []).append(claim)
        sent = 0
        for name, claims in by_name.items():
            with redis_errors(broker):
                if broker.llen(self.queue(name).name):
                    continue  # a backlog: the job waits its turn
            for claim in claims:
                self.publisher.publish(self.queue(name), self.task_name(name), claim.process_timeout,
                                       [Message(claim.job_id, claim.attempt)])
            sent += len(claims)
        return sent

    def _publish_claims(self, claims: Sequence[Claimed]) -> None:
        groups: dict[tuple[str, float | None], list[Message]] = {}
        for claim in claims:
            groups.setdefault((claim.name, claim.process_timeout), []).append(
                Message(claim.job_id, claim.attempt, claim.countdown))
        for (name, process_timeout), messages in groups.items():
            self.publisher.publish(self.queue(name), self.task_name(name), process_timeout, messages)
        self.store.unpark(claims)

    # --- processing --------------------------------------------------------

    def process(self, names: str | Sequence[str], options: Any = None, handler: Any = None,
                **kwargs: Any) -> Any:
        """Register ``handler`` for job name(s); also usable as a decorator.

        Forms: ``process(names, options, handler)``, ``process(names, handler)``,
        ``@process(names, max_jobs_num=10)``. ``max_jobs_num`` (kickq
        ``maxJobsNum``) limits the runs of each name at once across all workers.
        """
        if callable(options) and handler is None:
            options, handler = None, options
        settings = {**dict(options or {}), **kwargs}
        limit = None
        for key, value in settings.items():
            if key not in ("max_jobs_num", "maxJobsNum"):
                raise ConfigError(f"unknown process option {key!r}; the only one is 'max_jobs_num'")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"option {key!r}: expected an int >= 1 or None (got {value!r})")
            limit = value
        # anything but a list of names is one name (a bad one fails the name check)
        given = list(names) if isinstance(names, (list, tuple, set, frozenset)) else [names]
        job_names = [_check_name(name) for name in given]
        for name in job_names:
            if self.task_name(name) in self.app.tasks:
                raise ConfigError(f"job {name!r} already has a handler in this app")

        def register(fn: Handler) -> Handler:
            from .task import register_task

            for name in job_names:
                if self.task_name(name) in self.app.tasks:
                    raise ConfigError(f"job {name!r} already has a handler in this app")
                register_task(self, name, fn)
                self.processed[name] = limit
            return fn

        if handler is None:
            return register
        return register(handler)

    # --- deleting and inspecting -------------------------------------------

    def delete(self, job_id: str) -> bool:
        """Delete a job for good; True when it existed.

        A queued or delayed job never runs; a running one is not interrupted but
        is not retried, and its record goes when the run ends. Waiters get
        :class:`JobDeleted`.
        """
        if not isinstance(job_id, str):
            return False
        status, tombstone, final = self.store.delete(job_id)
        if status and tombstone and not final:
            self.settle(job_id, JobDeleted(f"job {job_id} was deleted", job_id, "deleted"))
        return bool(status)

    def get(self, job_id: str) -> JobRecord:
        """The job's record; raises :class:`JobNotFound`."""
        record = self.store.get(job_id) if isinstance(job_id, str) else None
        if record is None:
            raise JobNotFound(f"no job {job_id!r} in namespace {self.options['redis_namespace']!r}")
        return record

    def jobs(self, state: str | None = None, name: str | None = None,
             offset: int = 0, limit: int = 50) -> list[JobRecord]:
        """Job records by state (all states when None) and name, oldest first, paged."""
        from .keys import STATES

        states = [state] if state else list(STATES)
        for each in states:
            if each not in STATES:
                raise InvalidJobOptions(f"unknown state {each!r}; one of {', '.join(STATES)}")
        found: list[JobRecord] = []
        skip = offset
        for each in states:
            start = 0
            while len(found) < limit:
                ids = self.store.job_ids(each, start, 200)
                if not ids:
                    break
                start += len(ids)
                for job_id in ids:
                    record = self.store.get(job_id)
                    if record is None or (name and record.name != name):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    found.append(record)
                    if len(found) >= limit:
                        break
        return found

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
        from . import cron as cron_

        return cron_.schedule(self, name, cron, data, opts, tz)

    def unschedule(self, key: str) -> bool:
        """Remove a schedule; True when it existed."""
        from . import cron as cron_

        return cron_.unschedule(self, key)

    def schedules(self) -> list[dict[str, Any]]:
        """Every schedule: key, name, cron, tz, next_run, last_run."""
        from . import cron as cron_

        return cron_.schedules(self)

    # --- tombstoning -------------------------------------------------------

    def _ensure_result_backend(self) -> None:
        """Supply a result backend on kickq's Redis when the app has none."""
        conf = self.app.conf
        if conf.result_backend:
            # Celery caches the backend per thread: a thread (a threads-pool worker, say)
            # that looked before the backend was supplied still holds a DisabledBackend
            if isinstance(getattr(self.app._local, "backend", None), DisabledBackend):
                del self.app._local.backend
            return
        conf.result_backend = _backend_url(self.redis)
        transport = dict(conf.result_backend_transport_options or {})
        transport.setdefault("global_keyprefix", self.keys.result_prefix)
        conf.result_backend_transport_options = transport
        # forget a DisabledBackend cached before this point
        self.app._backend_cache = None
        self.app._local.__dict__.pop("backend", None)

    def settle(self, job_id: str, outcome: Any) -> None:
        """Store a tombstoned job's final outcome (a value, or a JobFailed) for its waiters."""
        self._ensure_result_backend()
        backend = self.app.backend
        if isinstance(outcome, JobFailed):
            backend.mark_as_failure(job_id, outcome)
        else:
            backend.mark_as_done(job_id, outcome)
        if self.options["purge_jobs"] and isinstance(backend, BaseKeyValueStoreBackend):
            # the result goes with the job's record (purge_timeout), not after Celery's result_expires
            backend.expire(backend.get_key_for_task(job_id), max(1, math.ceil(self.options["purge_timeout"])))

    def after_run(self, ended: Ended, result: Any = None) -> None:
        """Follow-up of a finished or reaped run: settle waiters, hand on due jobs."""
        if ended.final and ended.tombstone:
            if ended.verdict == "success":
                self.settle(ended.job_id, result)
            else:
                self.settle(ended.job_id, JobFailed(
                    f"job {ended.job_id} failed: {ended.last_error}", ended.job_id, ended.last_error))
        if ended.released or (ended.verdict in ("retry", "ghost") and ended.due_in <= self.horizon):
            self.promote()

    def __repr__(self) -> str:
        return f"<Kickq namespace={self.options['redis_namespace']!r} app={self.app.main!r}>"


def instances(app: Celery) -> list[Kickq]:
    """The Kickq instances created for ``app``."""
    return list(_instances.get(app, []))

