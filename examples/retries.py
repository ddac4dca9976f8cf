"""Retries and ghost runs: retry / retry_count / retry_interval, process_timeout.

Run it with `python examples/retries.py`. It uses the Redis at $KICKQ_REDIS_URL
(default redis://127.0.0.1:6379/0) as Celery broker and for kickq's records. In a
real project the worker is the ordinary `celery -A proj worker`; here an in-process
worker keeps the example to one command.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from kickq_celery import JobFailed, Kickq
from kickq_celery.harness import purge_namespace, wait_for, worker

url = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("KICKQ_NAMESPACE", "example-retries")

app = Celery("retries-example", broker=url)
Kickq.config({
    "redis": url,
    "redisNamespace": namespace,
    # per-job-name defaults, in kickq's camelCase
    "jobFlags": {"fetch": {"retry": True, "retryCount": 3, "retryInterval": 0.5}},
})
kq = Kickq(app, poll_interval=0.2)


@kq.process("fetch")
def fetch(job):
    if job.run < 3:  # the upstream is down for the first two runs
        raise ConnectionError(f"upstream down (run {job.run})")
    return {"fetched": job.data, "runs": job.run}


@kq.process("broken")
def broken(job):
    raise RuntimeError(f"run {job.run} failed")


@kq.process("stuck")
def stuck(job):
    time.sleep(1.5)  # longer than its process_timeout


def describe(job_id):
    record = kq.get(job_id)
    starts = [run.started_at for run in record.runs]
    gaps = [round((b - a).total_seconds(), 1) for a, b in zip(starts, starts[1:], strict=False)]
    runs = ", ".join(f"{run.number}:{run.state}" for run in record.runs)
    print(f"{record.name}: {record.state} after {len(record.runs)} runs [{runs}] gaps={gaps}")
    return record


with worker(app):
    # retries come from jobFlags; the promise settles once, on the final outcome
    job = kq.create("fetch", "https://example.com", tombstone=True)
    wait_for(lambda: kq.get(job.id).state == "retry", 10, message="the first retry")
    print(f"fetch: state is {kq.get(job.id).state} while it waits for a retry")
    print(f"fetch: promise -> {job.promise.wait().result}")
    describe(job.id)

    # a list of intervals: one per retry, the last one repeats
    job = kq.create("broken", tombstone=True, retry=True, retry_count=3, retry_interval=[0.2, 0.4])
    try:
        job.promise.wait()
    except JobFailed as exc:
        print(f"broken: JobFailed error={exc.error!r}")
    describe(job.id)

    # a callable interval gets the retry number (1, 2, ...)
    job = kq.create("broken", retry=True, retry_count=2, retry_interval=lambda n: 0.2 * n)
    wait_for(lambda: kq.get(job.id).complete, 10, message="the callable-interval job")
    describe(job.id)

    # a run longer than process_timeout is a ghost run; ghost_times re-runs, then fail
    job = kq.create("stuck", tombstone=True, process_timeout=0.5, ghost_times=1, ghost_interval=0)
    try:
        job.promise.wait()
    except JobFailed:
        record = describe(job.id)
        print(f"stuck: last error {record.last_error!r}")

stats = kq.stats()
print(f"stats: {stats.total.retried} retried, {stats.total.ghosts} ghosts, "
      f"{stats.total.succeeded} succeeded, {stats.total.failed} failed")
purge_namespace(kq)
print("done")
