"""JobStore: job records of one namespace on one Redis (the scripts' calls, and the reads).

Every change of a job record is one Lua script (see ``lua/`` and :mod:`.scripts`),
so concurrent workers, promoters and reapers never see or leave half a transition.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster

from . import scripts
from .connection import Client, masked_url, redis_errors, redis_now
from .exceptions import ConfigError, RedisUnavailable
from .keys import FINAL_STATES, STATES, Keys
from .records import JobRecord
from .scripts import Call, Claimed, Deleted, Ended, Started, text

T = TypeVar("T")


#: the calls whose writes ``wait_replicas`` waits for (the others are replayed or recomputed)
REPLICATED = ("create", "finish")
#: how long a call that timed out is sent again (with its id) instead of a new one: less than
#: the two minutes a script keeps its reply
RESEND_WITHIN = 100.0


class JobStore:
    """Job records of one namespace on one Redis.

    With ``wait_replicas``, a create or finish returns only once that many replicas have
    its write (Redis ``WAIT``, bounded by half of ``timeout``), else raises
    :class:`RedisUnavailable`: a write a failover could lose is never acknowledged.
    """

    def __init__(self, client: Client, keys: Keys, wait_replicas: int = 0, timeout: float = 5.0) -> None:
        if wait_replicas and isinstance(client, RedisCluster):
            # WAIT must go to the node that wrote, and cluster pipelines refuse scripts
            raise ConfigError("redis_wait_replicas is not supported on a Redis Cluster")
        self.client = client
        self.keys = keys
        self.wait_replicas = wait_replicas
        self.wait_ms = max(1, int(timeout * 500))
        self._scripts = {name: client.register_script(src) for name, src in scripts.SOURCES.items()}
        self._unanswered: dict[tuple[Any, ...], tuple[float, Call[Any]]] = {}

    def run(self, call: Call[T]) -> T:
        """Send one script call and parse its reply.

        A replayed call (delete, reap, promote...) whose reply timed out may still have been
        applied: the same request made again within :data:`RESEND_WITHIN` is sent with the
        first call's id, so it gets that call's reply (the jobs a promote claimed, say)
        instead of finding them taken.
        """
        if call.replays:
            sent, earlier = self._unanswered.pop(call.request, (0.0, call))
            if time.monotonic() - sent < RESEND_WITHIN:
                call = earlier
        try:
            return self._send(call)
        except RedisUnavailable as exc:
            if call.replays and isinstance(exc.__cause__, redis.TimeoutError):
                if len(self._unanswered) > 1000:
                    self._unanswered.clear()
                self._unanswered[call.request] = (time.monotonic(), call)
            raise

    def _send(self, call: Call[T]) -> T:
        with redis_errors(self.client):
            if not self.wait_replicas or call.script not in REPLICATED:
                return call.parse(self._scripts[call.script](keys=[self.keys.prefix], args=call.args))
            pipe = self.client.pipeline(transaction=False)  # WAIT on the connection that wrote
            self.queue(call, pipe)
            reply, acked = pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms).execute()
        self.check_replicated(acked)
        return call.parse(reply)

    def check_replicated(self, acked: int) -> None:
        """Raise RedisUnavailable when fewer than ``wait_replicas`` replicas acknowledged a write."""
        if acked < self.wait_replicas:
            raise RedisUnavailable(
                f"kickq's write reached {acked} of the {self.wait_replicas} replicas it waits for "
                f"(redis_wait_replicas) at {masked_url(self.client)} within {self.wait_ms} ms")

    def queue(self, call: Call[Any], pipe: Any) -> None:
        """Queue a script call on a pipeline (its reply is ``call.parse(pipe.execute()[i])``)."""
        self._scripts[call.script](keys=[self.keys.prefix], args=call.args, client=pipe)

    # --- transitions -------------------------------------------------------

    def create(self, name: str, flags_json: str, process_timeout: float | None, tombstone: bool,
               delay: float, park: bool, jobs: Sequence[tuple[str, str]]) -> float:
        """Write job records; returns the creation time (Redis clock)."""
        return self.run(scripts.create(name, flags_json, process_timeout, tombstone, delay, park, jobs))

    def start_run(self, job_id: str, attempt: int, token: str, lock_timeout: float) -> Started:
        return self.run(scripts.start(job_id, attempt, token, lock_timeout))

    def finish_run(self, job_id: str, token: str, outcome: str, payload: str, purge: float,
                   traceback: str = "") -> Ended:
        return self.run(scripts.finish(job_id, token, outcome, payload, purge, traceback))

    def reap(self, purge: float, limit: int = 100) -> list[Ended]:
        return self.run(scripts.reap(purge, limit))

    def heartbeat(self, lock_timeout: float, runs: Sequence[tuple[str, str]]) -> list[str]:
        return self.run(scripts.heartbeat(lock_timeout, runs))

    def delete(self, job_id: str) -> Deleted:
        return self.run(scripts.delete(job_id))

    def promote(self, horizon: float, lease: float, limit: int = 500) -> tuple[list[Claimed], float | None]:
        return self.run(scripts.promote(horizon, lease, limit))

    def overdue(self, grace: float, limit: int = 500) -> list[Claimed]:
        return self.run(scripts.overdue(grace, limit))

    def unpark(self, claims: Sequence[Claimed]) -> None:
        if claims:
            self.run(scripts.unpark(claims))

    def set_limit(self, name: str, limit: int | None) -> int:
        return self.run(scripts.limit(name, limit))

    # --- reads -------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with redis_errors(self.client):
            raw = self.client.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return JobRecord.from_hash({text(k): text(v) for k, v in raw.items()})

    def job_ids(self, state: str, offset: int = 0, count: int = 100) -> list[str]:
        """Ids in one state: waiting ones by due time, running ones by heartbeat deadline,
        finished ones oldest first (expired entries skipped)."""
        with redis_errors(self.client):
            if state == "processing":
                ids = self.client.zrange(self.keys.active, offset, offset + count - 1)
            elif state in FINAL_STATES:
                now = redis_now(self.client, self.keys.names)
                ids = self.client.zrangebyscore(self.keys.index(state), now, "+inf",
                                                start=offset, num=count)
            else:
                ids = self.client.zrange(self.keys.index(state), offset, offset + count - 1)
        return [text(i) for i in ids]

    def records(self, states: Sequence[str] = STATES, name: str | None = None,
                offset: int = 0, limit: int = 50) -> list[JobRecord]:
        """Records in the given states (in that order) and of ``name`` if given, paged."""
        found: list[JobRecord] = []
        skip = offset
        for state in states:
            start = 0
            while len(found) < limit:
                ids = self.job_ids(state, start, 200)
                if not ids:
                    break
                start += len(ids)
                for job_id in ids:
                    record = self.get(job_id)
                    if record is None or (name and record.name != name):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    found.append(record)
                    if len(found) >= limit:
                        break
        return found

    def names(self) -> list[str]:
        with redis_errors(self.client):
            return sorted(text(n) for n in self.client.smembers(self.keys.names))

    # --- the workers that handle each name ------------------------------------

    def announce(self, member: str, names: Sequence[str], ttl: float,
                 withdrawn: Sequence[str] = ()) -> None:
        """Worker ``member`` handles ``names`` for ``ttl`` seconds more (Redis clock), and no
        longer handles ``withdrawn``; the clock and one pipelined call."""
        if not names and not withdrawn:
            return
        with redis_errors(self.client):
            now = redis_now(self.client, self.keys.names)
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                key = self.keys.workers(name)
                pipe.zadd(key, {member: now + ttl})
                pipe.zremrangebyscore(key, "-inf", now)
            for name in withdrawn:
                pipe.zrem(self.keys.workers(name), member)
            pipe.execute()

    def _queue_live_workers(self, pipe: Any, name: str, now: float) -> None:
        """Queue two replies: the expired members dropped, then the live ones."""
        key = self.keys.workers(name)
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zrangebyscore(key, now, "+inf")

    def live_workers(self, names: Sequence[str]) -> dict[str, list[str]]:
        """The live workers (``hostname:pid``) that handle each name: the clock and one round trip."""
        with redis_errors(self.client):
            now = redis_now(self.client, self.keys.names)
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                self._queue_live_workers(pipe, name, now)
            replies = pipe.execute()
        return {name: [text(m) for m in replies[2 * i + 1]] for i, name in enumerate(names)}

    def raw_stats(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Counters, samples, completion buckets and live workers of each name: the clock and
        one round trip."""
        with redis_errors(self.client):
            now = redis_now(self.client, self.keys.names)
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.keys.stats(name))
                # the latest 500 (the scripts trim the lists to that now and then)
                pipe.lrange(self.keys.process_times(name), 0, 499)
                pipe.lrange(self.keys.wait_times(name), 0, 499)
                pipe.hgetall(self.keys.completions(name))
                self._queue_live_workers(pipe, name, now)
            replies = pipe.execute()
        result = {}
        for i, name in enumerate(names):
            counters, ptimes, wtimes, done, _, workers = replies[6 * i: 6 * i + 6]
            result[name] = {
                "counters": {text(k): int(v) for k, v in counters.items()},
                "process_times": [float(x) for x in ptimes],
                "wait_times": [float(x) for x in wtimes],
                # minute buckets; "s<second>" fields are the per-second buckets
                "completions": {int(k): int(v) for k, v in done.items() if not text(k).startswith("s")},
                "recent": {int(text(k)[1:]): int(v) for k, v in done.items() if text(k).startswith("s")},
                "workers": [text(m) for m in workers],
                "now": now,
            }
        return result
