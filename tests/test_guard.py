"""Bad input: each case raises its documented exception and writes nothing to Redis
or the broker. Also the exception hierarchy of API.md."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

import kickq_celery
from kickq_celery import (
    ConfigError,
    InvalidJobData,
    InvalidJobOptions,
    JobDeleted,
    JobFailed,
    JobNotFound,
    Kickq,
    KickqError,
    RedisUnavailable,
    TombstoneTimeout,
)
from kickq_celery.testing import make_app
from tests.conftest import free_port


def snapshot(kq: Kickq) -> dict[bytes, Any]:
    """Every key that names the namespace: records, indexes and stats (``{ns}:*``), its Celery
    queues (``<ns>.<name>``) and kombu's bindings, with its serialized value, so that any
    write shows up as a difference. (Namespaces are random: nothing else matches.)"""
    ns = kq.options["redis_namespace"]
    client = kq.redis
    return {key: client.dump(key) for key in client.scan_iter(match=f"*{ns}*", count=1000)}


@pytest.fixture
def kq(kickq: Kickq) -> Kickq:
    """The test's Kickq with some state already written, so that a snapshot is not trivially empty."""
    kickq.create("existing", {"a": 1})
    kickq.create("existing", 2, delay=60)
    return kickq


def assert_writes_nothing(kq: Kickq, call: Any, error: type[Exception],
                          match: str | None = None) -> Exception:
    before = snapshot(kq)
    assert before  # the namespace has records and a queue to compare
    with pytest.raises(error, match=match) as info:
        call()
    assert snapshot(kq) == before
    return info.value


def test_snapshot_sees_writes(kq):
    """The check itself: a good create changes the records and the queue."""
    before = snapshot(kq)
    assert any(key.startswith(b"{") for key in before)  # records
    assert kq.task_name("existing").encode() in before  # the Celery queue
    kq.create("existing", 3)
    after = snapshot(kq)
    assert after != before
    assert after[kq.task_name("existing").encode()] != before[kq.task_name("existing").encode()]


# --- names ------------------------------------------------------------------------

BAD_NAMES = ["", "x" * 201, 123, None, b"bytes", ["a"]]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_name(kq, name):
    err = assert_writes_nothing(kq, lambda: kq.create(name, 1), InvalidJobOptions)
    assert "job name" in str(err)
    assert_writes_nothing(kq, lambda: kq.create_many(name, [1, 2]), InvalidJobOptions)


def test_name_of_200_characters_is_fine(kq):
    job = kq.create("y" * 200, 1)
    assert kq.get(job.id).name == "y" * 200


@pytest.mark.parametrize("name", ["", "x" * 201, 5])
def test_bad_name_in_process(kq, name):
    assert_writes_nothing(kq, lambda: kq.process(name, lambda job: None), InvalidJobOptions)
    assert_writes_nothing(kq, lambda: kq.process(["good", name], lambda job: None), InvalidJobOptions)
    # nothing half-registered: the good name of the list got no task
    assert kq.task_name("good") not in kq.app.tasks


# --- data ---------------------------------------------------------------------------

BAD_DATA = [object(), {1, 2}, float("nan"), float("inf"), {"nested": [1, object()]},
            {("tuple", "key"): 1}, b"bytes", lambda: None]


@pytest.mark.parametrize("data", BAD_DATA, ids=repr)
def test_non_json_data(kq, data):
    err = assert_writes_nothing(kq, lambda: kq.create("j", data), InvalidJobData)
    assert "JSON" in str(err)
    # with a callback: the callback gets the error, nothing is raised
    calls = []
    before = snapshot(kq)
    assert kq.create("j", data, callback=lambda *args: calls.append(args)) is None
    assert snapshot(kq) == before
    assert len(calls) == 1 and isinstance(calls[0][0], InvalidJobData) and calls[0][1:] == (None, None)


def test_create_many_with_one_bad_item_writes_nothing(kq):
    items = [{"ok": 1}, {"ok": 2}, {"bad": object()}, {"ok": 3}]
    assert_writes_nothing(kq, lambda: kq.create_many("j", items), InvalidJobData)
    assert_writes_nothing(kq, lambda: kq.create_many("j", [1, 2, float("nan")]), InvalidJobData)


# --- flags --------------------------------------------------------------------------


@pytest.mark.parametrize("flags, opts, needle", [
    ({"retyr": True}, None, "did you mean 'retry'"),
    ({}, {"tombstoneTimout": 3}, "did you mean 'tombstoneTimeout'"),
    ({}, {"ghost_tims": 3}, "did you mean 'ghost_times'"),
    ({"purge_timeout": 3}, None, "'purge_timeout'"),  # a config option, not a per-job flag
    ({}, {"redisNamespace": "x"}, "'redisNamespace'"),
    ({"max_jobs_num": 3}, None, "'max_jobs_num'"),  # a process() option
    ({"retry": "yes"}, None, "'retry'"),  # wrong type
    ({"delay": -1}, None, "'delay'"),  # out of range
    ({"retry_interval": [1, 1e12]}, None, "at most 100 years"),
    ({}, {"retryCount": -2}, "'retryCount'"),
    ({"tombstone_timeout": 0}, None, "'tombstone_timeout'"),
    ({"retry_interval": "soon"}, None, "'retry_interval'"),
])
def test_bad_flag(kq, flags, opts, needle):
    err = assert_writes_nothing(kq, lambda: kq.create("j", 1, opts, **flags), InvalidJobOptions)
    assert needle in str(err)
    assert_writes_nothing(kq, lambda: kq.create_many("j", [1, 2], opts, **flags), InvalidJobOptions)


def test_bad_flag_with_callback_is_passed_not_raised(kq):
    calls = []
    before = snapshot(kq)
    assert kq.create("j", 1, callback=lambda *args: calls.append(args), retyr=True) is None
    assert snapshot(kq) == before
    [(err, job_id, promise)] = calls
    assert isinstance(err, InvalidJobOptions) and "retry" in str(err)
    assert (job_id, promise) == (None, None)


def test_retry_interval_callable_returning_garbage(kq):
    assert_writes_nothing(
        kq, lambda: kq.create("j", 1, retry=True, retry_interval=lambda n: "later"), InvalidJobOptions)


# --- config -------------------------------------------------------------------------


@pytest.mark.parametrize("values, needle", [
    ({"redisNamespce": "x"}, "did you mean 'redisNamespace'"),
    ({"purgeTimeout": "1d"}, "'purgeTimeout'"),
    ({"retry_count": 2, "tombstone": 1}, "'tombstone'"),
])
def test_bad_config_writes_nothing(kq, values, needle):
    before_config = Kickq.get_config()
    for call in (lambda: kickq_celery.config(values), lambda: Kickq.config(**values),
                 lambda: Kickq(kq.app, **values)):
        err = assert_writes_nothing(kq, call, ConfigError)
        assert needle in str(err)
    assert Kickq.get_config() == before_config


@pytest.mark.parametrize("options", [{"maxJobsNum": 0}, {"max_jobs_num": "3"}, {"max_jobs_num": True},
                                     {"maxJobs": 3}, {"retry": True}])
def test_bad_process_options(kq, options):
    err = assert_writes_nothing(kq, lambda: kq.process("p", options, lambda job: None), ConfigError)
    assert repr(next(iter(options))) in str(err)
    assert kq.task_name("p") not in kq.app.tasks


def test_second_handler_for_a_name(kq):
    def first(job):
        return 1

    def second(job):
        return 2

    kq.process("h", first)
    before = snapshot(kq)
    for register in (lambda: kq.process("h", second),
                     lambda: kq.process(["other", "h"], {"maxJobsNum": 2}, second),
                     lambda: kq.process("h")(second)):
        with pytest.raises(ConfigError, match="'h'"):
            register()
    assert snapshot(kq) == before
    assert kq.app.tasks[kq.task_name("h")].handler is first
    assert kq.task_name("other") not in kq.app.tasks
    # another Kickq instance on the same app and namespace cannot take the name either
    twin = Kickq(kq.app, redis=kq.options["redis"], redis_namespace=kq.options["redis_namespace"])
    with pytest.raises(ConfigError):
        twin.process("h", second)


# --- an unreachable Redis -----------------------------------------------------------


def outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # the test inspects what each call raised
        return exc


def test_unreachable_redis(kq, kickq_namespace):
    """Every call on a Redis that does not answer raises RedisUnavailable naming the
    address with the password masked, and writes nothing (the broker is the live test
    Redis, so a published message would show up in the snapshot)."""
    port = free_port()
    url = f"redis://:secret@127.0.0.1:{port}/0"
    ns = kq.options["redis_namespace"]
    dead = Kickq(kq.app, redis=url, redis_namespace=ns)
    as_kwargs = Kickq(kq.app, redis={"host": "127.0.0.1", "port": port, "password": "secret"},
                      redis_namespace=ns)
    as_client = Kickq(kq.app, redis=redis.Redis(host="127.0.0.1", port=port, password="secret"),
                      redis_namespace=ns)
    # no redis option: kickq uses the app's redis:// broker URL
    broker_app = make_app(url)
    from_broker = Kickq(broker_app, redis_namespace=ns)
    callback_calls: list[Any] = []
    calls = {
        "create": lambda: dead.create("j", 1),
        "create_many": lambda: dead.create_many("j", [1, 2]),
        "create tombstoned": lambda: dead.create("j", 1, tombstone=True),
        "get": lambda: dead.get("some-id"),
        "delete": lambda: dead.delete("some-id"),
        "kwargs": lambda: as_kwargs.create("j", 1),
        "client": lambda: as_client.create("j", 1),
        "broker url": lambda: from_broker.create("j", 1),
        "callback": lambda: dead.create("j", 1, callback=lambda *args: callback_calls.append(args)),
    }
    before = snapshot(kq)
    assert before
    # each call spends a few seconds retrying: run them side by side
    with ThreadPoolExecutor(len(calls)) as pool:
        results = dict(zip(calls, pool.map(outcome, calls.values()), strict=True))
    broker_app.close()
    assert snapshot(kq) == before
    assert results.pop("callback") is None
    [(err, job_id, promise)] = callback_calls
    assert isinstance(err, RedisUnavailable) and (job_id, promise) == (None, None)
    for what, err in results.items():
        assert isinstance(err, RedisUnavailable), (what, err)
        assert isinstance(err, ConnectionError)
        message = str(err)
        assert "secret" not in message and f"127.0.0.1:{port}" in message, (what, message)
        assert "***" in message, (what, message)


# --- the exception hierarchy ---------------------------------------------------------


@pytest.mark.parametrize("exc, bases", [
    (ConfigError, (KickqError, ValueError)),
    (InvalidJobOptions, (KickqError, ValueError)),
    (InvalidJobData, (KickqError, TypeError)),
    (JobNotFound, (KickqError, LookupError)),
    (RedisUnavailable, (KickqError, ConnectionError)),
    (JobFailed, (KickqError,)),
    (JobDeleted, (JobFailed, KickqError)),
    (TombstoneTimeout, (JobFailed, KickqError, TimeoutError)),
    (KickqError, (Exception,)),
])
def test_exception_hierarchy(exc, bases):
    for base in bases:
        assert issubclass(exc, base), (exc, base)
    assert getattr(kickq_celery, exc.__name__) is exc
    assert exc.__name__ in kickq_celery.__all__


def test_exception_relations_that_must_not_hold():
    assert not issubclass(JobDeleted, TimeoutError)
    assert not issubclass(JobFailed, (ValueError, TypeError, LookupError, ConnectionError))
    assert not issubclass(ConfigError, InvalidJobOptions)
    assert not issubclass(InvalidJobOptions, ConfigError)


def test_job_failed_attributes_and_pickling():
    for cls, timeout in ((JobFailed, False), (JobDeleted, False), (TombstoneTimeout, True)):
        err = cls("job j1 failed", "j1", "ValueError: boom")
        assert (err.job_id, err.error, err.has_timeout) == ("j1", "ValueError: boom", timeout)
        assert str(err) == "job j1 failed"
        # it travels through Celery's result backend
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is cls
        assert (copy.job_id, copy.error, str(copy)) == ("j1", "ValueError: boom", str(err))


def test_job_not_found(kq):
    with pytest.raises(JobNotFound) as info:
        kq.get("no-such-id")
    assert "no-such-id" in str(info.value)
    with pytest.raises(LookupError):
        kq.get(None)
