"""A worker consumes kickq's queues on a Redis broker without kombu's ack emulation
(kickq_celery/worker/consumer.py): no copy of a kickq message in kombu's ``unacked`` hash,
Celery's own tasks keep theirs, and the messages a worker reserved go back to their
queue at once on a warm shutdown (a SIGKILL leaves them to the redelivery sweep:
tests/test_reliability.py::test_prefetched_jobs_of_a_killed_worker_run)."""

from __future__ import annotations

import os
import signal

from kickq_celery.harness import wait_for

from .conftest import listed


def test_reserved_kickq_messages_have_no_unacked_copy_and_come_back_on_a_warm_shutdown(
        kickq, kickq_app, kickq_namespace, worker_process, r):
    raw_queue = f"{kickq_namespace}-raw"
    # a lock_timeout of 30 s: the redelivery sweep would wait 60 s, longer than any wait below
    worker = worker_process(concurrency=1, lock_timeout=30, default_queue=raw_queue)
    sleeper = kickq.create("sleep", 3)
    wait_for(lambda: kickq.get(sleeper.id).state == "processing", 20, message="the sleep job to start")
    # the only pool process is busy: the worker reserves these and holds them
    records = [kickq.create("record", i) for i in range(3)]
    kickq_app.send_task("tests.raw_record", ("raw",), queue=raw_queue)
    log = worker.log.read_text
    wait_for(lambda: log(errors="replace").count(f"Task {kickq.task_name('record')}[") >= 3
             and "Task tests.raw_record[" in log(errors="replace"), 20,
             message="the worker to reserve the jobs and the raw task")

    unacked = [message for message in r.hvals("unacked") if kickq_namespace in message]
    assert not [m for m in unacked if kickq.task_name("record") in m], unacked  # no copy, no round trips
    assert [m for m in unacked if "tests.raw_record" in m], unacked  # Celery's own task: kombu's acks

    # a warm shutdown (SIGTERM to the main process): the sleep job ends, the reserved messages
    # go back to their queue
    os.kill(worker.proc.pid, signal.SIGTERM)
    worker.proc.wait(30)
    worker.stop()
    assert kickq.get(sleeper.id).state == "success"
    queued = r.llen(kickq.task_name("record"))
    ran = listed(r, kickq_namespace, "runs")
    assert queued + len([job for job in records if job.id in ran]) >= 3, (queued, ran)

    worker_process(concurrency=1, lock_timeout=30, default_queue=raw_queue)
    wait_for(lambda: all(kickq.get(job.id).complete for job in records), 20,
             message="the reserved jobs to run on the next worker (no sweep within 20 s)")
    assert sorted(listed(r, kickq_namespace, "runs")) == sorted([sleeper.id, *(job.id for job in records)])
    assert all(len(kickq.get(job.id).runs) == 1 for job in records)
    wait_for(lambda: listed(r, kickq_namespace, "raw") == ["raw"], 20, message="the raw task to run once")
