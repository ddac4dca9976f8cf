"""The worker step: runs the maintenance loops (:mod:`.loops`) in every worker."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import bootsteps

from ..registry import instances

# loops imports cron, and so croniter, here in the main thread, never lazily in the loop
# thread: croniter's import runs a subprocess (platform.architecture), and a prefork pool
# forking meanwhile inherits its pipe, which then blocks the loop thread until that pool
# process exits.
from .loops import redelivery_grace, tick

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

    def _scopes(self) -> list[Any]:
        """One Kickq instance per (Redis, namespace) in use by the app."""
        seen: dict[Any, Any] = {}
        for kq in instances(self.app):
            seen.setdefault(kq.scope, kq)
        return list(seen.values())

    def start(self, worker: Any) -> None:
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
                        for name, limit in kq.processed.items():
                            kq.store.set_limit(name, limit)
                        limits_set.add(kq.scope)
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

    terminate = stop


def install(app: Any) -> None:
    """Add the step to ``app``'s workers (idempotent)."""
    if KickqStep not in app.steps["worker"]:
        app.steps["worker"].add(KickqStep)
