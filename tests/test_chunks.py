"""chunk_size: several jobs of a burst to one Celery message, under real `celery worker`
subprocesses (tests/workerapp.py, handlers ``chunked`` and ``chunked_burst``).

A message of a chunk carries ``(job_id, attempt, more)``; the worker runs its jobs in turn, each
through its own run guard, heartbeat, limits, process_timeout, retries and delete, so a chunk
keeps every per-job guarantee: a deleted job of a chunk never runs, a failing one fails alone, a
killed worker's chunk is finished by another worker (the running job as a ghost run, the others
redelivered one message each), while the jobs a live chunk has yet to run are not taken for lost,
``max_jobs_num`` and ``process_timeout`` hold per job. Bursts come from
``create_many(..., chunk_size=N)`` and from a worker's promoter (the ``chunk_size`` of its own
``job_flags``).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import pytest

from kickq_celery import InvalidJobOptions, Kickq
from kickq_celery.testing import wait_for
from tests.conftest import gone, listed


@dataclass(frozen=True)
class HandlerRun:
    """A run of the chunked handlers as they recorded it (times: the worker's time.time())."""

    job_id: str
    pid: int
    start: float
    end: float | None = None  # None: it started, its sleep never ended (stopped, killed)


def handler_starts(r, ns: str) -> list[HandlerRun]:  # type: ignore[no-untyped-def]
    """Every run the chunked handlers started, in order."""
    return [HandlerRun(job_id, int(pid), float(start))
            for entry in listed(r, ns, "chunked:started") for job_id, pid, start in [entry.split(":")]]


def handler_runs(r, ns: str) -> list[HandlerRun]:  # type: ignore[no-untyped-def]
    """Every run of the chunked handlers whose sleep ended, in order."""
    return [HandlerRun(job_id, int(pid), float(start), float(end))
            for entry in listed(r, ns, "chunked:runs") for job_id, pid, start, end in [entry.split(":")]]


def once_each(runs: list[HandlerRun], ids: list[str]) -> dict[str, HandlerRun]:
    """The one handler run of each job (asserting there is exactly one per job, and no other)."""
    counts = Counter(run.job_id for run in runs)
    assert counts == Counter(ids), counts
    return {run.job_id: run for run in runs}


def queued_messages(r, queue: str) -> list[tuple[str, list[Any]]]:  # type: ignore[no-untyped-def]
    """(task id, args) of each message in a queue's broker list, oldest first (kombu's Redis
    transport LPUSHes and takes from the right)."""
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["id"], args))
    return out


def chunk_ids(task_id: str, args: list[Any]) -> list[str]:
    """The jobs of a message, in the order it runs them (asserting its shape and attempts)."""
    assert args[0] == task_id and args[1] == 1, args  # the task id is its first job's
    if len(args) == 2:
        return [args[0]]
    assert len(args) == 3 and args[2] and all(attempt == 1 for _, attempt in args[2]), args
    return [args[0], *(job_id for job_id, _ in args[2])]


def states(kq: Kickq, ids: list[str]) -> list[str]:
    return [kq.get(job_id).state for job_id in ids]


def all_done(kq: Kickq, ids: list[str]) -> bool:
    return all(kq.get(job_id).complete for job_id in ids)


def wait_done(kq: Kickq, ids: list[str], timeout: float, *workers) -> None:  # type: ignore[no-untyped-def]
    """Wait (bounded) for every job to end; on a timeout, fail with their states and the workers'
    log tails."""
    try:
        wait_for(lambda: all_done(kq, ids), timeout, 0.05, f"the {len(ids)} jobs to end")
    except AssertionError as exc:
        tails = "\n".join(w.log.read_text(errors="replace")[-3000:] for w in workers)
        raise AssertionError(f"{exc}: states {states(kq, ids)}\n{tails}") from None


def single_success(kq: Kickq, ids: list[str]) -> None:
    for job_id in ids:
        record = kq.get(job_id)
        assert record.state == "success" and [run.state for run in record.runs] == ["success"], record


def task_lines(worker, kq: Kickq, name: str, outcome: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The worker log's Celery lines ``Task <ns>.<name>[<id>] <outcome>...``."""
    task = f"Task {kq.task_name(name)}["
    return [line.split(task, 1)[1] for line in worker.log.read_text(errors="replace").splitlines()
            if task in line and f"] {outcome}" in line]


def succeeded(worker, kq: Kickq, name: str, count: int) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """task id -> its logged result, of each Celery task of ``name`` that succeeded, once the
    worker logged ``count`` of them (a bounded wait; more, or none in time, fail)."""
    def logged() -> list[tuple[str, str]]:
        return [(line.split("]", 1)[0], line.split(": ", 1)[1])
                for line in task_lines(worker, kq, name, "succeeded")]
    try:
        wait_for(lambda: len(logged()) >= count, 5, 0.1, f"{count} Celery tasks to succeed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {logged()}\n{worker.log.read_text(errors='replace')[-3000:]}") from None
    found = dict(lines := logged())
    assert len(lines) == len(found) == count, lines  # (a task id twice would be a job's second message)
    return found


# --- create_many packs chunk_size jobs to a message -----------------------------------


def test_create_many_packs_jobs_to_messages_and_each_runs_once(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    ids = [job.id for job in kickq.create_many("chunked", [{"n": n} for n in range(10)], chunk_size=5)]
    queue = kickq.queue("chunked").name
    assert r.llen(queue) == 2  # before any worker: 10 jobs, 2 messages
    messages = queued_messages(r, queue)
    assert [chunk_ids(*message) for message in messages] == [ids[:5], ids[5:]]
    assert states(kickq, ids) == ["queued"] * 10
    assert all(kickq.get(job_id).flags["chunk_size"] == 5 for job_id in ids)

    # lock_timeout 10: the jobs (created before the worker) are not overdue for its redelivery sweep
    worker = worker_process(concurrency=2, lock_timeout=10)
    wait_done(kickq, ids, 20, worker)
    single_success(kickq, ids)
    runs = once_each(handler_runs(r, ns), ids)
    assert len(handler_starts(r, ns)) == 10
    # one pool process per message, its jobs in turn
    for chunk in (ids[:5], ids[5:]):
        assert len({runs[job_id].pid for job_id in chunk}) == 1, chunk
        for a, b in pairwise(chunk):
            assert runs[a].end <= runs[b].start, (a, b)
    assert [kickq.get(job_id).result == {"pid": runs[job_id].pid, "run": 1} for job_id in ids] == [True] * 10
    # Celery saw two tasks, each returning the results of its 5 jobs
    done = succeeded(worker, kickq, "chunked", 2)
    assert sorted(done) == sorted([ids[0], ids[5]])
    for first, chunk in ((ids[0], ids[:5]), (ids[5], ids[5:])):
        assert all(repr(job_id) in done[first] for job_id in chunk), done[first]
    assert r.llen(queue) == 0
    stats = kickq.stats("chunked").total
    assert (stats.created, stats.succeeded, stats.failed, stats.ghosts) == (10, 10, 0, 0)


# --- a delete reaches a job of a chunk that has not started -----------------------------


def test_a_job_deleted_while_an_earlier_job_of_its_chunk_runs_never_runs(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    worker = worker_process(concurrency=1)
    ids = [job.id for job in kickq.create_many(
        "chunked", [{"sleep": 1.0}, {"sleep": 0.1}, {"sleep": 0.1}, {"sleep": 0.1}], chunk_size=4)]
    wait_for(lambda: [run.job_id for run in handler_starts(r, ns)] == ids[:1], 15, 0.02,
             "job 1 of the chunk to start")
    assert states(kickq, ids) == ["processing", "queued", "queued", "queued"]
    assert kickq.delete(ids[1]) is True
    assert gone(kickq, ids[1])  # a queued job goes at once

    kept = [ids[0], *ids[2:]]
    wait_done(kickq, kept, 15, worker)
    single_success(kickq, kept)
    assert [run.job_id for run in handler_starts(r, ns)] == kept  # in turn, without the deleted one
    once_each(handler_runs(r, ns), kept)
    assert gone(kickq, ids[1]) and kickq.delete(ids[1]) is False
    done = succeeded(worker, kickq, "chunked", 1)
    assert list(done) == [ids[0]]
    assert ids[1] not in done[ids[0]] and all(job_id in done[ids[0]] for job_id in kept), done
    stats = kickq.stats("chunked").total
    assert (stats.created, stats.succeeded, stats.deleted) == (4, 3, 1)


# --- a failing job of a chunk fails alone -------------------------------------------------


def test_a_failing_job_of_a_chunk_fails_alone_and_celery_sees_the_first_failure(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    worker = worker_process(concurrency=1)
    ids = [job.id for job in kickq.create_many(
        "chunked", [{}, {"fail": True}, {}, {"fail": True}, {}], chunk_size=5)]
    wait_done(kickq, ids, 15, worker)
    assert states(kickq, ids) == ["success", "fail", "success", "fail", "success"]
    for job_id in ids[1::2]:
        record = kickq.get(job_id)
        assert [run.state for run in record.runs] == ["fail"], record.runs
        assert record.last_error == f"RuntimeError: chunked job {job_id} fails on purpose", record
    once_each(handler_runs(r, ns), ids)  # the jobs after a failure ran, each once
    # the chunk's Celery task raised the first final failure (the second one is logged by kickq)
    raised = wait_for(lambda: task_lines(worker, kickq, "chunked", "raised"), 5, 0.1, "the task to raise")
    assert len(raised) == 1 and raised[0].startswith(f"{ids[0]}] raised"), raised
    assert f"chunked job {ids[1]} fails on purpose" in raised[0], raised
    assert task_lines(worker, kickq, "chunked", "succeeded") == []
    log = worker.log.read_text(errors="replace")
    assert f"kickq: chunked {ids[3]} run 1 failed" in log, log[-3000:]
    stats = kickq.stats("chunked").total
    assert (stats.succeeded, stats.failed, stats.retried) == (3, 2, 0)


# --- a worker killed in the middle of a chunk -------------------------------------------


def test_a_chunk_of_a_killed_worker_is_finished_by_another_each_job_once(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    queue = kickq.queue("chunked").name
    first = worker_process(concurrency=1, lock_timeout=1)
    ids = [job.id for job in kickq.create_many("chunked", [{"sleep": 1.0}] * 5, chunk_size=5,
                                               ghost_interval=0)]
    wait_for(lambda: len(handler_starts(r, ns)) == 2, 15, 0.02, "job 2 of the chunk to start")
    first.kill()  # (SIGKILL to the worker's process group)
    starts = handler_starts(r, ns)
    assert [run.job_id for run in starts] == ids[:2]
    killed_pid = starts[1].pid
    # job 1 ended; job 2 was running; jobs 3-5 wait in Redis, with no message left for them
    assert states(kickq, ids) == ["success", "processing", "queued", "queued", "queued"]
    assert r.llen(queue) == 0

    second = worker_process(concurrency=2, lock_timeout=1)
    wait_done(kickq, ids, 20, first, second)
    single_success(kickq, [ids[0], *ids[2:]])
    record = kickq.get(ids[1])
    assert record.state == "success", record
    assert [run.state for run in record.runs] == ["ghost", "success"], record.runs
    assert "heartbeat lock expired" in (record.runs[0].error or ""), record.runs[0]
    # no job's handler ran to its end twice; job 2 started twice (the killed run, then its re-run)
    runs = once_each(handler_runs(r, ns), ids)
    assert Counter(run.job_id for run in handler_starts(r, ns)) == Counter({**{i: 1 for i in ids}, ids[1]: 2})
    assert runs[ids[1]].pid != killed_pid
    assert all(runs[job_id].pid != killed_pid for job_id in ids[1:])
    # the jobs the chunk had not reached went out again one message each (the redelivery sweep)
    log = second.log.read_text(errors="replace")
    assert "kickq: published the messages of" in log, log[-3000:]
    assert "lost its heartbeat -> ghost" in log
    stats = kickq.stats("chunked").total
    assert (stats.created, stats.succeeded, stats.failed, stats.ghosts) == (5, 5, 0, 1)


# --- the jobs ahead of a running chunk are not taken for lost ------------------------------


def test_the_jobs_a_running_chunk_has_not_reached_are_not_redelivered(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    # lock_timeout 1: a job due 2 s ago whose queue is empty looks lost to the sweep (every 1 s)
    worker = worker_process(concurrency=2, lock_timeout=1)
    ids = [job.id for job in kickq.create_many("chunked", [{"sleep": 0.8}] * 5, chunk_size=5)]
    wait_done(kickq, ids, 20, worker)
    single_success(kickq, ids)
    runs = once_each(handler_runs(r, ns), ids)
    log = worker.log.read_text(errors="replace")
    # the worker is alive and its chunk never stopped: nothing of it was lost
    assert "overdue job(s) again" not in log, [line for line in log.splitlines() if "overdue" in line]
    assert len({run.pid for run in runs.values()}) == 1, runs  # all in the chunk's pool process
    assert [runs[a].end <= runs[b].start for a, b in pairwise(ids)] == [True] * 4  # in turn


# --- max_jobs_num holds per job ---------------------------------------------------------


def test_max_jobs_num_holds_for_each_job_of_chunks_across_two_workers(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    workers = [worker_process(concurrency=2, max_jobs=1, wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    wait_for(lambda: r.hget(kickq.keys.limits, "sleep") == "1", 10, 0.05, "the workers to store the limit")

    ids = [job.id for job in kickq.create_many("sleep", [0.2] * 12, chunk_size=4)]
    wait_done(kickq, ids, 30, *workers)
    single_success(kickq, ids)
    assert listed(r, ns, "concurrency") == ["1"] * 12  # never two at once
    assert Counter(listed(r, ns, "started")) == Counter(ids)
    assert Counter(listed(r, ns, "runs")) == Counter(ids)
    runs = sorted((kickq.get(job_id).runs[0] for job_id in ids), key=lambda run: run.started_at)
    for earlier, later in pairwise(runs):  # by the records (Redis clock): one after the other
        # (a chunk's next job starts in its previous job's finish: at the same time, to rounding)
        assert earlier.started_at.timestamp() + earlier.duration <= later.started_at.timestamp() + 0.001
    assert r.zcard(kickq.keys.waiting("sleep")) == 0
    stats = kickq.stats("sleep").total
    assert (stats.succeeded, stats.failed, stats.ghosts, stats.queued, stats.processing) == (12, 0, 0, 0, 0)


# --- process_timeout holds per job ------------------------------------------------------


def test_process_timeout_stops_the_one_job_of_a_chunk_that_overruns(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    worker = worker_process(concurrency=2)
    slow = [job.id for job in kickq.create_many(
        "chunked", [{"sleep": 3.0}, {"sleep": 0.1}, {"sleep": 0.1}], chunk_size=3,
        process_timeout=1, ghost_retry=False)]
    steady = [job.id for job in kickq.create_many("chunked", [{"sleep": 0.6}] * 3, chunk_size=3,
                                                  process_timeout=1)]
    wait_done(kickq, slow + steady, 15, worker)

    starts = {run.job_id: run for run in handler_starts(r, ns)}
    assert sorted(starts) == sorted(slow + steady)
    # the first is stopped at its process_timeout (1 s), not run to its 3 s, and not run again
    record = kickq.get(slow[0])
    assert record.state == "fail", record
    assert [run.state for run in record.runs] == ["ghost"], record.runs
    assert "process_timeout" in (record.runs[0].error or "") + (record.last_error or ""), record
    assert 0.8 <= record.runs[0].duration < 2.0, record.runs[0]
    stopped = [entry.split(":") for entry in listed(r, ns, "chunked:stopped")]
    assert [job_id for job_id, _, _ in stopped] == [slow[0]]
    assert 0.8 <= float(stopped[0][2]) - starts[slow[0]].start < 2.0
    # the next two ran in the same pool process after it, well before its 3 s would have ended
    single_success(kickq, slow[1:])
    runs = once_each(handler_runs(r, ns), slow[1:] + steady)
    assert {starts[job_id].pid for job_id in slow} == {runs[slow[1]].pid}
    assert runs[slow[1]].start - starts[slow[0]].start < 2.0
    assert runs[slow[2]].end - starts[slow[0]].start < 2.5

    # three jobs of 0.6 s each in one message with process_timeout 1: the limit is per job
    single_success(kickq, steady)
    assert len({runs[job_id].pid for job_id in steady}) == 1
    span = runs[steady[-1]].end - runs[steady[0]].start
    assert span >= 1.7, span  # the message ran past 1 s, no job did
    assert all(kickq.get(job_id).runs[0].duration < 1.0 for job_id in steady)
    assert listed(r, ns, "chunked:stopped") == [f"{slow[0]}:{stopped[0][1]}:{stopped[0][2]}"]


def test_a_job_of_a_chunk_that_ignores_its_soft_time_limit_is_killed_5_s_later(kickq, worker_process, r):
    """As billiard's hard time limit does for one job: its pool process is killed, the reaper
    ends the run, and the rest of the chunk is published again (lock_timeout 1)."""
    ns = kickq.options["redis_namespace"]
    worker = worker_process(concurrency=1, lock_timeout=1)
    stubborn, after = [job.id for job in kickq.create_many(
        "chunked", [{"sleep": 30, "stubborn": True}, {"sleep": 0}], chunk_size=2,
        process_timeout=1, ghost_retry=False)]
    wait_done(kickq, [stubborn, after], 25, worker)
    record = kickq.get(stubborn)
    assert record.state == "fail" and [run.state for run in record.runs] == ["ghost"], record
    assert "heartbeat lock expired" in (record.last_error or ""), record
    [stopped] = [entry.split(":") for entry in listed(r, ns, "chunked:stopped")]
    killed_by = float(stopped[2]) + 5  # its soft limit, then 5 s: the process is gone
    single_success(kickq, [after])
    assert kickq.get(after).runs[0].started_at.timestamp() >= killed_by - 0.5
    assert stubborn not in [run.job_id for run in handler_runs(r, ns)]  # its sleep never ended
    assert "killing its process" in worker.log.read_text(errors="replace")


# --- the promoter publishes a burst of parked jobs in chunks ------------------------------


def test_the_promoter_publishes_a_burst_of_parked_jobs_in_chunks_of_its_job_flags(kickq, worker_process, r):
    ns = kickq.options["redis_namespace"]
    name = "chunked_burst"
    queue = kickq.queue(name).name
    # a worker that promotes but does not consume the name's queue: its messages stay to be seen
    # (lock_timeout 10: nothing is overdue for a redelivery sweep meanwhile)
    promoter = worker_process(concurrency=1, queues=kickq.queue("record").name, chunk_size=4, lock_timeout=10)
    ids = [job.id for job in kickq.create_many(name, [{"n": n} for n in range(10)], delay=1)]
    assert r.llen(queue) == 0 and r.zcard(kickq.keys.delayed) == 10  # parked, no message yet
    assert all(kickq.get(job_id).flags["chunk_size"] == 1 for job_id in ids)  # no chunk_size at create
    wait_for(lambda: r.zcard(kickq.keys.delayed) == 0 and r.llen(queue) == 3, 10, 0.05,
             "the promoter to publish the burst")
    chunks = [chunk_ids(*message) for message in queued_messages(r, queue)]
    assert sorted(map(len, chunks)) == [2, 4, 4], chunks  # 10 jobs, 4 to a message
    assert sorted(job_id for chunk in chunks for job_id in chunk) == sorted(ids)
    promoter.kill()  # (it holds nothing: no need to wait for a warm shutdown)

    consumer = worker_process(concurrency=1, chunk_size=4, lock_timeout=10)
    wait_done(kickq, ids, 20, promoter, consumer)
    single_success(kickq, ids)
    runs = once_each(handler_runs(r, ns), ids)
    # Celery saw 3 tasks, one per message, each with the results of its jobs
    done = succeeded(consumer, kickq, name, 3)
    assert sorted(done) == sorted(chunk[0] for chunk in chunks)
    for chunk in chunks:
        assert all(repr(job_id) in done[chunk[0]] for job_id in chunk), done[chunk[0]]
        assert [runs[a].end <= runs[b].start for a, b in pairwise(chunk)] == [True] * (len(chunk) - 1)
    assert len(task_lines(consumer, kickq, name, "received")) == 3
    assert r.llen(queue) == 0


# --- chunk_size is checked before anything is written -------------------------------------


def namespace_keys(kq: Kickq) -> list[bytes]:
    ns = kq.options["redis_namespace"]
    return [key for pattern in ("\\{" + ns + "\\}:*", f"{ns}.*")
            for key in kq.redis.scan_iter(match=pattern)]


@pytest.mark.parametrize("bad", [0, 51, -1, "3", True, False, 2.0, None])
def test_a_bad_chunk_size_raises_before_anything_is_written(kickq, bad):
    with pytest.raises(InvalidJobOptions, match="chunk_size"):
        kickq.create_many("chunked", [{"n": n} for n in range(6)], chunk_size=bad)
    with pytest.raises(InvalidJobOptions, match="chunk_size"):
        kickq.create("chunked", {"n": 0}, chunk_size=bad)
    with pytest.raises(InvalidJobOptions, match="chunkSize"):  # kickq (Node)'s spelling, in opts
        kickq.create_many("chunked", [{"n": 0}], {"chunkSize": bad})
    assert namespace_keys(kickq) == []
    assert kickq.jobs() == []


@pytest.mark.parametrize(("size", "count", "messages"), [(1, 7, 7), (2, 7, 4), (7, 120, 18), (50, 120, 3),
                                                         (50, 50, 1), (3, 1, 1)])
def test_chunk_sizes_from_1_to_50_give_one_message_per_chunk(kickq, r, size, count, messages):
    """Across create_many's script calls (50 jobs each): no chunk is split between two calls."""
    ids = [job.id for job in kickq.create_many("chunked", list(range(count)), chunk_size=size)]
    found = [chunk_ids(*message) for message in queued_messages(r, kickq.queue("chunked").name)]
    assert len(found) == messages
    assert [job_id for chunk in found for job_id in chunk] == ids
    assert all(len(chunk) == size for chunk in found[:-1]) and 1 <= len(found[-1]) <= size
