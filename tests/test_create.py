"""Kickq.create / create_many: argument forms, flag merging, the kickq-style
callback, the returned Job, the stored record, and data round trips."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kickq_celery import InvalidJobData, InvalidJobOptions, Job, JobRecord, Kickq, Promise
from kickq_celery.testing import purge_namespace

DATA = {
    "nested": {"list": [1, 2.5, [3, {"deep": None}]], "empty": {}, "none": None},
    "unicode": "zoë ✓ 日本語 🚀 \u0000 \"quoted\" \\ back",
    "bools": [True, False],
    "float": 0.1,
    "big": 2**62,
    "negative": -7,
    "exp": 1e-300,
    "int_like_float": 3.0,
    "empty_list": [],
    "": "empty key",
}


def same(a: Any, b: Any) -> bool:
    """Deep equality that also tells 1 from 1.0 and True from 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def queue_length(kq: Kickq, name: str) -> int:
    """Messages waiting in the Celery queue of job ``name`` (the broker is the test Redis)."""
    return int(kq.redis.llen(kq.task_name(name)))


# --- argument forms -------------------------------------------------------------------


def test_create_returns_a_queued_job(kickq):
    job = kickq.create("resize", {"img": 7})
    assert isinstance(job, Job)
    assert isinstance(job.id, str) and job.id
    assert (job.name, job.state, job.promise) == ("resize", "queued", None)
    record = kickq.get(job.id)
    assert isinstance(record, JobRecord)
    assert (record.id, record.name, record.state, record.data) == (job.id, "resize", "queued", {"img": 7})
    assert record.runs == [] and not record.complete and not record.success
    # its message is in the name's own queue, with the job id as the Celery task id
    assert queue_length(kickq, "resize") == 1


def redis_now(kq: Kickq) -> datetime:
    seconds, micros = kq.redis.time()
    return datetime.fromtimestamp(seconds + micros / 1e6, tz=timezone.utc)


def test_returned_job_carries_data_created_at_and_created(kickq):
    before = redis_now(kickq)
    job = kickq.create("resize", DATA)
    after = redis_now(kickq)
    assert job.created is True
    assert same(job.data, DATA)
    # created_at is the Redis clock of the create itself: exactly the record's, aware UTC
    record = kickq.get(job.id)
    assert job.created_at == record.created_at
    assert job.created_at is not None and job.created_at.tzinfo == timezone.utc
    assert before <= job.created_at <= after
    # data is the job's data as stored (JSON), so as get() and the handler see it
    assert kickq.create("j", (1, 2)).data == [1, 2]
    assert kickq.create("j").data is None
    # delayed and tombstoned jobs too, and through the kickq-style callback
    delayed = kickq.create("j", {"later": True}, delay=60, tombstone=True)
    assert (delayed.state, delayed.data, delayed.created) == ("delayed", {"later": True}, True)
    assert delayed.created_at == kickq.get(delayed.id).created_at
    seen = []
    via_callback = kickq.create("j", 5, callback=lambda err, job_id, promise: seen.append(job_id))
    assert via_callback is not None and seen == [via_callback.id]
    assert (via_callback.data, via_callback.created) == (5, True)


def test_data_forms(kickq):
    no_data = kickq.create("j")
    positional = kickq.create("j", [1, 2])
    keyword = kickq.create("j", data="text")
    falsy = kickq.create("j", 0)
    assert kickq.get(no_data.id).data is None
    assert kickq.get(positional.id).data == [1, 2]
    assert kickq.get(keyword.id).data == "text"
    assert kickq.get(falsy.id).data == 0
    assert len({no_data.id, positional.id, keyword.id, falsy.id}) == 4


@pytest.mark.parametrize("data", [DATA, None, True, False, 0, -1.5, "", "ünï", [], {}, [None, [[]]]],
                         ids=repr)
def test_stored_data_is_deep_equal(kickq, data):
    assert same(kickq.get(kickq.create("j", data).id).data, data)


def test_opts_camel_and_snake_case_merged_with_flags_winning(kickq):
    opts = {"retryCount": 5, "ghost_times": 2, "retry": True, "tombstoneTimeout": 4}
    job = kickq.create("j", 1, opts, retry_count=7, ghost_interval=timedelta(seconds=9))
    flags = kickq.get(job.id).flags
    assert flags["retry_count"] == 7  # **flags win over opts
    assert flags["ghost_times"] == 2
    assert flags["retry"] is True
    assert flags["tombstone_timeout"] == 4
    assert flags["ghost_interval"] == 9  # timedelta -> seconds
    assert flags["retry_interval"] == 1800  # untouched default
    # keyword opts= works too, and the camelCase spelling of a flag in opts loses to its snake_case kwarg
    job = kickq.create("j", data=1, opts={"ghostTimes": 3}, ghost_times=6)
    assert kickq.get(job.id).flags["ghost_times"] == 6
    # opts is not modified
    assert opts == {"retryCount": 5, "ghost_times": 2, "retry": True, "tombstoneTimeout": 4}


def test_stored_flags_are_fully_resolved(kickq):
    flags = kickq.get(kickq.create("j").id).flags
    assert set(flags) == {"delay", "tombstone", "tombstone_timeout", "retry", "retry_count",
                          "retry_interval", "process_timeout", "ghost_retry", "ghost_times",
                          "ghost_interval", "priority", "concurrency_key", "chunk_size"}


def test_retry_interval_forms_are_stored_as_seconds(kickq):
    as_list = kickq.get(kickq.create("j", retry=True, retry_interval=[1, timedelta(seconds=2)]).id)
    assert as_list.flags["retry_interval"] == [1, 2]
    # a callable is evaluated per retry at creation: workers need not have it
    as_callable = kickq.get(kickq.create("j", retry=True, retry_count=3, retry_interval=lambda n: n * 10).id)
    assert as_callable.flags["retry_interval"] == [10, 20, 30]


def test_tombstone_gives_a_promise(kickq):
    job = kickq.create("j", 1, tombstone=True)
    assert isinstance(job.promise, Promise)
    assert job.promise.async_result.id == job.id
    assert kickq.get(job.id).flags["tombstone"] is True


# --- the callback ---------------------------------------------------------------------


def test_callback_on_success(kickq):
    calls: list[tuple[Any, ...]] = []
    job = kickq.create("j", {"x": 1}, callback=lambda *args: calls.append(args))
    assert calls == [(None, job.id, None)]
    assert kickq.get(job.id).data == {"x": 1}


def test_callback_on_success_with_a_promise(kickq):
    calls: list[tuple[Any, ...]] = []
    job = kickq.create("j", 1, {"tombstone": True}, callback=lambda err, job_id, promise:
                       calls.append((err, job_id, promise)))
    [(err, job_id, promise)] = calls
    assert err is None and job_id == job.id
    assert isinstance(promise, Promise) and promise is job.promise


@pytest.mark.parametrize("args, kwargs, error", [
    (("", 1), {}, InvalidJobOptions),
    (("j", object()), {}, InvalidJobData),
    (("j", 1), {"retyr": True}, InvalidJobOptions),
    (("j", 1, {"delay": "soon"}), {}, InvalidJobOptions),
])
def test_callback_on_failure_raises_nothing(kickq, args, kwargs, error):
    calls: list[tuple[Any, ...]] = []
    result = kickq.create(*args, callback=lambda *a: calls.append(a), **kwargs)
    assert result is None
    [(err, job_id, promise)] = calls
    assert isinstance(err, error)
    assert (job_id, promise) == (None, None)
    assert kickq.stats().total.created == 0
    assert queue_length(kickq, "j") == 0


# --- delay ----------------------------------------------------------------------------


def test_delayed_job_state_and_schedule(kickq):
    for delay in (2, timedelta(seconds=2), 3600):
        job = kickq.create("later", "x", delay=delay)
        assert job.state == "delayed"
        record = kickq.get(job.id)
        assert record.state == "delayed"
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        assert math.isclose((record.scheduled_for - record.created_at).total_seconds(), seconds, abs_tol=0.01)
    # every delayed job waits in Redis without a message (no worker holds an ETA message)
    assert queue_length(kickq, "later") == 0
    assert kickq.redis.zcard(kickq.keys.delayed) == 3


def test_a_delay_horizon_sends_short_delays_as_countdowns(kickq_app, kickq_namespace, kickq_redis_url):
    kq = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=kickq_namespace, delay_horizon=5)
    try:
        for delay in (2, timedelta(seconds=2), 3600):
            assert kq.create("later", "x", delay=delay).state == "delayed"
        assert queue_length(kq, "later") == 2
        assert kq.redis.zcard(kq.keys.delayed) == 1
    finally:
        purge_namespace(kq)


def test_zero_delay_is_queued(kickq):
    assert kickq.create("j", delay=0).state == "queued"
    assert kickq.create("j", delay=None).state == "queued"


# --- create_many ----------------------------------------------------------------------


def test_create_many(kickq):
    items = [{"n": i, "s": "ü" * i} for i in range(25)]
    jobs = kickq.create_many("batch", items, {"retryCount": 1}, retry=True)
    assert len(jobs) == 25 and len({job.id for job in jobs}) == 25
    for job, item in zip(jobs, items, strict=True):
        assert (job.name, job.state, job.promise, job.created) == ("batch", "queued", None, True)
        record = kickq.get(job.id)
        assert same(record.data, item)
        assert same(job.data, item)
        # one create script: one creation time, the records'
        assert job.created_at is not None and job.created_at == record.created_at == jobs[0].created_at
        assert record.flags["retry"] is True and record.flags["retry_count"] == 1
    assert queue_length(kickq, "batch") == 25
    assert kickq.stats("batch").total.created == 25


def test_create_many_from_a_generator_and_empty(kickq):
    jobs = kickq.create_many("gen", (i * i for i in range(3)), delay=60)
    assert [kickq.get(job.id).data for job in jobs] == [0, 1, 4]
    assert {job.state for job in jobs} == {"delayed"}
    assert kickq.create_many("gen", []) == []


def test_create_many_tombstoned(kickq):
    jobs = kickq.create_many("t", [1, 2], tombstone=True)
    assert all(isinstance(job.promise, Promise) for job in jobs)
    assert jobs[0].promise is not jobs[1].promise


def test_create_many_invalid_item_writes_nothing(kickq):
    with pytest.raises(InvalidJobData):
        kickq.create_many("batch", [1, 2, {"bad": {1, 2}}, 4])
    assert kickq.stats().total.created == 0
    assert queue_length(kickq, "batch") == 0
    assert kickq.jobs() == []


# --- records ----------------------------------------------------------------------------


def test_record_timestamps_are_aware_utc(kickq):
    job = kickq.create("j", 1, delay=30)
    record = kickq.get(job.id)
    for stamp in (record.created_at, record.updated_at, record.scheduled_for):
        assert stamp is not None and stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)
        assert stamp.tzinfo == timezone.utc
    assert record.finished_at is None
    assert record.to_dict()["created_at"].endswith("+00:00")


def test_create_for_a_name_nobody_processes_waits(kickq):
    job = kickq.create("nobody-handles-this", 1)
    assert kickq.task_name("nobody-handles-this") not in kickq.app.tasks
    assert queue_length(kickq, "nobody-handles-this") == 1
    assert kickq.get(job.id).state == "queued"
