"""The consumer step: a worker consumes kickq's queues on a Redis broker without kombu's
ack emulation.

kombu's Redis transport copies every message it hands a worker into its ``unacked`` hash
(and index) and deletes it again at the ack: two extra round trips of the worker's main
process per message, nearly half of its time on one (py-spy, a worker draining no-op jobs),
and the copy is only read back after the ``visibility_timeout`` (an hour by default). A
kickq job does not need it: its record decides whether it runs, and the redelivery sweep
(worker/loops.py) publishes the message of a due job again once it is overdue by
``2 x lock_timeout`` (+ the horizon).

So, in a worker with an event loop (prefork, threads, solo) on a Redis broker, the queues
of job names that the sweep watches (kickq's Redis is the broker, ``delay_horizon`` 0: no
ETA message waits in a worker) are consumed on a connection of their own with kombu's
``ack_emulation`` off. Everything else is Celery's: the messages go through the worker's
own task handler (strategies, requests, pool, events), the prefetch limit is the worker's
(``concurrency x worker_prefetch_multiplier``, for these queues together), and on a warm
shutdown the messages the worker reserved but did not start go back to their queues.
A worker SIGKILLed with messages reserved loses them to the sweep instead of to the
``visibility_timeout``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.common import ignore_errors

from ..registry import instances

logger = logging.getLogger("kickq_celery")


def ackless_queues(c: Any) -> list[Any]:
    """The queues of the main task consumer of Celery consumer ``c`` that kickq may consume
    without ack emulation (see the module doc); none without an event loop or a Redis broker,
    nor with Celery's ``worker_disable_prefetch`` (Celery applies it to its own consumer)."""
    if (c.hub is None or c.connection.transport.driver_type != "redis"
            or c.app.conf.get("worker_disable_prefetch")):
        return []
    consumed = {queue.name: queue for queue in c.task_consumer.queues}
    found: dict[str, Any] = {}
    for kq in instances(c.app):
        if kq.horizon > 0 or kq.publisher.broker is None:
            continue
        for name in kq.processed:
            queue = consumed.get(kq.queue(name).name)
            if queue is not None:
                found[queue.name] = queue
    return list(found.values())


class AcklessConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumes kickq's queues on a connection without ack emulation (see the module doc)."""

    label = "kickq consumer"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.connection: Any = None
        self.consumer: Any = None

    def start(self, c: Any) -> None:
        queues = ackless_queues(c)
        if not queues:
            return
        for queue in queues:  # (before the task consumer starts consuming)
            c.task_consumer.cancel_by_queue(queue.name)
        self.connection = c.app.connection_for_read(transport_options={"ack_emulation": False})
        self.connection.ensure_connection(max_retries=3)
        self.consumer = c.app.amqp.TaskConsumer(self.connection, queues=queues,
                                                on_decode_error=c.on_decode_error)
        self.consumer.qos(prefetch_count=c.initial_prefetch_count)
        logger.debug("kickq: consuming %s without ack emulation", ", ".join(q.name for q in queues))

    def register_with_event_loop(self, c: Any, hub: Any) -> None:
        if self.consumer is None:
            return
        self.consumer.on_message = c.create_task_handler()
        self.connection.transport.register_with_event_loop(self.connection.connection, hub)
        self.consumer.consume()

    def stop(self, c: Any) -> None:
        """Close the connection (a restart opens a new one): the messages reserved and not yet
        started go back to their queues (kombu restores them when the channel closes)."""
        consumer, connection, self.consumer, self.connection = self.consumer, self.connection, None, None
        if consumer is not None:
            ignore_errors(connection, consumer.cancel)  # type: ignore[no-untyped-call]
        if connection is not None:
            ignore_errors(connection, connection.close)  # type: ignore[no-untyped-call]

    shutdown = stop

