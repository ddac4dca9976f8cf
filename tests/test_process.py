"""Kickq.process: its forms, one Celery task and queue per job name, a real
`celery worker` consuming them with no -Q, what a handler sees, job records after
runs, delays, and duplicate messages running the handler once."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from kickq_celery import Kickq, Run
from kickq_celery.plan import Message
from kickq_celery.testing import make_app, purge_namespace, wait_for, worker
from tests.test_create import DATA, same


def finished(kq: Kickq, job_id: str, timeout: float = 20) -> Any:
    """Wait for the job's final state; returns its record."""
    return wait_for(lambda: (r := kq.get(job_id)).complete and r, timeout, 0.05, f"job {job_id} to finish")


def log_count(worker: Any, text: str) -> int:
    return worker.log.read_text(errors="replace").count(text)


# --- registration ------------------------------------------------------------------------


def test_process_forms_register_a_task_and_queue_per_name(kickq, kickq_namespace):
    @kickq.process("dec", max_jobs_num=3)
    def decorated(job):
        return "dec"

    def shared(job):
        return job.name

    def plain(job):
        return "plain"

    assert decorated(None) == "dec"  # the decorator returns the function itself
    kickq.process(["a", "b"], {"maxJobsNum": 10}, shared)
    kickq.process("c", plain)
    kickq.process(("d",), None, plain)

    @kickq.process("e")
    def bare(job):
        return "e"

    assert {name: limits.max_jobs_num for name, limits in kickq.processed.items()} == {
        "dec": 3, "a": 10, "b": 10, "c": None, "d": None, "e": None}
    consumed = {queue.name for queue in kickq.app.amqp.queues.consume_from.values()}
    for name, handler in (("dec", decorated), ("a", shared), ("b", shared), ("c", plain), ("e", bare)):
        task_name = f"{kickq_namespace}.{name}"
        assert kickq.task_name(name) == task_name
        task = kickq.app.tasks[task_name]
        assert task.name == task_name and task.handler is handler and task.job_name == name
        assert kickq.queue(name).name == task_name
        assert task_name in consumed  # consumed by a worker with no -Q


def test_each_form_runs_its_jobs(kickq, kickq_worker):
    seen: dict[str, Any] = {}

    @kickq.process("dec", max_jobs_num=2)
    def decorated(job):
        seen[job.id] = job.name
        return ["dec", job.data]

    def shared(job):
        seen[job.id] = job.name
        return [job.name, job.data]

    kickq.process(["a", "b"], {"maxJobsNum": 10}, shared)
    kickq.process("c", shared)
    kickq_worker()
    # the worker published the limits of max_jobs_num for every worker to see
    assert kickq.redis.hgetall(kickq.keys.limits) == {b"dec": b"2", b"a": b"10", b"b": b"10"}
    jobs = {name: kickq.create(name, i) for i, name in enumerate(["dec", "a", "b", "c"])}
    for i, (name, job) in enumerate(jobs.items()):
        record = finished(kickq, job.id)
        assert (record.state, record.success) == ("success", True)
        assert record.result == [name, i]
        assert seen[job.id] == name


def test_worker_process_consumes_every_queue_without_q(kickq, kickq_namespace, worker_process):
    """`celery -A tests.workerapp worker` (no -Q) consumes the queue of each processed name,
    each named `<ns>.<name>`."""
    record = kickq.create("record", {"r": 1})
    sleep = kickq.create("sleep", 0)
    # the messages wait in the names' own queues, named from the namespace
    assert kickq.redis.llen(f"{kickq_namespace}.record") == 1
    assert kickq.redis.llen(f"{kickq_namespace}.sleep") == 1
    worker = worker_process(concurrency=2)
    assert finished(kickq, record.id).result == {"r": 1}
    assert finished(kickq, sleep.id).state == "success"
    assert kickq.redis.lrange(f"test:{kickq_namespace}:runs", 0, -1) != []
    assert "-Q" not in worker.proc.args and "--queues" not in worker.proc.args
    assert kickq.redis.llen(f"{kickq_namespace}.record") == 0


# --- what a handler sees -----------------------------------------------------------------


def test_handler_sees_its_job_and_its_record_processing(kickq, kickq_worker):
    seen: dict[str, Any] = {}

    @kickq.process("look")
    def look(job):
        record = kickq.get(job.id)
        seen.update(job=job, record=record, thread=threading.current_thread().name)
        return "ok"

    kickq_worker()
    job = kickq.create("look", {"x": [1]})
    created = kickq.get(job.id).created_at
    finished(kickq, job.id)
    ctx, record = seen["job"], seen["record"]
    assert (ctx.id, ctx.name, ctx.data, ctx.run, ctx.runs) == (job.id, "look", {"x": [1]}, 1, ())
    assert ctx.created_at == created and ctx.created_at.utcoffset() == timedelta(0)
    assert record.state == "processing"
    assert record.runs == [] and not record.complete


def test_handler_of_a_retry_sees_the_earlier_runs(kickq, kickq_worker):
    seen: list[Any] = []

    @kickq.process("flaky")
    def flaky(job):
        seen.append(job)
        if job.run == 1:
            raise ValueError('first "run" fails \\ ünï\n')  # text the runs JSON must escape
        return job.run

    kickq_worker()
    job = kickq.create("flaky", None, retry=True, retry_interval=0)
    record = finished(kickq, job.id)
    assert [ctx.run for ctx in seen] == [1, 2]
    earlier = seen[1].runs
    assert len(earlier) == 1 and earlier[0].number == 1 and earlier[0].state == "fail"
    assert earlier[0].error == 'ValueError: first "run" fails \\ ünï\n'
    assert record.result == 2
    assert [(run.number, run.state) for run in record.runs] == [(1, "fail"), (2, "success")]
    assert record.runs[0] == earlier[0] and record.runs[0].started_at < record.runs[1].started_at


def test_data_round_trips_deep_equal(kickq, kickq_worker):
    values = [DATA, None, True, False, 0, -3, 1.0, 2.5e-8, "", "ünï 🚀", [], {}, [[{"a": [None]}]]]
    seen: dict[str, Any] = {}

    @kickq.process("echo")
    def echo(job):
        seen[job.id] = job.data
        return job.data

    kickq_worker()
    jobs = [kickq.create("echo", value, tombstone=True) for value in values]
    for job, value in zip(jobs, values, strict=True):
        response = job.promise.wait()
        assert same(seen[job.id], value), (seen[job.id], value)
        assert same(response.result, value), (response.result, value)
        record = kickq.get(job.id)
        assert same(record.data, value) and same(record.result, value)


# --- records after runs ------------------------------------------------------------------


def test_get_after_success_and_failure(kickq, kickq_worker):
    @kickq.process("outcome")
    def outcome(job):
        if job.data == "fail":
            raise RuntimeError("boom")
        return {"done": job.data}

    kickq_worker()
    ok = kickq.create("outcome", "yes")
    bad = kickq.create("outcome", "fail")
    good, failed = finished(kickq, ok.id), finished(kickq, bad.id)

    assert (good.state, good.complete, good.success, good.result, good.last_error) == (
        "success", True, True, {"done": "yes"}, None)
    assert (failed.state, failed.complete, failed.success, failed.result) == ("fail", True, False, None)
    assert failed.last_error == "RuntimeError: boom"
    for record, state in ((good, "success"), (failed, "fail")):
        [run] = record.runs
        assert isinstance(run, Run)
        assert (run.number, run.state) == (1, state)
        assert run.duration >= 0 and record.total_process_time == pytest.approx(run.duration)
        for stamp in (record.created_at, record.updated_at, record.finished_at, run.started_at):
            assert stamp is not None and stamp.utcoffset() == timedelta(0)
        assert record.created_at <= run.started_at <= record.finished_at
    assert failed.runs[0].error == "RuntimeError: boom" and good.runs[0].error is None
    # a job's one successful run is read from its start and process time: no runs JSON, whose
    # size would turn the record from a listpack into a hashtable
    assert not kickq.redis.hexists(kickq.keys.job(ok.id), "runs")
    assert kickq.redis.object("encoding", kickq.keys.job(ok.id)) == b"listpack"
    assert kickq.redis.hexists(kickq.keys.job(bad.id), "runs")


# --- delays --------------------------------------------------------------------------------


@pytest.mark.parametrize("parked", [False, True], ids=["countdown", "parked"])
def test_delayed_job_starts_no_sooner_than_its_delay(kickq, kickq_worker, parked):
    delay = 1.5
    # delays beyond the horizon wait in Redis until a worker promotes them (the default: none
    # is sent as a countdown); within it, they go out as countdown (ETA) messages
    Kickq.config(delay_horizon=0.5 if parked else 5)

    @kickq.process("later")
    def later(job):
        return kickq.get(job.id).state

    kickq_worker()
    job = kickq.create("later", None, delay=delay)
    assert job.state == "delayed"
    assert kickq.get(job.id).state == "delayed"
    if parked:
        assert kickq.redis.zscore(kickq.keys.delayed, job.id) is not None
    record = finished(kickq, job.id)
    assert record.result == "processing"
    waited = (record.runs[0].started_at - record.created_at).total_seconds()
    assert waited >= delay, waited
    assert waited < delay + 10


def test_a_parked_job_starts_promptly_at_its_due_time(kickq_redis_url, kickq_namespace):
    """The promoter sleeps until the next due time, and a create that parks a job due sooner
    wakes it: no waiting for the next poll (here 5 s apart)."""
    app = make_app(kickq_redis_url)
    kq = Kickq(app, redis=kickq_redis_url, redis_namespace=kickq_namespace, poll_interval=5)

    @kq.process("soon")
    def soon(job):
        return job.data

    try:
        with worker(app):
            time.sleep(0.3)  # the worker's loop is asleep (until its next poll, 5 s away)
            jobs = [kq.create("soon", n, delay=delay) for n, delay in enumerate((0.5, 0.2, 1.0))]
            records = [finished(kq, job.id) for job in jobs]
        lateness = [(r.runs[0].started_at - r.scheduled_for).total_seconds() for r in records]
        assert all(0 <= late < 0.15 for late in lateness), lateness
    finally:
        purge_namespace(kq)
        app.close()


def test_a_message_that_comes_early_does_not_start_the_job_early(kickq, kickq_worker):
    """Messages published ahead of a delayed job's due time (a publisher's clock ahead of
    Redis's, say): a little early, and far too early. Neither starts the job before it is due."""
    delay = 2.0

    @kickq.process("due")
    def due(job):
        return job.data

    kickq_worker()
    jobs = {early_by: kickq.create("due", early_by, delay=delay) for early_by in (0.5, delay)}
    for early_by, job in jobs.items():
        kickq.publisher.publish(kickq.queue("due"), kickq.task_name("due"), None,
                                [Message(job.id, 1, delay - early_by)])
    for job in jobs.values():
        record = finished(kickq, job.id)
        assert [run.state for run in record.runs] == ["success"]
        waited = (record.runs[0].started_at - record.created_at).total_seconds()
        assert waited >= delay, waited


# --- duplicate messages --------------------------------------------------------------------


def test_duplicate_message_runs_the_handler_once(kickq, kickq_namespace, worker_process):
    job = kickq.create("record", {"once": True})
    # the same job's message delivered again: re-published the way kickq does, and by hand
    kickq.publisher.publish(kickq.queue("record"), kickq.task_name("record"), None, [Message(job.id, 1)])
    kickq.app.send_task(kickq.task_name("record"), args=(job.id, 1), task_id=job.id,
                        queue=kickq.queue("record"))
    assert kickq.redis.llen(kickq.task_name("record")) == 3
    worker = worker_process(concurrency=3)
    record = finished(kickq, job.id)
    # wait until the worker has run the task for all three messages: one run, two ignored
    done = f"{kickq.task_name('record')}[{job.id}] succeeded"
    ignored = f"{kickq.task_name('record')}[{job.id}] ignored"
    wait_for(lambda: log_count(worker, ignored) == 2, 20, 0.1, "all three messages to be processed")
    assert log_count(worker, done) == 1
    assert kickq.redis.lrange(f"test:{kickq_namespace}:runs", 0, -1) == [job.id.encode()]
    assert len(kickq.get(job.id).runs) == 1 and record.result == {"once": True}
    assert kickq.stats("record").total.succeeded == 1
