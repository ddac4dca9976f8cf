"""Testing helpers for kickq_celery users, in the style of ``celery.contrib.pytest``.

Installed as a pytest plugin (entry point ``pytest11``). Fixtures:

- ``kickq_redis_url``: the Redis URL of the tests (``KICKQ_TEST_REDIS_URL``,
  default ``redis://127.0.0.1:6379/0``).
- ``kickq_namespace``: a throwaway namespace; its keys are removed afterwards.
- ``kickq_app``: a Celery test app whose broker is that Redis (Celery's
  ``celery_parameters`` fixture applies).
- ``kickq``: your own :class:`Kickq`, named by the ini option ``kickq_app =
  "proj.jobs:kq"`` (or ``--kickq-app``), with its handlers and options, or else a fresh
  one; on the throwaway namespace, with fast worker timing (poll 0.1 s, heartbeat lock
  2 s) unless yours sets them.
- ``kickq_worker``: a function that starts an in-process worker for
  ``kickq_app`` (Celery's ``celery_worker_parameters`` fixture applies); call it after
  registering the handlers (with your own Kickq, they are registered already)::

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

import importlib
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.app import TestApp

from .client import Kickq
from .harness import (
    DEFAULT_TEST_REDIS_URL,
    make_app,
    purge_namespace,
    stop_process_group,
    wait_for,
    worker,
)

# Celery's own fixtures (celery_parameters, celery_worker_parameters...), which pytest-celery also
# registers
pytest_plugins = ["celery.contrib.pytest"]

__all__ = ["DEFAULT_TEST_REDIS_URL", "make_app", "purge_namespace", "stop_process_group", "wait_for",
           "worker"]


def pytest_addoption(parser: pytest.Parser) -> None:
    help_ = ("the Kickq your handlers are registered on, as 'module:attribute' (say 'proj.jobs:kq'): "
             "the kickq fixture is then a copy of it, with its handlers, on a throwaway namespace")
    parser.addini("kickq_app", help_)
    parser.getgroup("kickq").addoption("--kickq-app", dest="kickq_app", default=None, help=help_)


def pytest_configure(config: pytest.Config) -> None:
    # Celery's own Redis result backend still calls redis-py's deprecated setex (tombstones)
    config.addinivalue_line("filterwarnings", "ignore:Call to deprecated setex:DeprecationWarning")


def user_kickq(config: pytest.Config) -> Kickq | None:
    """The Kickq named by ``--kickq-app`` or the ``kickq_app`` ini option, if any."""
    spec = config.getoption("kickq_app") or config.getini("kickq_app")
    if not spec:
        return None
    module, _, attribute = str(spec).partition(":")
    found = getattr(importlib.import_module(module), attribute or "kq", None)
    if not isinstance(found, Kickq):
        raise pytest.UsageError(f"kickq_app {spec!r} is not a Kickq instance (module:attribute)")
    return found


@pytest.fixture
def kickq_redis_url() -> str:
    return os.environ.get("KICKQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)


@pytest.fixture
def kickq_namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def kickq_app(kickq_redis_url: str, celery_parameters: dict[str, Any]) -> Iterator[Celery]:
    """A Celery test app (with Celery's ``celery_parameters`` fixture) on the test Redis."""
    app = TestApp(set_as_current=False, enable_logging=False, config={
        "broker_url": kickq_redis_url, "result_backend": None,
        "broker_connection_retry_on_startup": True, "worker_hijack_root_logger": False,
    }, **celery_parameters)
    yield app
    app.close()


@pytest.fixture
def kickq(request: pytest.FixtureRequest, kickq_app: Celery, kickq_namespace: str,
          kickq_redis_url: str) -> Iterator[Kickq]:
    """Your Kickq (``kickq_app`` ini option) with its handlers, or a fresh one, on a throwaway
    namespace of the test Redis (fast worker timing unless yours sets it)."""
    Kickq.reset()
    user = user_kickq(request.config)
    overrides = {"poll_interval": 0.1, "lock_timeout": 2, **(user.overrides if user else {}),
                 "redis": kickq_redis_url, "redis_namespace": kickq_namespace}
    kq = Kickq(kickq_app, **overrides)
    if user is not None:
        for name, handler in user.handlers.items():
            kq.process(name, handler)
            kq.processed[name] = user.processed[name]  # the same limits
    yield kq
    purge_namespace(kq)
    Kickq.reset()


@pytest.fixture
def kickq_worker(kickq_app: Celery, kickq: Kickq,
                 celery_worker_parameters: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """Starts an in-process worker for ``kickq_app`` (threads pool, 4 threads, and Celery's
    ``celery_worker_parameters`` fixture, unless given); stopped after the test."""
    with ExitStack() as stack:
        def start(**kwargs: Any) -> Any:
            return stack.enter_context(worker(kickq_app, **{**celery_worker_parameters, **kwargs}))

        yield start
