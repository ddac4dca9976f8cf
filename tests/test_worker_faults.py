"""Worker and broker faults with real `celery worker` processes and real redis-servers:

- a worker SIGKILLed right after its cron tick claim reached Redis (the reply held back by a
  FaultProxy, so it never learnt it claimed the tick): the tick's job runs anyway, once;
- three workers waiting on parked (due-later) jobs ride out a SIGKILL and restart of the
  Redis that is both their broker and kickq's records (AOF): every job runs exactly once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pytest
import redis

from kickq_celery import JobNotFound, Kickq
from kickq_celery.connection import redis_now
from kickq_celery.cron import MISSED_TICK_GRACE
from kickq_celery.testing import make_app, wait_for
from tests.conftest import listed
from tests.faultproxy import FaultProxy, script_call

CALLS_TICK = script_call("tick")


def one_shot_cron(at: float) -> str:
    """A six-field cron expression (seconds last) whose only tick this year is ``at`` (UTC)."""
    t = datetime.fromtimestamp(at, tz=timezone.utc)
    return f"{t.minute} {t.hour} {t.day} {t.month} * {t.second}"


def state_of(kq: Kickq, job_id: str) -> str | None:
    try:
        return kq.get(job_id).state
    except JobNotFound:
        return None


def log_tail(worker, lines: int = 40) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(worker.log.read_text(errors="replace").splitlines()[-lines:])


# --- 1. a worker killed right after claiming a cron tick ----------------------------------


def test_tick_claimed_by_a_killed_worker_still_runs_once(kickq, kickq_redis_url, worker_process, r):
    ns = kickq.options["redis_namespace"]
    keys = kickq.keys
    # the claim must be the first call of the tick script, and it must find it loaded
    kickq.store.load()
    target = urlsplit(kickq_redis_url)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
    proxy_url = f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}"
    claim_sent = threading.Event()

    def hold_after_tick(request: bytes) -> bool:
        # called once the request went to Redis: stall every connection from here on, so
        # worker A gets no reply to its claim (nor gets to publish anything)
        if not claim_sent.is_set() and CALLS_TICK(request):
            proxy.pause()
            claim_sent.set()
        return False  # never drop: the reply just stays in Redis's socket buffer

    try:
        proxy.drop_reply_once(hold_after_tick)
        # kickq's records (and the handlers' client) through the proxy, the broker direct
        worker_a = worker_process(concurrency=1, redis_url=proxy_url, broker=kickq_redis_url)
        tick_at = math.floor(redis_now(kickq.redis)) + 2.0
        key = kickq.schedule("record", one_shot_cron(tick_at), data={"tick": tick_at})
        wait_for(claim_sent.is_set, 10, 0.02, "worker A to send the tick claim")
        assert proxy.errors == []
        # the script runs atomically as soon as Redis reads it
        wait_for(lambda: r.hget(keys.schedule_ticks, key), 2, 0.01, "the tick claim to apply")
        worker_a.kill()
    finally:
        proxy.close()

    assert float(r.hget(keys.schedule_ticks, key)) == tick_at  # claimed: by A, the only worker
    parked = r.zrange(keys.delayed, 0, -1, withscores=True)
    assert len(parked) == 1, parked
    job_id, due = parked[0]
    assert tick_at <= due < tick_at + 5  # parked as due at the claim
    record = kickq.get(job_id)
    assert (record.name, record.state, record.data, record.runs) == ("record", "queued",
                                                                     {"tick": tick_at}, [])
    assert listed(r, ns, "runs") == []  # A never published it
    assert r.llen(kickq.queue("record").name) == 0

    # worker B on the real Redis: its promoter publishes the parked job; its fire_due sees the
    # same tick (still the latest one, within the grace) and must not claim it again
    worker_process(concurrency=1)
    wait_for(lambda: state_of(kickq, job_id) == "success", 20, 0.05, "the tick's job to succeed")
    time.sleep(2.0)  # ten more passes of B's loops (poll_interval 0.2 s)
    assert redis_now(kickq.redis) - tick_at < MISSED_TICK_GRACE  # B could have fired the tick again
    assert listed(r, ns, "runs") == [job_id]
    assert [j.id for j in kickq.jobs(name="record", limit=100)] == [job_id]
    assert kickq.stats("record").total.created == 1
    assert float(r.hget(keys.schedule_ticks, key)) == tick_at
    assert [s["key"] for s in kickq.schedules()] == [key]
    record = kickq.get(job_id)
    assert [run.state for run in record.runs] == ["success"]
    assert kickq.unschedule(key)


# --- 2. a broker + records Redis SIGKILLed and restarted under three workers -------------


@pytest.fixture
def producer(private_redis, kickq_namespace: str) -> Iterator[Kickq]:
    """A Kickq in the test process on the private Redis (broker and records)."""
    app = make_app(private_redis.url)
    kq = Kickq(app, redis=private_redis.url, redis_namespace=kickq_namespace)
    yield kq
    app.close()
    Kickq.reset()  # drop the pooled clients of the private server


def test_three_workers_ride_out_a_broker_redis_kill_and_restart(private_redis, producer, worker_process):
    kq = producer
    ns = kq.options["redis_namespace"]
    direct = redis.Redis.from_url(private_redis.url, decode_responses=True)
    # messages a worker had prefetched when its broker died come back after visibility_timeout
    workers = [worker_process(concurrency=2, wait=False, redis_url=private_redis.url,
                              broker=private_redis.url, visibility_timeout=4, restore_interval=1)
               for _ in range(3)]
    for worker in workers:
        worker.wait_ready()

    first = time.monotonic()
    ids = [kq.create("record", i, delay=2 + 4 * i / 29).id for i in range(30)]
    total = kq.stats("record").total
    assert (total.created, total.delayed) == (30, 30)
    assert direct.zcard(kq.keys.delayed) == 30  # parked in Redis: no worker holds a message
    assert listed(direct, ns, "runs") == []

    assert private_redis.proc is not None
    private_redis.proc.kill()  # SIGKILL: no shutdown, only the AOF (appendfsync always) survives
    private_redis.proc.wait(10)
    assert time.monotonic() - first < 1.9, "the kill came after the first job was due"
    time.sleep(1.0)  # the workers' connections fail meanwhile
    private_redis.start()  # same port and dir: the AOF is loaded
    assert sorted(direct.keys(kq.keys.job("*"))) == sorted(kq.keys.job(i) for i in ids)

    def not_done() -> list[str]:
        return [i for i in ids if state_of(kq, i) != "success"]

    try:
        wait_for(lambda: not not_done(), 30, 0.2, "every job to succeed")
    except AssertionError:
        stuck = {i: kq.get(i) for i in not_done()}
        raise AssertionError(f"not finished: {stuck}\n" + log_tail(workers[0])) from None
    time.sleep(1.0)  # a duplicate run would show by now
    runs = Counter(listed(direct, ns, "runs"))
    assert runs == Counter(ids), {i: n for i, n in runs.items() if n != 1}
    for job_id in ids:
        assert [run.state for run in kq.get(job_id).runs] == ["success"], job_id
    total = kq.stats("record").total
    assert (total.created, total.succeeded, total.failed, total.delayed, total.queued) == (30, 30, 0, 0, 0)
    for worker in workers:
        assert worker.proc.poll() is None, log_tail(worker)
        log = worker.log.read_text(errors="replace")
        assert "Connection to broker lost" in log, log_tail(worker)  # the kill did reach it
        assert "Unrecoverable error" not in log, log_tail(worker)
    direct.close()
