"""Contract: the envelopes the publisher LPUSHes are the ones kombu's Redis transport would store.

``kickq_celery.publisher`` writes Celery task messages straight onto the broker's queue lists,
bypassing kombu, so it bets on kombu's internal envelope format. Here the same task message goes
through Celery's own publishing path (``app.amqp.as_task_v2`` + ``app.amqp.send_task_message``,
i.e. what ``send_task`` does, down to a kombu ``Producer.publish`` and the Redis transport's
LPUSH) onto the real Redis, and both stored envelopes are compared field by field.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from kickq_celery.publisher import Message, Publisher
from kickq_celery.testing import make_app, wait_for, worker

REDIS_URL = "redis://127.0.0.1:6379/0"
#: kickq's hard time limit is 5 s after the soft one (README, "process_timeout and Celery pools")
HARD_LIMIT_GRACE = 5
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def queue(broker: redis.Redis) -> Iterator[str]:
    """A queue (and task) name of the test's own; its list and kombu bindings removed afterwards."""
    name = f"kickq-contract-{uuid.uuid4().hex[:12]}"
    yield name
    # kombu keeps "_kombu.binding.<exchange>" (and, from 5.7, "_kombu.binding_permanent.<exchange>");
    # the exchange is named after the queue, as in Kickq.queue()
    broker.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")


@pytest.fixture
def app() -> Iterator[Celery]:
    # no remote control: an in-process worker would otherwise join the shared pidbox keys
    app = make_app(REDIS_URL, worker_enable_remote_control=False)
    yield app
    app.close()


LABEL = "('resize', {\"img\":7})"


def _kombu_envelope(app: Celery, broker: redis.Redis, queue: str, job_id: str, attempt: int,
                    countdown: float, process_timeout: float | None,
                    more: list[list[Any]] | None = None) -> dict[str, Any]:
    """The envelope Celery/kombu store for the same task, read back from the queue's list
    (``more``: a chunk's other jobs, a third arg)."""
    limits: dict[str, Any] = {}
    if process_timeout:
        limits = {"soft_time_limit": process_timeout, "time_limit": process_timeout + HARD_LIMIT_GRACE}
    # how a kickq message shows its job in Flower and `celery inspect` (Celery's own fields)
    kwargs: dict[str, Any] = {"job_id": job_id, "attempt": attempt}
    args: tuple[Any, ...] = (job_id, attempt)
    if more:
        kwargs["more"], args = len(more), (job_id, attempt, more)
    shown = {"argsrepr": LABEL, "kwargsrepr": repr(kwargs)}
    message = app.amqp.as_task_v2(job_id, queue, args=args, ignore_result=True,
                                  countdown=countdown or None, retries=attempt - 1, **shown, **limits)
    with app.producer_or_acquire() as producer:
        app.amqp.send_task_message(producer, queue, message,
                                   queue=Queue(queue, Exchange(queue), routing_key=queue))
    stored = broker.lrange(queue, 0, -1)
    assert len(stored) == 1, "kombu stores a priority-0 message on the list named after the queue"
    return json.loads(stored[0])  # type: ignore[no-any-return]


def _normalized(envelope: dict[str, Any]) -> dict[str, Any]:
    """A copy with the body decoded and the volatile fields reduced to their shape."""
    env = json.loads(json.dumps(envelope))
    props, headers = env.get("properties", {}), env.get("headers", {})
    if props.get("body_encoding") == "base64":
        env["body"] = base64.b64decode(env["body"]).decode()
    env["body"] = json.loads(env["body"])
    # Celery reads the embed's callbacks, errbacks, chain and chord with .get: a missing key is None
    if isinstance(env["body"], list) and len(env["body"]) == 3 and isinstance(env["body"][2], dict):
        env["body"][2] = {key: value for key, value in env["body"][2].items() if value is not None}
    # volatile: a fresh uuid per message; the worker's ack uses it, so it must still be a uuid string
    if "delivery_tag" in props:
        tag = props["delivery_tag"]
        props["delivery_tag"] = "<uuid>" if isinstance(tag, str) and _UUID.fullmatch(tag) else tag
    # volatile: a time; None vs a string and its ISO format (every digit as 9) must still agree
    if isinstance(headers.get("eta"), str):
        headers["eta"] = re.sub(r"\d", "9", headers["eta"])
    return env


def _differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Every field where the two differ (in value or JSON type), as readable lines."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        lines: list[str] = []
        for key in sorted(set(ours) | set(theirs)):
            where = f"{path}.{key}" if path else key
            if key not in ours:
                lines.append(f"{where}: missing in ours, kombu has {theirs[key]!r}")
            elif key not in theirs:
                lines.append(f"{where}: ours has {ours[key]!r}, missing in kombu's")
            else:
                lines += _differences(ours[key], theirs[key], where)
        return lines
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [line for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                for line in _differences(a, b, f"{path}[{i}]")]
    if type(ours) is not type(theirs) or ours != theirs:
        return [f"{path}: ours {ours!r} != kombu's {theirs!r}"]
    return []


@pytest.mark.parametrize(("countdown", "process_timeout"), [
    pytest.param(0, None, id="plain"),
    pytest.param(30, None, id="countdown"),
    pytest.param(0, 60, id="process_timeout"),
    pytest.param(12.5, 7.5, id="both-float"),
])
def test_publisher_envelope_matches_kombu(app: Celery, broker: redis.Redis, queue: str,
                                          countdown: float, process_timeout: float | None) -> None:
    job_id, attempt = str(uuid.uuid4()), 3
    theirs = _kombu_envelope(app, broker, queue, job_id, attempt, countdown, process_timeout)
    # pushed as Publisher.push does it, onto the same list kombu just wrote to
    [encoded] = Publisher(app, broker).encoded(queue, queue, process_timeout,
                                               [Message(job_id, attempt, countdown, LABEL)])
    broker.lpush(queue, encoded)
    stored = broker.lrange(queue, 0, -1)
    assert stored[0].decode() == encoded
    ours = json.loads(stored[0])

    assert sorted(ours) == sorted(theirs)
    differences = _differences(_normalized(ours), _normalized(theirs))
    assert not differences, "\n".join(differences)
    # sanity: the comparison saw the fields this test is about
    headers = ours["headers"]
    assert headers["timelimit"] == ([process_timeout + HARD_LIMIT_GRACE, process_timeout]
                                    if process_timeout else [None, None])
    assert (headers["eta"] is None) == (countdown == 0)
    if countdown:  # both etas are about now + countdown, in UTC
        etas = [datetime.fromisoformat(env["headers"]["eta"]) for env in (ours, theirs)]
        assert [eta.utcoffset() for eta in etas] == [timedelta(0), timedelta(0)]
        assert abs((etas[0] - etas[1]).total_seconds()) < 2
        assert abs((etas[0] - datetime.now(timezone.utc)).total_seconds() - countdown) < 2
    assert ours["properties"]["delivery_tag"] != theirs["properties"]["delivery_tag"]


def test_chunk_envelope_matches_kombu(app: Celery, broker: redis.Redis, queue: str) -> None:
    """A chunk's message: the other jobs' [id, attempt] pairs as a third arg, and no time limit
    (each job's process_timeout is kept by the task: see worker/task.py)."""
    job_id, more = str(uuid.uuid4()), [[str(uuid.uuid4()), 1], [str(uuid.uuid4()), 2]]
    theirs = _kombu_envelope(app, broker, queue, job_id, 1, 0, None, more)
    [encoded] = Publisher(app, broker).encoded(
        queue, queue, 30, [Message(job_id, 1, 0, LABEL, tuple((i, a) for i, a in more))])
    ours = json.loads(encoded)
    differences = _differences(_normalized(ours), _normalized(theirs))
    assert not differences, "\n".join(differences)
    assert ours["headers"]["timelimit"] == [None, None]


def test_pushed_envelopes_run_on_a_real_worker(app: Celery, broker: redis.Redis, queue: str) -> None:
    runs: list[tuple[Any, ...]] = []

    @app.task(name=queue, bind=True)
    def handler(self: Any, job_id: str, attempt: int) -> None:
        req = self.request
        runs.append((job_id, attempt, req.id, req.eta, tuple(req.timelimit or ()),
                     req.delivery_info.get("routing_key"), datetime.now(timezone.utc)))

    # on this shared Redis the worker must not restore other users' stale messages from kombu's
    # shared "unacked" hash (it restores those older than the visibility timeout)
    app.conf.broker_transport_options = {"visibility_timeout": 10**9}
    now, later = str(uuid.uuid4()), str(uuid.uuid4())
    pub = Publisher(app, broker)
    broker.lpush(queue, *pub.encoded(queue, queue, None, [Message(now, 1)]),
                 *pub.encoded(queue, queue, 20, [Message(later, 2, countdown=0.5)]))
    with worker(app, pool="solo", concurrency=1, queues=[queue]):
        wait_for(lambda: len(runs) == 2, 8, message="both messages to run")
    assert not broker.llen(queue)
    by_id = {run[0]: run for run in runs}
    assert by_id[now][:6] == (now, 1, now, None, (None, None), queue)
    assert by_id[later][:3] == (later, 2, later)
    assert by_id[later][4:6] == ((20 + HARD_LIMIT_GRACE, 20), queue)
    # the worker parsed the eta and held the message until then
    assert by_id[later][6] >= datetime.fromisoformat(str(by_id[later][3])) - timedelta(seconds=0.05)
