"""Cron without `celery beat`: a schedule every two seconds, fired by the worker itself.

Run it with `python examples/cron.py`. It uses the Redis at $KICKQ_REDIS_URL
(default redis://127.0.0.1:6379/0) as broker and for kickq's records. In a real
project the worker is the ordinary `celery -A proj worker` (any number of them:
each tick still creates exactly one job); here an in-process worker keeps the
example to one command.
"""

from __future__ import annotations

import os
import sys
import time

from celery import Celery

from kickq_celery import Kickq
from kickq_celery.harness import purge_namespace, worker

url = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("cron-example", broker=url)
app.conf.broker_connection_retry_on_startup = True
# a namespace of its own, so the clean-up at the end touches nothing else
kq = Kickq(app, redis=url, redis_namespace=f"cron-example-{os.getpid()}", poll_interval=0.2)


@kq.process("tick")
def tick(job):
    created = f"{job.created_at:%H:%M:%S.%f}"[:-3]  # milliseconds
    print(f"  job {job.id[:8]} (created {created}) ran with data {job.data}", flush=True)
    return job.data


try:
    with worker(app):
        # six fields: the sixth is seconds, so this is "every two seconds"
        key = kq.schedule("tick", "* * * * * */2", data={"report": "heartbeat"})
        print(f"scheduled {key}; the worker creates one job per tick", flush=True)
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline and kq.stats("tick").total.succeeded < 3:
            time.sleep(0.1)
        for schedule in kq.schedules():
            last = schedule["last_run"]
            print(f"schedule {schedule['key']}: cron {schedule['cron']!r} ({schedule['tz']}), "
                  f"last run {last and f'{last:%H:%M:%S}'}, next run {schedule['next_run']:%H:%M:%S}")
        print("unscheduled:", kq.unschedule(key))
        fired = kq.stats("tick").total
    print(f"{fired.created} jobs created by the schedule, {fired.succeeded} succeeded")
    ok = fired.succeeded >= 3
finally:
    purge_namespace(kq)
sys.exit(0 if ok else 1)
