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

Also :func:`wait_for` (a bounded wait), :func:`stop_process_group`, :func:`purge_namespace`,
:func:`make_app` and :func:`worker`, from :mod:`kickq_celery.harness`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from celery import Celery

from .client import Kickq
from .harness import (
    DEFAULT_TEST_REDIS_URL,
    make_app,
    purge_namespace,
    stop_process_group,
    wait_for,
    worker,
)

__all__ = ["DEFAULT_TEST_REDIS_URL", "make_app", "purge_namespace", "stop_process_group", "wait_for",
           "worker"]


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
