"""Caller-chosen job ids (``create(..., job_id=...)``, ``create_many(..., job_ids=...)``, and
their asyncio forms): creating is idempotent while the record exists, racing creators make one
job, tombstones of an existing id wait for that job's outcome, and the id is free again once
the record is deleted or purged. Real Redis, and a real ``celery worker`` where a job must run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from kickq_celery import InvalidJobOptions, JobFailed, JobNotFound, JobRecord, Kickq
from kickq_celery.testing import wait_for
from tests.conftest import ROOT, listed


def queue_length(kq: Kickq, name: str) -> int:
    """Celery messages waiting in the queue of job ``name`` (the broker is the test Redis)."""
    return int(kq.redis.llen(kq.task_name(name)))


def job_keys(r: redis.Redis, ns: str) -> list[str]:
    """The job records of the namespace."""
    return sorted(r.scan_iter(match="\\{" + ns + "\\}:job:*"))  # type: ignore[arg-type]


def namespace_keys(r: redis.Redis, ns: str) -> list[str]:
    """Every key kickq writes for the namespace: records, indexes, stats ({ns}:...) and queues (ns.*)."""
    return sorted(key for pattern in ("\\{" + ns + "\\}:*", f"{ns}.*") for key in r.scan_iter(match=pattern))


def finished(kq: Kickq, job_id: str, timeout: float = 20) -> JobRecord:
    record: JobRecord = wait_for(lambda: (rec := kq.get(job_id)).complete and rec, timeout, 0.05,
                                 f"job {job_id} to finish")
    return record


def gone(kq: Kickq, job_id: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            kq.get(job_id)
        except JobNotFound:
            return True
        return False
    return check


# --- idempotent creates, no worker -----------------------------------------------------------


def test_same_job_id_twice_writes_one_record_and_one_message(kickq, r, kickq_namespace):
    first = kickq.create("record", {"n": 1}, job_id="order-1", retry=True, retry_count=5)
    assert (first.id, first.created, first.state, first.data) == ("order-1", True, "queued", {"n": 1})

    again = kickq.create("record", {"n": 2}, job_id="order-1", retry_count=1)
    assert again.id == "order-1"
    assert again.created is False
    # the existing job, not what this call asked for
    assert (again.state, again.data, again.created_at) == ("queued", {"n": 1}, first.created_at)
    record = kickq.get("order-1")
    assert (record.data, record.flags["retry_count"], record.created_at) == ({"n": 1}, 5, first.created_at)
    assert job_keys(r, kickq_namespace) == ["{" + kickq_namespace + "}:job:order-1"]
    assert queue_length(kickq, "record") == 1  # one Celery message
    assert kickq.stats("record").total.created == 1
    # a job created without a job_id beside it is unaffected
    fresh = kickq.create("record", 3)
    assert fresh.created is True and fresh.id != "order-1"
    assert queue_length(kickq, "record") == 2


def test_an_existing_delayed_job_is_returned_as_it_is(kickq, r, kickq_namespace):
    later = kickq.create("record", "later", job_id="remind:42", delay=60)
    assert (later.created, later.state) == (True, "delayed")
    again = kickq.create("record", "now", job_id="remind:42")  # no delay asked: still the delayed job
    assert (again.created, again.state, again.data, again.created_at) == (
        False, "delayed", "later", later.created_at)
    assert kickq.get("remind:42").state == "delayed"
    assert queue_length(kickq, "record") == 0  # parked in Redis: no message, then or now
    assert len(job_keys(r, kickq_namespace)) == 1


def test_create_many_with_job_ids_creates_only_the_new_ones(kickq, r, kickq_namespace):
    kickq.create("record", "old", job_id="b")
    jobs = kickq.create_many("record", ["A", "B", "C"], job_ids=["a", "b", "c"])
    assert [(j.id, j.created, j.data) for j in jobs] == [("a", True, "A"), ("b", False, "old"),
                                                       ("c", True, "C")]
    assert queue_length(kickq, "record") == 3  # b's one message, then a's and c's
    assert len(job_keys(r, kickq_namespace)) == 3
    assert kickq.get("b").data == "old"
    again = kickq.create_many("record", [1, 2], job_ids=["c", "a"])
    assert [(j.id, j.created, j.data) for j in again] == [("c", False, "C"), ("a", False, "A")]
    assert queue_length(kickq, "record") == 3
    assert kickq.stats("record").total.created == 3


# --- racing creators -------------------------------------------------------------------------

RACER = r"""
import json, sys
import redis
from celery import Celery
from kickq_celery import Kickq
url, ns, job_id, me = sys.argv[1:5]
kq = Kickq(Celery("racer", broker=url, set_as_current=False), redis=url, redis_namespace=ns)
try:
    kq.get(job_id)
except Exception:
    pass  # connected, and nothing there yet
barrier = redis.Redis.from_url(url)
barrier.rpush(f"test:{ns}:ready", me)
if not barrier.blpop([f"test:{ns}:go"], timeout=20):
    sys.exit("never released")
job = kq.create("record", {"by": me}, job_id=job_id)
print("JOB " + json.dumps({"id": job.id, "created": job.created, "data": job.data}))
"""


def test_processes_creating_one_id_at_once_make_one_job(kickq, r, kickq_namespace, kickq_redis_url):
    racers = 4
    args = [sys.executable, "-c", RACER, kickq_redis_url, kickq_namespace, "pay-7"]
    procs = [subprocess.Popen([*args, str(n)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for n in range(racers)]
    try:
        wait_for(lambda: r.llen(f"test:{kickq_namespace}:ready") == racers, 30, 0.02, "the racers")
        r.rpush(f"test:{kickq_namespace}:go", *["go"] * racers)  # released together
        outs = [proc.communicate(timeout=30) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        r.delete(f"test:{kickq_namespace}:ready", f"test:{kickq_namespace}:go")
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
    jobs = [json.loads(next(ln for ln in out.splitlines() if ln.startswith("JOB "))[4:]) for out, _ in outs]
    winners = [job for job in jobs if job["created"]]
    assert len(winners) == 1, jobs
    # every racer got the one job: the winner's data
    assert {job["id"] for job in jobs} == {"pay-7"}
    assert all(job["data"] == winners[0]["data"] for job in jobs), jobs
    assert kickq.get("pay-7").data == winners[0]["data"]
    assert job_keys(r, kickq_namespace) == ["{" + kickq_namespace + "}:job:pay-7"]
    assert queue_length(kickq, "record") == 1
    assert kickq.stats("record").total.created == 1


# --- the id is free again once the record is gone ------------------------------------------


def test_the_id_can_be_used_again_after_delete(kickq, r, kickq_namespace, worker_process):
    kickq.create("record", "first", job_id="again")
    assert kickq.delete("again") is True
    with pytest.raises(JobNotFound):
        kickq.get("again")
    second = kickq.create("record", "second", job_id="again")
    assert (second.created, second.data) == (True, "second")
    # the deleted job's message is still queued beside the new one's: only one run, the new job's
    assert queue_length(kickq, "record") == 2

    worker = worker_process(concurrency=2)
    assert finished(kickq, "again").result == "second"

    def handled() -> int:  # the messages of task id "again" the worker is done with (run or dropped)
        log = worker.log.read_text(errors="replace")
        return sum(log.count(f"{kickq.task_name('record')}[again] {end}") for end in ("succeeded", "ignored"))

    wait_for(lambda: handled() == 2, 10, 0.05, "the worker to handle both messages")
    assert listed(r, kickq_namespace, "runs") == ["again"]

    # a finished job deleted: the id makes a new job, which runs
    assert kickq.delete("again") is True
    third = kickq.create("record", "third", job_id="again")
    assert (third.created, third.state, third.data) == (True, "queued", "third")
    record = finished(kickq, "again")
    assert (record.result, len(record.runs)) == ("third", 1)
    assert listed(r, kickq_namespace, "runs") == ["again", "again"]
    assert kickq.stats("record").total.created == 3


def test_the_id_can_be_used_again_after_purge(kickq, kickq_app, kickq_worker, r, kickq_namespace):
    # a worker whose Kickq keeps finished records 1 s (purge_timeout is the worker's option)
    short = Kickq(kickq_app, **kickq.overrides, purge_timeout=1)

    @short.process("purged")
    def purged(job: Any) -> Any:
        return job.data

    kickq_worker(pool="threads", concurrency=2)
    kickq.create("purged", "first", job_id="p-1")
    assert finished(kickq, "p-1").result == "first"
    # until it is purged, the finished job is what the id gives
    existing = kickq.create("purged", "too soon", job_id="p-1")
    assert (existing.created, existing.state, existing.data) == (False, "success", "first")

    wait_for(gone(kickq, "p-1"), 5, 0.05, "the record to be purged")
    reused = kickq.create("purged", "second", job_id="p-1")
    assert (reused.created, reused.data) == (True, "second")
    assert finished(kickq, "p-1").result == "second"
    assert len(job_keys(r, kickq_namespace)) == 1


# --- tombstones ------------------------------------------------------------------------------


def test_tombstones_of_one_id_settle_with_its_one_outcome(kickq, r, kickq_namespace, worker_process):
    plain = kickq.create("record", {"order": 1}, job_id="t-1")  # created without a tombstone
    first = kickq.create("record", {"order": 2}, job_id="t-1", tombstone=True, tombstone_timeout=20)
    second = kickq.create("record", {"order": 3}, job_id="t-1", tombstone=True, tombstone_timeout=20)
    assert (plain.created, first.created, second.created) == (True, False, False)
    assert first.promise is not None and second.promise is not None
    assert queue_length(kickq, "record") == 1

    worker_process(concurrency=2)
    one, two = first.promise.wait(), second.promise.wait()
    assert (one.id, one.state, one.result) == ("t-1", "success", {"order": 1})
    assert (two.id, two.state, two.result) == ("t-1", "success", {"order": 1})
    assert listed(r, kickq_namespace, "runs") == ["t-1"]  # one run for all three creates
    assert len(kickq.get("t-1").runs) == 1


def test_tombstone_of_an_id_whose_job_ended_settles_with_that_outcome(kickq, r, kickq_namespace,
                                                                       worker_process):
    worker_process(concurrency=2)
    kickq.create("record", {"done": True}, job_id="ended-ok")
    kickq.create("fail_first", job_id="ended-bad")  # no retry: the first run fails the job
    assert finished(kickq, "ended-ok").state == "success"
    assert finished(kickq, "ended-bad").state == "fail"

    late = kickq.create("record", "ignored", job_id="ended-ok", tombstone=True, tombstone_timeout=5)
    assert (late.created, late.state, late.data) == (False, "success", {"done": True})
    assert late.promise is not None and late.promise.wait().result == {"done": True}

    failed = kickq.create("fail_first", job_id="ended-bad", tombstone=True, tombstone_timeout=5)
    assert (failed.created, failed.state) == (False, "fail")
    assert failed.promise is not None
    with pytest.raises(JobFailed) as info:
        failed.promise.wait()
    assert info.value.job_id == "ended-bad" and "first run fails on purpose" in str(info.value)

    # the asyncio create settles an ended job's tombstone the same
    async def acreate() -> Any:
        return await kickq.acreate("record", "ignored", job_id="ended-ok", tombstone=True,
                                   tombstone_timeout=5)

    alate = asyncio.run(acreate())
    assert (alate.created, alate.state) == (False, "success")
    assert alate.promise.wait().result == {"done": True}
    # nothing ran again
    assert sorted(listed(r, kickq_namespace, "runs")) == ["ended-bad", "ended-ok"]


def test_a_reused_id_does_not_see_the_outcome_of_the_job_before(kickq):
    kickq.create("record", 1, job_id="reused", tombstone=True, tombstone_timeout=10)
    assert kickq.delete("reused") is True  # its waiters get JobDeleted
    job = kickq.create("record", 2, job_id="reused", tombstone=True, tombstone_timeout=1)
    assert job.created is True and kickq.get("reused").state == "queued"
    # no worker: the new job's promise can only time out
    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    assert info.value.has_timeout is True, repr(info.value)


def test_an_existing_id_comes_back_with_its_own_name(kickq):
    kickq.create("alpha", 1, job_id="named")
    again = kickq.create("beta", 2, job_id="named")
    assert (again.created, again.data) == (False, 1)
    assert again.name == kickq.get("named").name == "alpha"


# --- bad ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["", "a b", "tab\there", "line\nbreak", " lead", "x" * 201, 7, b"bytes",
                                    ["list"], 1.5],
                         ids=["empty", "space", "tab", "newline", "leading-space", "201-chars", "int",
                              "bytes", "list", "float"])
def test_bad_job_id_raises_and_writes_nothing(kickq, r, kickq_namespace, job_id):
    with pytest.raises(InvalidJobOptions, match="job_id"):
        kickq.create("record", 1, job_id=job_id)
    with pytest.raises(InvalidJobOptions, match="job_id"):
        kickq.create("record", 1, job_id=job_id, tombstone=True)
    with pytest.raises(InvalidJobOptions, match="job_id"):
        asyncio.run(kickq.acreate("record", 1, job_id=job_id))
    # a bad id among good ones: none of them is written
    with pytest.raises(InvalidJobOptions, match="job_id"):
        kickq.create_many("record", [1, 2, 3], job_ids=["ok-1", job_id, "ok-3"])
    assert namespace_keys(r, kickq_namespace) == []


def test_the_longest_job_id_is_200_characters(kickq):
    longest = "é" + "x" * 199
    assert kickq.create("record", 1, job_id=longest).created is True
    assert kickq.get(longest).id == longest
    assert kickq.create("record", 2, job_id=longest).created is False


@pytest.mark.parametrize("job_ids", [["a", "b"], ["a", "b", "c", "d"], [], ["a", "b", "a"], ["a", "a", "a"],
                                     "abc"],
                         ids=["too-few", "too-many", "none", "duplicate", "all-same", "a-str"])
def test_bad_job_ids_raise_and_write_nothing(kickq, r, kickq_namespace, job_ids):
    with pytest.raises(InvalidJobOptions, match="job_ids"):
        kickq.create_many("record", [1, 2, 3], job_ids=job_ids)

    async def acreate_many() -> Any:
        return await kickq.acreate_many("record", [1, 2, 3], job_ids=job_ids)

    with pytest.raises(InvalidJobOptions, match="job_ids"):
        asyncio.run(acreate_many())
    assert namespace_keys(r, kickq_namespace) == []


# --- asyncio ---------------------------------------------------------------------------------


def test_acreate_with_job_id_is_idempotent(kickq, r, kickq_namespace):
    async def main() -> tuple[Any, Any, list[Any], list[Any]]:
        first = await kickq.acreate("record", {"v": 1}, job_id="async-1")
        again = await kickq.acreate("record", {"v": 2}, job_id="async-1")
        # creates of one id at once (batched into one round trip): one of them makes the job
        together = await asyncio.gather(*(kickq.acreate("record", {"v": n}, job_id="async-2")
                                          for n in range(5)))
        many = await kickq.acreate_many("record", ["x", "y"], job_ids=["async-1", "async-3"])
        return first, again, list(together), many

    first, again, together, many = asyncio.run(main())
    assert (first.created, first.data) == (True, {"v": 1})
    assert (again.created, again.data, again.created_at, again.state) == (
        False, {"v": 1}, first.created_at, "queued")
    assert [job.created for job in together].count(True) == 1
    winner = next(job for job in together if job.created)
    assert all(job.data == winner.data for job in together)
    assert [(job.id, job.created, job.data) for job in many] == [("async-1", False, {"v": 1}),
                                                               ("async-3", True, "y")]
    assert len(job_keys(r, kickq_namespace)) == 3
    assert queue_length(kickq, "record") == 3
    assert kickq.stats("record").total.created == 3
