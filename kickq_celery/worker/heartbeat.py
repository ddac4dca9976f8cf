"""The heartbeat: renews the locks of the runs this process holds, so a dead worker's
runs are found (their locks lapse) and live ones are not."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..store import JobStore

logger = logging.getLogger("kickq_celery")


class Heartbeat:
    """Renews the heartbeat locks of the runs this process holds.

    One daemon thread per process (re-created after a fork), so prefork,
    threads and solo pools all keep their locks alive while a handler runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, tuple[JobStore, float, str]] = {}
        self._pid = 0
        self._wake = threading.Event()

    def hold(self, store: JobStore, lock_timeout: float, job_id: str, token: str) -> None:
        with self._lock:
            self._runs[job_id] = (store, lock_timeout, token)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._wake = threading.Event()
                threading.Thread(target=self._loop, name="kickq-heartbeat", daemon=True).start()

    def release(self, job_id: str) -> None:
        with self._lock:
            self._runs.pop(job_id, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                runs = dict(self._runs)
            interval = min((timeout for _, timeout, _ in runs.values()), default=3.0) / 3
            groups: dict[tuple[int, float], list[tuple[str, str]]] = {}
            stores: dict[int, JobStore] = {}
            for job_id, (store, timeout, token) in runs.items():
                groups.setdefault((id(store), timeout), []).append((job_id, token))
                stores[id(store)] = store
            for (store_id, timeout), held in groups.items():
                try:
                    lost = stores[store_id].heartbeat(timeout, held)
                    if lost:
                        logger.debug("kickq: no longer holding %s (finished, reaped or deleted)", lost)
                except Exception:  # keep beating; the reaper decides if we are too late
                    logger.exception("kickq: heartbeat failed")
            self._wake.wait(max(interval, 0.05))
            time.sleep(0)


heartbeat = Heartbeat()
