"""Redis faults at kickq's scripts, through a real proxy in front of the shared Redis.

- A reply lost after Redis applied a script call (tests/faultproxy.py's drop_reply_once: the
  connection is cut, redis-py sends the call again): every script ends as if the reply had
  come, compared with the same scenario without the fault on a fresh namespace.
- A Redis that accepts connections and never answers: the API raises RedisUnavailable
  within 2 x redis_timeout.
- A Redis stalled for 2 x redis_timeout: a worker's loops survive and run what comes next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
import redis
from celery import Celery

from kickq_celery import JobDeleted, JobFailed, Kickq, RedisUnavailable, TombstoneTimeout
from kickq_celery.connection import redis_now
from kickq_celery.cron import definitions, latest_tick
from kickq_celery.keys import STATES
from kickq_celery.options import Limits
from kickq_celery.records import JobRecord
from kickq_celery.scripts import SOURCES, text
from kickq_celery.testing import make_app, purge_namespace, wait_for, worker
from kickq_celery.worker import loops
from tests.faultproxy import FaultProxy, SilentServer, script_call

REDIS_TIMEOUT = 0.5
#: a connect on 127.0.0.1 and the scheduling of the threads involved
SLACK = 0.2


def url_via(port: int, redis_url: str) -> str:
    """``redis_url`` (its db) through a listener on 127.0.0.1:``port``."""
    return f"redis://127.0.0.1:{port}{urlsplit(redis_url).path or '/0'}"


class Proxied:
    """A FaultProxy in front of the test Redis, an app whose broker goes through it, and
    Kickq instances on it, each on a namespace of its own (purged afterwards)."""

    def __init__(self, redis_url: str, namespace: str, broker_via_proxy: bool = True) -> None:
        target = urlsplit(redis_url)
        self.redis_url = redis_url
        self.namespace = namespace
        self.proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
        self.url = url_via(self.proxy.port, redis_url)
        self.app = make_app(self.url if broker_via_proxy else redis_url)
        self.namespaces: list[str] = []

    def kickq(self, suffix: str, **overrides: Any) -> Kickq:
        namespace = f"{self.namespace}-{suffix}"
        self.namespaces.append(namespace)
        settings = {"poll_interval": 0.1, "lock_timeout": 2, **overrides}
        return Kickq(self.app, redis=self.url, redis_namespace=namespace, **settings)

    def close(self) -> None:
        self.proxy.resume()
        self.app.close()
        Kickq.reset()  # kickq's clients of the proxy
        direct = make_app(self.redis_url)
        for namespace in self.namespaces:
            purge_namespace(Kickq(direct, redis=self.redis_url, redis_namespace=namespace))
        direct.close()
        Kickq.reset()
        self.proxy.close()
        assert self.proxy.threads() == []


@pytest.fixture
def proxied(kickq_redis_url: str, kickq_namespace: str) -> Iterator[Proxied]:
    Kickq.reset()
    setup = Proxied(kickq_redis_url, kickq_namespace)
    yield setup
    setup.close()


class Fault:
    """Arms the proxy to lose the reply of a script's next call (a no-op for the control)."""

    def __init__(self, proxy: FaultProxy, active: bool) -> None:
        self.proxy = proxy
        self.active = active

    def arm(self, script: str) -> None:
        if self.active:
            self.proxy.drop_reply_once(script_call(script))


# --- what a scenario leaves in Redis, without ids and times -------------------------------


def snapshot(kq: Kickq, name: str, ids: list[str]) -> dict[str, Any]:
    """The records of ``ids``, with their index memberships, the stats of ``name``, its queue's
    messages and how many call replies are remembered: everything a script call changes."""
    r, keys = kq.redis, kq.keys
    records: list[dict[str, Any] | None] = []
    for job_id in ids:
        raw = {text(k): text(v) for k, v in r.hgetall(keys.job(job_id)).items()}
        if not raw:
            records.append(None)
            continue
        record = JobRecord.from_hash(job_id, raw)
        records.append({
            "state": record.state, "attempt": raw.get("attempt"), "data": record.data,
            "runs": [run.state for run in record.runs], "result": record.result,
            "failed": bool(record.last_error), "token": bool(raw.get("token")),
            "indexes": [s for s in STATES if s != "processing"
                        and r.zscore(keys.index(s), job_id) is not None],
            "name_indexes": [s for s in STATES if r.zscore(keys.name_index(s, name), job_id) is not None],
            "parked": r.zscore(keys.delayed, job_id) is not None,
            "active": r.zscore(keys.active, job_id) is not None,
            "waiting_for_slot": r.zscore(keys.waiting(name), job_id) is not None,
        })
    stats = kq.stats(name).names[name].to_dict()
    del stats["process_time"], stats["wait_time"]  # durations: samples are counted below
    return {
        "records": records,
        "stats": stats,
        "samples": (r.llen(keys.process_times(name)), r.llen(keys.wait_times(name))),
        "parked": r.zcard(keys.delayed),
        "running": r.scard(keys.running(name)),
        "messages": r.llen(kq.queue(name).name),
        "remembered": len(list(r.scan_iter(match=keys.call("*")))),
    }


# --- one scenario per script: (kq, fault) -> what it returned and left ---------------------


def create_one(kq: Kickq, fault: Fault) -> dict[str, Any]:
    fault.arm("create")  # records and message in one MULTI (the broker is this Redis)
    job = kq.create("c", {"n": 1})
    assert job is not None
    return {"returned": (job.name, job.state), **snapshot(kq, "c", [job.id])}


def create_many(kq: Kickq, fault: Fault) -> dict[str, Any]:
    fault.arm("create")
    jobs = kq.create_many("cm", [1, 2, 3])
    return {"returned": [(job.name, job.state) for job in jobs],
            **snapshot(kq, "cm", [job.id for job in jobs])}


def create_chosen_id(kq: Kickq, fault: Fault) -> dict[str, Any]:
    fault.arm("create")  # the call sent again must answer as the first did: created, not existing
    job = kq.create("ci", {"n": 1}, job_id="order-1")
    assert job is not None and job.created
    return {"returned": (job.id, job.state, job.created), **snapshot(kq, "ci", [job.id])}


def progress(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("p", 1)
    assert kq.store.start_run(job.id, 1, "token-1", 30).status == "run"
    fault.arm("progress")
    recorded = kq.store.progress(job.id, "token-1", '{"done":3}')
    assert recorded and kq.get(job.id).progress == {"done": 3}
    return {"returned": recorded, **snapshot(kq, "p", [job.id])}


def start(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("s", {"n": 2})
    fault.arm("start")
    started = kq.store.start_run(job.id, 1, "token-1", 30)
    raw = kq.redis.hgetall(kq.keys.job(job.id))
    assert started.status == "run" and started.data == {"n": 2}
    # the run the first call started, not a second one
    assert started.started_at == float(raw[b"started_at"])
    assert started.created_at == float(raw[b"created_at"])
    assert raw[b"token"] == b"token-1"
    # anyone else's message is a duplicate
    assert kq.store.start_run(job.id, 1, "token-2", 30).status == "skip"
    return {"returned": (started.status, started.data, started.runs), **snapshot(kq, "s", [job.id])}


def finish(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("f", 3)
    assert kq.store.start_run(job.id, 1, "token-1", 30).status == "run"
    fault.arm("finish")
    ended = kq.store.finish_run(job.id, "token-1", "success", "42", 0)
    assert (ended.verdict, ended.final, ended.attempt) == ("success", True, 1)
    return {"returned": replace(ended, job_id=""), **snapshot(kq, "f", [job.id])}


def finish_retry(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("fr", 4, retry=True, retry_count=1, retry_interval=60)
    assert kq.store.start_run(job.id, 1, "token-1", 30).status == "run"
    fault.arm("finish")
    ended = kq.store.finish_run(job.id, "token-1", "fail", "ValueError: boom", 0)
    assert (ended.verdict, ended.attempt, ended.due_in) == ("retry", 2, 60.0)
    return {"returned": replace(ended, job_id=""), **snapshot(kq, "fr", [job.id])}


def turn(kq: Kickq, fault: Fault) -> dict[str, Any]:
    """A chunk's finish of one job and start of the next, in one call: sent again after the lost
    reply, the first job ends once and the next one's run is the one that call started."""
    first, second = kq.create_many("c", [6, 7], chunk_size=2)
    assert kq.store.start_run(first.id, 1, "token-1", 30).status == "run"
    fault.arm("turn")
    ended, started = kq.store.finish_then_start(first.id, "token-1", "success", "6", 0, "",
                                                (second.id, 1, "token-2", 30))
    assert (ended.verdict, ended.final) == ("success", True)
    assert (started.status, started.data) == ("run", 7)
    assert kq.redis.hget(kq.keys.job(second.id), "token") == b"token-2"
    return {"returned": (replace(ended, job_id=""), started.status, started.data, started.runs),
            **snapshot(kq, "c", [first.id, second.id])}


def heartbeat(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("h", 5)
    assert kq.store.start_run(job.id, 1, "token-1", 2).status == "run"
    fault.arm("heartbeat")
    lost = kq.store.heartbeat(30, [(job.id, "token-1"), ("no-such-job", "token-2")])
    deadline = kq.redis.zscore(kq.keys.active, job.id) - redis_now(kq.redis)
    assert lost == [("no-such-job", "lost")] and 25 < deadline <= 30, (lost, deadline)
    return {"returned": lost, **snapshot(kq, "h", [job.id])}


def delete(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("d", 6, tombstone=True, tombstone_timeout=5)
    assert job is not None and job.promise is not None
    fault.arm("delete")
    deleted = kq.delete(job.id)
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    # settled by the delete (a TombstoneTimeout would take the 5 s of tombstone_timeout)
    assert type(info.value) is JobDeleted, repr(info.value)
    assert time.monotonic() - started < 2.0
    assert deleted is True
    return {"returned": deleted, "again": kq.delete(job.id), **snapshot(kq, "d", [job.id])}


def reap(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("rp", 7, tombstone=True, tombstone_timeout=5, ghost_retry=False)
    assert job is not None and job.promise is not None
    assert kq.store.start_run(job.id, 1, "token-1", 0.05).status == "run"
    wait_for(lambda: kq.redis.zscore(kq.keys.active, job.id) < redis_now(kq.redis), 2, 0.02,
             "the heartbeat lock to lapse")
    fault.arm("reap")
    reaped = loops.reap(kq)  # the ghost fails the job (ghost_retry=False) and settles it
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    assert not isinstance(info.value, TombstoneTimeout), repr(info.value)
    assert "heartbeat lock expired" in (info.value.error or "")
    assert time.monotonic() - started < 2.0
    assert reaped == 1 and kq.stats("rp").total.ghosts == 1  # reported once
    return {"returned": reaped, "again": loops.reap(kq), **snapshot(kq, "rp", [job.id])}


def parked_and_due(kq: Kickq, name: str) -> str:
    """A job parked in `delayed` (any delay is past the default horizon of 0), now due."""
    job = kq.create(name, 8, delay=0.3)
    assert job is not None and kq.redis.zscore(kq.keys.delayed, job.id) is not None
    due = float(kq.redis.hget(kq.keys.job(job.id), "scheduled_for"))
    wait_for(lambda: redis_now(kq.redis) >= due, 2, 0.02, "the parked job to be due")
    assert kq.redis.llen(kq.queue(name).name) == 0  # no message yet
    return job.id


def promote(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job_id = parked_and_due(kq, "p")
    fault.arm("promote")
    started = time.monotonic()
    next_due = loops.promote(kq)  # claims, publishes, unparks
    # published in this pass, not after the claim's lease (horizon + 30 s)
    assert kq.redis.llen(kq.queue("p").name) == 1
    assert time.monotonic() - started < 2.0
    assert loops.promote(kq) is None  # nothing left to claim
    return {"returned": next_due, **snapshot(kq, "p", [job_id])}


def unpark(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job_id = parked_and_due(kq, "u")
    fault.arm("unpark")
    next_due = loops.promote(kq)
    assert kq.redis.zscore(kq.keys.delayed, job_id) is None  # the lease is gone
    return {"returned": next_due, **snapshot(kq, "u", [job_id])}


def tick(kq: Kickq, fault: Fault) -> dict[str, Any]:
    key = kq.schedule("t", "* * * * * *", data={"n": 9})  # every second
    [schedule], _, _ = definitions(kq.store)
    # a tick from before the schedule existed never fires: wait for the first one after
    wait_for(lambda: latest_tick(schedule["cron"], ZoneInfo("UTC"), redis_now(kq.redis))
             >= schedule["since"], 3, 0.02, "the first tick of the schedule")
    fault.arm("tick")
    fired = loops.fire_due(kq)  # claims the tick and creates its job, parked as due
    ids = kq.store.job_ids("queued")
    assert fired == 1 and len(ids) == 1, (fired, ids)
    assert kq.redis.hget(kq.keys.schedule_ticks, key) is not None
    return {"returned": fired, **snapshot(kq, "t", ids)}


def limit(kq: Kickq, fault: Fault) -> dict[str, Any]:
    assert kq.store.set_limits("l", Limits(1)) == 0
    jobs = kq.create_many("l", [1, 2, 3, 4])
    ids = [job.id for job in jobs]
    statuses = [kq.store.start_run(job_id, 1, f"token-{i}", 30).status for i, job_id in enumerate(ids)]
    assert statuses == ["run", "wait", "wait", "wait"]
    fault.arm("limit")
    woken = kq.store.set_limits("l", Limits(3))  # two more slots: two of the three waiting jobs woken
    assert woken == 2 and kq.redis.zcard(kq.keys.delayed) == 2
    assert kq.redis.hget(kq.keys.limits, "l") == b"3"
    return {"returned": woken, **snapshot(kq, "l", ids)}


def overdue(kq: Kickq, fault: Fault) -> dict[str, Any]:
    job = kq.create("o", 10)
    assert job is not None
    fault.arm("overdue")
    claims = kq.store.overdue(0)  # reads only
    assert [claim.job_id for claim in claims] == [job.id]
    return {"returned": [(c.name, c.attempt, c.process_timeout) for c in claims],
            **snapshot(kq, "o", [job.id])}


SCENARIOS: dict[str, tuple[str, Callable[[Kickq, Fault], dict[str, Any]]]] = {
    "create": ("create", create_one),
    "create_many": ("create", create_many),
    "create_chosen_id": ("create", create_chosen_id),
    "progress": ("progress", progress),
    "start": ("start", start),
    "finish": ("finish", finish),
    "finish-retry": ("finish", finish_retry),
    "turn": ("turn", turn),
    "heartbeat": ("heartbeat", heartbeat),
    "delete": ("delete", delete),
    "reap": ("reap", reap),
    "promote": ("promote", promote),
    "unpark": ("unpark", unpark),
    "tick": ("tick", tick),
    "limit": ("limit", limit),
    "overdue": ("overdue", overdue),
}


def test_every_script_is_covered() -> None:
    assert {script for script, _ in SCENARIOS.values()} == set(SOURCES)


@pytest.mark.parametrize("case", list(SCENARIOS))
def test_a_lost_reply_ends_as_if_it_had_come(proxied: Proxied, case: str) -> None:
    script, scenario = SCENARIOS[case]
    proxy = proxied.proxy
    control = scenario(proxied.kickq("control"), Fault(proxy, active=False))
    assert proxy.dropped == 0
    dropped = scenario(proxied.kickq("dropped"), Fault(proxy, active=True))
    assert proxy.dropped == 1 and not proxy.armed and proxy.errors == []
    if script == "create":
        # redis-py sends the whole MULTI again, LPUSH included: the record is written once
        # (create_jobs skips an id that exists), its message twice, and the run guard drops
        # the duplicate (test_a_create_whose_reply_was_lost_runs_once)
        assert control["messages"] == len(control["records"])
        assert dropped["messages"] in (control["messages"], 2 * control["messages"])
        dropped["messages"] = control["messages"]
    assert dropped == control


def test_a_create_whose_reply_was_lost_runs_once(proxied: Proxied) -> None:
    kq = proxied.kickq("worker")
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    @kq.process("once")
    def once(job: Any) -> Any:
        with lock:
            calls[job.id] += 1
        return job.data

    with worker(proxied.app, concurrency=4):
        proxied.proxy.drop_reply_once(script_call("create"))
        job = kq.create("once", 1)
        assert job is not None and proxied.proxy.dropped == 1
        proxied.proxy.drop_reply_once(script_call("create"))
        ids = [job.id] + [j.id for j in kq.create_many("once", [2, 3, 4])]
        assert proxied.proxy.dropped == 2
        wait_for(lambda: kq.stats("once").total.succeeded == 4, 20, 0.05, "the 4 jobs to succeed")
        queue = kq.queue("once").name
        wait_for(lambda: kq.redis.llen(queue) == 0, 10, 0.05, "the queue to drain")
        time.sleep(0.5)  # a duplicate message taken last would have its run by now
    assert calls == Counter({job_id: 1 for job_id in ids})
    for job_id in ids:
        record = kq.get(job_id)
        assert record.state == "success" and [run.state for run in record.runs] == ["success"]
    total = kq.stats("once").total
    assert (total.created, total.succeeded, total.failed, total.queued, total.processing) == (4, 4, 0, 0, 0)


# --- a Redis that never answers ----------------------------------------------------------------

SILENT_CALLS: dict[str, Callable[[Kickq], Any]] = {
    "create": lambda kq: kq.create("silent", 1),
    "get": lambda kq: kq.get("some-job"),
    "delete": lambda kq: kq.delete("some-job"),
    "stats": lambda kq: kq.stats(),
}


@pytest.mark.parametrize("operation", list(SILENT_CALLS))
def test_a_silent_redis_raises_redis_unavailable_in_time(kickq_namespace: str, kickq_redis_url: str,
                                                          operation: str) -> None:
    Kickq.reset()
    with SilentServer() as silent:
        url = url_via(silent.port, kickq_redis_url)
        app = make_app(url)  # the broker too: a create is one MULTI on the silent server
        kq = Kickq(app, redis=url, redis_namespace=kickq_namespace, redis_timeout=REDIS_TIMEOUT)
        timings = []
        for _ in range(2):  # and again, on a new connection
            started = time.monotonic()
            with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
                SILENT_CALLS[operation](kq)
            timings.append(time.monotonic() - started)
        print(f"\n{operation}: RedisUnavailable after " + ", ".join(f"{t:.3f} s" for t in timings))
        assert max(timings) < 2 * REDIS_TIMEOUT + SLACK, timings
        assert min(timings) >= REDIS_TIMEOUT * 0.9, timings  # it did wait for a reply
        assert silent.connections >= 1
        app.close()
        Kickq.reset()
    assert silent.threads() == []


# --- a stalled Redis and a worker's loops ----------------------------------------------------


@pytest.fixture
def stalled(kickq_redis_url: str, kickq_namespace: str) -> Iterator[Proxied]:
    """kickq's records through the proxy, the Celery broker direct (the stall is kickq's)."""
    Kickq.reset()
    setup = Proxied(kickq_redis_url, kickq_namespace, broker_via_proxy=False)
    yield setup
    setup.close()


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kickq-worker-loops" and t.is_alive()]


def test_worker_loops_survive_a_stalled_redis(stalled: Proxied, caplog: pytest.LogCaptureFixture) -> None:
    kq = stalled.kickq("stall", redis_timeout=REDIS_TIMEOUT)
    app: Celery = stalled.app
    ran: list[Any] = []

    @kq.process("later")
    def later(job: Any) -> Any:
        ran.append(job.data)
        return job.data

    caplog.set_level(logging.ERROR, logger="kickq_celery")
    with worker(app, concurrency=2):
        before = kq.create("later", "before", delay=0.5)  # parked: the loop's promoter publishes it
        assert before is not None
        wait_for(lambda: kq.get(before.id).state == "success", 10, 0.05, "the job before the stall")
        [thread] = loop_threads()

        stalled.proxy.pause()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            kq.get(before.id)  # the stall is real
        assert time.monotonic() - started < 2 * REDIS_TIMEOUT + SLACK
        time.sleep(2 * REDIS_TIMEOUT)
        stalled.proxy.resume()
        time.sleep(0.2)  # commands held back by the stall reach Redis now (their callers gave up)

        after = [kq.create("later", f"after-{i}", delay=0.5) for i in range(2)]
        for job in after:
            assert job is not None
            wait_for(lambda job=job: kq.get(job.id).state == "success", 10, 0.05, "a job after the stall")
        assert thread.is_alive() and loop_threads() == [thread]
    assert sorted(ran) == ["after-0", "after-1", "before"]
    # the loop did meet the stall (and logged it), and went on
    assert any(record.name == "kickq_celery" and record.levelno >= logging.ERROR
               and "loop" in record.getMessage() for record in caplog.records), caplog.text


# --- a reply that timed out: the call sent again with its id ---------------------------------


def held_back(proxied: Proxied, kq: Kickq, script: str, call: Callable[[], Any]) -> None:
    """Make ``call`` while the proxy forwards nothing: its call of ``script`` times out
    (RedisUnavailable within 2 x redis_timeout, not retried). At resume() the proxy hands the
    held-back request to Redis, which applies it though its caller gave up."""
    kq.store.load()  # else the held-back call would find no function (or script) to run
    proxied.proxy.pause()
    started = time.monotonic()
    try:
        with pytest.raises(RedisUnavailable) as info:
            call()
    finally:
        proxied.proxy.resume()
    assert isinstance(info.value.__cause__, redis.TimeoutError), repr(info.value.__cause__)
    assert time.monotonic() - started < 2 * REDIS_TIMEOUT + SLACK


def test_a_promote_that_timed_out_publishes_its_claims_when_called_again(proxied: Proxied) -> None:
    kq = proxied.kickq("promote", redis_timeout=REDIS_TIMEOUT)
    job_id = parked_and_due(kq, "tp")
    held_back(proxied, kq, "promote", lambda: loops.promote(kq))
    # Redis claimed the job for the call that timed out: leased for the horizon + 30 s
    wait_for(lambda: (kq.redis.zscore(kq.keys.delayed, job_id) or 0) - redis_now(kq.redis) > 25,
             2, 0.02, "the held-back promote to lease the job")
    assert kq.redis.llen(kq.queue("tp").name) == 0
    started = time.monotonic()
    next_due = loops.promote(kq)  # the first call's claims: published now, not after the lease
    assert kq.redis.llen(kq.queue("tp").name) == 1
    assert kq.redis.zscore(kq.keys.delayed, job_id) is None  # and the lease dropped
    assert next_due is None and time.monotonic() - started < 2.0
    assert loops.promote(kq) is None and kq.redis.llen(kq.queue("tp").name) == 1  # published once


def test_a_delete_that_timed_out_settles_the_promise_when_called_again(proxied: Proxied) -> None:
    kq = proxied.kickq("delete", redis_timeout=REDIS_TIMEOUT)
    job = kq.create("td", 1, tombstone=True, tombstone_timeout=3)
    assert job is not None and job.promise is not None
    held_back(proxied, kq, "delete", lambda: kq.delete(job.id))
    wait_for(lambda: not kq.redis.exists(kq.keys.job(job.id)), 2, 0.02, "the held-back delete")
    assert kq.delete(job.id) is True  # the first call's reply: the job existed, its waiters told
    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    assert type(info.value) is JobDeleted, repr(info.value)
    assert time.time() < job.promise.deadline  # settled by the delete, not by tombstone_timeout
    assert kq.delete(job.id) is False  # a new call: the job is gone


def test_a_reap_that_timed_out_reports_its_ghosts_when_called_again(proxied: Proxied) -> None:
    kq = proxied.kickq("reap", redis_timeout=REDIS_TIMEOUT)
    job = kq.create("tr", 1, tombstone=True, tombstone_timeout=3, ghost_retry=False)
    assert job is not None and job.promise is not None
    assert kq.store.start_run(job.id, 1, "t", 0.01).status == "run"
    wait_for(lambda: kq.redis.zscore(kq.keys.active, job.id) < redis_now(kq.redis), 2, 0.02,
             "the heartbeat lock to lapse")
    held_back(proxied, kq, "reap", lambda: loops.reap(kq))
    wait_for(lambda: kq.get(job.id).state == "fail", 2, 0.02, "the held-back reap")
    assert kq.redis.zscore(kq.keys.active, job.id) is None
    assert loops.reap(kq) == 1  # the first call's ghost, followed up now
    with pytest.raises(JobFailed) as info:
        job.promise.wait()
    assert not isinstance(info.value, TombstoneTimeout), repr(info.value)
    assert "heartbeat lock expired" in (info.value.error or "")
    assert time.time() < job.promise.deadline
    assert kq.stats("tr").total.ghosts == 1  # counted once, by the call Redis applied
    assert loops.reap(kq) == 0
