"""Testing helpers for kickq_celery users, in the style of ``celery.contrib.pytest``.

Installed as a pytest plugin (entry point ``pytest11``). Fixtures:

- ``kickq_redis_url``: the Redis URL of the tests (``KICKQ_TEST_REDIS_URL``,
  default ``redis://127.0.0.1:6379/0``).
- ``kickq_namespace``: a throwaway namespace; its keys are removed afterwards.
- ``kickq_app``: a Celery app whose broker is that Redis.
- ``kickq``: a :class:`Kickq` on the throwaway namespace, with fast worker
  timing (poll 0.1 s, heartbeat lock 2 s).
- ``kickq_worker``: a function that starts an in-process worker for
  ``kickq_app``; call it after registering the handlers::

      def test_resize(kickq, kickq_worker):
          @kickq.process("resize")
          def resize(job):
              return job.data * 2

          kickq_worker()
          assert kickq.create("resize", 21, tombstone=True).promise.wait().result == 42

Also :func:`wait_for`, a bounded wait for a condition.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

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


@pytest.fixture
def kickq_redis_url() -> str:
    return os.environ.get("KICKQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)


@pytest.fixture
def kickq_namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def kickq_app(kickq_redis_url: str) -> Iterator[Celery]:
    app = make_app(kickq_redis_url)
    yield app
    app.close()


@pytest.fixture
def kickq(kickq_app: Celery, kickq_namespace: str, kickq_redis_url: str) -> Iterator[Kickq]:
    Kickq.reset()
    kq = Kickq(kickq_app, redis=kickq_redis_url, redis_namespace=kickq_namespace,
               poll_interval=0.1, lock_timeout=2)
    yield kq
    purge_namespace(kq)
    Kickq.reset()


@pytest.fixture
def kickq_worker(kickq_app: Celery, kickq: Kickq) -> Iterator[Callable[..., Any]]:
    with ExitStack() as stack:
        def start(**kwargs: Any) -> Any:
            return stack.enter_context(worker(kickq_app, **kwargs))

        yield start
