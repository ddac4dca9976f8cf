"""Every Redis key, channel and Celery name kickq derives from a namespace.

The namespace is wrapped in braces, a Redis Cluster hash tag, so every key of
one namespace lives in one slot and each Lua script may touch any of them.
The Lua scripts build the per-job and per-name keys from :attr:`Keys.prefix`
with the same suffixes as below.
"""

from __future__ import annotations

from dataclasses import dataclass

#: States of a job that has not finished; each has a gauge in the stats.
WAITING_STATES = ("queued", "delayed", "retry", "ghost")
ACTIVE_STATES = (*WAITING_STATES, "processing")
FINAL_STATES = ("success", "fail")
STATES = (*ACTIVE_STATES, *FINAL_STATES)


@dataclass(frozen=True)
class Keys:
    """Key names of one namespace."""

    namespace: str

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}:"

    def job(self, job_id: str) -> str:
        """Hash: the job record."""
        return f"{self.prefix}job:{job_id}"

    def index(self, state: str) -> str:
        """Sorted set: job ids in a waiting state (score: due time) or a final one
        (score: expiry). Running jobs are in :attr:`active` instead."""
        return f"{self.prefix}idx:{state}"

    def name_index(self, state: str, name: str) -> str:
        """Sorted set: the ids of job ``name``'s jobs in ``state``, scored as :meth:`index`'s
        (running ones by their start)."""
        return f"{self.prefix}nidx:{state}:{len(name)}:{name}"

    @property
    def ahead(self) -> str:
        """Sorted set: jobs a running chunk has yet to reach, by its heartbeat's deadline (the
        redelivery sweep leaves them alone until it lapses)."""
        return f"{self.prefix}ahead"

    @property
    def delayed(self) -> str:
        """Sorted set: parked job ids by due time (no broker message yet)."""
        return f"{self.prefix}delayed"

    @property
    def wake(self) -> str:
        """List: a wake-up for a sleeping promoter (a job parked due sooner than the rest)."""
        return f"{self.prefix}wake"

    def call(self, call_id: str) -> str:
        """String: the reply of a script call, for two minutes, should the call be sent again."""
        return f"{self.prefix}call:{call_id}"

    @property
    def active(self) -> str:
        """Sorted set: running job ids by heartbeat-lock deadline."""
        return f"{self.prefix}active"

    def running(self, name: str) -> str:
        """Set: running job ids of one name (the cluster-wide slots)."""
        return f"{self.prefix}running:{name}"

    def waiting(self, name: str) -> str:
        """Sorted set: jobs of one name waiting for a ``max_jobs_num`` slot."""
        return f"{self.prefix}waiting:{name}"

    @property
    def limits(self) -> str:
        """Hash: job name -> max_jobs_num."""
        return f"{self.prefix}limits"

    @property
    def names(self) -> str:
        """Set: every job name seen in this namespace."""
        return f"{self.prefix}names"

    def workers(self, name: str) -> str:
        """Sorted set: the workers that handle one job name (member: ``hostname:pid``, score:
        when it expires, Redis clock). Each worker refreshes its member; members whose time
        passed are dropped whenever the set is read or refreshed, so it stays bounded."""
        return f"{self.prefix}workers:{name}"

    def stats(self, name: str) -> str:
        """Hash: counters and state gauges of one job name."""
        return f"{self.prefix}stats:{name}"

    def process_times(self, name: str) -> str:
        """List: the latest run durations of one name (bounded sample)."""
        return f"{self.prefix}ptimes:{name}"

    def wait_times(self, name: str) -> str:
        """List: the latest created-to-first-start times of one name."""
        return f"{self.prefix}wtimes:{name}"

    def completions(self, name: str) -> str:
        """Hash: minute number -> completions in that minute (last hour kept), and
        ``s<second>`` -> completions in that second (last minute kept)."""
        return f"{self.prefix}done:{name}"

    @property
    def schedules(self) -> str:
        """Hash: schedule key -> cron definition (JSON)."""
        return f"{self.prefix}cron"

    @property
    def schedule_ticks(self) -> str:
        """Hash: schedule key -> timestamp of the last tick claimed."""
        return f"{self.prefix}cron:last"

    @property
    def result_prefix(self) -> str:
        """Prefix of the Celery result keys when kickq supplies the backend."""
        return f"{self.prefix}result:"

    def task_name(self, name: str) -> str:
        """The Celery task (and queue) name of a job name."""
        return f"{self.namespace}.{name}"
