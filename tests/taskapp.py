"""The Celery app of tests/test_tasks.py: ordinary ``@app.task`` functions beside ``@kq.task``
ones with the same bodies, so that a test can do the same thing to both and compare.

Worker subprocesses run it (``worker_process(app="tests.taskapp")``) and the test process
imports it too, to call the tasks as a project's code would (``record_kickq.delay(...)``).
Configured from the environment like ``tests/workerapp.py``: ``KICKQ_TEST_NS`` (a fresh
namespace when unset: the test process, which hands its namespace to the workers it starts),
``KICKQ_TEST_REDIS_URL`` (records and broker), ``KICKQ_TEST_VISIBILITY_TIMEOUT`` and
``KICKQ_TEST_RESTORE_INTERVAL`` (the broker's redelivery of unacknowledged messages).

Every task records in Redis lists under ``test:<namespace>:<tag>`` (``tests/conftest.py``'s
``worker_process`` removes them afterwards).
"""

from __future__ import annotations

import json
import os
import time
import uuid

import redis
from celery import Celery

from kickq_celery import Kickq
from kickq_celery.testing import DEFAULT_TEST_REDIS_URL

NAMESPACE = os.environ.get("KICKQ_TEST_NS") or f"tasks{uuid.uuid4().hex[:10]}"
REDIS_URL = os.environ.get("KICKQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
PREFIX = f"test:{NAMESPACE}:"

app = Celery("taskapp", broker=REDIS_URL, set_as_current=False)  # the test process imports it too
app.conf.broker_connection_retry_on_startup = True
# the Celery tasks' queue is the namespace's own ("<ns>.celery"): no other test's worker takes
# them, and purge_namespace removes it (set before any queue is declared: a worker with no -Q
# consumes it beside the kickq queues)
app.conf.task_default_queue = f"{NAMESPACE}.celery"
transport: dict[str, float] = {}
if os.environ.get("KICKQ_TEST_VISIBILITY_TIMEOUT"):
    transport["visibility_timeout"] = float(os.environ["KICKQ_TEST_VISIBILITY_TIMEOUT"])
if os.environ.get("KICKQ_TEST_RESTORE_INTERVAL"):
    # kombu looks for unacked messages past their visibility_timeout every 10 x 10 s by default
    transport["unacked_restore_interval"] = float(os.environ["KICKQ_TEST_RESTORE_INTERVAL"])
    transport["unacked_restore_throttle"] = 1
if transport:
    app.conf.broker_transport_options = transport

kq = Kickq(app, redis=REDIS_URL, redis_namespace=NAMESPACE, poll_interval=0.1, lock_timeout=2)
r = redis.Redis.from_url(REDIS_URL)


def key(tag: str, what: str = "runs") -> str:
    """The Redis list ``what`` (runs, started, concurrency) of ``tag``."""
    return f"{PREFIX}{tag}:{what}"


def _record(x, tag, sleep):
    """The body of the record tasks: ``[x, pid, time]`` (JSON) to ``<tag>:started``, how many
    of ``tag`` run at once to ``<tag>:concurrency``, sleep ``sleep`` s, then ``[x, pid, time]``
    to ``<tag>:runs``; returns ``{"x": x, "tag": tag}``."""
    r.rpush(key(tag, "started"), json.dumps([x, os.getpid(), time.time()]))
    r.rpush(key(tag, "concurrency"), r.incr(key(tag, "running")))
    try:
        time.sleep(float(sleep))
    finally:
        r.decr(key(tag, "running"))
    r.rpush(key(tag, "runs"), json.dumps([x, os.getpid(), time.time()]))
    return {"x": x, "tag": tag}


@app.task
def record_celery(x, tag="celery", sleep=0):
    """An ordinary Celery task."""
    return _record(x, tag, sleep)


@kq.task
def record_kickq(x, tag="kickq", sleep=0):
    """The same function as a kickq task: job ``tests.taskapp.record_kickq``."""
    return _record(x, tag, sleep)


@kq.task(max_jobs_num=2)
def limited_kickq(x, tag="limited", sleep=1):
    """At most 2 runs at once, across all workers."""
    return _record(x, tag, sleep)


@kq.task(retry=True, retry_count=2, retry_interval=0.3)
def flaky_kickq(name, fail_runs):
    """Fails its first ``fail_runs`` runs (counted in ``flaky:<name>``), then returns
    ``{"name": name, "run": <the run that succeeded>}``; 3 runs at most (retry_count=2)."""
    run = r.incr(f"{PREFIX}flaky:{name}")
    if run <= fail_runs:
        raise RuntimeError(f"run {run} of {name} fails on purpose")
    return {"name": name, "run": run}


@kq.task(name="taskapp.whoami", bind=True)
def whoami(job, x, tag="whoami"):
    """Bound: the job context comes first, as Celery passes the task."""
    return {"id": job.id, "name": job.name, "run": job.run, "data": job.data, "x": x, "tag": tag}
