"""Cron: schedules in Redis, fired by the workers themselves, once per tick."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from kickq_celery import InvalidJobData, InvalidJobOptions
from kickq_celery.connection import redis_now
from kickq_celery.testing import wait_for


def _namespace_keys(kq):
    return list(kq.redis.scan_iter(match="{" + kq.options["redis_namespace"] + "}:*"))


def _created_times(kq, name):
    """Creation times (epoch seconds) of every job of ``name``, sorted."""
    records = kq.jobs(name=name, limit=1000)
    return sorted(r.created_at.timestamp() for r in records)


@pytest.mark.parametrize("cron, tz", [
    ("* * * *", "UTC"),                  # four fields
    ("* * * * * * *", "UTC"),            # seven fields
    ("61 * * * *", "UTC"),               # out of range
    ("* * * * * 61", "UTC"),             # seconds out of range
    ("every minute", "UTC"),
    ("a b c d e", "UTC"),
    (123, "UTC"),
    ("0 0 31 2 *", "UTC"),               # valid syntax, but never matches a date
    ("*/5 * * * *", "Mars/Olympus_Mons"),
    ("*/5 * * * *", ""),
    ("*/5 * * * *", None),
    ("*/5 * * * *", "../etc/passwd"),
])
def test_bad_cron_or_time_zone_raises_and_writes_nothing(kickq, cron, tz):
    with pytest.raises(InvalidJobOptions):
        kickq.schedule("report", cron, tz=tz)
    assert _namespace_keys(kickq) == []
    assert kickq.schedules() == []


def test_bad_name_flags_or_data_raise_and_write_nothing(kickq):
    with pytest.raises(InvalidJobOptions):
        kickq.schedule("", "* * * * *")
    with pytest.raises(InvalidJobOptions):
        kickq.schedule("report", "* * * * *", opts={"no_such_flag": 1})
    with pytest.raises(InvalidJobData):
        kickq.schedule("report", "* * * * *", data={"when": datetime.now()})
    assert _namespace_keys(kickq) == []


def test_schedules_lists_key_name_cron_tz_next_and_last_run(kickq):
    every_5 = kickq.schedule("report", "*/5 * * * *", data={"kind": "short"})
    paris = kickq.schedule("digest", "0 9 * * *", tz="Europe/Paris")
    seconds = kickq.schedule("beat", "* * * * * */2")  # six fields: seconds last
    assert kickq.schedule("report", "*/5 * * * *", data={"kind": "short"}) == every_5  # same definition
    assert kickq.schedule("report", "*/5 * * * *", data={"kind": "long"}) != every_5

    now = datetime.fromtimestamp(redis_now(kickq.redis), tz=timezone.utc)
    listing = {s["key"]: s for s in kickq.schedules()}
    assert len(listing) == 4
    assert set(listing[every_5]) == {"key", "name", "cron", "tz", "next_run", "last_run"}
    assert {k: listing[every_5][k] for k in ("key", "name", "cron", "tz", "last_run")} == {
        "key": every_5, "name": "report", "cron": "*/5 * * * *", "tz": "UTC", "last_run": None}
    for schedule in listing.values():
        assert schedule["next_run"].tzinfo is not None
        assert schedule["next_run"].utcoffset().total_seconds() == 0
        assert schedule["next_run"] >= now.replace(microsecond=0)

    nxt = listing[every_5]["next_run"]
    assert nxt.minute % 5 == 0 and nxt.second == 0 and (nxt - now).total_seconds() <= 300

    local = listing[paris]["next_run"].astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute, local.second) == (9, 0, 0)
    assert listing[paris]["tz"] == "Europe/Paris"

    nxt = listing[seconds]["next_run"]
    assert nxt.second % 2 == 0 and nxt.microsecond == 0 and (nxt - now).total_seconds() <= 2

    assert kickq.unschedule(every_5) is True
    assert kickq.unschedule(every_5) is False
    assert kickq.unschedule("no-such-key") is False
    assert every_5 not in {s["key"] for s in kickq.schedules()}


def test_tick_from_before_the_schedule_existed_does_not_fire(kickq, kickq_worker):
    @kickq.process("late")
    def late(job):
        return None

    kickq_worker(pool="threads", concurrency=2)
    # once a minute, at the second that was 10 s ago: the latest tick is recent
    # (within the missed-tick grace) but older than the schedule
    second = (int(redis_now(kickq.redis)) - 10) % 60
    key = kickq.schedule("late", f"* * * * * {second}")
    # a wrong fire would happen within one worker poll (0.1 s); 1.5 s proves it did not
    time.sleep(1.5)
    assert kickq.stats("late").total.created == 0
    assert kickq.schedules()[0]["last_run"] is None
    assert kickq.unschedule(key)


def test_missed_ticks_are_not_replayed_in_a_burst(kickq, kickq_worker):
    @kickq.process("often")
    def often(job):
        return None

    kickq.schedule("often", "* * * * * *")  # every second
    # no worker for 5 s: five ticks go by unseen (nothing else fires them)
    time.sleep(5)
    assert kickq.stats("often").total.created == 0

    kickq_worker(pool="threads", concurrency=2)
    wait_for(lambda: kickq.stats("often").total.created >= 3, 10, 0.05, "three ticks after the start")
    created = _created_times(kickq, "often")
    first = created[0]
    # a replay would create the five missed jobs at once; the latest tick at most fires late
    assert len([t for t in created if t - first < 0.5]) <= 2, created
    last_run = kickq.schedules()[0]["last_run"].timestamp()
    assert last_run == int(last_run)  # ticks are whole seconds
    assert len(created) <= (created[-1] - first) + 2, created


def test_one_job_per_tick_with_three_workers_and_across_restarts(kickq, worker_process):
    workers = [worker_process(concurrency=1, wait=False) for _ in range(3)]
    for worker in workers:
        worker.wait_ready()

    t0 = redis_now(kickq.redis)
    key = kickq.schedule("record", "* * * * * */2", data={"from": "cron"})
    # the measurement window: every worker polls every 0.2 s and races for each tick
    time.sleep(9)
    created = _created_times(kickq, "record")
    window = [t for t in created if t <= t0 + 9]
    # 4 or 5 ticks fall in 9 s; one fewer or more when a tick sits on an edge of the window
    assert 3 <= len(window) <= 6, created
    gaps = [b - a for a, b in zip(created, created[1:], strict=False)]
    # two jobs for one tick would be created within a poll (0.2 s) of each other; ticks are 2 s
    # apart, less the lag of a busy worker's poll, or 4 s when a slow poll skipped one
    assert all(0.5 <= gap <= 6.5 for gap in gaps), gaps
    # every job created is listed (a tick may fire between a listing and the stats: read both
    # again until they agree)
    wait_for(lambda: kickq.stats("record").total.created == len(_created_times(kickq, "record")), 5,
             0.05, "the listing and the stats to agree")
    last_run = kickq.schedules()[0]["last_run"].timestamp()
    assert last_run % 2 == 0

    # the schedule lives in Redis: stop every worker, start a new one, jobs keep coming
    # (a warm shutdown, SIGTERM to the main process: a job running then finishes its run, where a
    # SIGTERM to the whole process group could kill it into a ghost run, re-run only much later)
    for worker in workers:
        os.kill(worker.proc.pid, signal.SIGTERM)
    for worker in workers:
        worker.proc.wait(30)
        worker.stop()
    before = kickq.stats("record").total.created
    restarted = worker_process(concurrency=1)
    try:
        wait_for(lambda: kickq.stats("record").total.created >= before + 2, 20, 0.1,
                 "jobs from the restarted worker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{restarted.log.read_text()[-3000:]}") from None

    assert kickq.unschedule(key) is True
    t_unscheduled = redis_now(kickq.redis)
    # at least one tick (every 2 s) falls in the next 3.2 s, plus the poll that would fire it
    time.sleep(3.2)
    created = _created_times(kickq, "record")
    # a tick claimed just before unschedule() may still create its job a moment later
    assert [t for t in created if t > t_unscheduled + 0.5] == [], (t_unscheduled, created)
    assert kickq.schedules() == []

    # every job created by the schedule ran once
    wait_for(lambda: kickq.stats("record").total.succeeded == len(created), 20, 0.1,
             "every cron job to run")
    runs = [x.decode() for x in kickq.redis.lrange(f"test:{kickq.options['redis_namespace']}:runs", 0, -1)]
    assert len(runs) == len(set(runs)) == len(created)
    assert all(kickq.get(job_id).result == {"from": "cron"} for job_id in runs)
