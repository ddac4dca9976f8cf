"""RabbitMQ as the Celery broker while kickq's records stay in Redis.

Messages then go out through kombu producers (publisher.Publisher.publish), not
straight into Redis lists. Every queue and exchange a test declares is deleted
afterwards, so reruns start from a clean broker.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from amqp.exceptions import NotFound
from celery import Celery
from kombu import Connection, Exchange, Queue

from kickq_celery import JobNotFound, Kickq
from kickq_celery.testing import make_app, wait_for, worker

AMQP_URL = os.environ.get("KICKQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def amqp_url() -> str:
    """The RabbitMQ URL; starts a local rabbitmq-server when none answers, else skips."""
    if not _reachable(AMQP_URL):
        if shutil.which("rabbitmq-server") and "@127.0.0.1:" in AMQP_URL:
            subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=60)
            try:
                wait_for(lambda: _reachable(AMQP_URL), 60, 1.0, "rabbitmq-server to start")
            except AssertionError:
                pass
        if not _reachable(AMQP_URL):
            pytest.skip(f"RabbitMQ is not reachable at {re.sub(r':[^:@/]*@', ':***@', AMQP_URL)}")
    return AMQP_URL


def queue_depth(url: str, name: str) -> int:
    """Ready messages in a queue (passive declare: the queue must exist)."""
    with Connection(url) as conn:
        return int(conn.default_channel.queue_declare(name, passive=True).message_count)


def _exists(conn: Connection, name: str) -> bool:
    channel = conn.channel()
    try:
        channel.queue_declare(name, passive=True)
    except NotFound:  # RabbitMQ closes the channel on this
        return False
    channel.close()
    return True


@dataclass
class Rabbit:
    url: str
    namespace: str
    app: Celery
    kq: Kickq
    logs: Path
    queues: set[str] = field(default_factory=set)

    def declared(self) -> set[str]:
        """The namespace's queues: the app's, and those in the banners of worker logs."""
        names = {name for name in self.app.amqp.queues if name.startswith(f"{self.namespace}.")}
        pattern = re.compile(re.escape(self.namespace) + r"\.[\w.\-]+")
        for log in self.logs.glob("*.log"):
            names.update(pattern.findall(log.read_text(errors="replace")))
        return names | self.queues

    def cleanup(self) -> None:
        names = self.declared()
        with Connection(self.url) as conn:
            channel = conn.channel()
            for name in names:
                Queue(name, Exchange(name), routing_key=name).bind(channel).delete()
                Exchange(name).bind(channel).delete()
            channel.close()
            left = [name for name in names if _exists(conn, name)]
        assert left == [], f"queues left on RabbitMQ: {left}"


@pytest.fixture
def rabbit(amqp_url: str, kickq: Kickq, kickq_namespace: str, kickq_redis_url: str,
           tmp_path: Path) -> Iterator[Rabbit]:
    """A Celery app on RabbitMQ and a Kickq on it whose records are in the test Redis.

    Depends on ``kickq`` (same namespace) for the purge of the Redis keys afterwards.
    """
    default_queue = f"{kickq_namespace}.default"  # not Celery's shared "celery" queue
    # broker_heartbeat=0: else the in-process worker's event loop sleeps up to 10 s between
    # checks of its stop flag on an amqp connection (its only timer is the heartbeat)
    app = make_app(amqp_url, task_default_queue=default_queue, worker_enable_remote_control=False,
                   broker_heartbeat=0)
    kq = Kickq(app, redis=kickq_redis_url, redis_namespace=kickq_namespace, poll_interval=0.1,
               lock_timeout=2, delay_horizon=1)
    state = Rabbit(amqp_url, kickq_namespace, app, kq, tmp_path, {default_queue})
    yield state
    try:
        state.cleanup()
    finally:
        app.close()


def _parked(kq: Kickq) -> set[str]:
    """Ids of the jobs parked in Redis (no broker message yet)."""
    return {m.decode() for m in kq.redis.zrange(kq.keys.delayed, 0, -1)}


def _waited(kq: Kickq, job_id: str) -> float:
    record = kq.get(job_id)
    assert record.state == "success", record
    return (record.runs[0].started_at - record.created_at).total_seconds()


def test_jobs_on_rabbitmq_with_an_in_process_worker(rabbit: Rabbit) -> None:
    kq, ns = rabbit.kq, rabbit.namespace
    runs: list[str] = []

    @kq.process("double")
    def double(job):
        runs.append(job.id)
        return job.data * 2

    @kq.process("flaky")
    def flaky(job):
        runs.append(job.id)
        if job.run == 1:
            raise RuntimeError("first run fails on purpose")
        return job.run

    # no worker yet: the messages wait in RabbitMQ; Redis has the records only
    doomed = kq.create("double", 0)
    kept = kq.create("double", 1)
    # (RabbitMQ counts a published message a moment after it is sent: no publisher confirms)
    wait_for(lambda: queue_depth(rabbit.url, f"{ns}.double") == 2, 5, 0.05, "both messages in the queue")
    assert not kq.redis.exists(f"{ns}.double")
    assert kq.delete(doomed.id) is True

    with worker(rabbit.app, pool="threads", concurrency=4):
        tombstoned = kq.create("double", 21, tombstone=True)
        assert tombstoned.promise.wait().result == 42  # result backend: kickq's Redis

        soon = kq.create("double", 2, delay=0.5)  # within delay_horizon: a countdown message
        later = kq.create("double", 3, delay=1.5)  # beyond: parked in Redis, promoted by the worker
        assert (soon.state, later.state) == ("delayed", "delayed")
        parked = _parked(kq)
        assert later.id in parked and soon.id not in parked

        retried = kq.create("flaky", None, retry=True, retry_interval=0.2, tombstone=True)
        assert retried.promise.wait().result == 2
        assert [run.state for run in kq.get(retried.id).runs] == ["fail", "success"]

        wait_for(lambda: all(kq.get(j.id).complete for j in (soon, later, kept)), 15, message="the jobs")
        assert _waited(kq, soon.id) >= 0.45
        assert _waited(kq, later.id) >= 1.45
        assert kq.get(later.id).result == 6

    assert doomed.id not in runs and kept.id in runs
    with pytest.raises(JobNotFound):
        kq.get(doomed.id)
    # the deleted job's message was delivered and dropped by the run guard
    assert queue_depth(rabbit.url, f"{ns}.double") == 0


def test_jobs_on_rabbitmq_with_a_celery_worker_process(rabbit: Rabbit, worker_process) -> None:
    kq, ns = rabbit.kq, rabbit.namespace
    runs_key = f"test:{ns}:runs"

    def runs() -> list[str]:
        return [m.decode() for m in kq.redis.lrange(runs_key, 0, -1)]

    doomed = kq.create("record", "doomed")
    assert kq.delete(doomed.id) is True
    worker_process(concurrency=2, broker=rabbit.url, default_queue=f"{ns}.default")

    tombstoned = kq.create("record", {"a": [1, 2]}, tombstone=True)
    assert tombstoned.promise.wait().result == {"a": [1, 2]}

    soon = kq.create("record", "soon", delay=0.5)
    later = kq.create("record", "later", delay=1.5)
    parked = _parked(kq)
    assert later.id in parked and soon.id not in parked

    retried = kq.create("fail_first", None, retry=True, retry_interval=0.2, tombstone=True)
    assert retried.promise.wait().result == 2
    assert runs().count(retried.id) == 2

    wait_for(lambda: kq.get(soon.id).complete and kq.get(later.id).complete, 15, message="the delayed jobs")
    assert _waited(kq, soon.id) >= 0.45
    assert _waited(kq, later.id) >= 1.45
    assert kq.get(later.id).result == "later"

    assert doomed.id not in runs()
    with pytest.raises(JobNotFound):
        kq.get(doomed.id)
    assert queue_depth(rabbit.url, f"{ns}.record") == 0
