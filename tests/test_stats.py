"""Stats: counters, gauges, timings and recent completions, from the counters the Lua scripts keep."""

from __future__ import annotations

import json
import time

import pytest

from kickq_celery import Kickq, scripts
from kickq_celery.testing import purge_namespace, wait_for

SLEEPS = [0.05, 0.08, 0.1, 0.15, 0.2]


def _zero_gauges(s):
    return (s.queued, s.delayed, s.processing) == (0, 0, 0)


def test_stats_count_successes_failures_retries_and_deletes_exactly(kickq, kickq_worker):
    @kickq.process("work")
    def work(job):
        time.sleep(job.data["sleep"])
        if job.data.get("fail"):
            raise RuntimeError("failing on purpose")
        return job.data["sleep"]

    kickq_worker(pool="threads", concurrency=4)
    kickq.create_many("work", [{"sleep": s} for s in SLEEPS])
    # each fails twice: the first run is retried (retry_count=1), the second fails for good
    kickq.create_many("work", [{"sleep": 0.06, "fail": True}, {"sleep": 0.12, "fail": True}],
                      retry=True, retry_count=1, retry_interval=0)
    doomed = kickq.create("work", {"sleep": 0}, delay=60)
    assert kickq.stats("work")["work"].delayed == 1
    assert kickq.delete(doomed.id)

    s = wait_for(lambda: (s := kickq.stats("work")["work"]).succeeded + s.failed == 7 and _zero_gauges(s)
                 and s, 20, 0.05, "7 jobs to finish")
    assert (s.created, s.succeeded, s.failed, s.retried, s.ghosts, s.deleted) == (8, 5, 2, 2, 0, 1)
    assert (s.queued, s.delayed, s.processing) == (0, 0, 0)

    # 9 runs (5 + 2 * 2), each sleeping 0.05-0.2 s plus a little overhead
    p = s.process_time
    assert 0.05 <= p["p50"] <= 0.2 + 0.15, p
    assert p["p50"] <= p["p95"] <= p["max"], p
    assert 0.2 <= p["max"] < 2.0, p
    assert 0.05 <= p["avg"] <= p["max"], p
    assert p["avg"] == pytest.approx((sum(SLEEPS) + 2 * 0.06 + 2 * 0.12) / 9, abs=0.15)
    # waiting: created to first start, one sample per job that started
    w = s.wait_time
    assert all(w[k] is not None for k in ("avg", "p50", "p95", "max")), w
    assert 0 <= w["p50"] <= w["p95"] <= w["max"] < 10, w
    # every final outcome is a completion (the retried runs and the deleted job are not)
    assert (s.completed_last_minute, s.completed_last_hour) == (7, 7)

    total = kickq.stats()
    assert set(total.names) == {"work"}
    assert total.total.to_dict() == total["work"].to_dict()
    assert kickq.stats("work").to_dict() == total.to_dict()


def test_ghost_runs_are_counted(kickq, kickq_worker):
    @kickq.process("stuck")
    def stuck(job):
        time.sleep(1.0)  # longer than process_timeout: the reaper turns the run into a ghost

    kickq_worker(pool="threads", concurrency=2)
    kickq.create("stuck", None, process_timeout=0.3, ghost_retry=False)
    s = wait_for(lambda: (s := kickq.stats("stuck")["stuck"]).failed == 1 and s, 15, 0.05, "the ghost")
    assert (s.created, s.succeeded, s.failed, s.retried, s.ghosts, s.deleted) == (1, 0, 1, 0, 1, 0)
    assert _zero_gauges(s)
    assert s.completed_last_minute == 1


def test_gauges_count_waiting_jobs_and_namespaces_do_not_mix(kickq, kickq_app, kickq_redis_url,
                                                           kickq_namespace):
    other = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=kickq_namespace + "-other")
    try:
        # no worker runs these: they wait
        kickq.create_many("mail", [1, 2, 3])
        kickq.create("mail", 4, delay=30)     # beyond the delay horizon: parked in Redis
        kickq.create("mail", 5, delay=2)      # within it: a Celery countdown
        kickq.create("report", None)
        other.create_many("mail", [1, 2])
        other.create("other-only", None, delay=30)

        mine = kickq.stats()
        assert set(mine.names) == {"mail", "report"}
        mail = mine["mail"]
        assert (mail.created, mail.queued, mail.delayed, mail.processing) == (5, 3, 2, 0)
        assert (mine["report"].created, mine["report"].queued) == (1, 1)
        assert (mine.total.created, mine.total.queued, mine.total.delayed) == (6, 4, 2)
        assert mail.process_time == {"avg": None, "p50": None, "p95": None, "max": None}
        assert mail.wait_time["avg"] is None
        assert (mail.completed_last_minute, mail.completed_last_hour) == (0, 0)

        theirs = other.stats()
        assert set(theirs.names) == {"mail", "other-only"}
        assert (theirs["mail"].created, theirs["mail"].queued) == (2, 2)
        assert (theirs.total.created, theirs.total.queued, theirs.total.delayed) == (3, 2, 1)

        # deleting moves a job from its gauge to the deleted counter, in its namespace only
        delayed = kickq.jobs("delayed", "mail")
        assert kickq.delete(delayed[0].id)
        mail = kickq.stats("mail")["mail"]
        assert (mail.delayed, mail.deleted, mail.created) == (1, 1, 5)
        assert other.stats("mail")["mail"].deleted == 0

        # an unknown name has all-zero stats
        assert kickq.stats("nothing")["nothing"].to_dict() == kickq.stats("nothing").total.to_dict()
        assert kickq.stats("nothing").total.created == 0
    finally:
        purge_namespace(other)


def test_stats_to_dict_is_json_serializable(kickq, kickq_worker):
    @kickq.process("echo")
    def echo(job):
        return job.data

    kickq_worker(pool="threads", concurrency=2)
    kickq.create("echo", {"x": 1}, tombstone=True).promise.wait()
    kickq.create("echo", 2, delay=30)
    stats = kickq.stats()
    text = json.dumps(stats.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert set(back) == {"names", "total"}
    assert back["names"]["echo"]["created"] == 2
    assert back["names"]["echo"]["succeeded"] == 1
    assert back["names"]["echo"]["delayed"] == 1
    assert set(back["total"]["process_time"]) == {"avg", "p50", "p95", "max"}
    assert back["total"]["process_time"]["max"] == stats.total.process_time["max"]
    assert set(back["total"]) == {
        "queued", "delayed", "processing", "created", "succeeded", "failed", "retried", "ghosts",
        "deleted", "process_time", "wait_time", "completed_last_minute", "completed_last_hour", "workers"}


def test_timing_samples_are_the_latest_500_runs(kickq):
    store = kickq.store
    jobs = kickq.create_many("sampled", [None] * 6000)
    # in two round trips: thousands of completions a second, so one run in ten is sampled
    assert {s.status for s in store.run_all([scripts.start(job.id, 1, "t", 30) for job in jobs])} == {"run"}
    ended = store.run_all([scripts.finish(job.id, "t", "success", "null", 600) for job in jobs])
    assert {e.verdict for e in ended} == {"success"}
    raw = store.raw_stats(["sampled"])["sampled"]
    assert len(raw["process_times"]) == len(raw["wait_times"]) == 500
    assert kickq.redis.llen(kickq.keys.process_times("sampled")) <= 600  # trimmed now and then
    assert kickq.stats("sampled").total.succeeded == 6000


def test_timing_samples_keep_every_run_up_to_10_completions_a_second_then_one_in_ten(kickq):
    store = kickq.store
    slow = kickq.create_many("trickle", [None] * 6)
    for job in slow:  # a few a second: each one is sampled
        assert store.start_run(job.id, 1, "t", 30).status == "run"
        time.sleep(0.2)
        assert store.finish_run(job.id, "t", "success", "null", 600).verdict == "success"
    raw = store.raw_stats(["trickle"])["trickle"]
    assert len(raw["process_times"]) == len(raw["wait_times"]) == 6
    assert min(raw["process_times"]) >= 0.2

    fast = kickq.create_many("burst", [None] * 400)
    store.run_all([scripts.start(job.id, 1, "t", 30) for job in fast])
    started = time.monotonic()
    store.run_all([scripts.finish(job.id, "t", "success", "null", 600) for job in fast])
    seconds = int(time.monotonic() - started) + 2  # the burst spans at most this many seconds
    kept = len(store.raw_stats(["burst"])["burst"]["process_times"])
    assert 40 <= kept <= seconds * 10 + 40, kept  # 10 a second, then every 10th completion


def test_a_second_of_completions_goes_into_its_minute_when_the_next_second_with_one_comes(kickq):
    store = kickq.store

    def complete(n):
        for job in kickq.create_many("counted", [None] * n):
            assert store.start_run(job.id, 1, "t", 30).status == "run"
            assert store.finish_run(job.id, "t", "success", "null", 600).verdict == "success"

    complete(3)
    first = kickq.redis.hgetall(kickq.keys.completions("counted"))
    time.sleep(1.1)
    complete(2)
    done = {k.decode(): int(v) for k, v in kickq.redis.hgetall(kickq.keys.completions("counted")).items()}
    # the first second's 3 are in their minute's bucket now; the latest second is named "last"
    assert sum(v for k, v in done.items() if k.isdigit()) == 3, (first, done)
    assert done[f"s{done['last']}"] == 2
    stats = kickq.stats("counted").total
    assert (stats.completed_last_minute, stats.completed_last_hour) == (5, 5)
