"""Adopting kickq without rewriting: one Celery task, before and after `@kq.task`.

Run it with `python examples/celery_tasks.py`. It uses the Redis at $KICKQ_REDIS_URL
(default redis://127.0.0.1:6379/0) as Celery broker and for kickq's records. In a
real project the worker is the ordinary `celery -A proj worker`; here an in-process
worker keeps the example to one command.

The change is one line: `@app.task` becomes `@kq.task(...)`. The function and its
callers (`.delay()`, `.apply_async(args, kwargs, countdown=/eta=)`, `.get()`,
`.revoke()`) stay as they are; the calls become kickq jobs, with durable revokes,
retries whose result waits for the final outcome, and one record per job.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta, timezone

from celery import Celery

from kickq_celery import JobDeleted, JobFailed, Kickq
from kickq_celery.harness import purge_namespace, wait_for, worker

url = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("KICKQ_NAMESPACE", "example-celery-tasks")

app = Celery("celery-tasks-example", broker=url)
# this example's own Celery queue (so that it takes no other app's tasks); kickq jobs have theirs
app.conf.task_default_queue = f"{namespace}.celery"
kq = Kickq(app, redis=url, redis_namespace=namespace, poll_interval=0.2)
# a worker logs a failed run with its traceback, as Celery does; here one fails on purpose
logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL)

outbox: list[tuple[int, str]] = []  # what the mail server accepted
busy = {13}  # the mail server turns user 13's first email away


def deliver(user_id, template):
    """The existing email code (here: an outbox, and a mail server that is busy once)."""
    if user_id in busy:
        busy.discard(user_id)
        raise ConnectionError("mail server busy, try later")
    if user_id < 0:
        raise ValueError(f"user {user_id} has no email address")
    outbox.append((user_id, template))
    return f"sent {template!r} to user {user_id}"


# --- before: an ordinary Celery task --------------------------------------------------

@app.task(name="emails.send_email_celery")
def send_email_celery(user_id, template="welcome"):
    return deliver(user_id, template)


# --- after: the same function; `@app.task` became `@kq.task` -------------------------
# at most 4 emails at once across all workers; a failed send is tried twice more
# (retry_interval is in seconds: 0.2 keeps the example short, a project might say 60)

@kq.task(name="emails.send_email", max_jobs_num=4, retry=True, retry_count=2, retry_interval=0.2)
def send_email(user_id, template="welcome"):
    return deliver(user_id, template)


with worker(app):
    # before: the caller sends, and the worker runs it
    send_email_celery.delay(7, template="reset")
    wait_for(lambda: (7, "reset") in outbox, 10, message="the Celery task")
    print(f"before: Celery task ran, outbox {outbox}")

    # after: the same calls
    result = send_email.delay(7, template="reset")
    print(f"after: delay -> {result.get(timeout=10)}")
    later = send_email.apply_async((7,), {"template": "digest"}, countdown=1)
    print(f"after: countdown=1 is {later.state} at first, then -> {later.get(timeout=10)}")
    at = datetime.now(timezone.utc) + timedelta(seconds=1)
    print(f"after: eta -> {send_email.apply_async((8,), eta=at).get(timeout=10)}")

    # a retry does not end get(): it returns once a run succeeds...
    retried = send_email.delay(13)
    print(f"after: retried -> {retried.get(timeout=10)}")
    print(f"after: runs {[run.state for run in kq.get(retried.id).runs]}")
    # ...and raises JobFailed only after the last failed run
    try:
        send_email.delay(-1).get(timeout=10)
    except JobFailed as exc:
        print(f"after: failed for good -> {exc.error}")

    # a revoke is a durable delete: the job never runs, whatever the workers do
    revoked = send_email.apply_async((9,), countdown=1)
    revoked.revoke()
    try:
        revoked.get(timeout=10)
    except JobDeleted:
        print(f"after: revoked -> JobDeleted, state {revoked.state}")
    time.sleep(1.5)  # past its countdown
    print(f"after: user 9 got {[t for u, t in outbox if u == 9]}")

    # a plain call runs the function here, as with Celery (no job)
    print(f"after: plain call -> {send_email(10)}")

    record = kq.get(result.id)
    print(f"after: job {record.name} data {record.data} state {record.state}")

total = kq.stats("emails.send_email").total
print(f"stats: {total.created} created, {total.succeeded} succeeded, {total.failed} failed, "
      f"{total.retried} retried, {total.deleted} deleted")
print(f"outbox: {outbox}")
purge_namespace(kq)
print("done")
