"""Flower (the real one, from PyPI) shows each kickq run as what it was: a success as SUCCESS
with the job's name and data as its args, a final failure as FAILURE with its traceback, a
failed run that runs again as RETRY, and a message that starts no run (a job waiting for its
``max_jobs_num`` slot) never as a SUCCESS before the job's run has ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kickq_celery import Kickq
from kickq_celery.testing import stop_process_group, wait_for
from tests.conftest import ROOT, free_port

#: the binding table of Celery's event exchange (kombu's Redis transport)
EVENT_BINDINGS = "_kombu.binding.celeryev"


class Flower:
    """A `celery -A tests.workerapp flower` subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._out = open(log, "ab")
        cmd = [sys.executable, "-m", "celery", "-A", "tests.workerapp", "flower",
               f"--port={self.port}", "--address=127.0.0.1"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""  # not listening (yet)

    def task(self, task_id: str) -> dict[str, Any] | None:
        """What Flower knows of a task (from the events it captured), None while it knows nothing."""
        status, body = self.get(f"/api/task/info/{task_id}")
        if status == 404:
            return None
        assert status == 200, (status, body)
        return json.loads(body)  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the API answers and the event receiver captures events (a worker's heartbeat)."""
        def ready() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            status, metrics = self.get("/metrics")
            return status == 200 and "flower_worker_online{" in metrics

        wait_for(ready, timeout, 0.1, "Flower to capture events")
        status, body = self.get("/api/tasks?limit=1")
        assert status == 200, (status, body)  # FLOWER_UNAUTHENTICATED_API opens the API

    def stop(self) -> None:
        stop_process_group(self.proc, 10)
        self._out.close()


class Watch:
    """Polls Flower for a few tasks in a thread; keeps each task's states in the order seen."""

    def __init__(self, flower: Flower, interval: float = 0.03) -> None:
        self.flower = flower
        self.interval = interval
        self.ids: list[str] = []
        self.seen: dict[str, list[tuple[float, str]]] = {}  # id -> [(time.time(), state)]
        self.last: dict[str, dict[str, Any]] = {}
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, *task_ids: str) -> None:
        with self.lock:
            self.ids.extend(task_ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                ids = list(self.ids)
            for task_id in ids:
                try:
                    info = self.flower.task(task_id)
                except BaseException as exc:  # shown by the test
                    self.errors.append(exc)
                    return
                if info is None:
                    continue
                with self.lock:
                    states = self.seen.setdefault(task_id, [])
                    if not states or states[-1][1] != info["state"]:
                        states.append((time.time(), info["state"]))
                    self.last[task_id] = info
            self._stop.wait(self.interval)

    def states(self, task_id: str) -> list[str]:
        with self.lock:
            return [state for _, state in self.seen.get(task_id, [])]

    def timeline(self, task_id: str) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.seen.get(task_id, []))

    def first(self, task_id: str, state: str) -> float | None:
        with self.lock:
            return next((at for at, each in self.seen.get(task_id, []) if each == state), None)

    def info(self, task_id: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.last.get(task_id, {}))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def show(self, jobs: dict[str, Any]) -> None:
        """Print the states seen of each job, in seconds from the first one seen."""
        with self.lock:
            seen = {name: self.seen.get(job.id, []) for name, job in jobs.items()}
        start = min((at for states in seen.values() for at, _ in states), default=0.0)
        for name, states in seen.items():
            print(f"Flower showed {name} ({jobs[name].id}):",
                  [(round(at - start, 2), state) for at, state in states])
        if any(not states or states[-1][1] not in ("SUCCESS", "FAILURE") for states in seen.values()):
            print("Flower's log:", self.flower.log.read_text()[-3000:])


@pytest.fixture
def flower_env(kickq_namespace: str, kickq_redis_url: str,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of the worker and of Flower: the worker sends task events (-E, read by
    celery's CLI from CELERY_WORKER_TASK_EVENTS), and both use a control exchange of the test's
    own, so that Flower's periodic `enable_events` and `inspect` reach no other test's worker."""
    monkeypatch.setenv("CELERY_WORKER_TASK_EVENTS", "1")  # the worker_process fixture copies os.environ
    return {**os.environ, "KICKQ_TEST_NS": kickq_namespace, "KICKQ_TEST_REDIS_URL": kickq_redis_url,
            "KICKQ_TEST_CONTROL_EXCHANGE": kickq_namespace, "PYTHONPATH": str(ROOT),
            "FLOWER_UNAUTHENTICATED_API": "true"}


@pytest.fixture
def flower(tmp_path: Path, flower_env: dict[str, str], kickq: Kickq) -> Iterator[Flower]:
    namespace = kickq.options["redis_namespace"]
    receivers_before = kickq.redis.smembers(EVENT_BINDINGS)
    server = Flower(flower_env, tmp_path / "flower.log")
    try:
        yield server
    finally:
        server.stop()
        # what purge_namespace leaves: the reply exchange of the test's control exchange, both
        # exchanges' kombu deadlines, and Flower's event queue (kombu keeps its binding after a
        # stop; events reach the receivers through Redis pub/sub, not through this table)
        kickq.redis.delete(f"_kombu.binding.reply.{namespace}.pidbox",
                           f"_kombu.binding_permanent.reply.{namespace}.pidbox")
        kickq.redis.zrem("_kombu.binding_deadlines", f"{namespace}.pidbox", f"reply.{namespace}.pidbox")
        receivers = kickq.redis.smembers(EVENT_BINDINGS) - receivers_before
        flowers = [member for member in receivers if b"celeryev." in member]
        if flowers:
            kickq.redis.srem(EVENT_BINDINGS, *flowers)


def test_flower_shows_each_run_as_what_it_was(kickq: Kickq, kickq_namespace: str, flower: Flower,
                                              worker_process: Callable[..., Any]) -> None:
    worker_process(concurrency=2, max_jobs=1, control_exchange=kickq_namespace)  # "sleep": one at a time
    flower.wait_ready()
    watch = Watch(flower)
    names: dict[str, Any] = {}
    try:
        names["ok"] = ok = kickq.create("record", {"n": 1, "text": "ok"})
        names["failed"] = failed = kickq.create("fail_first", "for good")  # no retry: run 1 fails for good
        names["flaky"] = flaky = kickq.create("fail_first", "flaky", retry=True, retry_count=1,
                                              retry_interval=1)
        # max_jobs_num=1: one runs, the other waits for the slot
        names["first"], names["second"] = kickq.create_many("sleep", [1.5, 1.5])
        jobs = list(names.values())
        watch.add(*(job.id for job in jobs))

        def finished_in_flower() -> bool:
            return all(watch.states(job.id)[-1:] in (["SUCCESS"], ["FAILURE"]) for job in jobs)

        wait_for(lambda: all(kickq.get(job.id).complete for job in jobs), 20, 0.05, "the jobs")
        wait_for(lambda: finished_in_flower() or watch.errors, 10, 0.05, "Flower to see the jobs end")
    finally:
        watch.stop()
        watch.show(names)  # printed when the test fails (and with -s)
    assert not watch.errors, watch.errors
    states = {name: watch.states(job.id) for name, job in names.items()}

    task = f"{kickq_namespace}.%s"
    # a success: SUCCESS, shown as the job's name and data, its id and attempt
    info = watch.info(ok.id)
    assert states["ok"][-1] == "SUCCESS" and "FAILURE" not in states["ok"] and "RETRY" not in states["ok"]
    assert info["name"] == task % "record" and info["uuid"] == ok.id
    assert info["args"] == "('record', {\"n\":1,\"text\":\"ok\"})"
    assert info["kwargs"] == repr({"job_id": ok.id, "attempt": 1})
    assert info["result"] == repr({"n": 1, "text": "ok"})
    assert info["exception"] is None and info["traceback"] is None

    # a final failure: FAILURE, with the handler's exception and traceback
    info = watch.info(failed.id)
    assert states["failed"][-1] == "FAILURE" and "SUCCESS" not in states["failed"]
    assert "RETRY" not in states["failed"]
    assert info["name"] == task % "fail_first" and info["args"] == "('fail_first', \"for good\")"
    assert info["exception"] == "RuntimeError('first run fails on purpose')"
    assert "raise RuntimeError" in info["traceback"] and "first run fails on purpose" in info["traceback"]
    assert kickq.get(failed.id).state == "fail"

    # a failed run that runs again: RETRY (its exception shown), then SUCCESS with run 2's result
    info = watch.info(flaky.id)
    assert "RETRY" in states["flaky"] and states["flaky"][-1] == "SUCCESS", states["flaky"]
    assert states["flaky"].index("RETRY") < states["flaky"].index("SUCCESS")
    assert "FAILURE" not in states["flaky"]
    assert info["retried"] is not None and info["retried"] < info["succeeded"]
    assert info["result"] == "2"  # the handler returns job.run
    assert info["kwargs"] == repr({"job_id": flaky.id, "attempt": 2})  # the message of run 2
    assert [run.state for run in kickq.get(flaky.id).runs] == ["fail", "success"]

    # max_jobs_num=1: the job that waited for the slot shows no SUCCESS before its own run ended
    records = [kickq.get(names[name].id) for name in ("first", "second")]
    ran_first, waited = sorted(records, key=lambda record: record.runs[0].started_at)
    assert [len(record.runs) for record in (ran_first, waited)] == [1, 1]  # the Ignored message: no run
    first_ended = ran_first.runs[0].started_at.timestamp() + ran_first.runs[0].duration
    waited_started = waited.runs[0].started_at.timestamp()
    waited_ended = waited_started + waited.runs[0].duration
    assert waited_started >= first_ended - 0.05  # one at a time
    timeline = watch.timeline(waited.id)
    print(f"the waiting job {waited.id}: {[(round(at - first_ended, 2), s) for at, s in timeline]} "
          f"(s from the end of the first one's run); its run started {waited_started - first_ended:.3f} s "
          "after that")
    waited_states = [state for _, state in timeline]
    assert waited_states[-1] == "SUCCESS" and waited_states.count("SUCCESS") == 1, waited_states
    assert "FAILURE" not in waited_states and "RETRY" not in waited_states
    shown_success = watch.first(waited.id, "SUCCESS")
    assert shown_success is not None and shown_success >= waited_ended - 0.05 > first_ended
    # Flower saw it while it waited (its first message was taken, then Ignored): no SUCCESS then
    while_waiting = [state for at, state in timeline if at < first_ended]
    assert while_waiting and "SUCCESS" not in while_waiting, timeline
    info = watch.info(waited.id)
    assert info["succeeded"] >= waited_ended - 0.05
    assert info["runtime"] < waited.runs[0].duration + 0.5  # the run's own time, not the wait
    assert info["args"] == "('sleep', 1.5)" and info["result"] == "1.5"
    assert watch.states(ran_first.id)[-1] == "SUCCESS"
