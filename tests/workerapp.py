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
           redis_wait_replicas=int(os.environ.get("KICKQ_TEST_WAIT_REPLICAS", "0")),
           # a worker shares its producers' delay_horizon: with one, its queues keep kombu's acks
           delay_horizon=float(os.environ.get("KICKQ_TEST_DELAY_HORIZON", "0")),
           # this worker's promoter publishes the due bursts of chunked_burst that many to a
           # Celery message (tests/test_chunks.py)
           job_flags={"chunked_burst": {"chunk_size": int(os.environ.get("KICKQ_TEST_CHUNK_SIZE", "1"))}})


def _records_client(**kwargs):  # type: ignore[no-untyped-def]
    """The records' client: redis-py cannot read a redis+sentinel:// (or +cluster) URL, kickq can."""
    if REDIS_URL.startswith(("redis+sentinel://", "redis+cluster://")):
        return client_for(REDIS_URL)
    return redis.Redis.from_url(REDIS_URL, **kwargs)


r = _records_client()
PREFIX = f"test:{NAMESPACE}:"


@app.task(name="tests.raw_record")
def raw_record(value):
    """A plain Celery task beside the kickq jobs: it keeps kombu's acks (tests/test_consumer.py)."""
    r.rpush(PREFIX + "raw", str(value))
    return value


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


def _limits_run(job):  # type: ignore[no-untyped-def]
    """The body of the ``limits_*`` handlers: sleep ``job.data["sleep"]`` seconds (0 by default),
    then record the run (``<name>:<id>`` in ``limits:runs``)."""
    data = job.data if isinstance(job.data, dict) else {}
    time.sleep(float(data.get("sleep", 0)))
    r.rpush(PREFIX + "limits:runs", f"{job.name}:{job.id}")
    return data


@kq.process("limits_rate", rate_limit=os.environ.get("KICKQ_TEST_RATE_LIMIT") or None)
def limits_rate(job):
    """rate_limit from KICKQ_TEST_RATE_LIMIT (say "10/s"; none when unset)."""
    return _limits_run(job)


@kq.process("limits_keyed", max_jobs_per_key=int(os.environ.get("KICKQ_TEST_PER_KEY", "0")) or None)
def limits_keyed(job):
    """max_jobs_per_key from KICKQ_TEST_PER_KEY (none when unset or 0)."""
    return _limits_run(job)


@kq.process("limits_prio", max_jobs_num=1)
def limits_prio(job):
    """One run at a time, cluster-wide: the others wait in Redis, in priority order."""
    return _limits_run(job)


# --- control_: progress, job.deleted and delete(terminate=True) (tests/test_job_runs.py) ---


def _control_record(job, what):
    """Add ``what`` to the list ``control:<id>`` (a test reads it as ``what`` strings)."""
    r.rpush(f"{PREFIX}control:{job.id}", what)


@kq.process("control_progress")
def control_progress(job):
    """Record progress 1..``count`` (default 5), ``pause`` s apart (default 0.3); each progress()
    return value goes to ``control:<id>`` as ``"<value>:<returned>"``; a non-JSON value is tried
    first (``invalid`` recorded when it raises InvalidJobData)."""
    from kickq_celery import InvalidJobData

    data = job.data or {}
    try:
        job.progress(object())
    except InvalidJobData:
        _control_record(job, "invalid")
    for value in range(1, int(data.get("count", 5)) + 1):
        _control_record(job, f"{value}:{job.progress(value)}")
        time.sleep(float(data.get("pause", 0.3)))
    return "done"


@kq.process("control_paused")
def control_paused(job):
    """Record progress ``{"run": <run>}`` (``progress:<run>:<returned>``) and ``started:<run>:<pid>``;
    wait (up to 60 s) for the key ``control:go:<id>:<run>``; then try progress
    ``{"run": <run>, "after": true}`` and record ``after:<run>:<returned>``."""
    _control_record(job, f"progress:{job.run}:{job.progress({'run': job.run})}")
    _control_record(job, f"started:{job.run}:{os.getpid()}")
    deadline = time.monotonic() + 60
    while not r.exists(f"{PREFIX}control:go:{job.id}:{job.run}") and time.monotonic() < deadline:
        time.sleep(0.05)
    _control_record(job, f"after:{job.run}:{job.progress({'run': job.run, 'after': True})}")
    return job.run


@kq.process("control_sleeper")
def control_sleeper(job):
    """Sleep ``job.data`` s (default 60) in 0.1 s steps: records ``started:<run>:<pid>``, then
    ``stopped`` when SoftTimeLimitExceeded interrupts it, ``finally`` in any case, ``completed``
    when it was not interrupted."""
    from celery.exceptions import SoftTimeLimitExceeded

    _control_record(job, f"started:{job.run}:{os.getpid()}")
    deadline = time.monotonic() + float(job.data or 60)
    try:
        while time.monotonic() < deadline:
            time.sleep(0.1)
    except SoftTimeLimitExceeded:
        _control_record(job, "stopped")
        raise
    finally:
        _control_record(job, "finally")
    _control_record(job, "completed")
    return "slept"


@kq.process("control_watch")
def control_watch(job):
    """Watch ``job.deleted`` for up to ``job.data["for"]`` s (default 30): records progress
    ``"running"`` and ``started:<run>:<pid>``, then ``deleted`` when it turns True and the return
    value of a progress() call then (``progress:<returned>``). With ``job.data["stop"]`` it returns
    then; else it goes on until the key ``control:go:<id>`` exists and records ``completed``
    (``stopped`` if SoftTimeLimitExceeded interrupts it)."""
    from celery.exceptions import SoftTimeLimitExceeded

    data = job.data or {}
    job.progress("running")
    _control_record(job, f"started:{job.run}:{os.getpid()}")
    deadline = time.monotonic() + float(data.get("for", 30))
    seen = False
    try:
        while time.monotonic() < deadline:
            if job.deleted and not seen:
                seen = True
                _control_record(job, "deleted")
                _control_record(job, f"progress:{job.progress('after delete')}")
                if data.get("stop"):
                    return "saw deleted"
            if seen and r.exists(f"{PREFIX}control:go:{job.id}"):
                break
            time.sleep(0.05)
    except SoftTimeLimitExceeded:
        _control_record(job, "stopped")
        raise
    _control_record(job, "completed")
    return "watched"


# --- chunked: several jobs to a Celery message (chunk_size, tests/test_chunks.py) ----------


def _chunked_run(job):  # type: ignore[no-untyped-def]
    """Sleep ``job.data["sleep"]`` seconds (0 by default), then fail if ``job.data["fail"]``.
    Records ``<id>:<pid>:<start>`` in ``chunked:started`` when the run starts, ``<id>:<pid>:<start>:
    <end>`` in ``chunked:runs`` when its sleep ends (a run that fails too), ``<id>:<pid>:<when>`` in
    ``chunked:stopped`` when SoftTimeLimitExceeded cuts the sleep short (times: time.time())."""
    from celery.exceptions import SoftTimeLimitExceeded

    data = job.data if isinstance(job.data, dict) else {}
    pid, start = os.getpid(), time.time()
    r.rpush(PREFIX + "chunked:started", f"{job.id}:{pid}:{start:.6f}")
    try:
        time.sleep(float(data.get("sleep", 0)))
    except SoftTimeLimitExceeded:
        r.rpush(PREFIX + "chunked:stopped", f"{job.id}:{pid}:{time.time():.6f}")
        if not data.get("stubborn"):
            raise
        time.sleep(float(data.get("sleep", 0)))  # a handler that ignores its soft time limit
    r.rpush(PREFIX + "chunked:runs", f"{job.id}:{pid}:{start:.6f}:{time.time():.6f}")
    if data.get("fail"):
        raise RuntimeError(f"chunked job {job.id} fails on purpose")
    return {"pid": pid, "run": job.run}


@kq.process("chunked")
def chunked(job):
    """A job of a chunk (see _chunked_run); create its jobs with chunk_size."""
    return _chunked_run(job)


@kq.process("chunked_burst")
def chunked_burst(job):
    """As ``chunked``; its job_flags (above) give it KICKQ_TEST_CHUNK_SIZE, so this worker's
    promoter publishes its parked jobs that many to a message when they come due."""
    return _chunked_run(job)
