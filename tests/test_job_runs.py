"""What a handler can do with its run, under real `celery worker` subprocesses
(tests/workerapp.py, handlers ``control_*``): ``job.progress(value)`` (seen by ``kq.get`` and
``kickq get``, refused to a run that was reaped), ``kq.delete(id, terminate=True)`` (the prefork
handler is interrupted, a threads handler sees ``job.deleted``; no retry, waiters get JobDeleted)
and ``job.deleted`` on a plain delete of a running job (the run is not interrupted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kickq_celery import JobDeleted, Kickq
from kickq_celery.testing import wait_for
from tests.conftest import ROOT, gone

#: the workerapp's default lock_timeout (KICKQ_TEST_LOCK_TIMEOUT): the heartbeat beats every third of it
LOCK_TIMEOUT = 3.0
#: what a stop or a seen delete may take beyond lock_timeout (a loaded machine, the handler's own steps)
SLACK = 1.0


def marks(kq: Kickq, ns: str, job_id: str) -> list[str]:
    """What the control_* handlers recorded for this job (see _control_record in workerapp.py)."""
    return [x.decode() for x in kq.redis.lrange(f"test:{ns}:control:{job_id}", 0, -1)]


def started(kq: Kickq, ns: str, job_id: str) -> list[tuple[int, int]]:
    """(run, pool process pid) of each run of the job that started its handler."""
    return [(int(run), int(pid)) for mark in marks(kq, ns, job_id)
            if mark.startswith("started:") for _, run, pid in [mark.split(":")]]


def go(kq: Kickq, ns: str, job_id: str, run: int | None = None) -> None:
    """Let a waiting control_paused (``run``) or control_watch handler go on."""
    kq.redis.set(f"test:{ns}:control:go:{job_id}" + ("" if run is None else f":{run}"), 1)


def log_of(worker) -> str:
    return worker.log.read_text(errors="replace")


def celery_outcome(kq: Kickq, worker, name: str, job_id: str) -> str:
    """How the job's one Celery task ended, by the worker's log: ignored, succeeded, raised, retry..."""
    task = f"{kq.task_name(name)}[{job_id}] "
    ends = ("ignored", "succeeded", "raised", "retry", "failed")

    def ended() -> list[str]:
        return [line.split(task, 1)[1].split()[0] for line in log_of(worker).splitlines()
                if task in line and line.split(task, 1)[1].startswith(ends)]
    found = wait_for(ended, 10, 0.1, f"{task}to end")
    assert len(found) == 1, found
    return found[0].rstrip(":")


def run_after(kq: Kickq, ns: str, name: str, data: object, done: str) -> int:
    """Create a job and wait (bounded) for its handler to record ``done``; the pid that ran it."""
    job = kq.create(name, data)
    wait_for(lambda: done in marks(kq, ns, job.id), 15, 0.05, "a job created after it to run")
    return started(kq, ns, job.id)[0][1]


def assert_not_retried(kq: Kickq, ns: str, name: str, job_id: str) -> None:
    """One run only, none retried; the record is gone (a retry would need it)."""
    assert gone(kq, job_id)
    assert [run for run, _ in started(kq, ns, job_id)] == [1]
    assert kq.stats(name)[name].retried == 0


@pytest.fixture
def cli(kickq_redis_url, kickq_namespace):
    """Run `kickq --redis URL --namespace NS <args>`; its stdout (it must succeed)."""
    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "kickq_celery.cli", "--redis", kickq_redis_url,
                              "--namespace", kickq_namespace, *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout
    return run


# --- progress ---------------------------------------------------------------------------


def test_progress_is_seen_while_the_job_runs_and_by_kickq_get(kickq, kickq_namespace, worker_process, cli):
    worker_process(concurrency=1)
    job = kickq.create("control_progress", {"count": 5, "pause": 0.3})
    seen: list[object] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        record = kickq.get(job.id)
        if not seen or seen[-1] != record.progress:
            seen.append(record.progress)
        if record.complete:
            break
        time.sleep(0.02)
    assert record.state == "success" and record.result == "done"
    assert record.progress == 5
    values = [v for v in seen if v is not None]
    assert values == sorted(values) and set(values) <= {1, 2, 3, 4, 5}, seen
    assert len(values) >= 3, seen  # seen while it ran, not only at the end
    assert seen.index(values[0]) <= 1  # nothing but "none yet" before the first value
    # every call recorded (True); the non-JSON one raised InvalidJobData and recorded nothing
    assert marks(kickq, kickq_namespace, job.id) == ["invalid", *(f"{i}:True" for i in range(1, 6))]

    as_json = json.loads(cli("get", job.id, "--json"))
    assert as_json["progress"] == 5 and as_json["state"] == "success"
    table = cli("get", job.id)
    fields = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[-1].strip()
              for line in table.splitlines() if line.strip()}
    assert fields["progress"] == "5", table
    assert fields["id"] == job.id


def test_a_reaped_run_cannot_record_progress(kickq, kickq_namespace, worker_process):
    """The pool process of run 1 is SIGSTOPped: its heartbeat stops, the lock (1 s) lapses, the
    worker's reaper (its main process, not stopped) makes run 1 a ghost, and run 2 starts in the
    other pool process. SIGCONTed, run 1's progress() returns False and changes nothing."""
    ns = kickq_namespace
    worker_process(concurrency=2, lock_timeout=1)
    job = kickq.create("control_paused", None, ghost_retry=True, ghost_times=1, ghost_interval=0)
    (_, pid), = wait_for(lambda: started(kickq, ns, job.id), 15, 0.05, "run 1 to start")
    assert kickq.get(job.id).progress == {"run": 1}
    os.kill(pid, signal.SIGSTOP)
    try:
        runs = wait_for(lambda: len(s := started(kickq, ns, job.id)) == 2 and s, 10, 0.05,
                        "run 1 to be reaped and run 2 to start")
        assert runs[1][0] == 2 and runs[1][1] != pid
        record = kickq.get(job.id)
        assert record.state == "processing" and [r.state for r in record.runs] == ["ghost"]
        assert "heartbeat lock expired" in (record.runs[0].error or "")
        assert record.progress == {"run": 2}
        go(kickq, ns, job.id, 1)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: any(m.startswith("after:1:") for m in marks(kickq, ns, job.id)), 10, 0.05,
             "run 1 to try progress() again")
    assert "after:1:False" in marks(kickq, ns, job.id)
    assert kickq.get(job.id).progress == {"run": 2}  # unchanged
    assert kickq.get(job.id).state == "processing"  # run 2 still holds the job
    go(kickq, ns, job.id, 2)
    record = wait_for(lambda: (r := kickq.get(job.id)).complete and r, 10, 0.05, "run 2 to finish")
    assert record.state == "success" and record.result == 2
    assert record.progress == {"run": 2, "after": True}
    assert marks(kickq, ns, job.id).count("after:2:True") == 1
    assert [m for m in marks(kickq, ns, job.id) if m.startswith("progress:")] == ["progress:1:True",
                                                                                   "progress:2:True"]


# --- delete(terminate=True) -------------------------------------------------------------


def _delete_with_terminate(kickq, job) -> float:  # type: ignore[no-untyped-def]
    """Delete running ``job`` with terminate: its waiter gets JobDeleted at once, not when the run
    ends. Returns when it was asked (time.monotonic())."""
    asked = time.monotonic()
    assert kickq.delete(job.id, terminate=True) is True
    with pytest.raises(JobDeleted):
        job.promise.wait()
    assert time.monotonic() - asked < 1.0
    return asked


def test_terminate_interrupts_a_prefork_run(kickq, kickq_namespace, worker_process):
    ns = kickq_namespace
    worker = worker_process(concurrency=1)
    job = kickq.create("control_sleeper", 60, tombstone=True, tombstone_timeout=60,
                       retry=True, retry_count=3, retry_interval=0)
    (_, pid), = wait_for(lambda: started(kickq, ns, job.id), 15, 0.05, "the run to start")
    asked = _delete_with_terminate(kickq, job)
    wait_for(lambda: "finally" in marks(kickq, ns, job.id), LOCK_TIMEOUT + SLACK, 0.02,
             "the handler to be interrupted")
    took = time.monotonic() - asked
    assert took < LOCK_TIMEOUT + SLACK, took
    assert marks(kickq, ns, job.id)[1:] == ["stopped", "finally"]  # interrupted, never completed
    wait_for(lambda: gone(kickq, job.id), 5, 0.05, "the record to go")
    assert kickq.delete(job.id) is False
    assert celery_outcome(kickq, worker, "control_sleeper", job.id) == "ignored"
    assert "deleted with terminate: stopping its run" in log_of(worker)
    # the pool process (the only one) lives on and is free: the next job runs there at once
    assert run_after(kickq, ns, "control_sleeper", 0.05, "completed") == pid
    assert_not_retried(kickq, ns, "control_sleeper", job.id)


def _terminate_on_threads(kickq, ns, worker_process):
    worker = worker_process(concurrency=2, pool="threads")
    job = kickq.create("control_watch", {"stop": True, "for": 30}, tombstone=True, tombstone_timeout=60,
                       retry=True, retry_count=3, retry_interval=0)
    wait_for(lambda: started(kickq, ns, job.id), 15, 0.05, "the run to start")
    asked = _delete_with_terminate(kickq, job)
    wait_for(lambda: "deleted" in marks(kickq, ns, job.id), LOCK_TIMEOUT + SLACK, 0.02,
             "the handler to see job.deleted")
    took = time.monotonic() - asked
    assert took < LOCK_TIMEOUT + SLACK, took
    wait_for(lambda: gone(kickq, job.id), 5, 0.05, "the record to go")
    # a thread is not interrupted: it saw job.deleted and returned (its result is not kept)
    assert marks(kickq, ns, job.id)[1:] == ["deleted", "progress:False"]
    run_after(kickq, ns, "control_watch", {"stop": True, "for": 0.1}, "completed")
    assert_not_retried(kickq, ns, "control_watch", job.id)
    return worker, job


def test_terminate_on_threads_sets_job_deleted_and_ends_the_celery_task_as_ignored(
        kickq, kickq_namespace, worker_process):
    worker, job = _terminate_on_threads(kickq, kickq_namespace, worker_process)
    assert celery_outcome(kickq, worker, "control_watch", job.id) == "ignored"


# --- delete without terminate -----------------------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_deleting_a_running_job_sets_job_deleted_without_interrupting_it(kickq, kickq_namespace,
                                                                        worker_process, pool):
    ns = kickq_namespace
    worker = worker_process(concurrency=1, pool=pool)
    job = kickq.create("control_watch", {"for": 30}, tombstone=True, tombstone_timeout=60,
                       retry=True, retry_count=3, retry_interval=0)
    wait_for(lambda: started(kickq, ns, job.id), 15, 0.05, "the run to start")
    asked = time.monotonic()
    assert kickq.delete(job.id) is True
    with pytest.raises(JobDeleted):
        job.promise.wait()
    wait_for(lambda: "deleted" in marks(kickq, ns, job.id), LOCK_TIMEOUT + SLACK, 0.02,
             "the handler to see job.deleted")
    took = time.monotonic() - asked
    assert took < LOCK_TIMEOUT + SLACK, took
    # it goes on running: not stopped, the record kept until the run ends
    time.sleep(LOCK_TIMEOUT / 3 + 0.5)  # another heartbeat passes: it does not stop it either
    record = kickq.get(job.id)
    assert record.state == "processing"
    assert record.progress == "running"  # a deleted job's run records no progress
    assert marks(kickq, ns, job.id)[1:] == ["deleted", "progress:False"]
    go(kickq, ns, job.id)
    wait_for(lambda: "completed" in marks(kickq, ns, job.id), 10, 0.05, "the handler to complete")
    wait_for(lambda: gone(kickq, job.id), 5, 0.05, "the record to go after the run")
    assert "stopped" not in marks(kickq, ns, job.id)
    assert "stopping its run" not in log_of(worker)
    run_after(kickq, ns, "control_watch", {"stop": True, "for": 0.1}, "completed")
    assert_not_retried(kickq, ns, "control_watch", job.id)
