"""kickq_celery in one file: handlers, a worker, a few jobs, their records.

Run it with `make demo` (or `python examples/quickstart.py`). It uses the Redis at
$KICKQ_REDIS_URL (default redis://127.0.0.1:6379/0), or starts an embedded one.
In a real project the worker is the ordinary `celery -A proj worker`; here an
in-process worker keeps the demo to one command.
"""

from __future__ import annotations

import logging
import os

from celery import Celery

from kickq_celery import JobFailed, Kickq
from kickq_celery.embedded import redis_or_embedded
from kickq_celery.harness import purge_namespace, wait_for, worker

url = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")
target = redis_or_embedded(url)
if target.embedded is not None:
    print(f"No Redis answers at {url}: started an embedded Redis at {target.redis_url}")
else:
    print(f"Using the Redis at {url}")

# a worker logs a failed run with its traceback, as Celery does; here it fails on purpose
logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL)

app = Celery("quickstart", broker=target.broker_url)
kq = Kickq(app, redis=target.redis_url, redis_namespace="quickstart", poll_interval=0.2)


@kq.process("greet", max_jobs_num=2)
def greet(job):
    return f"hello, {job.data['name']}"


@kq.process("flaky")
def flaky(job):
    raise RuntimeError(f"run {job.run} failed on purpose")


with worker(app):
    now = kq.create("greet", {"name": "world"}, tombstone=True)
    later = kq.create("greet", {"name": "delayed world"}, delay=1.5)
    failing = kq.create("flaky", None, retry=True, retry_count=1, retry_interval=0, tombstone=True)
    print(f"created {now.id} ({now.state}), {later.id} ({later.state}), {failing.id} ({failing.state})")

    print("tombstone says:", now.promise.wait().result)
    try:
        failing.promise.wait()
    except JobFailed as exc:
        print("flaky failed for good:", exc.error)
    wait_for(lambda: kq.get(later.id).complete, 15, message="the delayed job")

    for job in (now, later, failing):
        record = kq.get(job.id)
        runs = ", ".join(f"run {r.number}: {r.state} {r.duration * 1000:.1f} ms" for r in record.runs)
        waited = (record.runs[0].started_at - record.created_at).total_seconds()
        print(f"{record.name:6} {record.state:8} result={record.result!r} waited={waited:.2f}s [{runs}]")

stats = kq.stats()
print(f"processed: {stats.total.succeeded} succeeded, {stats.total.failed} failed, "
      f"{stats.total.retried} retried")
purge_namespace(kq)
target.close()
