"""Tombstoning: wait for a job's outcome with wait(), then(), await or a callback.

Run it with `python examples/tombstone.py`. It uses the Redis at $KICKQ_REDIS_URL
(default redis://127.0.0.1:6379/0) as Celery broker and for kickq's records. In a
real project the worker is the ordinary `celery -A proj worker`; here an in-process
worker keeps the example to one command.
"""

from __future__ import annotations

import asyncio
import os
import time

from celery import Celery

from kickq_celery import JobDeleted, JobFailed, Kickq, TombstoneTimeout
from kickq_celery.harness import purge_namespace, worker

url = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("KICKQ_NAMESPACE", "example-tombstone")

# No result backend configured: kickq supplies one on its Redis, under the namespace.
app = Celery("tombstone-example", broker=url)
Kickq.config({"redis": url, "redisNamespace": namespace, "tombstoneTimeout": 10})
kq = Kickq(app, poll_interval=0.2)


@kq.process("resize")
def resize(job):
    width, height = job.data["size"]
    return {"img": job.data["img"], "size": [width // 2, height // 2]}


@kq.process("broken")
def broken(job):
    raise ValueError(f"cannot read image {job.data}")


@kq.process("slow")
def slow(job):
    time.sleep(job.data)
    return "finished, but nobody waited that long"


def on_complete(response):
    print(f"then: on_complete got {response.result}")
    return "thumbnail ready"


def on_failed(exc):
    print(f"then: on_failed got {type(exc).__name__}")
    return "no thumbnail"


def on_created(err, job_id, promise):
    print(f"callback: err={err} promise={'yes' if promise else 'no'}")
    print(f"callback: result {promise.wait().result}")


async def await_many():
    jobs = [kq.create("resize", {"img": n, "size": [100 * n, 50 * n]}, tombstone=True) for n in (1, 2, 3)]
    responses = await asyncio.gather(*(job.promise for job in jobs))
    return [response.result["size"] for response in responses]


with worker(app):
    job = kq.create("resize", {"img": 7, "size": [640, 480]}, tombstone=True)
    response = job.promise.wait()
    print(f"wait: {response.job_name} {response.state} -> {response.result}")

    derived = kq.create("resize", {"img": 8, "size": [20, 10]}, tombstone=True).promise.then(
        on_complete, on_failed)
    print(f"then: derived promise -> {derived.wait().result}")
    derived = kq.create("broken", 9, tombstone=True).promise.then(on_complete, on_failed)
    print(f"then: derived promise -> {derived.wait().result}")

    print(f"await: sizes {asyncio.run(await_many())}")

    kq.create("resize", {"img": 10, "size": [8, 8]}, callback=on_created, tombstone=True)

    try:
        kq.create("broken", 11, tombstone=True).promise.wait()
    except JobFailed as exc:
        print(f"failed: {type(exc).__name__} error={exc.error!r} has_timeout={exc.has_timeout}")

    try:
        kq.create("slow", 1.5, tombstone=True, tombstone_timeout=0.5).promise.wait()
    except TombstoneTimeout as exc:
        print(f"timeout: {type(exc).__name__} has_timeout={exc.has_timeout}")

    later = kq.create("resize", {"img": 12, "size": [2, 2]}, tombstone=True, delay=3)
    kq.delete(later.id)
    try:
        later.promise.wait()
    except JobDeleted as exc:
        print(f"deleted: {type(exc).__name__} has_timeout={exc.has_timeout}")

    # the outcome is an ordinary Celery result too
    print(f"celery: AsyncResult says {app.AsyncResult(job.id).get(timeout=5)}")

purge_namespace(kq)
print("done")
