"""max_jobs_num is a cluster-wide limit: across `celery worker` processes, never more
runs of a name at once; waiting is neither a run nor a failure, and waiting jobs are
woken once per freed slot instead of bouncing through the broker."""

from __future__ import annotations

import time

from kickq_celery.options import Limits
from kickq_celery.testing import wait_for
from tests.conftest import listed


def received(worker, job_id: str) -> int:  # type: ignore[no-untyped-def]
    """How many Celery messages of the job the worker received (its INFO log)."""
    return worker.log.read_text(errors="replace").count(f"[{job_id}] received")


def all_succeeded(kq, ids: list[str]) -> bool:  # type: ignore[no-untyped-def]
    return all(record.state == "success" for record in map(kq.get, ids))


def test_max_jobs_num_holds_across_two_worker_processes(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    workers = [worker_process(concurrency=4, max_jobs=3, wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    assert r.hget(kickq.keys.limits, "sleep") == "3"  # stored by the workers' bootstep
    ids = [job.id for job in kickq.create_many("sleep", [0.3] * 20)]
    wait_for(lambda: all_succeeded(kickq, ids), 60, 0.2, "the 20 jobs to succeed")

    concurrency = [int(n) for n in listed(r, ns, "concurrency")]
    assert len(concurrency) == 20
    assert 2 <= max(concurrency) <= 3, concurrency  # parallel, but never over the limit
    assert sorted(listed(r, ns, "runs")) == sorted(ids)  # each handler ran exactly once
    for job_id in ids:
        record = kickq.get(job_id)
        assert [run.state for run in record.runs] == ["success"], record
    stats = kickq.stats("sleep").total
    assert (stats.succeeded, stats.failed, stats.retried, stats.ghosts) == (20, 0, 0, 0)
    assert (stats.queued, stats.processing) == (0, 0)
    assert not r.exists(kickq.keys.running("sleep"), kickq.keys.waiting("sleep"))


def test_waiting_jobs_do_not_busy_loop_the_broker(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    worker = worker_process(concurrency=4, max_jobs=3)
    holders = [job.id for job in kickq.create_many("sleep", [2.5] * 3)]
    wait_for(lambda: len(listed(r, ns, "started")) == 3, 20, 0.05, "3 jobs to hold the slots")
    waiting = [job.id for job in kickq.create_many("sleep", [0.1] * 5)]
    wait_for(lambda: r.zcard(kickq.keys.waiting("sleep")) == 5, 10, 0.05, "5 jobs to wait")
    # the slots stay taken for ~2 s more: a busy loop would re-deliver the waiting
    # jobs' messages meanwhile; half a second shows that nothing moves
    time.sleep(0.5)
    assert len(listed(r, ns, "started")) == 3
    assert [received(worker, job_id) for job_id in waiting] == [1] * 5
    for job_id in waiting:
        record = kickq.get(job_id)
        assert record.state == "queued" and record.runs == []
    assert kickq.stats("sleep").total.queued == 5

    wait_for(lambda: all_succeeded(kickq, holders + waiting), 30, 0.1, "all jobs to succeed")
    # once when created, once when a freed slot woke it
    assert [received(worker, job_id) for job_id in waiting] == [2] * 5
    assert [received(worker, job_id) for job_id in holders] == [1] * 3
    assert sorted(listed(r, ns, "runs")) == sorted(holders + waiting)
    assert max(int(n) for n in listed(r, ns, "concurrency")) <= 3
    assert kickq.stats("sleep").total.failed == 0


def test_deleting_a_woken_job_passes_its_slot_on(kickq, r):
    """A job woken for a freed slot and then deleted must not strand the jobs behind it.

    Driven through the store's scripts directly: the window between the wake-up and
    the woken job's start is too short to hit with workers.
    """
    store = kickq.store
    store.set_limits("limited", Limits(1))
    a, b, c = (job.id for job in kickq.create_many("limited", ["a", "b", "c"]))
    assert store.start_run(a, 1, "token-a", 30).status == "run"
    assert store.start_run(b, 1, "token-b", 30).status == "wait"
    assert store.start_run(c, 1, "token-c", 30).status == "wait"
    ended = store.finish_run(a, "token-a", "success", "null", 60)
    assert ended.released == b  # b is parked as due now for a promoter to publish
    assert r.zscore(kickq.keys.delayed, b) is not None
    assert kickq.delete(b) is True
    # b's slot is free and c waits for one: c must be woken (parked as due), not stranded
    assert r.zscore(kickq.keys.delayed, c) is not None
    assert r.zcard(kickq.keys.waiting("limited")) == 0
    assert store.start_run(c, 1, "token-c", 30).status == "run"


def test_a_raised_or_removed_limit_wakes_the_waiting_jobs(kickq, r):
    """Workers restarted with a higher (or no) max_jobs_num must not strand the jobs
    already waiting for a slot (nothing else would wake them if nothing runs)."""
    store = kickq.store
    store.set_limits("limited", Limits(1))
    a, b, c, d = (job.id for job in kickq.create_many("limited", ["a", "b", "c", "d"]))
    assert store.start_run(a, 1, "token-a", 30).status == "run"
    assert [store.start_run(j, 1, "t", 30).status for j in (b, c, d)] == ["wait"] * 3
    assert store.set_limits("limited", Limits(1)) == 0  # same limit, slot taken: nobody wakes
    assert store.set_limits("limited", Limits(2)) == 1  # one more slot: the oldest waiting job
    assert r.zrange(kickq.keys.delayed, 0, -1) == [b]
    assert store.set_limits("limited", Limits(None)) == 2  # no limit: everyone
    assert sorted(r.zrange(kickq.keys.delayed, 0, -1)) == sorted([b, c, d])
    assert not r.exists(kickq.keys.waiting("limited"), kickq.keys.limits)
    assert [store.start_run(j, 1, "t", 30).status for j in (b, c, d)] == ["run"] * 3
