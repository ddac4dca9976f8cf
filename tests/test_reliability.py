"""Reliability with real `celery worker` subprocesses: long delays wait in Redis and run
once, a dead worker's job is finished by another, deletes survive restarts, namespaces
are isolated, and the promoter lease publishes a parked job once."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from kickq_celery import JobNotFound, Kickq, scripts, testing
from kickq_celery.testing import purge_namespace, wait_for
from kickq_celery.worker.loops import redelivery_grace
from tests.conftest import listed


def state(kq: Kickq, job_id: str) -> str | None:
    try:
        return kq.get(job_id).state
    except JobNotFound:
        return None


def received(worker, job_id: str) -> int:  # type: ignore[no-untyped-def]
    """How many Celery messages of the job the worker received (its INFO log)."""
    return worker.log.read_text(errors="replace").count(f"[{job_id}] received")


def test_delay_past_visibility_timeout_runs_once(kickq, kickq_app, worker_process, r):
    # with a delay_horizon, the producer's app has the worker's visibility_timeout, so its horizon
    # is capped at 2 / 4 s
    Kickq.config(delay_horizon=5)
    kickq_app.conf.broker_transport_options = {"visibility_timeout": 2}
    assert kickq.horizon == 0.5
    worker = worker_process(concurrency=2, visibility_timeout=2)
    job = kickq.create("record", "late", delay=6)
    assert job.state == "delayed"
    # parked in Redis: no broker message exists yet that could be redelivered
    assert r.zscore(kickq.keys.delayed, job.id) is not None
    try:
        # (a message the broker lost would be published again within the redelivery grace)
        record = wait_for(lambda: state(kickq, job.id) == "success" and kickq.get(job.id), 30,
                          0.1, "the delayed job to run")
    except AssertionError:
        raise AssertionError(worker.log.read_text(errors="replace")[-4000:]) from None
    # two more visibility timeouts: a redelivered message would have run by now
    time.sleep(4)
    assert listed(r, kickq.options["redis_namespace"], "runs") == [job.id]
    record = kickq.get(job.id)
    assert len(record.runs) == 1 and record.runs[0].state == "success"
    # both stamped by Redis TIME: not a moment before created + 6 s
    assert record.scheduled_for == record.created_at + timedelta(seconds=6)
    assert record.runs[0].started_at >= record.scheduled_for
    # the guarantee is one run; the broker itself may hand the message over again
    assert received(worker, job.id) >= 1


def test_promoter_lease_publishes_a_parked_job_once(kickq, kickq_app, worker_process, r):
    kickq_app.conf.broker_transport_options = {"visibility_timeout": 2}
    workers = [worker_process(concurrency=2, visibility_timeout=2, wait=False) for _ in range(3)]
    for worker in workers:
        worker.wait_ready()
    jobs = kickq.create_many("record", list(range(30)), delay=2)
    assert r.zcard(kickq.keys.delayed) == 30
    ids = [job.id for job in jobs]
    ns = kickq.options["redis_namespace"]
    wait_for(lambda: len(listed(r, ns, "runs")) >= 30, 30, 0.1, "the parked jobs to run")
    # three promoters polled every 0.2 s: each job was published (received) exactly once
    assert sorted(listed(r, ns, "runs")) == sorted(ids)
    for job_id in ids:
        assert sum(received(w, job_id) for w in workers) == 1, job_id
    assert r.zcard(kickq.keys.delayed) == 0


def test_killed_worker_job_is_finished_by_a_fresh_worker(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    first = worker_process(concurrency=1, lock_timeout=3)
    job = kickq.create("sleep", 2, ghost_interval=0)
    wait_for(lambda: job.id in listed(r, ns, "started"), 20, 0.05, "the job to start")
    first.kill()
    killed = time.monotonic()
    assert kickq.get(job.id).state == "processing"  # nobody is left to say otherwise

    worker_process(concurrency=1, lock_timeout=3)
    record = wait_for(lambda: state(kickq, job.id) == "success" and kickq.get(job.id), 60,
                      0.1, "a fresh worker to finish the job")
    assert time.monotonic() - killed < 60
    assert [run.state for run in record.runs] == ["ghost", "success"]
    assert "heartbeat lock expired" in (record.runs[0].error or "")
    assert listed(r, ns, "started") == [job.id, job.id]
    assert listed(r, ns, "runs") == [job.id]  # the handler completed once
    stats = kickq.stats("sleep").total
    assert (stats.succeeded, stats.ghosts, stats.failed, stats.processing) == (1, 1, 0, 0)
    assert r.zcard(kickq.keys.active) == 0


def test_delete_of_a_delayed_job_survives_a_worker_restart(kickq, kickq_app, kickq_namespace,
                                                            kickq_redis_url, worker_process, r):
    # a second producer with a long horizon publishes 7 s delays as Celery countdowns,
    # which the worker holds in memory; the fixture's (horizon 5 s) parks them in Redis
    eager = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=kickq_namespace, delay_horizon=30)
    worker = worker_process(concurrency=2)
    parked, parked_control = kickq.create_many("record", ["parked", "parked control"], delay=7)
    held, held_control = eager.create_many("record", ["held", "held control"], delay=7)
    created = time.monotonic()
    assert r.zscore(kickq.keys.delayed, parked.id) is not None
    assert r.zscore(kickq.keys.delayed, held.id) is None
    wait_for(lambda: received(worker, held.id) and received(worker, held_control.id), 10, 0.05,
             "the worker to hold the countdown messages")
    worker.stop()
    assert time.monotonic() - created < 7, "the worker stopped too late for this test"

    assert kickq.delete(parked.id) is True
    assert kickq.delete(held.id) is True
    fresh = worker_process(concurrency=2)
    ns = kickq.options["redis_namespace"]
    wait_for(lambda: {parked_control.id, held_control.id} <= set(listed(r, ns, "runs")), 30,
             0.1, "the control jobs to run")
    # the controls were due at the same time; give a straggler one more second to show up
    time.sleep(1)
    assert sorted(listed(r, ns, "runs")) == sorted([parked_control.id, held_control.id])
    for job_id in (parked.id, held.id):
        with pytest.raises(JobNotFound):
            kickq.get(job_id)
    # the held message came back to the queue on shutdown and the guard dropped it
    assert received(fresh, held.id) <= 1
    assert kickq.stats("record").total.deleted == 2


def test_namespaces_on_one_redis_never_see_each_other(kickq, kickq_app, kickq_redis_url,
                                                      worker_process, r):
    ns_a = kickq.options["redis_namespace"]
    ns_b = ns_a + "b"
    other = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=ns_b)
    try:
        worker_process(concurrency=2)  # namespace A only
        a_jobs = [j.id for j in kickq.create_many("record", ["a1", "a2", "a3"])]
        b_jobs = [j.id for j in other.create_many("record", ["b1", "b2"])]
        wait_for(lambda: all(state(kickq, j) == "success" for j in a_jobs), 20, 0.1, "A's jobs")
        # same job name, same Redis: B's jobs wait for a worker of B
        assert [state(other, j) for j in b_jobs] == ["queued", "queued"]

        worker_process(concurrency=2, ns=ns_b)
        wait_for(lambda: all(state(other, j) == "success" for j in b_jobs), 20, 0.1, "B's jobs")
        assert sorted(listed(r, ns_a, "runs")) == sorted(a_jobs)
        assert sorted(listed(r, ns_b, "runs")) == sorted(b_jobs)

        for mine, theirs, their_ids in ((kickq, other, b_jobs), (other, kickq, a_jobs)):
            for job_id in their_ids:
                with pytest.raises(JobNotFound):
                    mine.get(job_id)
                assert mine.delete(job_id) is False
                assert theirs.get(job_id).state == "success"  # untouched by the failed delete
        assert sorted(j.id for j in kickq.jobs()) == sorted(a_jobs)
        assert sorted(j.id for j in other.jobs()) == sorted(b_jobs)
        assert kickq.stats().total.created == 3 and kickq.stats().total.succeeded == 3
        assert other.stats().total.created == 2 and other.stats().total.succeeded == 2
        assert kickq.stats().total.deleted == 0 == other.stats().total.deleted
        assert kickq.delete(a_jobs[0]) is True and other.get(b_jobs[0]).state == "success"
    finally:
        purge_namespace(other)
        keys = list(r.scan_iter(match=f"test:{ns_b}:*"))
        if keys:
            r.delete(*keys)


def test_lost_message_is_published_again(kickq_app, kickq_namespace, kickq_redis_url):
    """A job whose Celery message vanished (no message at all here) still runs, once."""
    kq = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=kickq_namespace,
               poll_interval=0.1, lock_timeout=1, delay_horizon=0.5)
    runs = []

    @kq.process("lost")
    def lost(job):
        runs.append(job.id)
        return job.data

    try:
        # the record alone, as if its message had been lost between broker and worker
        kq.store.run(scripts.create(
            "lost", '{"delay": null, "retry": false, "retry_count": 3, "retry_interval": 0,'
                        ' "ghost_retry": true, "ghost_times": 1, "ghost_interval": 0}',
                        None, False, 0.0, False, [("lost-1", '"x"')]))
        assert kq.get("lost-1").state == "queued"
        with testing.worker(kickq_app):
            record = wait_for(lambda: kq.get("lost-1").complete and kq.get("lost-1"),
                              timeout=redelivery_grace(kq) + 10, message="the lost job to run")
            time.sleep(redelivery_grace(kq))  # a later sweep must not run it again
        assert record.state == "success" and record.result == "x"
        assert runs == ["lost-1"]
        assert len(kq.get("lost-1").runs) == 1
    finally:
        purge_namespace(kq)


def test_prefetched_jobs_of_a_killed_worker_run(kickq, worker_process, kickq_namespace):
    """Messages a SIGKILLed worker had reserved come back long before the visibility_timeout."""
    first = worker_process(concurrency=1, lock_timeout=1)
    sleeper = kickq.create("sleep", 30)
    wait_for(lambda: kickq.get(sleeper.id).state == "processing", 20, message="the sleep job to start")
    queued = [kickq.create("record", i) for i in range(3)]  # reserved by the busy worker
    wait_for(lambda: first.log.read_text(errors="replace").count(f"Task {kickq_namespace}.record[") >= 3,
             20, message="the worker to reserve the record jobs")
    first.kill()
    worker_process(concurrency=1, lock_timeout=1)
    for job in queued:
        record = wait_for(lambda job=job: kickq.get(job.id).complete and kickq.get(job.id), 60,
                          message="a reserved job to run on the new worker")
        assert record.state == "success" and len(record.runs) == 1
    kickq.delete(sleeper.id)
