"""``@kq.task``: Celery-style tasks on kickq jobs, with real `celery worker` subprocesses
(``tests/taskapp.py``), each kickq task beside an ordinary ``@app.task`` with the same body.

The same calls (``delay``, ``apply_async`` with ``countdown`` or ``eta``) work for both; the
kickq task survives what the Celery one does not: a revoke while no worker runs, a countdown
past the broker's visibility_timeout, a worker SIGKILLed mid-run, and a limit across workers.
And ``KickqResult``: ``get()`` waits for the final outcome, ``state`` follows the record,
``revoke()`` deletes, ``await`` works; bad arguments write nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import chain, states

from kickq_celery import (
    InvalidJobData,
    InvalidJobOptions,
    JobDeleted,
    JobFailed,
    KickqError,
    TombstoneTimeout,
)
from kickq_celery.tasks import KickqResult
from kickq_celery.testing import wait_for
from tests import taskapp
from tests.taskapp import flaky_kickq, limited_kickq, record_celery, record_kickq, whoami

APP = "tests.taskapp"
NS = taskapp.NAMESPACE

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def kickq_namespace() -> str:
    """The namespace of tests.taskapp as this process imported it: the tasks the tests call
    create their jobs there, and the workers (given it by worker_process) serve it."""
    return NS


@pytest.fixture(autouse=True)
def clean(kickq, r):
    """After each test (its workers stopped, before kickq purges the namespace), remove what
    the tasks recorded; each test starts with an empty namespace."""
    yield
    keys = list(r.scan_iter(match=f"test:{NS}:*"))
    if keys:
        r.delete(*keys)


def entries(r, tag: str, what: str = "runs") -> list[list]:
    """``[x, pid, time]`` of each run (or start) the tasks recorded under ``tag``."""
    return [json.loads(item) for item in r.lrange(taskapp.key(tag, what), 0, -1)]


def xs(r, tag: str, what: str = "runs") -> list:
    return [entry[0] for entry in entries(r, tag, what)]


def most_at_once(r, tag: str) -> int:
    return max((int(n) for n in r.lrange(taskapp.key(tag, "concurrency"), 0, -1)), default=0)


def namespace_keys(r) -> list[str]:
    """Every key of the namespace: kickq's records and the namespace's Celery queues."""
    return [*r.scan_iter(match="\\{" + NS + "\\}:*"), *r.scan_iter(match=f"{NS}.*")]


def ignored(worker, kickq, job_id: str) -> bool:
    """The worker consumed the job's message and started no run (the run guard's Ignore)."""
    line = f"{kickq.task_name(record_kickq.name)}[{job_id}] ignored"
    return line in worker.log.read_text(errors="replace")


def test_the_same_calls_work_for_the_celery_task_and_the_kickq_task(kickq, worker_process, r):
    worker_process(app=APP, concurrency=4)
    sent: dict[str, float] = {}
    kickq_results = []
    for task, tag in ((record_celery, "same-celery"), (record_kickq, "same-kickq")):
        sent[tag] = time.time()
        now = task.delay(1, tag=tag)
        counted = task.apply_async((2,), {"tag": tag}, countdown=1)
        timed = task.apply_async((3,), {"tag": tag}, eta=datetime.now(timezone.utc) + timedelta(seconds=1.5))
        if task is record_kickq:
            kickq_results = [now, counted, timed]
    wait_for(lambda: len(xs(r, "same-celery")) == 3 and len(xs(r, "same-kickq")) == 3, 15, 0.05,
             "both tasks' three calls to run")
    for tag in sent:
        started = {x: at for x, _, at in entries(r, tag, "started")}
        assert sorted(started) == [1, 2, 3], tag
        assert started[1] - sent[tag] < 1, tag  # at once
        assert started[2] >= sent[tag] + 1, tag  # countdown=1
        assert started[3] >= sent[tag] + 1.5, tag  # eta: now + 1.5 s

    now, counted, timed = kickq_results
    assert all(isinstance(result, KickqResult) for result in kickq_results)
    assert [result.get(timeout=5) for result in kickq_results] == [
        {"x": x, "tag": "same-kickq"} for x in (1, 2, 3)]
    record = kickq.get(counted.id)
    assert record.name == "tests.taskapp.record_kickq" == record_kickq.name
    assert record.data == {"args": [2], "kwargs": {"tag": "same-kickq"}}
    assert record.scheduled_for == record.created_at + timedelta(seconds=1)
    assert [run.state for run in record.runs] == ["success"]
    assert kickq.get(timed.id).scheduled_for - kickq.get(timed.id).created_at >= timedelta(seconds=1.4)


def test_a_revoke_while_no_worker_runs_holds_for_kickq_only(kickq, worker_process, r):
    celery_result = record_celery.delay(1, tag="revoke-celery")
    revoked = record_kickq.delay(1, tag="revoke-kickq")
    celery_result.revoke()  # a broadcast to the running workers: there are none
    revoked.revoke()  # kq.delete: kept in Redis
    sentinel = record_kickq.delay(2, tag="revoke-kickq")  # queued behind the revoked one
    assert revoked.state == states.REVOKED

    worker = worker_process(app=APP)
    assert sentinel.get(timeout=15) == {"x": 2, "tag": "revoke-kickq"}
    wait_for(lambda: xs(r, "revoke-celery"), 10, 0.05, "the revoked Celery task to run")
    wait_for(lambda: ignored(worker, kickq, revoked.id), 10, 0.05,
             "the revoked kickq job's message to be dropped")
    assert xs(r, "revoke-celery") == [1]  # Celery forgot the revoke: it ran
    assert xs(r, "revoke-kickq") == [2]  # the revoked kickq job never did
    with pytest.raises(JobDeleted):
        revoked.get(timeout=5)
    assert kickq.stats(record_kickq.name).total.deleted == 1


def test_a_countdown_past_the_visibility_timeout_runs_once_for_kickq(kickq, worker_process, r):
    # the broker hands an unacknowledged message over again after 2 s (looked for every second)
    worker = worker_process(app=APP, visibility_timeout=2, restore_interval=1)
    celery_result = record_celery.apply_async((1,), {"tag": "vt-celery"}, countdown=4)
    kickq_result = record_kickq.apply_async((1,), {"tag": "vt-kickq"}, countdown=4)
    assert r.zscore(kickq.keys.delayed, kickq_result.id) is not None  # it waits in Redis, not a worker
    # Celery's ETA message sits unacknowledged in the worker past the visibility timeout
    received = f"{record_celery.name}[{celery_result.id}] received"
    wait_for(lambda: worker.log.read_text(errors="replace").count(received) >= 2, 10, 0.05,
             "the Celery countdown message to be delivered a second time")
    assert kickq_result.get(timeout=15) == {"x": 1, "tag": "vt-kickq"}
    wait_for(lambda: len(xs(r, "vt-celery")) >= 2, 10, 0.05, "the Celery task to run twice")
    time.sleep(2.5)  # a visibility timeout more: a redelivered kickq message would have run by now
    assert xs(r, "vt-kickq") == [1]
    assert [run.state for run in kickq.get(kickq_result.id).runs] == ["success"]
    assert len(xs(r, "vt-celery")) >= 2  # one countdown call, two (or more) runs


def test_a_run_of_a_sigkilled_worker_is_rerun_for_kickq_and_lost_for_celery(kickq, worker_process, r):
    first = worker_process(app=APP, concurrency=2)
    celery_result = record_celery.delay(1, tag="kill-celery", sleep=2)
    kickq_result = record_kickq.apply_async((1,), {"tag": "kill-kickq", "sleep": 2}, ghost_interval=0)
    wait_for(lambda: xs(r, "kill-celery", "started") and xs(r, "kill-kickq", "started"), 15, 0.05,
             "both runs to start")
    time.sleep(0.3)  # the Celery message is acknowledged as its run starts (default acks)
    first.kill()
    killed = time.monotonic()

    worker_process(app=APP, concurrency=2)
    # the fresh worker's reaper finds the kickq run's heartbeat lock lapsed and runs it again
    assert kickq_result.get(timeout=20) == {"x": 1, "tag": "kill-kickq"}
    assert time.monotonic() - killed < 15
    record = kickq.get(kickq_result.id)
    assert [run.state for run in record.runs] == ["ghost", "success"]
    assert "heartbeat lock expired" in (record.runs[0].error or "")
    assert xs(r, "kill-kickq", "started") == [1, 1] and xs(r, "kill-kickq") == [1]
    # the Celery task is gone: not in its queue, not among the broker's unacknowledged messages
    assert r.llen(f"{NS}.celery") == 0
    assert not [m for m in r.hvals("unacked") if celery_result.id in m]
    # and it never finished: it would have, 2 s after it started, had any worker run it on
    assert xs(r, "kill-celery", "started") == [1] and xs(r, "kill-celery") == []


def test_max_jobs_num_holds_across_two_workers_and_celery_has_no_such_limit(kickq, worker_process, r):
    workers = [worker_process(app=APP, concurrency=3, wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    for x in range(6):
        record_celery.delay(x, tag="limit-celery", sleep=1.5)
    wait_for(lambda: len(xs(r, "limit-celery")) == 6, 15, 0.05, "the Celery tasks to run")
    assert most_at_once(r, "limit-celery") > 2  # 6 processes: nothing holds them to 2

    results = [limited_kickq.delay(x, tag="limit-kickq", sleep=1) for x in range(6)]
    assert [result.get(timeout=20)["x"] for result in results] == list(range(6))
    assert sorted(xs(r, "limit-kickq")) == list(range(6))
    assert most_at_once(r, "limit-kickq") == 2  # the limit, reached and never passed


def test_get_raises_job_failed_only_after_the_final_failed_retry(kickq, worker_process, r):
    worker_process(app=APP)
    failing = flaky_kickq.delay("always", 99)  # retry=True, retry_count=2, retry_interval=0.3
    called = time.monotonic()
    with pytest.raises(JobFailed) as info:
        failing.get(timeout=15)
    assert time.monotonic() - called >= 0.6  # two retry intervals: not at the first failure
    record = kickq.get(failing.id)
    assert record.state == "fail"
    assert [run.state for run in record.runs] == ["fail", "fail", "fail"]  # retry_count + 1 runs
    assert r.get(f"test:{NS}:flaky:always") == "3"
    assert info.value.job_id == failing.id and not isinstance(info.value, JobDeleted)
    assert info.value.error == "RuntimeError: run 3 of always fails on purpose"
    assert (failing.state, failing.ready(), failing.failed(), failing.successful()) == (
        states.FAILURE, True, True, False)
    assert isinstance(failing.result, JobFailed)
    assert isinstance(failing.get(timeout=5, propagate=False), JobFailed)

    # a per-call flag overrides the task's retry_interval: long enough to see RETRY
    retried = flaky_kickq.apply_async(("once", 1), retry_interval=1.5)
    wait_for(lambda: retried.state == states.RETRY, 10, 0.05, "the failed first run")
    assert not retried.ready()
    assert retried.get(timeout=15) == {"name": "once", "run": 2}
    assert [run.state for run in kickq.get(retried.id).runs] == ["fail", "success"]
    assert retried.successful()


def test_state_follows_the_job_record(kickq, worker_process, r):
    result = record_kickq.delay(1, tag="states", sleep=1.5)
    revoked = record_kickq.apply_async((2,), {"tag": "states"}, countdown=60)
    assert (result.state, result.ready(), result.result) == (states.PENDING, False, None)
    assert revoked.state == states.PENDING
    with pytest.raises(TombstoneTimeout):
        result.get(timeout=0.3)  # no worker yet

    revoked.revoke()
    assert (revoked.state, revoked.ready(), revoked.successful()) == (states.REVOKED, True, False)
    assert isinstance(revoked.result, JobDeleted)
    with pytest.raises(JobDeleted):
        revoked.get(timeout=5)

    worker_process(app=APP)
    wait_for(lambda: result.state == states.STARTED, 15, 0.02, "the run to start")
    assert not result.ready()
    assert result.get(timeout=10) == {"x": 1, "tag": "states"}
    assert (result.state, result.ready(), result.successful(), result.failed()) == (
        states.SUCCESS, True, True, False)
    assert result.result == {"x": 1, "tag": "states"}
    # looked up again by id, as a web request would
    again = record_kickq.AsyncResult(result.id)
    assert isinstance(again, KickqResult) and again.state == states.SUCCESS
    assert xs(r, "states") == [1]


def test_await_a_result_in_asyncio(kickq, worker_process):
    worker_process(app=APP)

    async def main() -> tuple[list, str]:
        results = [record_kickq.delay(x, tag="await") for x in range(3)]
        revoked = record_kickq.apply_async((9,), {"tag": "await"}, countdown=30)
        revoked.revoke()
        try:
            await revoked
        except JobDeleted as exc:
            outcome = type(exc).__name__
        return await asyncio.wait_for(asyncio.gather(*results), 15), outcome

    done, revoked = asyncio.run(main())
    assert done == [{"x": x, "tag": "await"} for x in range(3)]
    assert revoked == "JobDeleted"


def test_bind_passes_the_job_context(kickq, worker_process):
    worker_process(app=APP)
    result = whoami.apply_async((5,), {"tag": "bound"})
    assert result.get(timeout=15) == {"id": result.id, "name": "taskapp.whoami", "run": 1,
                                      "data": {"args": [5], "kwargs": {"tag": "bound"}},
                                      "x": 5, "tag": "bound"}
    # task_id= is the job id, and makes the call idempotent
    first = whoami.apply_async((6,), task_id=f"whoami-{NS}")
    second = whoami.apply_async((7,), task_id=f"whoami-{NS}")
    assert first.id == second.id == f"whoami-{NS}"
    assert second.get(timeout=15)["x"] == 6
    assert kickq.stats("taskapp.whoami").total.created == 2


def test_arguments_that_are_not_json_raise_invalid_job_data_and_write_nothing(kickq, r):
    assert namespace_keys(r) == []
    for call in (lambda: record_kickq.delay(object()),
                 lambda: record_kickq.delay(1, tag={"a", "set"}),
                 lambda: record_kickq.apply_async((float("nan"),)),
                 lambda: whoami.apply_async((b"bytes",), countdown=5)):
        with pytest.raises(InvalidJobData):
            call()
    assert namespace_keys(r) == []  # no record, no message, no parked delay


def test_unsupported_celery_options_raise_and_write_nothing(kickq, r):
    for call in (lambda: record_kickq.apply_async((1,), queue="other"),
                 lambda: record_kickq.apply_async((1,), link=record_kickq),
                 lambda: record_kickq.apply_async((1,), countdown=1, eta=datetime.now(timezone.utc)),
                 lambda: record_kickq.apply_async((1,), countdown=1, delay=1),
                 lambda: record_kickq.apply_async("not a list"),
                 lambda: record_kickq.apply_async((1,), ["not", "a", "mapping"])):
        with pytest.raises(InvalidJobOptions):
            call()
    for call in (lambda: record_kickq.s(1), lambda: record_kickq.si(1),
                 lambda: chain(record_kickq.s(1), record_kickq.s(2))):
        with pytest.raises(KickqError):
            call()
    with pytest.raises(InvalidJobOptions):
        kickq.task(queue="other")(lambda: None)
    with pytest.raises(InvalidJobOptions):
        kickq.task(delay=5)(lambda: None)  # a delay is per call (countdown=, eta=)
    assert namespace_keys(r) == []


def test_a_plain_call_runs_the_function_here(kickq, r):
    assert record_kickq(7, tag="plain") == {"x": 7, "tag": "plain"}
    assert entries(r, "plain")[0][:2] == [7, os.getpid()]  # in this process, not a worker
    assert record_kickq.__name__ == "record_kickq" and "kickq task" in record_kickq.__doc__
    assert whoami(3) == {"id": "", "name": "taskapp.whoami", "run": 0,
                         "data": {"args": [3], "kwargs": {}}, "x": 3, "tag": "whoami"}

    @kickq.task
    def double(x):
        return 2 * x

    # the default name: the function's module-qualified name
    assert double.name == "tests.test_tasks.test_a_plain_call_runs_the_function_here.<locals>.double"
    assert kickq.task_name(double.name) in kickq.app.tasks  # registered as a kickq handler
    assert double(4) == 8
    assert namespace_keys(r) == []  # no job
