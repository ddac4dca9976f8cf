"""JobStore: the Python side of the Lua scripts; records in, dataclasses out.

Every change of a job record is one Lua script (see ``lua/``), so concurrent
workers, promoters and reapers never see or leave half a transition.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from .exceptions import RedisUnavailable
from .keys import FINAL_STATES, Keys
from .records import JobRecord, Run

_LIB = resources.files(__package__).joinpath("lua/lib.lua").read_text()


def _script(name: str) -> str:
    return _LIB + resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


_SOURCES = {name: _script(name) for name in (
    "create", "start", "finish", "reap", "heartbeat", "delete", "promote", "unpark", "tick", "overdue",
    "limit")}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def masked_url(client: redis.Redis) -> str:
    """The client's address with any password hidden, for error messages."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    auth = ":***@" if kwargs.get("password") else ""
    return f"redis://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


@contextmanager
def redis_errors(client: redis.Redis) -> Iterator[None]:
    """Turn redis-py connection failures into :class:`RedisUnavailable`."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(f"kickq cannot reach Redis at {masked_url(client)}: {exc}") from exc


@dataclass(frozen=True)
class Started:
    """The reply of the run guard."""

    status: str  # run | gone | skip | wait | early
    data: Any = None
    runs: tuple[Run, ...] = ()
    created_at: float = 0.0
    started_at: float = 0.0
    wait: float = 0.0  # early: seconds until the job is due


@dataclass(frozen=True)
class Ended:
    """What a finished (or reaped) run led to."""

    job_id: str
    verdict: str  # success | fail | retry | ghost | deleted | stale
    released: str | None = None
    due_in: float = 0.0
    tombstone: bool = False
    attempt: int = 0
    last_error: str = ""

    @property
    def final(self) -> bool:
        return self.verdict in FINAL_STATES

    @classmethod
    def parse(cls, job_id: str, reply: Sequence[Any]) -> Ended:
        if _text(reply[0]) == "stale":
            return cls(job_id, "stale")
        verdict, released, due_in, tombstone, attempt, error = (
            None if item is None else _text(item) for item in reply)
        return cls(job_id, verdict or "", released, float(due_in or 0), tombstone == "1",
                   int(attempt or 0), error or "")


@dataclass(frozen=True)
class Claimed:
    """A parked job a promoter claimed for publishing."""

    job_id: str
    name: str
    attempt: int
    countdown: float
    lease_until: str
    process_timeout: float | None


class JobStore:
    """Job records of one namespace on one Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._scripts = {name: client.register_script(src) for name, src in _SOURCES.items()}

    def _call(self, script: str, *args: Any, client: Any = None) -> Any:
        with redis_errors(self.client):
            return self._scripts[script](args=[self.keys.prefix, *args], client=client)

    # --- transitions -------------------------------------------------------

    def create(self, name: str, flags_json: str, process_timeout: float | None,
               tombstone: bool, delay: float, park: bool,
               jobs: Sequence[tuple[str, str]], client: Any = None) -> Any:
        """Write job records; returns the creation time (Redis clock).

        With ``client`` a pipeline, the call is queued there and returns the pipeline.
        """
        pairs = [item for job in jobs for item in job]
        reply = self._call("create", name, flags_json, _opt(process_timeout),
                           int(tombstone), delay, int(park), *pairs, client=client)
        return reply if client is not None else float(reply)

    def start_run(self, job_id: str, attempt: int, token: str, lock_timeout: float) -> Started:
        reply = self._call("start", job_id, attempt, token, lock_timeout)
        status = _text(reply[0])
        if status == "early":
            return Started(status, wait=float(reply[1]))
        if status != "run":
            return Started(status)
        runs = tuple(Run.from_dict(run) for run in json.loads(reply[2]))
        return Started(status, json.loads(reply[1]), runs, float(reply[3]), float(reply[4]))

    def finish_run(self, job_id: str, token: str, outcome: str, payload: str,
                   purge: float) -> Ended:
        return Ended.parse(job_id, self._call("finish", job_id, token, outcome, payload, purge))

    def reap(self, purge: float, limit: int = 100) -> list[Ended]:
        return [Ended.parse(_text(r[0]), r[1:]) for r in self._call("reap", purge, limit)]

    def heartbeat(self, lock_timeout: float, runs: Sequence[tuple[str, str]]) -> list[str]:
        pairs = [item for run in runs for item in run]
        return [_text(job_id) for job_id in self._call("heartbeat", lock_timeout, *pairs)]

    def delete(self, job_id: str) -> tuple[int, bool, bool]:
        """Returns (0 unknown | 1 deleted | 2 marked while running, tombstone, was final)."""
        reply = self._call("delete", job_id)
        if not reply[0]:
            return 0, False, False
        return int(reply[0]), _text(reply[1]) == "1", bool(reply[2])

    def promote(self, horizon: float, lease: float, limit: int = 500) -> list[Claimed]:
        return [
            Claimed(_text(r[0]), _text(r[1]), int(r[2]), float(r[3]), _text(r[4]),
                    float(r[5]) if r[5] else None)
            for r in self._call("promote", horizon, lease, limit)
        ]

    def overdue(self, grace: float, limit: int = 500) -> list[Claimed]:
        """Waiting jobs due for more than ``grace`` seconds that no promoter or slot holds."""
        return [
            Claimed(_text(r[0]), _text(r[1]), int(r[2]), 0.0, "", float(r[3]) if r[3] else None)
            for r in self._call("overdue", grace, limit)
        ]

    def unpark(self, claims: Sequence[Claimed]) -> None:
        if claims:
            self._call("unpark", *[x for c in claims for x in (c.job_id, c.lease_until)])

    def claim_tick(self, schedule_key: str, tick: float) -> bool:
        """Claim a cron tick for this caller alone."""
        return bool(self._call("tick", schedule_key, repr(tick)))

    # --- reads -------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with redis_errors(self.client):
            raw = self.client.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return JobRecord.from_hash({_text(k): _text(v) for k, v in raw.items()})

    def job_ids(self, state: str, offset: int = 0, count: int = 100) -> list[str]:
        """Ids in one state: waiting ones by due time, running ones by heartbeat deadline,
        finished ones oldest first (expired entries skipped)."""
        with redis_errors(self.client):
            if state == "processing":
                ids = self.client.zrange(self.keys.active, offset, offset + count - 1)
            elif state in FINAL_STATES:
                now = redis_now(self.client)
                ids = self.client.zrangebyscore(self.keys.index(state), now, "+inf",
                                                start=offset, num=count)
            else:
                ids = self.client.zrange(self.keys.index(state), offset, offset + count - 1)
        return [_text(i) for i in ids]

    def set_limit(self, name: str, limit: int | None) -> int:
        """Set (None: clear) a name's max_jobs_num; returns how many waiting jobs it woke."""
        return int(self._call("limit", name, "" if limit is None else limit))

    def names(self) -> list[str]:
        with redis_errors(self.client):
            return sorted(_text(n) for n in self.client.smembers(self.keys.names))

    def raw_stats(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Counters, samples and completion buckets of each name, in one round trip."""
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.keys.stats(name))
                # the latest 500 (the scripts trim the lists to that now and then)
                pipe.lrange(self.keys.process_times(name), 0, 499)
                pipe.lrange(self.keys.wait_times(name), 0, 499)
                pipe.hgetall(self.keys.completions(name))
            pipe.time()
            replies = pipe.execute()
        now = replies[-1][0] + replies[-1][1] / 1e6
        result = {}
        for i, name in enumerate(names):
            counters, ptimes, wtimes, done = replies[4 * i: 4 * i + 4]
            result[name] = {
                "counters": {_text(k): int(v) for k, v in counters.items()},
                "process_times": [float(x) for x in ptimes],
                "wait_times": [float(x) for x in wtimes],
                # minute buckets; "s<second>" fields are the per-second buckets
                "completions": {int(k): int(v) for k, v in done.items() if not _text(k).startswith("s")},
                "recent": {int(_text(k)[1:]): int(v) for k, v in done.items() if _text(k).startswith("s")},
                "now": now,
            }
        return result


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def _opt(value: float | None) -> str:
    return "" if value is None else repr(float(value))

