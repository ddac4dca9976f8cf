"""Redis clients from kickq's ``redis`` setting, and what every caller needs around them.

One shared client (connection pool) per setting; connection failures become
:class:`RedisUnavailable` with the address shown and any password hidden.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .exceptions import RedisUnavailable

_clients: dict[Any, redis.Redis] = {}
_clients_lock = threading.Lock()


def client_for(setting: Any) -> redis.Redis:
    """One shared client (connection pool) per Redis setting (URL, kwargs or client)."""
    if isinstance(setting, redis.Redis):
        return setting
    key = setting if isinstance(setting, str) else json.dumps(setting, sort_keys=True, default=str)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            kwargs: dict[str, Any] = {
                "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 5),
                "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
                "socket_connect_timeout": 2,
                "health_check_interval": 30,
            }
            if isinstance(setting, str):
                client = redis.Redis.from_url(setting, **kwargs)
            else:
                client = redis.Redis(**{**kwargs, **setting})
            _clients[key] = client
    return client


def close_all() -> None:
    """Close every shared client (``Kickq.reset``)."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
            client.connection_pool.disconnect()
        _clients.clear()


def same_server(a: redis.Redis, b: redis.Redis) -> bool:
    """Whether two clients talk to the same Redis server and database."""
    if a is b:
        return True
    ka, kb = a.connection_pool.connection_kwargs, b.connection_pool.connection_kwargs
    return all(ka.get(k) == kb.get(k) for k in ("host", "port", "path", "db"))


def backend_url(client: redis.Redis) -> str:
    """A Celery result-backend URL for the server ``client`` talks to."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"redis+socket://{kw['path']}"
    scheme = "rediss" if client.connection_pool.connection_class is redis.SSLConnection else "redis"
    auth = f"{kw.get('username') or ''}:{kw['password']}@" if kw.get("password") else ""
    return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


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


def redis_now(client: redis.Redis) -> float:
    """The Redis server's clock, in epoch seconds."""
    seconds, micros = client.time()
    return seconds + micros / 1e6
