"""The worker step: runs the maintenance loops (:mod:`.loops`) in every worker, and
announces the job names the worker handles."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from celery import bootsteps

from ..options import Limits
from ..registry import instances
from .consumer import AcklessConsumer

# loops imports cron, and so croniter, here in the main thread, never lazily in the loop
# thread: croniter's import runs a subprocess (platform.architecture), and a prefork pool
# forking meanwhile inherits its pipe, which then blocks the loop thread until that pool
# process exits.
from .loops import announce, redelivery_grace, tick

logger = logging.getLogger("kickq_celery")


class KickqStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs :func:`tick` for every Kickq instance of the app, every poll_interval."""

    label = "kickq"
    # start once the pool has forked its processes: a thread running during a fork can
    # leave a lock held in the child, which then hangs at start-up
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.app = worker.app
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept: dict[Any, float] = {}
        self._failing: dict[Any, str] = {}  # scope -> the error its last pass failed with
        self._hostname = str(getattr(worker, "hostname", None) or socket.gethostname())
        self._member = ""  # hostname:pid, set in start()
        # scope -> (time.monotonic(), names) of this worker's last announce
        self._announced: dict[Any, tuple[float, frozenset[str]]] = {}

    def _scopes(self) -> list[Any]:
        """One Kickq instance per (Redis, namespace) in use by the app."""
        seen: dict[Any, Any] = {}
        for kq in instances(self.app):
            seen.setdefault(kq.scope, kq)
        return list(seen.values())

    def _handlers(self) -> dict[Any, dict[str, Limits]]:
        """Per scope: the job names the app has handlers for (name -> its limits)."""
        found: dict[Any, dict[str, Limits]] = {}
        for kq in instances(self.app):
            found.setdefault(kq.scope, {}).update(kq.processed)
        return found

    def _handled(self, kq: Any, handlers: Mapping[str, Limits]) -> list[str]:
        """The names of ``handlers`` whose queue this worker consumes (``-Q`` may leave some out)."""
        consumed = self.app.amqp.queues.consume_from
        return sorted(name for name in handlers if kq.queue(name).name in consumed)

    def _log_names(self) -> None:
        """One line per namespace: the job names this worker handles, their queues and
        limits; a warning for each name with a handler whose queue it does not consume."""
        handlers = self._handlers()
        for kq in self._scopes():
            names = handlers.get(kq.scope, {})
            handled = self._handled(kq, names)
            namespace = kq.options["redis_namespace"]
            listed = ", ".join(f"{name} (queue {kq.queue(name).name}, {names[name]})" for name in handled)
            logger.info("kickq: namespace %r: this worker handles %s", namespace, listed or "no job names")
            for name in sorted(set(names) - set(handled)):
                logger.warning("kickq: this worker has a handler for job %r in namespace %r but does not "
                               "consume its queue %s (-Q leaves it out): it runs none of these jobs",
                               name, namespace, kq.queue(name).name)

    def _announce(self, kq: Any) -> None:
        """Announce the names this worker handles in ``kq``'s scope, every lock_timeout / 2."""
        last, before = self._announced.get(kq.scope, (None, frozenset()))
        if self._stop.is_set() or (
                last is not None and time.monotonic() - last < float(kq.options["lock_timeout"]) / 2):
            return
        names = self._handled(kq, self._handlers().get(kq.scope, {}))
        announce(kq, self._member, names, sorted(before - set(names)))  # -Q changed at run time
        self._announced[kq.scope] = (time.monotonic(), frozenset(names))

    def _withdraw(self) -> None:
        """Drop this worker from the names it announced, at once (a warm shutdown)."""
        announced, self._announced = self._announced, {}
        for kq in self._scopes():
            names = announced.get(kq.scope, (0.0, frozenset()))[1]
            if not names:
                continue
            try:
                announce(kq, self._member, (), sorted(names))
            except Exception as exc:  # Redis away: the announce expires on its own
                logger.warning("kickq: could not withdraw this worker's names from %r (%s); they "
                               "expire within 3 x lock_timeout", kq, exc)

    def start(self, worker: Any) -> None:
        self._member = f"{self._hostname}:{os.getpid()}"
        try:
            self._log_names()
        except Exception:  # a log line must not keep the worker from starting
            logger.exception("kickq: could not list the job names of this worker")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kickq-worker-loops", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        limits_set: set[Any] = set()
        while not self._stop.is_set():
            scopes = self._scopes()
            wait = min((kq.options["poll_interval"] for kq in scopes), default=0.5)
            for kq in scopes:
                # the redelivery sweep is rarer: jobs are only overdue after a grace period
                sweep = time.monotonic() - self._swept.get(kq.scope, 0.0) >= redelivery_grace(kq) / 2
                try:
                    if kq.scope not in limits_set:  # here, not in start(): Redis may be away then
                        for name, limits in kq.processed.items():
                            kq.store.set_limits(name, limits)
                        limits_set.add(kq.scope)
                    self._announce(kq)
                    next_due = tick(kq, sweep)
                    if next_due is not None:
                        wait = min(wait, next_due)
                    if sweep:
                        self._swept[kq.scope] = time.monotonic()
                    if self._failing.pop(kq.scope, None):
                        logger.warning("kickq: worker loop of %r works again", kq)
                except Exception as exc:  # Redis or broker away: try again next pass
                    # the traceback once per kind of failure, not at every pass
                    if self._failing.get(kq.scope) != repr(exc):
                        logger.exception("kickq: worker loop failed for %r (retrying)", kq)
                    self._failing[kq.scope] = repr(exc)
            self._sleep(scopes, max(wait, 0.005))

    def _sleep(self, scopes: list[Any], wait: float) -> None:
        """Until the next parked job is due, or a create parks one due sooner."""
        if len(scopes) == 1 and wait > 0.02:
            # one namespace (the usual case): sleep in Redis, where lua/lib.lua's park() pushes
            # a wake-up when it parks a job due before everything parked so far
            kq = scopes[0]
            try:
                kq.redis.blpop([kq.keys.wake], timeout=wait)
                return
            except Exception:  # Redis away: the next pass logs it
                pass
        self._stop.wait(wait)

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._withdraw()

    terminate = stop


def install(app: Any) -> None:
    """Add the steps to ``app``'s workers and their consumers (idempotent)."""
    if KickqStep not in app.steps["worker"]:
        app.steps["worker"].add(KickqStep)
    if AcklessConsumer not in app.steps["consumer"]:
        app.steps["consumer"].add(AcklessConsumer)
