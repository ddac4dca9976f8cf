"""Awaiting stored outcomes without a thread: one pub/sub listener per event loop.

Celery's Redis result backend stores an outcome with ``SET``/``SETEX`` and then
``PUBLISH``es the same value on a channel named like the key. A :class:`Listener`
(one per running event loop and Redis server) holds one ``redis.asyncio`` pub/sub
connection and one command connection: it subscribes to the key of every awaited
outcome (awaits started together share a ``SUBSCRIBE``, up to :data:`BATCH` keys each),
reads each key once its subscription is confirmed (``MGET``, batched too), so that an
outcome stored before the await is seen, and resolves the waiters' futures when the
value arrives either way. A key no one waits for is unsubscribed; the listener closes its
connections when no one waits at all (the next await opens a new one).

Deadlines are loop timers. A deadline that passes before the key's first read has
answered waits for that read (an outcome stored before the await wins), at most
:data:`READ_GRACE` seconds past the deadline. A pub/sub connection that fails, or stays
silent after a PING, is dropped: the listener opens a new one (with backoff while Redis
is unreachable; the waiters' deadlines still hold) and subscribes and reads every key
again, so a value published while it was away is not lost.

Only Celery's plain and Sentinel Redis backends, with settings that ``redis.asyncio``
takes, have a listener (:func:`listener_for` returns ``None`` otherwise). A host
name (not an IP address) is resolved by asyncio's ``getaddrinfo``, which borrows the
default executor for the lookup when a listener connects.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
from celery.backends.base import Backend
from celery.backends.redis import RedisBackend, SentinelBackend
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger("kickq_celery")

T = TypeVar("T")

#: seconds past its deadline that a waiter waits for its key's first read
READ_GRACE = 1.0
#: how long an idle listener keeps its connections, for the next await (one at a time, say)
LINGER = 1.0
#: keys per SUBSCRIBE / MGET
BATCH = 1000
#: seconds of silence on the pub/sub connection before a PING; twice that, a reconnect
QUIET = 15.0

_ASYNC_CONNECTIONS: dict[type[Any], type[Any]] = {
    redis.Connection: redis.asyncio.Connection,
    redis.SSLConnection: redis.asyncio.SSLConnection,
    redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
}

_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Listener]] = (
    weakref.WeakKeyDictionary())
_listeners_lock = threading.Lock()
#: backend -> what _client_factory found for it (its settings do not change once made)
_factories: weakref.WeakKeyDictionary[Backend, tuple[str, Callable[[], redis.asyncio.Redis]] | None] = (
    weakref.WeakKeyDictionary())


def _accepted(connection_class: type[Any]) -> frozenset[str]:
    """The keyword arguments a ``redis.asyncio`` connection class takes."""
    return _accepted_by(connection_class.__mro__)


@cache
def _accepted_by(mro: tuple[type[Any], ...]) -> frozenset[str]:
    names: set[str] = {"max_connections"}  # the pool's
    for klass in mro:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(name for name, p in inspect.signature(init).parameters.items()
                         if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self")
    return frozenset(names)


def _async_params(params: dict[str, Any], default_class: type[Any]) -> dict[str, Any] | None:
    """``params`` of a sync redis-py connection for its asyncio twin, or None when a
    setting has no asyncio equivalent (then the caller keeps the sync path)."""
    params = dict(params)
    async_class = _ASYNC_CONNECTIONS.get(params.pop("connection_class", default_class))
    if async_class is None:
        return None
    accepted = _accepted(async_class)
    for name, value in list(params.items()):
        if name not in accepted:
            if value not in (None, False):
                return None
            del params[name]
    params["decode_responses"] = False  # the backend decodes the raw payloads
    return {**params, "connection_class": async_class}


def _no_retry() -> Retry:
    """redis-py retries nothing: the listener does, subscribing every key again."""
    return Retry(NoBackoff(), 0)


def _identity(kind: str, params: Any) -> str:
    return f"{kind}:{sorted(params.items(), key=lambda item: item[0])!r}"


def _client_factory(backend: Backend) -> tuple[str, Callable[[], redis.asyncio.Redis]] | None:
    """(identity of the server, a function making an asyncio client of it) for the
    backend, or None when it is not one kickq can listen to."""
    if isinstance(backend, SentinelBackend):
        params = dict(backend.connparams)
        hosts = params.pop("hosts", [])
        options = backend.app.conf.get("result_backend_transport_options") or {}
        service: str | None = options.get("master_name")
        # Sentinel over TLS has no asyncio twin in redis-py
        master = None if "connection_class" in params else _async_params(params, redis.Connection)
        if master is None or not hosts or not service:
            return None
        master.pop("connection_class")
        addresses = [(host["host"], host["port"]) for host in hosts]
        sentinel_kwargs = options.get("sentinel_kwargs") or {}
        others = options.get("min_other_sentinels", 0)
        credentials = {k: master.pop(k) for k in ("username", "password") if k in master}

        def sentinel_client() -> redis.asyncio.Redis:
            sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # (typed in redis-py 8.2)
                addresses, min_other_sentinels=others, sentinel_kwargs=sentinel_kwargs, **master)
            client: redis.asyncio.Redis = sentinel.master_for(service, retry=_no_retry(), **credentials)
            return client

        ident = _identity("sentinel", {**master, **credentials, "hosts": addresses, "service": service})
        return ident, sentinel_client
    if type(backend) is not RedisBackend:  # a subclass may store elsewhere
        return None
    plain = _async_params(backend.connparams, redis.Connection)
    if plain is None:
        return None

    def plain_client() -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_pool(redis.asyncio.ConnectionPool(**{**plain, "retry": _no_retry()}))

    return _identity("redis", plain), plain_client


def listener_for(backend: Backend) -> Listener | None:
    """The running event loop's listener of the backend's Redis (made on first use), or
    None when the backend is not a Redis one that ``redis.asyncio`` can reach the same way."""
    loop = asyncio.get_running_loop()
    with _listeners_lock:
        try:
            found = _factories[backend]
        except KeyError:
            found = _factories[backend] = _client_factory(backend)
        except TypeError:  # a backend that cannot be weakly referenced
            found = _client_factory(backend)
        if found is None:
            return None
        ident, make_client = found
        per_loop = _listeners.setdefault(loop, {})
        listener = per_loop.get(ident)
        if listener is None:
            listener = per_loop[ident] = Listener(loop, make_client, ident)
    return listener


def _forget(listener: Listener) -> None:
    with _listeners_lock:
        per_loop = _listeners.get(listener.loop)
        if per_loop is not None and per_loop.get(listener.ident) is listener:
            del per_loop[listener.ident]


class _Waiter:
    __slots__ = ("future", "accept", "expired")

    def __init__(self, future: asyncio.Future[Any], accept: Callable[[bytes], Any]) -> None:
        self.future = future
        self.accept = accept
        self.expired = False


class _Key:
    """The waiters of one key, and whether it was read since its subscription was confirmed."""

    __slots__ = ("waiters", "checked")

    def __init__(self) -> None:
        self.waiters: set[_Waiter] = set()
        self.checked = False


class Listener:
    """The pub/sub listener of one Redis server for one event loop (see the module doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, make_client: Callable[[], redis.asyncio.Redis],
                 ident: str) -> None:
        self.loop = loop
        self.ident = ident
        self._client = make_client()
        #: the current pub/sub connection (None: the flusher makes one and subscribes every key)
        self._pubsub: PubSub | None = None
        self._keys: dict[bytes, _Key] = {}
        self._to_subscribe: set[bytes] = set()
        self._to_unsubscribe: set[bytes] = set()
        self._to_read: set[bytes] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self._idle: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None

    async def wait(self, key: bytes, timeout: float, accept: Callable[[bytes], T | None]) -> T:
        """The first value of ``key`` (stored already, or published later) that ``accept``
        turns into something other than None; raises TimeoutError after ``timeout`` s."""
        assert not self._closed, "a closed listener is no longer handed out"
        if self._idle is not None:  # waited for again before it closed
            self._idle.cancel()
            self._idle = None
        waiter = _Waiter(self.loop.create_future(), accept)
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key()
            self._to_subscribe.add(key)
            self._wake()
        entry.waiters.add(waiter)
        timer = self.loop.call_later(max(timeout, 0.0), self._expire, key, waiter)
        try:
            result: T = await waiter.future
            return result
        finally:
            timer.cancel()
            self._discard(key, waiter)
            if not self._keys and not self._closed and self._idle is None:
                self._idle = self.loop.call_later(LINGER, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle = None
        if not self._keys and not self._closed:
            self._closing = self.loop.create_task(self._close())

    # --- waiters -----------------------------------------------------------

    def _expire(self, key: bytes, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        entry = self._keys.get(key)
        if entry is not None and not entry.checked and not waiter.expired:
            # an outcome stored before the await must win: wait (a little) for the first read
            waiter.expired = True
            self.loop.call_later(READ_GRACE, self._expire, key, waiter)
            return
        waiter.future.set_exception(TimeoutError(f"nothing stored under {key!r} in time"))

    def _discard(self, key: bytes, waiter: _Waiter) -> None:
        entry = self._keys.get(key)
        if entry is None:
            return
        entry.waiters.discard(waiter)
        if not entry.waiters:
            del self._keys[key]
            self._to_unsubscribe.add(key)
            if self._keys:
                self._wake()

    def _deliver(self, key: bytes, payload: bytes | None, first_read: bool) -> None:
        entry = self._keys.get(key)
        if entry is None:
            return
        for waiter in list(entry.waiters):
            if waiter.future.done():
                continue
            if payload is not None:
                try:
                    value = waiter.accept(payload)
                except Exception as exc:  # a payload the backend cannot decode
                    waiter.future.set_exception(exc)
                    continue
                if value is not None:
                    waiter.future.set_result(value)
                    continue
            if first_read and waiter.expired:
                waiter.future.set_exception(TimeoutError(f"nothing stored under {key!r} in time"))
        if first_read:
            entry.checked = True

    # --- connections -------------------------------------------------------

    def _wake(self) -> None:
        if not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = self.loop.create_task(self._flush())

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:  # once per outage
            logger.warning("kickq: the tombstone listener lost its Redis (%s); retrying", exc)
        self._failing = True

    async def _flush(self) -> None:
        """Send the pending (un)subscriptions and first reads, in batches, until none are
        left; retried with backoff while Redis is unreachable."""
        backoff = 0.05
        while not self._closed and (self._to_subscribe or self._to_unsubscribe or self._to_read):
            try:
                await self._flush_once()
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            else:
                backoff = 0.05

    def _take(self, pending: set[bytes]) -> list[bytes]:
        """Up to BATCH keys of ``pending`` that someone still waits for (taken out of it)."""
        pending.intersection_update(self._keys)
        batch = list(itertools.islice(pending, BATCH))
        pending.difference_update(batch)
        return batch

    async def _flush_once(self) -> None:
        pubsub = self._pubsub
        if pubsub is None:  # a new connection: nothing to unsubscribe
            pubsub = self._pubsub = self._client.pubsub()
            self._to_unsubscribe.clear()
        try:
            gone = self._to_unsubscribe - self._keys.keys()
            self._to_unsubscribe.clear()
            if gone and pubsub.connection is not None:
                await pubsub.unsubscribe(*gone)
            while batch := self._take(self._to_subscribe):
                await pubsub.subscribe(*batch)
                if self._reader is None:
                    self._reader = self.loop.create_task(self._read(pubsub))
        except (RedisError, OSError):
            await self._drop(pubsub)
            raise
        while batch := self._take(self._to_read):
            try:
                values: list[Any] = await self._client.mget(batch)
            except BaseException:
                self._to_read.update(batch)
                raise
            self._failing = False
            for key, value in zip(batch, values, strict=True):
                self._deliver(key, value, first_read=True)

    async def _read(self, pubsub: PubSub) -> None:
        """Deliver the published values; read a key once its subscription is confirmed (so
        that a value stored before is seen). Drops the connection when it fails or stays
        silent after a PING (the flusher then subscribes every key on a new one)."""
        quiet = False
        while not self._closed:
            try:
                message = await pubsub.get_message(timeout=QUIET)
                if message is None:
                    if quiet:
                        raise RedisError(f"no answer to a PING in {QUIET} s")
                    quiet = True
                    await pubsub.ping()
                    continue
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await self._drop(pubsub)
                return
            quiet = False
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                self._deliver(channel, message["data"], first_read=False)
            elif kind == "subscribe" and channel in self._keys:
                self._to_read.add(channel)
                self._wake()

    async def _drop(self, pubsub: PubSub) -> None:
        """Give up the pub/sub connection ``pubsub`` (its reader goes with it)."""
        if self._pubsub is pubsub:
            self._pubsub = None
            self._to_subscribe.update(self._keys)  # every key again, on a new connection
            self._to_read.clear()  # read once subscribed again
            reader, self._reader = self._reader, None
            if reader is not None and reader is not asyncio.current_task():
                reader.cancel()
            self._wake()
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # (typed in redis-py 8.2)
        except Exception as exc:
            logger.debug("kickq: closing a tombstone listener connection: %s", exc)

    async def _close(self) -> None:
        """Forget the listener and close its connections (no one waits any more)."""
        self._closed = True
        _forget(self)
        tasks = [task for task in (self._reader, self._flusher)
                 if task is not None and task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if self._pubsub is not None:
                await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # (typed in redis-py 8.2)
            await self._client.aclose()
            pool = self._client.connection_pool
            for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()):
                await sentinel.aclose()
        except Exception as exc:  # the waiters have their outcome: nothing to raise to them
            logger.debug("kickq: closing the tombstone listener: %s", exc)
