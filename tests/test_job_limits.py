"""rate_limit, max_jobs_per_key and priority across real `celery worker` subprocesses (prefork).

Every limit holds across all workers; jobs held by one wait in Redis (their Celery task ends
as Ignore at once, so no worker process is held), and the waiting ones start by priority,
then in the order they came. Run start times come from the job records (Redis clock).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from itertools import pairwise

from kickq_celery.testing import wait_for
from tests.conftest import listed


def all_succeeded(kq, ids: list[str]) -> bool:  # type: ignore[no-untyped-def]
    return all(record.state == "success" for record in map(kq.get, ids))


def single_runs(kq, ids: list[str]):  # type: ignore[no-untyped-def]
    """The one run of each job (asserting each job succeeded with exactly one run)."""
    runs = {}
    for job_id in ids:
        record = kq.get(job_id)
        assert record.state == "success", record
        assert [run.state for run in record.runs] == ["success"], record
        runs[job_id] = record.runs[0]
    return runs


def handler_runs(r, ns: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The job ids of the limits_* handler calls (one entry per call)."""
    return [entry.split(":", 1)[1] for entry in listed(r, ns, "limits:runs")]


def ends(run) -> datetime:  # type: ignore[no-untyped-def]
    return run.started_at + timedelta(seconds=run.duration)


def overlap(a, b) -> bool:  # type: ignore[no-untyped-def]
    return a.started_at < ends(b) and b.started_at < ends(a)


def test_rate_limit_holds_across_two_workers_without_holding_processes(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    workers = [worker_process(concurrency=4, rate_limit="10/s", wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    wait_for(lambda: r.hget(kickq.keys.limits, "limits_rate") is not None, 10, 0.05,
             "the workers to store the rate limit")

    ids = [job.id for job in kickq.create_many("limits_rate", [{}] * 100)]
    # mid-way, jobs of a name without limits run at once on the same workers: the rate-limited
    # jobs wait in Redis, not in the workers' processes
    time.sleep(3)
    assert r.zcard(kickq.keys.waiting("limits_rate")) > 0  # jobs are waiting for the window
    others = [job.id for job in kickq.create_many("record", list(range(8)))]
    wait_for(lambda: all_succeeded(kickq, others), 3, 0.05, "8 unlimited jobs to run meanwhile")
    assert sum(1 for record in map(kickq.get, ids) if record.state == "success") < 90  # still waiting

    wait_for(lambda: all_succeeded(kickq, ids), 20, 0.2, "the 100 rate-limited jobs to succeed")
    runs = single_runs(kickq, ids)
    assert sorted(handler_runs(r, ns)) == sorted(ids)  # each handler ran exactly once
    starts = sorted(run.started_at.timestamp() for run in runs.values())
    # no window [x, x + 1) holds more than 10 starts: the 11th start after any start x is >= x + 1
    for i in range(len(starts) - 10):
        assert starts[i + 10] - starts[i] >= 1.0, (i, starts[i:i + 11])
    span = starts[-1] - starts[0]
    assert 8.5 <= span <= 25, span
    stats = kickq.stats("limits_rate").total
    assert (stats.succeeded, stats.failed, stats.ghosts, stats.queued, stats.processing) == (100, 0, 0, 0, 0)
    assert r.zcard(kickq.keys.waiting("limits_rate")) == 0


def test_max_jobs_per_key_holds_each_key_alone(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    workers = [worker_process(concurrency=4, per_key=1, wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    wait_for(lambda: r.hget(kickq.keys.limits, "limits_keyed") is not None, 10, 0.05,
             "the workers to store the limit")

    keyed: dict[str, list[str]] = {key: [] for key in ("k1", "k2", "k3")}
    for _ in range(4):
        for key in keyed:
            keyed[key].append(kickq.create("limits_keyed", {"sleep": 0.5}, concurrency_key=key).id)
    free = [kickq.create("limits_keyed", {"sleep": 0.5}).id for _ in range(3)]  # no key: not held
    every = [job_id for ids in keyed.values() for job_id in ids] + free
    wait_for(lambda: all_succeeded(kickq, every), 20, 0.1, "the keyed jobs to succeed")

    runs = single_runs(kickq, every)
    assert sorted(handler_runs(r, ns)) == sorted(every)
    for key, ids in keyed.items():
        mine = sorted((runs[job_id] for job_id in ids), key=lambda run: run.started_at)
        for earlier, later in pairwise(mine):
            assert ends(earlier) <= later.started_at, (key, earlier, later)  # one run of a key at once
        span = (ends(mine[-1]) - mine[0].started_at).total_seconds()
        assert span >= 4 * 0.5, (key, span)
    # the keys are not held back by each other: their first runs overlap, and all keys run in parallel
    firsts = [min((runs[job_id] for job_id in ids), key=lambda run: run.started_at) for ids in keyed.values()]
    assert all(overlap(a, b) for a in firsts for b in firsts if a is not b), firsts
    keyed_span = (max(ends(runs[j]) for ids in keyed.values() for j in ids)
                  - min(runs[j].started_at for ids in keyed.values() for j in ids)).total_seconds()
    assert keyed_span < 2 * 4 * 0.5, keyed_span  # serial would take 3 x 2 s
    # jobs without a key start at once, and together
    created = kickq.get(free[0]).created_at
    assert all((runs[j].started_at - created).total_seconds() < 1.5 for j in free), \
        [runs[j].started_at - created for j in free]
    assert all(overlap(runs[a], runs[b]) for a in free for b in free if a != b)
    assert not r.exists(kickq.keys.waiting("limits_keyed"))
    assert kickq.stats("limits_keyed").total.succeeded == 15


def test_waiting_jobs_start_by_priority_then_in_order(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    worker_process(concurrency=2)  # one process runs the long job, the other takes the messages
    assert r.hget(kickq.keys.limits, "limits_prio") == "1"
    long = kickq.create("limits_prio", {"sleep": 1.5}).id
    wait_for(lambda: kickq.get(long).state == "processing", 10, 0.02, "the long job to start")
    low = [kickq.create("limits_prio", {"n": n}, priority=0).id for n in range(4)]
    high = [kickq.create("limits_prio", {"n": n}, priority=9).id for n in range(4)]
    wait_for(lambda: r.zcard(kickq.keys.waiting("limits_prio")) == 8, 5, 0.02,
             "the 8 jobs to wait for the slot")
    assert kickq.get(long).state == "processing"  # they all came while the long job ran
    assert [kickq.get(j).priority for j in low + high] == [0] * 4 + [9] * 4

    wait_for(lambda: all_succeeded(kickq, [long, *low, *high]), 20, 0.05, "all jobs to succeed")
    runs = single_runs(kickq, [long, *low, *high])
    assert sorted(handler_runs(r, ns)) == sorted([long, *low, *high])
    order = sorted(low + high, key=lambda job_id: runs[job_id].started_at)
    assert order == high + low, ([("high" if j in high else "low", high.index(j) if j in high
                                   else low.index(j)) for j in order])
    assert all(runs[j].started_at >= ends(runs[long]) for j in low + high)
    for earlier, later in pairwise(order):  # max_jobs_num=1: one after the other
        assert ends(runs[earlier]) <= runs[later].started_at
