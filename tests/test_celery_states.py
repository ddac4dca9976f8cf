"""What Celery sees of a kickq run: its signals and logs match the run (a failure is a failure,
a retry a retry, a message that starts no run is ignored), and a failed run keeps its traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals

from kickq_celery import Kickq
from kickq_celery.plan import Message
from kickq_celery.testing import wait_for


class Seen:
    """The task signals Celery sent, per job id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, Any]] = []

    def add(self, kind: str, task_id: str, detail: Any) -> None:
        with self.lock:
            self.events.append((kind, task_id, detail))

    def of(self, task_id: str) -> list[str]:
        with self.lock:
            return [kind for kind, each, _ in self.events if each == task_id]

    def detail(self, kind: str, task_id: str) -> Any:
        with self.lock:
            return next(d for k, each, d in self.events if k == kind and each == task_id)


@pytest.fixture
def seen() -> Iterator[Seen]:
    found = Seen()

    def success(sender: Any, result: Any, **_: Any) -> None:
        found.add("success", sender.request.id, result)

    def failure(sender: Any, task_id: str, exception: BaseException, traceback: Any, einfo: Any,
                **_: Any) -> None:
        found.add("failure", task_id, (exception, str(einfo)))

    def retry(sender: Any, request: Any, reason: Any, **_: Any) -> None:
        found.add("retry", request.id, reason)

    handlers = [(signals.task_success, success), (signals.task_failure, failure),
                (signals.task_retry, retry)]
    for signal, handler in handlers:
        signal.connect(handler, weak=False)
    yield found
    for signal, handler in handlers:
        signal.disconnect(handler)


class Boom(Exception):
    pass


def test_success_failure_and_retry_are_what_celery_reports(kickq: Kickq, kickq_worker: Any, seen: Seen,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    @kickq.process("outcome")
    def outcome(job: Any) -> Any:
        if job.data == "fail" or (job.data == "flaky" and job.run == 1):
            raise Boom(f"run {job.run} of {job.data}")
        return {"ran": job.data}

    kickq_worker()
    with caplog.at_level(logging.INFO):
        ok = kickq.create("outcome", "ok")
        failed = kickq.create("outcome", "fail", retry=True, retry_count=1, retry_interval=0)
        flaky = kickq.create("outcome", "flaky", retry=True, retry_count=2, retry_interval=0)
        wait_for(lambda: all(kickq.get(j.id).complete for j in (ok, failed, flaky)), 20, 0.05, "the jobs")
        wait_for(lambda: len(seen.of(failed.id)) == 2 and len(seen.of(flaky.id)) == 2, 5, 0.05,
                 "the signals")
    assert seen.of(ok.id) == ["success"] and seen.detail("success", ok.id) == {"ran": "ok"}
    # a failed run that runs again is a retry; only the last one is a failure (in either order:
    # the next run may end on another thread before the first one's Retry reaches Celery)
    assert sorted(seen.of(failed.id)) == ["failure", "retry"]
    assert sorted(seen.of(flaky.id)) == ["retry", "success"]
    assert str(seen.detail("retry", failed.id).exc) == "run 1 of fail"  # the handler's own error
    exception, einfo = seen.detail("failure", failed.id)
    assert isinstance(exception, Boom) and str(exception) == "run 2 of fail"
    assert "raise Boom" in einfo  # the handler's own traceback
    # Celery logs the failure once, with its traceback; kickq adds no line of its own
    failures = [r for r in caplog.records if failed.id in r.getMessage() and r.levelno >= logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info is not None

    record = kickq.get(failed.id)
    assert [run.state for run in record.runs] == ["fail", "fail"]
    for run in record.runs:
        assert run.traceback and "raise Boom" in run.traceback and run.traceback.rstrip().endswith(
            f"Boom: run {run.number} of fail")
    assert kickq.get(ok.id).runs[0].traceback is None


def test_a_message_that_starts_no_run_is_ignored_not_a_success(kickq: Kickq, kickq_worker: Any,
                                                               seen: Seen) -> None:
    @kickq.process("once")
    def once(job: Any) -> Any:
        return job.data

    kickq_worker()
    job = kickq.create("once", 1)
    wait_for(lambda: kickq.get(job.id).complete, 10, 0.05, "the job")
    # the same message again (a duplicate): the run guard drops it, and Celery reports no success
    kickq.publisher.publish(kickq.queue("once"), kickq.task_name("once"), None, [Message(job.id, 1)])
    wait_for(lambda: kickq.redis.llen(kickq.task_name("once")) == 0, 10, 0.05, "the duplicate consumed")
    later = kickq.create("once", 2)  # consumed after the duplicate
    wait_for(lambda: seen.of(later.id) == ["success"], 10, 0.05, "a later job")
    assert seen.of(job.id) == ["success"]


def test_kickq_get_shows_the_last_traceback(kickq: Kickq, kickq_worker: Any, kickq_redis_url: str,
                                            kickq_namespace: str) -> None:
    @kickq.process("broken")
    def broken(job: Any) -> Any:
        raise Boom("no luck")

    kickq_worker()
    job = kickq.create("broken", None)
    wait_for(lambda: kickq.get(job.id).complete, 10, 0.05, "the job")
    out = subprocess.run([sys.executable, "-m", "kickq_celery.cli", "--redis", kickq_redis_url,
                          "--namespace", kickq_namespace, "get", job.id],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "traceback of run 1:" in out and 'raise Boom("no luck")' in out
    assert out.rstrip().endswith("Boom: no luck")
