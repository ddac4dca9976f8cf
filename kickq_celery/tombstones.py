"""Tombstone outcomes in the app's Celery result backend (kickq supplies one when it has none).

The outcome of a tombstoned job is stored under the job id only when it is final,
so a :class:`~kickq_celery.promise.Promise` over its ``AsyncResult`` settles once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery import Celery, states
from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend
from celery.backends.redis import RedisBackend

from .connection import Client, backend_url, sentinel_service
from .exceptions import JobFailed
from .keys import Keys

if TYPE_CHECKING:
    from .records import JobRecord
    from .store import AsyncJobStore, JobStore


def ended_outcome(record: JobRecord) -> Any:
    """The outcome waiters of an ended job get: its result, or a JobFailed."""
    if record.success:
        return record.result
    error = record.last_error or ""
    return JobFailed(f"job {record.id} failed: {error}", record.id, error)


def ensure_result_backend(app: Celery, client: Client, keys: Keys) -> None:
    """Supply a result backend on kickq's Redis when the app has none (on a Cluster: the
    primary that holds the namespace's slot, as Celery has no Cluster result backend)."""
    conf = app.conf
    if conf.result_backend:
        # Celery caches the backend per thread: a thread (a threads-pool worker, say)
        # that looked before the backend was supplied still holds a DisabledBackend
        if isinstance(getattr(app._local, "backend", None), DisabledBackend):
            del app._local.backend
        return
    conf.result_backend = backend_url(client, keys.result_prefix)
    transport = dict(conf.result_backend_transport_options or {})
    transport.setdefault("global_keyprefix", keys.result_prefix)
    service = sentinel_service(client)
    if service:
        transport.setdefault("master_name", service)  # Celery's sentinel:// backend needs it
    conf.result_backend_transport_options = transport
    # forget a DisabledBackend cached before this point
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


def settle(app: Celery, store: JobStore, options: Mapping[str, Any], job_id: str, outcome: Any) -> None:
    """Store a tombstoned job's final outcome (a value, or a JobFailed) for its waiters."""
    ensure_result_backend(app, store.client, store.keys)
    backend = app.backend
    if isinstance(outcome, JobFailed):
        backend.mark_as_failure(job_id, outcome)
    else:
        backend.mark_as_done(job_id, outcome)
    if options["purge_jobs"] and isinstance(backend, BaseKeyValueStoreBackend):
        # the result goes with the job's record (purge_timeout), not after Celery's result_expires
        backend.expire(backend.get_key_for_task(job_id), max(1, math.ceil(options["purge_timeout"])))



async def asettle(app: Celery, store: JobStore, astore: AsyncJobStore, options: Mapping[str, Any],
                  job_id: str, outcome: Any) -> None:
    """:func:`settle` from asyncio code. When the backend is the one kickq supplies on its own
    Redis, the result meta Celery's Redis backend would write is written (SET with its expiry,
    then PUBLISH, as the backend does) through ``astore``'s asyncio client; else this is the
    backend's own, blocking call."""
    ensure_result_backend(app, store.client, store.keys)
    backend = app.backend
    if not (isinstance(backend, RedisBackend)
            and app.conf.result_backend == backend_url(store.client, store.keys.result_prefix)):
        settle(app, store, options, job_id, outcome)
        return
    failed = isinstance(outcome, JobFailed)
    state = states.FAILURE if failed else states.SUCCESS
    result = backend.prepare_exception(outcome) if failed else outcome
    meta = {**backend._get_result_meta(result=result, state=state, traceback=None, request=None),
            "task_id": job_id}
    value, key = backend.encode(meta), backend.get_key_for_task(job_id)
    expires = max(1, math.ceil(options["purge_timeout"])) if options["purge_jobs"] else backend.expires
    pipe = astore.client.pipeline(transaction=False)
    pipe.set(key, value, ex=int(expires) if expires else None)
    pipe.publish(key, value)
    await pipe.execute()
