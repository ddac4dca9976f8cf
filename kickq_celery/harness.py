"""Running workers and waiting for them, in tests and examples (no pytest needed).

:func:`wait_for` (a bounded wait), :func:`stop_process_group` (for `celery worker`
subprocesses), :func:`purge_namespace`, :func:`make_app` and :func:`worker` (an
in-process worker). The pytest plugin :mod:`kickq_celery.testing` builds on them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery
from celery.contrib.testing.worker import start_worker

if TYPE_CHECKING:
    from .client import Kickq

T = TypeVar("T")

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` (a `celery worker` and its
    pool): SIGTERM to the group for a warm shutdown, SIGKILL if it is not over in time."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def purge_namespace(kq: Kickq) -> int:
    """Remove every key of ``kq``'s namespace (and its Celery queues, when the
    broker is the same Redis); returns how many."""
    namespace = kq.options["redis_namespace"]
    # newer kombu (5.7) also keeps a "_kombu.binding_permanent.<exchange>" set per declared queue
    patterns = ["\\{" + namespace + "\\}:*", f"{namespace}.*", f"_kombu.binding.{namespace}.*",
                f"_kombu.binding_permanent.{namespace}.*"]
    keys = [key for pattern in patterns for key in kq.redis.scan_iter(match=pattern, count=1000)]
    if keys:
        kq.redis.delete(*keys)
    # messages a killed worker left unacknowledged (kombu's Redis transport keeps them in
    # "unacked" until a worker restores them into the namespace's queues)
    unacked = [tag for tag, message in kq.redis.hscan_iter("unacked", count=1000)
               if f'"routing_key": "{namespace}.'.encode() in message]
    if unacked:
        kq.redis.hdel("unacked", *unacked)
        kq.redis.zrem("unacked_index", *unacked)
    return len(keys) + len(unacked)


def make_app(redis_url: str, name: str = "kickq-tests", **conf: Any) -> Celery:
    """A Celery app on ``redis_url`` as broker, set up for tests."""
    app = Celery(name, broker=redis_url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                    **conf)
    return app


@contextmanager
def worker(app: Celery, pool: str = "threads", concurrency: int = 4, **kwargs: Any) -> Iterator[Any]:
    """An in-process Celery worker (with the kickq bootstep) for ``app``."""
    with start_worker(app, pool=pool, concurrency=concurrency, perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=30, **kwargs) as instance:
        yield instance
