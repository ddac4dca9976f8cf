"""The pytest plugin kickq_celery.testing, used the way a project's tests would use it.

The inner test file runs in a pytest subprocess of its own (pytester), where the
plugin is loaded from its entry point, as in a user's project.
"""

from __future__ import annotations

import redis

pytest_plugins = ["pytester"]

INNER = '''
import pathlib

import pytest

from kickq_celery.testing import wait_for


def remember(namespace):
    with pathlib.Path(__file__).with_name("namespaces.txt").open("a") as out:
        out.write(namespace + "\\n")


def test_job_runs_on_the_plugin_worker(kickq, kickq_worker, kickq_namespace):
    remember(kickq_namespace)
    assert kickq.options["redis_namespace"] == kickq_namespace

    @kickq.process("double")
    def double(job):
        return job.data * 2

    kickq_worker(pool="threads", concurrency=2)
    job = kickq.create("double", 21, tombstone=True)
    assert job.promise.wait().result == 42
    assert wait_for(lambda: kickq.get(job.id).state == "success", 5, message="the record")
    # left behind on purpose: the fixtures remove them
    parked = kickq.create("double", 1, delay=3600)
    assert kickq.get(parked.id).state == "delayed"
    kickq.schedule("double", "0 0 1 1 *", data=1)


def test_keys_are_removed_even_when_the_test_fails(kickq, kickq_namespace):
    remember(kickq_namespace)
    kickq.create("nobody_processes_this", {"x": 1})  # a record and a message in its queue
    assert False, "fails on purpose"


def test_each_test_gets_its_own_namespace(kickq_namespace):
    remember(kickq_namespace)


def test_wait_for_is_bounded():
    with pytest.raises(AssertionError, match="timed out after 0.2s waiting for never"):
        wait_for(lambda: False, 0.2, message="never")
'''


def test_plugin_fixtures_work_and_leave_no_keys(pytester, kickq_redis_url):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout", "60")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: fails on purpose",
                                 "FAILED test_inner.py::test_keys_are_removed_even_when_the_test_fails*"])

    namespaces = (pytester.path / "namespaces.txt").read_text().split()
    assert len(namespaces) == 3 and len(set(namespaces)) == 3, namespaces
    client = redis.Redis.from_url(kickq_redis_url)
    for ns in namespaces:
        # records, indexes, stats, cron, results ({ns}:...), queues (ns.<name>), kombu bindings
        left = [key for pattern in ("*{" + ns + "}*", f"*{ns}.*") for key in client.scan_iter(match=pattern)]
        assert left == [], left


APP_MODULE = '''
from celery import Celery

from kickq_celery import Kickq

app = Celery("proj", broker="redis://127.0.0.1:1/0")  # a broker the tests must not use
kq = Kickq(app, redis="redis://127.0.0.1:1/0", redis_namespace="production", retry_count=2)


@kq.process("double", max_jobs_num=3)
def double(job):
    return job.data * 2


@kq.process("picky")
def picky(job):
    if job.run == 1:
        raise ValueError("not the first time")
    return "second"
'''

USER_TESTS = '''
from proj_jobs import kq as users_kq


def test_celery_results_warn_of_nothing(kickq):
    kickq.create("double", 1, tombstone=True)  # kickq supplies the result backend on its Redis
    kickq.app.backend.store_result("some-id", 1, "SUCCESS")  # where redis-py warns of setex


def test_the_users_handlers_run_without_registering_them(kickq, kickq_worker, kickq_namespace):
    assert kickq is not users_kq and kickq.options["redis_namespace"] == kickq_namespace
    assert {name: limits.max_jobs_num for name, limits in kickq.processed.items()} == {
        "double": 3, "picky": None}  # its handlers, with their limits
    assert kickq.options["retry_count"] == 2  # and its options
    kickq_worker()
    assert kickq.create("double", 21, tombstone=True).promise.wait().result == 42
    job = kickq.create("picky", None, retry=True, retry_interval=0, tombstone=True)
    assert job.promise.wait().result == "second"


def test_the_users_kickq_is_left_as_it_was():
    assert users_kq.options["redis_namespace"] == "production"
    assert users_kq.options["redis"] == "redis://127.0.0.1:1/0"
'''


def test_kickq_is_the_users_own_kickq_named_by_the_ini_option(pytester, kickq_redis_url):
    pytester.makepyfile(proj_jobs=APP_MODULE, test_users=USER_TESTS)
    pytester.makeini("[pytest]\nkickq_app = proj_jobs:kq\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout", "60")
    result.assert_outcomes(passed=3)
    # Celery's Redis result backend calls redis-py's deprecated setex: not the user's concern
    assert "setex" not in result.stdout.str()


def test_the_kickq_app_flag_and_a_bad_name(pytester):
    pytester.makepyfile(proj_jobs=APP_MODULE, test_users="def test_nothing(kickq):\n    pass\n")
    good = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kickq-app", "proj_jobs:kq")
    good.assert_outcomes(passed=1)
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kickq-app", "proj_jobs:app")
    assert "kickq_app 'proj_jobs:app' is not a Kickq instance" in bad.stdout.str() + bad.stderr.str()
