"""Publishing the Celery messages of jobs, built once per job name.

A kickq message is an ordinary Celery (protocol 2) task message whose args
are ``(job_id, attempt)``, or ``(job_id, attempt, more)`` for a chunk of jobs
(``more``: the other jobs' ``[id, attempt]`` pairs, run in turn). Celery's
``send_task`` spends most of its time building the same headers again for every
call; here Celery builds them once per job name (``app.amqp.as_task_v2``) and
each job only fills in its id.

On a Redis broker the messages go out as kombu's Redis transport stores them
(one ``LPUSH`` per message onto the queue's list): pushed by the create script
itself with the job records when the broker is kickq's own Redis (see
:meth:`Publisher.encoded`), so a record never exists without its message, else
pipelined. Any other broker (RabbitMQ, SQS...) gets the same headers and body
through a kombu producer.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from celery import Celery
from kombu.entity import Queue

from .plan import Message
from .settings import broker_redis

__all__ = ["Message", "Publisher", "redis_broker_url"]

#: The third element of a protocol-2 body: no callbacks, chain or chord (Celery reads each
#: with ``embed.get``, so an empty one says the same as Celery's four None values, in less room)
_EMBED: dict[str, Any] = {}
#: JSON without the spaces after separators: a queued job's message is most of its memory
_COMPACT = (",", ":")


@dataclass(frozen=True)
class _Template:
    headers: dict[str, Any]
    properties: dict[str, Any]


def redis_broker_url(app: Celery) -> str | None:
    """The broker as a kickq ``redis`` URL, when it is one Redis (or a Sentinel service)
    whose lists kombu keeps without a key prefix."""
    url = app.conf.broker_url
    transport = app.conf.broker_transport_options or {}
    if not isinstance(url, str) or transport.get("global_keyprefix"):
        return None
    if ";" in url and not url.startswith("sentinel://"):
        return None  # a fail-over list of brokers: kombu picks one
    return broker_redis(app.conf)


class Publisher:
    """Publishes job messages for one Celery app."""

    def __init__(self, app: Celery, broker: redis.Redis | None) -> None:
        self.app = app
        #: the broker's Redis when messages can be pushed directly, else None
        self.broker = broker
        self._templates: dict[tuple[str, float | None, bool], _Template] = {}

    def _template(self, task_name: str, process_timeout: float | None, chunk: bool) -> _Template:
        key = (task_name, process_timeout, chunk)
        template = self._templates.get(key)
        if template is None:
            limits: dict[str, Any] = {}
            if process_timeout and not chunk:
                # prefork pools stop an overrunning run; other pools rely on the reaper (the
                # task stops each run of a chunk at its own process_timeout: worker/task.py)
                limits = {"soft_time_limit": process_timeout, "time_limit": process_timeout + 5}
            headers, properties, _, _ = self.app.amqp.as_task_v2(
                "", task_name, args=(), ignore_result=True, **limits)
            properties = {**properties, "reply_to": "", "priority": 0, "delivery_mode": 2}
            template = self._templates[key] = _Template(headers, properties)
        return template

    def _headers(self, template: _Template, message: Message) -> dict[str, Any]:
        eta = None
        if message.countdown > 0:
            eta = (datetime.now(timezone.utc) + timedelta(seconds=message.countdown)).isoformat()
        return {**template.headers, "id": message.job_id, "root_id": message.job_id, "eta": eta,
                "retries": message.attempt - 1,  # Celery's count of earlier runs (Flower shows it)
                "argsrepr": message.label or repr((message.job_id, message.attempt)),
                "kwargsrepr": repr(self._kwargs(message))}

    @staticmethod
    def _kwargs(message: Message) -> dict[str, Any]:
        shown: dict[str, Any] = {"job_id": message.job_id, "attempt": message.attempt}
        if message.more:
            shown["more"] = len(message.more)
        return shown

    @staticmethod
    def _args(message: Message) -> list[Any]:
        if message.more:
            return [message.job_id, message.attempt, [list(job) for job in message.more]]
        return [message.job_id, message.attempt]

    def _body(self, message: Message) -> str:
        return json.dumps([self._args(message), {}, _EMBED], separators=_COMPACT)

    def encoded(self, queue: str, task_name: str, process_timeout: float | None,
                messages: Sequence[Message]) -> list[str]:
        """The messages as kombu's Redis transport keeps them in a queue's list."""
        delivery_info = {"exchange": "", "routing_key": queue}
        encoded = []
        for m in messages:
            template = self._template(task_name, process_timeout, bool(m.more))
            encoded.append(json.dumps({
                "body": base64.b64encode(self._body(m).encode()).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": self._headers(template, m),
                "properties": {**template.properties, "correlation_id": m.job_id,
                               "delivery_info": delivery_info, "body_encoding": "base64",
                               "delivery_tag": str(uuid.uuid4())},
            }, separators=_COMPACT))
        return encoded

    def push(self, pipe: Any, queue: Queue, task_name: str, process_timeout: float | None,
             messages: Sequence[Message]) -> None:
        """Queue the LPUSH of the messages on a pipeline of the broker's Redis."""
        encoded = self.encoded(queue.name, task_name, process_timeout, messages)
        if encoded:
            pipe.lpush(queue.name, *encoded)

    def publish(self, queue: Queue, task_name: str, process_timeout: float | None,
                messages: Sequence[Message]) -> None:
        """Publish the messages on the broker."""
        if not messages:
            return
        if self.broker is not None:
            pipe = self.broker.pipeline(transaction=False)
            self.push(pipe, queue, task_name, process_timeout, messages)
            pipe.execute()
            return
        # Producer.batch() is new in kombu 5.7; setup.cfg allows kombu >= 5.3
        with self.app.producer_or_acquire() as producer, getattr(producer, "batch", nullcontext)():
            for m in messages:
                template = self._template(task_name, process_timeout, bool(m.more))
                producer.publish(
                    [self._args(m), {}, _EMBED], exchange="", routing_key=queue.name,
                    declare=[queue], serializer="json", headers=self._headers(template, m),
                    retry=True, **{**template.properties, "correlation_id": m.job_id})
