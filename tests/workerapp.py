"""The Celery app of the `celery worker` subprocesses that tests start.

Configured from the environment (see ``tests/conftest.py``). Handlers record
each run in Redis lists under ``test:<namespace>:`` so that tests can count runs.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from kickq_celery import Kickq
from kickq_celery.connection import client_for
from kickq_celery.testing import DEFAULT_TEST_REDIS_URL

NAMESPACE = os.environ["KICKQ_TEST_NS"]
REDIS_URL = os.environ.get("KICKQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)

app = Celery("workerapp", broker=os.environ.get("KICKQ_TEST_BROKER", REDIS_URL))
app.conf.broker_connection_retry_on_startup = True
if os.environ.get("KICKQ_TEST_DEFAULT_QUEUE"):
    # a namespaced default queue, so that a test can delete every queue it made (RabbitMQ)
    app.conf.task_default_queue = os.environ["KICKQ_TEST_DEFAULT_QUEUE"]
if os.environ.get("KICKQ_TEST_CONTROL_EXCHANGE"):
    # `celery inspect` private to one test: other tests' workers (also named w0@host) share the broker
    app.conf.control_exchange = os.environ["KICKQ_TEST_CONTROL_EXCHANGE"]
if os.environ.get("KICKQ_TEST_VISIBILITY_TIMEOUT"):
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["KICKQ_TEST_VISIBILITY_TIMEOUT"])}
if os.environ.get("KICKQ_TEST_MASTER_NAME"):
    # a sentinel:// broker names its Sentinel service here
    app.conf.broker_transport_options = {
        **(app.conf.broker_transport_options or {}), "master_name": os.environ["KICKQ_TEST_MASTER_NAME"]}

kq = Kickq(app, redis=REDIS_URL, redis_namespace=NAMESPACE, poll_interval=0.2,
           lock_timeout=float(os.environ.get("KICKQ_TEST_LOCK_TIMEOUT", "3")),
           redis_wait_replicas=int(os.environ.get("KICKQ_TEST_WAIT_REPLICAS", "0")))


def _records_client(**kwargs):  # type: ignore[no-untyped-def]
    """The records' client: redis-py cannot read a redis+sentinel:// (or +cluster) URL, kickq can."""
    if REDIS_URL.startswith(("redis+sentinel://", "redis+cluster://")):
        return client_for(REDIS_URL)
    return redis.Redis.from_url(REDIS_URL, **kwargs)


r = _records_client()
PREFIX = f"test:{NAMESPACE}:"


@kq.process("record")
def record(job):
    """Record the run and return the data."""
    r.rpush(PREFIX + "runs", job.id)
    return job.data


@kq.process("sleep", max_jobs_num=int(os.environ.get("KICKQ_TEST_MAX_JOBS", "0")) or None)
def sleep(job):
    """Sleep ``job.data`` seconds; record how many of these run at once."""
    r.rpush(PREFIX + "concurrency", r.incr(PREFIX + "running"))
    r.rpush(PREFIX + "started", job.id)
    try:
        time.sleep(float(job.data or 0))
    finally:
        r.decr(PREFIX + "running")
    r.rpush(PREFIX + "runs", job.id)
    return job.data


@kq.process("stoppable")
def stoppable(job):
    """Sleep ``job.data`` seconds; record in ``stopped`` when the soft time limit stops it."""
    from celery.exceptions import SoftTimeLimitExceeded

    r.rpush(PREFIX + "started", job.id)
    try:
        time.sleep(float(job.data or 0))
    except SoftTimeLimitExceeded:
        r.rpush(PREFIX + "stopped", job.id)
        raise
    r.rpush(PREFIX + "runs", job.id)
    return job.data


if os.environ.get("KICKQ_TEST_RESTORE_INTERVAL"):
    # kombu sweeps the unacked messages (restored after visibility_timeout, e.g. those a
    # worker had prefetched when its broker connection dropped) only every 10 x 10 s by default
    app.conf.broker_transport_options = {
        **(app.conf.broker_transport_options or {}),
        "unacked_restore_interval": float(os.environ["KICKQ_TEST_RESTORE_INTERVAL"]),
        "unacked_restore_throttle": 1}

# a client that rides out a Redis restart (redis-py's default jittered retries may give up sooner)
steady_r = _records_client(
    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40),
    retry_on_error=[redis.ConnectionError, redis.TimeoutError])


@kq.process("steady")
def steady(job):
    """Sleep ``job.data`` seconds; add ``<id>:<call>`` to the sets ``steady:started`` and
    ``steady:runs`` through a client that survives Redis restarts (a set, so that a
    command redis-py re-sends is not counted twice, while two calls are)."""
    call = f"{job.id}:{uuid.uuid4().hex}"
    steady_r.sadd(PREFIX + "steady:started", call)
    time.sleep(float(job.data or 0))
    steady_r.sadd(PREFIX + "steady:runs", call)
    return job.data


@kq.process("fail_first")
def fail_first(job):
    """Fail the first run, succeed after (to test retries); records every run."""
    r.rpush(PREFIX + "runs", job.id)
    if job.run == 1:
        raise RuntimeError("first run fails on purpose")
    return job.run


@kq.process("asleep")
async def asleep(job):
    """An async handler: records ``<pid>:<id of its running loop>`` in ``loops``, awaits
    ``asyncio.sleep(job.data)`` (0.05 s by default; records in ``stopped`` when that is cut short),
    returns what it saw; data ``"fail"`` raises after the sleep."""
    loop = f"{os.getpid()}:{id(asyncio.get_running_loop())}"
    r.rpush(PREFIX + "loops", loop)
    try:
        await asyncio.sleep(0.05 if job.data in (None, "fail") else float(job.data))
    except BaseException:
        r.rpush(PREFIX + "stopped", job.id)
        raise
    if job.data == "fail":
        raise ValueError("the async handler fails on purpose")
    r.rpush(PREFIX + "runs", job.id)
    return {"slept": job.data, "loop": loop}
