"""The Celery app of the benchmark workers: a raw Celery no-op task and a kickq no-op job.

Both count their runs in Redis (one INCR each), so both sides do the same work.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from kickq_celery import Kickq

REDIS_URL = os.environ.get("KICKQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("KICKQ_BENCH_NS", "kqbench")
RAW_QUEUE = f"{NAMESPACE}-raw"
COUNTER = f"{NAMESPACE}-counter"

app = Celery("benchapp", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(task_default_queue=RAW_QUEUE, worker_prefetch_multiplier=4,
                broker_connection_retry_on_startup=True, result_expires=600,
                # results under the run's namespace, so the run can remove them all
                result_backend_transport_options={"global_keyprefix": f"{NAMESPACE}-"})
#: jobs per Celery message of the chunked no-op's bursts
CHUNK_SIZE = int(os.environ.get("KICKQ_BENCH_CHUNK", "20"))
kq = Kickq(app, redis=REDIS_URL, redis_namespace=NAMESPACE, purge_timeout=600,
           job_flags={"chunked_noop": {"chunk_size": CHUNK_SIZE}})
counter = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.raw_noop")
def raw_noop(value: object = None) -> object:
    counter.incr(COUNTER)
    return value


@app.task(name="bench.raw_fire", ignore_result=True)
def raw_fire(value: object = None) -> object:
    """Raw Celery's cheapest setting: fire and forget, no result stored."""
    counter.incr(COUNTER)
    return value


@kq.process("noop")
def noop(job: object) -> object:
    counter.incr(COUNTER)
    return getattr(job, "data", None)


# the same no-op with every limit configured, none of them binding: the cost of the guard's checks
@kq.process("limited_noop", max_jobs_num=1000, rate_limit="100000/s", max_jobs_per_key=1000)
def limited_noop(job: object) -> object:
    counter.incr(COUNTER)
    return getattr(job, "data", None)


# the same no-op, its bursts CHUNK_SIZE jobs to a Celery message
@kq.process("chunked_noop")
def chunked_noop(job: object) -> object:
    counter.incr(COUNTER)
    return getattr(job, "data", None)
