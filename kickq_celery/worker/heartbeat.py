"""The heartbeat: renews the locks of the runs this process holds, so a dead worker's
runs are found (their locks lapse) and live ones are not; and tells a run that its job
was deleted (``job.deleted``), stopping it when the delete asked to terminate it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..records import Job
    from ..store import JobStore

logger = logging.getLogger("kickq_celery")


def in_prefork_child() -> bool:
    """Whether this is a prefork pool process: its main thread runs the handler, and SIGUSR1
    raises SoftTimeLimitExceeded in it (billiard's soft time limit)."""
    handler = signal.getsignal(signal.SIGUSR1)
    return getattr(handler, "__module__", "") == "billiard.pool"


@dataclass
class Held:
    """A run this process holds."""

    store: JobStore
    lock_timeout: float
    token: str
    job: Job | None = None
    in_handler: bool = False  # the handler is running (the only time a stop may interrupt it)
    stopped: bool = False  # the run was stopped: its job was deleted with terminate
    timers: tuple[threading.Timer, ...] = ()  # stop the handler at its process_timeout (see limit)


class Heartbeat:
    """Renews the heartbeat locks of the runs this process holds.

    One daemon thread per process (re-created after a fork), so prefork,
    threads and solo pools all keep their locks alive while a handler runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, Held] = {}
        #: the jobs each running chunk has yet to reach: (store, lock_timeout, ids) by chunk
        self._ahead: dict[str, tuple[JobStore, float, list[str]]] = {}
        self._pid = 0
        self._wake = threading.Event()

    def hold(self, store: JobStore, lock_timeout: float, job_id: str, token: str,
             job: Job | None = None) -> None:
        with self._lock:
            self._runs[job_id] = Held(store, lock_timeout, token, job)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._wake = threading.Event()
                threading.Thread(target=self._loop, name="kickq-heartbeat", daemon=True).start()

    def release(self, job_id: str) -> None:
        with self._lock:
            held = self._runs.pop(job_id, None)
        for timer in held.timers if held is not None else ():
            timer.cancel()

    def hold_ahead(self, chunk: str, store: JobStore, lock_timeout: float, job_ids: list[str]) -> None:
        """Hold the jobs running chunk ``chunk`` has yet to reach as long as this process lives,
        as its runs are (none: the chunk is done), so no other worker takes them for lost."""
        with self._lock:
            if job_ids:
                self._ahead[chunk] = (store, lock_timeout, job_ids)
            else:
                self._ahead.pop(chunk, None)

    def limit(self, job_id: str, seconds: float) -> None:
        """Stop the handler of a held run after ``seconds`` (its process_timeout) as billiard's
        time limits do, for a run with no limit of its own (one of a chunk's jobs): its soft limit
        (SoftTimeLimitExceeded in the handler), then 5 s later its hard one (the pool process is
        killed; the reaper ends the run). Only in a prefork pool process; elsewhere the reaper
        ends the run when the time is up."""
        if not in_prefork_child():
            return
        with self._lock:
            held = self._runs[job_id]
            stops = ((seconds, signal.SIGUSR1), (seconds + 5, signal.SIGKILL))
            held.timers = tuple(threading.Timer(after, self._timed_out, (job_id, held.token, signum))
                                for after, signum in stops)
            for timer in held.timers:
                timer.daemon = True
                timer.start()

    def _timed_out(self, job_id: str, token: str, signum: int) -> None:
        with self._lock:
            held = self._runs.get(job_id)
            if held is not None and held.token == token and held.in_handler and not held.stopped:
                logger.warning("kickq: job %s ran past its process_timeout: %s", job_id,
                               "stopping its run" if signum == signal.SIGUSR1 else "killing its process")
                # (under the lock: the handler cannot be left meanwhile, see leave_handler)
                os.kill(os.getpid(), signum)

    def enter_handler(self, job_id: str) -> None:
        with self._lock:
            self._runs[job_id].in_handler = True

    def leave_handler(self, job_id: str) -> bool:
        """The handler returned (or raised); whether the run was stopped (terminate)."""
        with self._lock:
            held = self._runs[job_id]
            held.in_handler = False
            return held.stopped

    def stopped(self, job_id: str) -> bool:
        with self._lock:
            held = self._runs.get(job_id)
            return bool(held and held.stopped)

    def _deleted(self, job_id: str, terminate: bool) -> None:
        """The job of a held run was deleted: tell the handler, and stop it if asked and it can be."""
        with self._lock:
            held = self._runs.get(job_id)
            if held is None:
                return
            if held.job is not None:
                held.job.deleted = True
            if terminate and held.in_handler and not held.stopped and in_prefork_child() \
                    and threading.main_thread().is_alive():
                held.stopped = True
                logger.warning("kickq: job %s was deleted with terminate: stopping its run", job_id)
                # (under the lock: the handler cannot be left meanwhile, see leave_handler)
                os.kill(os.getpid(), signal.SIGUSR1)

    def _loop(self) -> None:
        while True:
            with self._lock:
                runs = dict(self._runs)
                ahead = list(self._ahead.values())
            interval = min([held.lock_timeout for held in runs.values()]
                           + [timeout for _, timeout, _ in ahead], default=3.0) / 3
            groups: dict[tuple[int, float], list[tuple[str, str]]] = {}
            aheads: dict[tuple[int, float], list[str]] = {}
            stores: dict[int, JobStore] = {}
            for job_id, held in runs.items():
                groups.setdefault((id(held.store), held.lock_timeout), []).append((job_id, held.token))
                stores[id(held.store)] = held.store
            for store, timeout, job_ids in ahead:
                groups.setdefault((id(store), timeout), [])
                aheads.setdefault((id(store), timeout), []).extend(job_ids)
                stores[id(store)] = store
            for (store_id, timeout), pairs in groups.items():
                try:
                    for job_id, status in stores[store_id].heartbeat(
                            timeout, pairs, aheads.get((store_id, timeout), ())):
                        if status == "lost":
                            logger.debug("kickq: no longer holding %s (finished, reaped)", job_id)
                        else:
                            self._deleted(job_id, status == "terminate")
                except Exception:  # keep beating; the reaper decides if we are too late
                    logger.exception("kickq: heartbeat failed")
            self._wake.wait(max(interval, 0.05))
            time.sleep(0)


heartbeat = Heartbeat()
