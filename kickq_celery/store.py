"""JobStore: job records of one namespace on one Redis (the scripts' calls, and the reads).

Every change of a job record is one Lua script (see ``lua/`` and :mod:`.scripts`),
so concurrent workers, promoters and reapers never see or leave half a transition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

import redis
import redis.asyncio.cluster
from redis.cluster import RedisCluster

from . import scripts
from .connection import AsyncClient, Client, masked_url, redis_errors, redis_now
from .exceptions import ConfigError, RedisUnavailable
from .keys import ACTIVE_STATES, FINAL_STATES, STATES, Keys
from .options import Limits
from .records import JobRecord
from .scripts import CREATE_CHUNK, CREATE_HEADER, Call, Claimed, Deleted, Ended, Started, text

T = TypeVar("T")
logger = logging.getLogger("kickq_celery")


#: the calls whose writes ``wait_replicas`` waits for (the others are replayed or recomputed)
REPLICATED = ("create", "finish", "turn")
#: how long a call that timed out is sent again (with its id) instead of a new one: less than
#: the two minutes a script keeps its reply
RESEND_WITHIN = 100.0


class _Store:
    """What the sync and the asyncio store share: the client, the keys, the scripts, WAIT.

    With ``wait_replicas``, a create or finish returns only once that many replicas have
    its write (Redis ``WAIT``, bounded by half of ``timeout``), else raises
    :class:`RedisUnavailable`: a write a failover could lose is never acknowledged.
    """

    def __init__(self, client: Any, keys: Keys, wait_replicas: int = 0, timeout: float = 5.0) -> None:
        if wait_replicas and isinstance(client, (RedisCluster, redis.asyncio.cluster.RedisCluster)):
            # WAIT must go to the node that wrote, and cluster pipelines refuse scripts
            raise ConfigError("redis_wait_replicas is not supported on a Redis Cluster")
        self.client = client
        self.keys = keys
        self.wait_replicas = wait_replicas
        self.wait_ms = max(1, int(timeout * 500))
        self._scripts = {name: client.register_script(src) for name, src in scripts.SOURCES.items()}
        self.shas = {name: script.sha for name, script in self._scripts.items()}
        #: call the scripts as Redis 7 functions (FCALL), until Redis turns FUNCTION LOAD down
        #: (an older server, or a user not allowed it): then by EVALSHA
        self.use_functions = True

    def fcall_args(self, call: Call[Any]) -> tuple[Any, ...]:
        keys = (self.keys.prefix, *call.keys)
        return (scripts.FUNCTIONS[call.script], len(keys), *keys, *call.args)

    def functions_refused(self, exc: redis.ResponseError) -> None:
        """FUNCTION LOAD failed: from now on the scripts go by EVALSHA."""
        logger.info("kickq: Redis at %s takes no functions (%s): scripts are sent by EVALSHA",
                    masked_url(self.client), exc)
        self.use_functions = False

    def check_replicated(self, acked: int) -> None:
        """Raise RedisUnavailable when fewer than ``wait_replicas`` replicas acknowledged a write."""
        if acked < self.wait_replicas:
            raise RedisUnavailable(
                f"kickq's write reached {acked} of the {self.wait_replicas} replicas it waits for "
                f"(redis_wait_replicas) at {masked_url(self.client)} within {self.wait_ms} ms")


def scripts_missing(exc: BaseException) -> bool:
    """Whether a call failed only for want of kickq's functions or scripts in Redis (restarted
    without them, flushed, or older than Redis 7 for FCALL): nothing ran, so once they are
    loaded the call can be sent again."""
    if isinstance(exc, redis.exceptions.NoScriptError):
        return True
    message = str(exc)
    return isinstance(exc, redis.ResponseError) and (
        message.startswith("Function not found") or message.lower().startswith("unknown command"))


class JobStore(_Store):
    """Job records of one namespace on one Redis (see :class:`_Store` for ``wait_replicas``)."""

    client: Client

    def __init__(self, client: Client, keys: Keys, wait_replicas: int = 0, timeout: float = 5.0) -> None:
        super().__init__(client, keys, wait_replicas, timeout)
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
        if self.wait_replicas and call.script in REPLICATED:
            return self.pipelined(call)
        with redis_errors(self.client):
            return call.parse(self._call(call))

    def _call(self, call: Call[Any]) -> Any:
        """The reply of one script call: by FCALL, its function loaded first should Redis lack
        it; by EVALSHA where Redis takes no functions (redis-py loads a missing script)."""
        if self.use_functions:
            try:
                return self.client.fcall(*self.fcall_args(call))
            except redis.ResponseError as exc:
                if not scripts_missing(exc):
                    raise
                self.load()
            if self.use_functions:
                return self.client.fcall(*self.fcall_args(call))
        return self._scripts[call.script](keys=[self.keys.prefix, *call.keys], args=call.args)

    def load(self) -> None:
        """Load the library of functions into Redis, or where Redis takes none, the scripts."""
        if self.use_functions:
            try:
                self.client.function_load(scripts.LIBRARY, replace=True)
                return
            except redis.ResponseError as exc:
                self.functions_refused(exc)
        for script in self._scripts.values():
            self.client.script_load(script.script)

    def pipelined(self, call: Call[T]) -> T:
        """Send ``call`` in a pipeline, followed on the same connection by WAIT when
        ``wait_replicas`` asks for it (see :meth:`run_all`)."""
        return self._pipelined([call])[0]  # type: ignore[no-any-return]

    def run_all(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Send ``calls`` in one round trip (a pipeline; one by one on a Cluster, whose pipelines
        take no scripts) and parse each reply; the first error raises."""
        if len(calls) == 1:
            return [self.run(calls[0])]
        if isinstance(self.client, RedisCluster):
            return [self.run(call) for call in calls]
        return self._pipelined(calls)

    def _pipelined(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """The calls in a pipeline, each by its function's name or its script's SHA (no SCRIPT
        EXISTS round trip first); should Redis lack them, they are loaded and the calls sent
        again (each call sent again changes nothing it did: see ``replayed`` in lua/lib.lua)."""
        for again in (False, True):
            pipe = self.client.pipeline(transaction=False)
            ends = []
            for call in calls:
                queue_pipelined(self, call, pipe)
                ends.append(len(pipe.command_stack))
            with redis_errors(self.client):
                replies = pipe.execute(raise_on_error=False)
            try:
                return [parse_pipelined(self, call, replies[start:end])
                        for call, start, end in zip(calls, [0, *ends], ends, strict=False)]
            except redis.ResponseError as exc:
                if again or not scripts_missing(exc):
                    raise
                with redis_errors(self.client):
                    self.load()
        raise AssertionError("unreachable")

    # --- transitions -------------------------------------------------------

    def start_run(self, job_id: str, attempt: int, token: str, lock_timeout: float) -> Started:
        return self.run(scripts.start(job_id, attempt, token, lock_timeout))

    def finish_run(self, job_id: str, token: str, outcome: str, payload: str, purge: float,
                   traceback: str = "") -> Ended:
        return self.run(scripts.finish(job_id, token, outcome, payload, purge, traceback))

    def finish_then_start(self, job_id: str, token: str, outcome: str, payload: str, purge: float,
                          traceback: str, then: tuple[str, int, str, float]) -> tuple[Ended, Started]:
        """End a run and start the next job's (``then``: id, attempt, token, lock_timeout) in one
        call: a chunk's jobs in turn (see lua/turn.lua)."""
        return self.run(scripts.turn(job_id, token, outcome, payload, purge, traceback, *then))

    def reap(self, purge: float, limit: int = scripts.REAP_LIMIT) -> list[Ended]:
        return self.run(scripts.reap(purge, limit))

    def heartbeat(self, lock_timeout: float, runs: Sequence[tuple[str, str]],
                  ahead: Sequence[str] = ()) -> list[tuple[str, str]]:
        return self.run(scripts.heartbeat(lock_timeout, runs, ahead))

    def delete(self, job_id: str, terminate: bool = False) -> Deleted:
        return self.run(scripts.delete(job_id, terminate))

    def progress(self, job_id: str, token: str, value_json: str) -> bool:
        return self.run(scripts.progress(job_id, token, value_json))

    def promote(self, horizon: float, lease: float,
                limit: int = scripts.PROMOTE_LIMIT) -> tuple[list[Claimed], float | None]:
        return self.run(scripts.promote(horizon, lease, limit))

    def overdue(self, grace: float, limit: int = 100) -> list[Claimed]:
        return self.run(scripts.overdue(grace, limit))

    def unpark(self, claims: Sequence[Claimed]) -> None:
        if claims:
            self.run(scripts.unpark(claims))

    def set_limits(self, name: str, limits: Limits) -> int:
        """Set a name's limits; returns how many waiting jobs that woke (in calls of at most
        scripts.RELEASE_CAP each, so that none holds Redis long)."""
        total = 0
        while True:
            woken = self.run(scripts.limit(name, limits))
            total += woken
            if woken < scripts.RELEASE_CAP:
                return total

    # --- reads -------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with redis_errors(self.client):
            return record_from(job_id, self.client.hgetall(self.keys.job(job_id)))

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
        """Records in the given states (in that order) and of ``name`` if given, paged.

        A page costs O(log N + its size) at any offset, with or without a name: whole states are
        skipped by their counts in the index (of all names, or the name's own), the page's ids
        are read by rank and its records in one round trip.
        """
        found: list[JobRecord] = []
        for state in states:
            if len(found) >= limit:
                break
            if name is not None:
                key = self.keys.name_index(state, name)
            else:
                key = self.keys.active if state == "processing" else self.keys.index(state)
            with redis_errors(self.client):
                size = self.client.zcard(key)
                # finished records expire: their index entries (scored by expiry) may outlive them
                expired = (self.client.zcount(key, "-inf", f"({redis_now(self.client, self.keys.names)}")
                           if state in FINAL_STATES else 0)
            if offset >= size - expired:
                offset -= size - expired
                continue
            start = expired + offset
            with redis_errors(self.client):
                ids = [text(i) for i in self.client.zrange(key, start, start + limit - len(found) - 1)]
            offset = 0
            found.extend(record for record in self._get_many(ids) if record is not None)
        return found

    def _get_many(self, ids: Sequence[str]) -> list[JobRecord | None]:
        """The records of ``ids`` in one round trip (None for one that is gone)."""
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        with redis_errors(self.client):
            return [record_from(job_id, raw) for job_id, raw in zip(ids, pipe.execute(), strict=True)]

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

    def live_workers(self, names: Sequence[str]) -> dict[str, list[str]]:
        """The live workers (``hostname:pid``) that handle each name: the clock and one round trip."""
        with redis_errors(self.client):
            now = redis_now(self.client, self.keys.names)
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                queue_live_workers(self.keys, pipe, name, now)
            replies = pipe.execute()
        return {name: [text(m) for m in replies[2 * i + 1]] for i, name in enumerate(names)}

    def raw_stats(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Counters, samples, completion buckets and live workers of each name: the clock and
        one round trip."""
        with redis_errors(self.client):
            now = redis_now(self.client, self.keys.names)
            pipe = self.client.pipeline(transaction=False)
            queue_stats(self.keys, pipe, names, now)
            return parse_stats(names, pipe.execute(), now)


def queue_pipelined(store: _Store, call: Call[Any], pipe: Any) -> None:
    """Queue what :meth:`JobStore.pipelined` sends (on a sync or an asyncio pipeline)."""
    if store.use_functions:
        pipe.fcall(*store.fcall_args(call))
    else:
        pipe.evalsha(store.shas[call.script], 1 + len(call.keys), store.keys.prefix, *call.keys, *call.args)
    if store.wait_replicas and call.script in REPLICATED:
        pipe.execute_command("WAIT", store.wait_replicas, store.wait_ms)


def parse_pipelined(store: _Store, call: Call[T], replies: list[Any]) -> T:
    """The reply of the call :func:`queue_pipelined` queued (its error raised)."""
    acked = replies.pop() if store.wait_replicas and call.script in REPLICATED else None
    reply = replies[0]
    if isinstance(reply, Exception):
        raise reply
    if acked is not None:
        store.check_replicated(acked)
    return call.parse(reply)


Batch = list[tuple[Call[Any], list[asyncio.Future[Any]]]]


def merged(batch: list[tuple[Call[Any], asyncio.Future[Any]]]) -> Batch:
    """The calls of a batch, creates of one name and flags (the ARGV before the jobs) and queue
    merged into one create of all their jobs: each job is written as it would have been alone.
    (A create of the caller's own ids has a call id of its own, so it is never merged.)"""
    out: Batch = []
    creates: dict[tuple[Any, ...], int] = {}
    for call, future in batch:
        if call.script != "create":
            out.append((call, [future]))
            continue
        key = (call.keys, *call.args[:CREATE_HEADER])
        if key in creates and not call.replays and (
                len(out[creates[key]][0].args) + len(call.args) - 2 * CREATE_HEADER
                <= CREATE_CHUNK * (4 if call.keys else 2)):  # (id, data[, count, message] per job)
            first, futures = out[creates[key]]
            out[creates[key]] = (replace(first, args=(*first.args, *call.args[CREATE_HEADER:])),
                                 [*futures, future])
        else:
            creates[key] = len(out)
            out.append((call, [future]))
    return out


def settle_all(futures: list[asyncio.Future[Any]], result: Any = None,
               error: BaseException | None = None) -> None:
    for future in futures:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


def queue_live_workers(keys: Keys, pipe: Any, name: str, now: float) -> None:
    """Queue two replies: the expired members dropped, then the live ones."""
    key = keys.workers(name)
    pipe.zremrangebyscore(key, "-inf", now)
    pipe.zrangebyscore(key, now, "+inf")


def queue_stats(keys: Keys, pipe: Any, names: Sequence[str], now: float) -> None:
    """Queue the reads of :func:`parse_stats` on a pipeline (sync or asyncio)."""
    for name in names:
        pipe.hgetall(keys.stats(name))
        for state in ACTIVE_STATES:  # the gauges: how many jobs of the name are in each state
            pipe.zcard(keys.name_index(state, name))
        # the latest 500 (the scripts trim the lists to that now and then)
        pipe.lrange(keys.process_times(name), 0, 499)
        pipe.lrange(keys.wait_times(name), 0, 499)
        pipe.hgetall(keys.completions(name))
        queue_live_workers(keys, pipe, name, now)


def completions(done: dict[Any, Any]) -> dict[int, int]:
    """The minute buckets of a name's completions (see ``completed`` in lua/lib.lua): the
    number fields, and the second named by "last", not yet added to its minute ("s<second>"
    fields are the per-second buckets)."""
    fields = {text(k): int(v) for k, v in done.items()}
    minutes = {int(k): v for k, v in fields.items() if k.isdigit()}
    last = fields.get("last")
    if last is not None:
        minute = last // 60
        minutes[minute] = minutes.get(minute, 0) + fields.get(f"s{last}", 0)
    return minutes


def parse_stats(names: Sequence[str], replies: Sequence[Any], now: float) -> dict[str, dict[str, Any]]:
    """What :func:`queue_stats` read, per name."""
    result = {}
    per_name = 6 + len(ACTIVE_STATES)
    for i, name in enumerate(names):
        counters, *gauges, ptimes, wtimes, done, _, workers = replies[per_name * i: per_name * (i + 1)]
        result[name] = {
            "counters": {**{text(k): int(v) for k, v in counters.items()},
                         **dict(zip(ACTIVE_STATES, map(int, gauges), strict=True))},
            "process_times": [float(x) for x in ptimes],
            "wait_times": [float(x) for x in wtimes],
            "completions": completions(done),
            "recent": {int(text(k)[1:]): int(v) for k, v in done.items() if text(k).startswith("s")},
            "workers": [text(m) for m in workers],
            "now": now,
        }
    return result


def record_from(job_id: str, raw: dict[Any, Any]) -> JobRecord | None:
    """Job ``job_id``'s record from its hash (None when the hash is empty: no such job)."""
    return JobRecord.from_hash(job_id, {text(k): text(v) for k, v in raw.items()}) if raw else None


class AsyncJobStore(_Store):
    """The asyncio twin of :class:`JobStore`: the same script calls and reads, awaited on a
    ``redis.asyncio`` client of the same server (the create/read/delete/stats side only)."""

    client: AsyncClient

    def __init__(self, client: AsyncClient, keys: Keys, wait_replicas: int = 0, timeout: float = 5.0) -> None:
        super().__init__(client, keys, wait_replicas, timeout)
        self._batch: list[tuple[Call[Any], asyncio.Future[Any]]] = []
        self._in_flight = False
        self._draining: set[asyncio.Task[None]] = set()

    async def run(self, call: Call[T]) -> T:
        """Send one script call and parse its reply (see :meth:`JobStore.pipelined`). A call
        made while another round trip is under way waits for it, then goes out with the others
        that came meanwhile in one round trip, creates of one name and flags merged into one
        create (as ``create_many`` makes): many tasks creating at once cost few round trips."""
        if self._in_flight:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._batch.append((call, future))
            return await future
        self._in_flight = True
        try:
            return await self._send_one(call)
        finally:
            if self._batch:
                task = asyncio.ensure_future(self._drain())  # keeps _in_flight until it is done
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                self._in_flight = False

    async def _send_one(self, call: Call[T]) -> T:
        """One call on its own: its script, loaded again should Redis have lost it."""
        if self.wait_replicas and call.script in REPLICATED:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            await self._flush([(call, [future])])
            return future.result()
        with redis_errors(self.client):
            return call.parse(await self._call(call))

    async def _call(self, call: Call[Any]) -> Any:
        """The reply of one script call (see :meth:`JobStore._send`)."""
        if self.use_functions:
            try:
                return await self.client.fcall(*self.fcall_args(call))
            except redis.ResponseError as exc:
                if not scripts_missing(exc):
                    raise
                await self.load()
            if self.use_functions:
                return await self.client.fcall(*self.fcall_args(call))
        return await self._scripts[call.script](keys=[self.keys.prefix, *call.keys], args=call.args)

    async def load(self) -> None:
        """Load the library of functions into Redis, or where Redis takes none, the scripts."""
        if self.use_functions:
            try:
                await self.client.function_load(scripts.LIBRARY, replace=True)
                return
            except redis.ResponseError as exc:
                self.functions_refused(exc)
        for script in self._scripts.values():
            await self.client.script_load(script.script)

    async def _drain(self) -> None:
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                await self._flush(merged(batch))
        finally:
            self._in_flight = False

    async def _flush(self, batch: Batch, again: bool = False) -> None:
        """Send the calls in one pipeline and settle each one's futures with its reply."""
        if isinstance(self.client, redis.asyncio.cluster.RedisCluster):
            # cluster pipelines take no scripts: one call at a time, each routed by its key
            for call, futures in batch:
                try:
                    with redis_errors(self.client):
                        reply = await self._call(call)
                    settle_all(futures, call.parse(reply))
                except Exception as exc:
                    settle_all(futures, error=exc)
            return
        pipe = self.client.pipeline(transaction=False)
        ends = []
        for call, _ in batch:
            queue_pipelined(self, call, pipe)
            ends.append(len(pipe.command_stack))
        try:
            with redis_errors(self.client):
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # Redis away: every call of the batch fails
            for _, futures in batch:
                settle_all(futures, error=exc)
            return
        lost: Batch = []
        for (call, futures), start, end in zip(batch, [0, *ends], ends, strict=False):
            try:
                settle_all(futures, parse_pipelined(self, call, replies[start:end]))
            except Exception as exc:
                if again or not scripts_missing(exc):
                    settle_all(futures, error=exc)
                else:
                    lost.append((call, futures))
        if lost:  # Redis lacks the functions (a restart, an older server): load, send those again
            try:
                with redis_errors(self.client):
                    await self.load()
            except Exception as exc:
                for _, futures in lost:
                    settle_all(futures, error=exc)
                return
            await self._flush(lost, again=True)

    async def now(self) -> float:
        if isinstance(self.client, redis.asyncio.cluster.RedisCluster):
            node = self.client.get_node_from_key(self.keys.names)
            seconds, micros = await self.client.time(target_nodes=node)
        else:
            seconds, micros = await self.client.time()
        return float(seconds + micros / 1e6)

    async def get(self, job_id: str) -> JobRecord | None:
        with redis_errors(self.client):
            return record_from(job_id, await self.client.hgetall(self.keys.job(job_id)))

    async def names(self) -> list[str]:
        with redis_errors(self.client):
            return sorted(text(n) for n in await self.client.smembers(self.keys.names))

    async def live_workers(self, names: Sequence[str]) -> dict[str, list[str]]:
        with redis_errors(self.client):
            now = await self.now()
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                queue_live_workers(self.keys, pipe, name, now)
            replies = await pipe.execute()
        return {name: [text(m) for m in replies[2 * i + 1]] for i, name in enumerate(names)}

    async def raw_stats(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        with redis_errors(self.client):
            now = await self.now()
            pipe = self.client.pipeline(transaction=False)
            queue_stats(self.keys, pipe, names, now)
            return parse_stats(names, await pipe.execute(), now)
