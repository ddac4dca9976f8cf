"""Tombstone outcomes in the app's Celery result backend (kickq supplies one when it has none).

The outcome of a tombstoned job is stored under the job id only when it is final,
so a :class:`~kickq_celery.promise.Promise` over its ``AsyncResult`` settles once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend

from .connection import Client, backend_url, sentinel_service
from .exceptions import JobFailed
from .keys import Keys

if TYPE_CHECKING:
    from .store import JobStore


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
