"""Redis clients from kickq's ``redis`` setting, and what every caller needs around them.

One shared client (connection pool) per setting: a ``redis://``, ``rediss://`` or
``unix://`` URL, ``redis+sentinel://`` (the primary of a Sentinel service, followed
across failovers), ``redis+cluster://`` (a Redis Cluster), a dict of connection
kwargs, or a client the user made. Every call waits at most ``redis_timeout`` for a
reply; a dropped connection is retried with backoff (the scripts answer a call sent
again as the first time), a stalled server is not. Connection failures become
:class:`RedisUnavailable`, with the address shown and any password hidden.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .exceptions import ConfigError, RedisUnavailable

logger = logging.getLogger("kickq_celery")

#: what kickq's records live on: a plain (or Sentinel-managed) client, or a cluster client
Client = redis.Redis | RedisCluster

_clients: dict[Any, Client] = {}
_clients_lock = threading.Lock()


def _common(timeout: float, asyncio_: bool = False) -> dict[str, Any]:
    """Connection settings of every client kickq makes (sync, or asyncio's)."""
    retry = redis.asyncio.retry.Retry if asyncio_ else Retry
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # a dropped connection is retried (the scripts are safe to send twice); a timeout is
        # not: a stalled server would otherwise hold the caller for retries x timeout
        "retry": retry(ExponentialBackoff(cap=1.0, base=0.05), 5, supported_errors=(redis.ConnectionError,)),
        "retry_on_error": [redis.ConnectionError],
        "health_check_interval": 30,
    }


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        hosts.append((host or "localhost", int(port) if port else default_port))
    return hosts


def _split(url: str) -> tuple[str | None, str | None, str, list[str], dict[str, str]]:
    """(username, password, hosts, path parts, query) of a multi-host URL."""
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    rest, _, path = rest.partition("/")
    auth, _, netloc = rest.rpartition("@")
    user, _, password = auth.partition(":")
    return (unquote(user) or None, unquote(password) or None, netloc,
            [part for part in path.split("/") if part], dict(parse_qsl(query)))


def _sentinel_client(url: str, timeout: float) -> redis.Redis:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]``."""
    user, password, netloc, path, query = _split(url)
    if not path:
        raise ConfigError(f"a redis+sentinel:// URL names its service: {mask(url)}")
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(_hosts(netloc, 26379),
                        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
                        **_common(timeout))
    extra: dict[str, Any] = {"ssl": True} if query.get("ssl") in ("1", "true", "yes") else {}
    client: redis.Redis = sentinel.master_for(path[0], db=db, username=user, password=password, **extra)
    follow_failovers(client)
    return client


def _cluster_client(url: str, timeout: float) -> RedisCluster:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]``."""
    user, password, netloc, _, _ = _split(url)
    nodes = [ClusterNode(host, port) for host, port in _hosts(netloc, 6379)]
    return RedisCluster(startup_nodes=nodes, username=user, password=password,
                        socket_timeout=timeout, socket_connect_timeout=timeout)


def client_for(setting: Any, timeout: float = 5.0) -> Client:
    """One shared client (connection pool) per Redis setting (URL, kwargs or client)."""
    if isinstance(setting, (redis.Redis, RedisCluster)):
        follow_failovers(setting)
        return setting
    text = setting if isinstance(setting, str) else json.dumps(setting, sort_keys=True, default=str)
    key = (text, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if isinstance(setting, str) and setting.startswith("redis+sentinel://"):
                client = _sentinel_client(setting, timeout)
            elif isinstance(setting, str) and setting.startswith("redis+cluster://"):
                client = _cluster_client(setting, timeout)
            elif isinstance(setting, str):
                client = redis.Redis.from_url(setting, **_common(timeout))
            else:
                client = redis.Redis(**{**_common(timeout), **setting})
            _clients[key] = client
    return client


# --- asyncio clients: one per setting and event loop ----------------------------------

#: the asyncio client kickq makes (its connections belong to one event loop)
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, AsyncClient]] = (
    weakref.WeakKeyDictionary())


def async_client_for(setting: Any, timeout: float = 5.0) -> AsyncClient:
    """The asyncio twin of :func:`client_for` for the running event loop: the same server, the
    same timeouts and retries. A sync client given as the setting is followed to its server."""
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    key = (setting if isinstance(setting, str)
           else id(setting) if isinstance(setting, (redis.Redis, RedisCluster))
           else json.dumps(setting, sort_keys=True, default=str), timeout)
    client = per_loop.get(key)
    if client is None:
        client = per_loop[key] = _async_client(setting, timeout)
    return client


def _async_client(setting: Any, timeout: float) -> AsyncClient:
    common = _common(timeout, asyncio_=True)
    if isinstance(setting, RedisCluster):
        nodes = [redis.asyncio.cluster.ClusterNode(n.host, n.port) for n in setting.get_primaries()]
        kwargs = setting.nodes_manager.connection_kwargs
        return redis.asyncio.cluster.RedisCluster(
            startup_nodes=nodes, username=kwargs.get("username"), password=kwargs.get("password"),
            socket_timeout=timeout, socket_connect_timeout=timeout)
    if isinstance(setting, redis.Redis):
        pool = setting.connection_pool
        kwargs = {k: v for k, v in pool.connection_kwargs.items()
                  if k in ("host", "port", "db", "username", "password", "path")}
        if isinstance(pool, SentinelConnectionPool):
            primary: redis.asyncio.Redis = redis.asyncio.sentinel.Sentinel(
                _sentinel_hosts(pool), **common).master_for(
                pool.service_name, db=kwargs.get("db", 0), username=kwargs.get("username"),
                password=kwargs.get("password"))
            return primary
        if "path" in kwargs:
            kwargs["unix_socket_path"] = kwargs.pop("path")
        if is_tls(setting):
            kwargs.update({k: v for k, v in pool.connection_kwargs.items() if k.startswith("ssl_")}, ssl=True)
        return redis.asyncio.Redis(**{**common, **kwargs})
    if isinstance(setting, str) and setting.startswith("redis+sentinel://"):
        user, password, netloc, path, _ = _split(setting)
        sentinel = redis.asyncio.sentinel.Sentinel(_hosts(netloc, 26379), **common)
        client: redis.asyncio.Redis = sentinel.master_for(
            path[0], db=int(path[1]) if len(path) > 1 else 0, username=user, password=password)
        return client
    if isinstance(setting, str) and setting.startswith("redis+cluster://"):
        user, password, netloc, _, _ = _split(setting)
        return redis.asyncio.cluster.RedisCluster(
            startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in _hosts(netloc, 6379)],
            username=user, password=password, socket_timeout=timeout, socket_connect_timeout=timeout)
    if isinstance(setting, str):
        return redis.asyncio.Redis.from_url(setting, **common)
    return redis.asyncio.Redis(**{**common, **setting})


def close_all() -> None:
    """Close every shared client (``Kickq.reset``)."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
            if isinstance(client, redis.Redis):
                client.connection_pool.disconnect()
        _clients.clear()


# --- following a Sentinel failover ------------------------------------------------

#: the longest a failover holds kickq's calls (should +switch-master never come)
MAX_HOLD = 10.0


class _Follower:
    """Follows one Sentinel service's failovers in this process.

    From the moment the leading sentinel tells the chosen replica to become primary
    (``+failover-state-send-slaveof-noone``) to ``+switch-master``, the old primary still
    takes writes that the promotion has already cut off from the replica: kickq holds its
    calls meanwhile (at most :data:`MAX_HOLD`), then drops its connections to the old primary
    and goes on with the new one. Only the leader tells the first event, so every sentinel
    is listened to, each by a thread of its own.
    """

    def __init__(self, pool: SentinelConnectionPool) -> None:
        self.pool = pool
        self.hold_until = 0.0

    def start(self) -> None:
        for sentinel in self.pool.sentinel_manager.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            threading.Thread(target=self._listen, args=(kwargs["host"], kwargs["port"],
                                                        kwargs.get("socket_connect_timeout")),
                             name="kickq-sentinel", daemon=True).start()

    def wait(self) -> None:
        """Return once no failover of the service is under way (or the hold ran out)."""
        while time.monotonic() < self.hold_until:
            time.sleep(0.005)

    def _listen(self, host: str, port: int, connect_timeout: float | None) -> None:
        while True:
            listener = redis.Redis(host=host, port=port, socket_connect_timeout=connect_timeout,
                                   health_check_interval=10)
            try:
                pubsub = listener.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe("+failover-state-send-slaveof-noone", "+switch-master")
                pubsub.psubscribe("-failover-abort-*")
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message:
                        self._on(_text(message["channel"]), _text(message["data"]))
            except Exception:  # this sentinel is away: try it again in a moment
                listener.close()
                time.sleep(1.0)

    def _on(self, channel: str, data: str) -> None:
        # +switch-master: "<service> <old ip> <old port> <new ip> <new port>"; the others:
        # "<instance type> <name> <ip> <port> @ <service> <primary ip> <primary port>"
        if channel == "+switch-master":
            service = data.split(" ", 1)[0]
        else:
            service = data.partition(" @ ")[2].split(" ", 1)[0]
        if service != self.pool.service_name:
            return
        if channel == "+failover-state-send-slaveof-noone":
            self.hold_until = time.monotonic() + MAX_HOLD
            return
        if channel == "+switch-master":
            # asks the sentinels again and disconnects the idle connections; busy ones are
            # dropped when released (the pool owns only the new primary's)
            self.pool.get_master_address()
            logger.warning("kickq: Sentinel service %s switched primary: %s", service, data)
        self.hold_until = 0.0


_followers: dict[int, _Follower] = {}
_followers_lock = threading.Lock()


def follow_failovers(client: Client) -> None:
    """For a Sentinel-managed client: follow the service's failovers (see :class:`_Follower`)."""
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return
    with _followers_lock:
        if id(pool) in _followers:
            return
        _followers[id(pool)] = follower = _Follower(pool)
    follower.start()


def _after_fork() -> None:
    # the listening threads do not survive a fork (prefork pool processes use the clients too)
    with _followers_lock:
        followers = list(_followers.values())
    for follower in followers:
        follower.hold_until = 0.0
        follower.start()


os.register_at_fork(after_in_child=_after_fork)


# --- about a client -------------------------------------------------------------


#: a client of either kind (sync or asyncio), for the helpers that only look at its settings
AnyClient = Client | AsyncClient
_CLUSTERS = (RedisCluster, redis.asyncio.cluster.RedisCluster)
_SENTINEL_POOLS = (SentinelConnectionPool, redis.asyncio.sentinel.SentinelConnectionPool)


def _sentinel_hosts(pool: Any) -> list[tuple[str, int]]:
    """The (host, port) of each sentinel a pool asks."""
    return [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in pool.sentinel_manager.sentinels]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _kwargs(client: AnyClient, key: str | None = None) -> dict[str, Any]:
    if isinstance(client, _CLUSTERS):
        node = client.get_node_from_key(key) if key else client.get_default_node()
        assert node is not None
        return {"host": node.host, "port": node.port, **client.nodes_manager.connection_kwargs}
    return client.connection_pool.connection_kwargs


def sentinel_service(client: Client) -> str | None:
    """The Sentinel service a client follows, if it is a Sentinel-managed one."""
    pool = getattr(client, "connection_pool", None)
    return pool.service_name if isinstance(pool, SentinelConnectionPool) else None


def same_server(a: Client, b: Client) -> bool:
    """Whether two clients talk to the same Redis server and database."""
    if a is b:
        return True
    if isinstance(a, RedisCluster) or isinstance(b, RedisCluster):
        return False
    pa, pb = a.connection_pool, b.connection_pool
    if isinstance(pa, SentinelConnectionPool) or isinstance(pb, SentinelConnectionPool):
        return (isinstance(pa, SentinelConnectionPool) and isinstance(pb, SentinelConnectionPool)
                and pa.service_name == pb.service_name
                and pa.connection_kwargs.get("db") == pb.connection_kwargs.get("db"))
    ka, kb = pa.connection_kwargs, pb.connection_kwargs
    return all(ka.get(k) == kb.get(k) for k in ("host", "port", "path", "db"))


def is_tls(client: AnyClient) -> bool:
    if isinstance(client, _CLUSTERS):
        return bool(client.nodes_manager.connection_kwargs.get("ssl"))
    return issubclass(client.connection_pool.connection_class,
                      (redis.SSLConnection, redis.asyncio.SSLConnection))


def backend_url(client: Client, key: str | None = None) -> str:
    """A Celery result-backend URL for the server ``client`` talks to (on a Cluster: the
    node holding ``key``)."""
    kw = _kwargs(client, key)
    if "path" in kw:
        return f"redis+socket://{kw['path']}"
    user, password = quote(kw.get("username") or "", safe=""), quote(kw.get("password") or "", safe="")
    auth = f"{user}:{password}@" if password else ""
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        hosts = ";".join(f"sentinel://{auth}{host}:{port}" for host, port in _sentinel_hosts(pool))
        return f"{hosts}/{kw.get('db', 0)}"
    address = f"{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    return f"rediss://{address}{_ssl_query(kw)}" if is_tls(client) else f"redis://{address}"


_CERT_REQS = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional", ssl.CERT_REQUIRED: "required"}


def _ssl_query(kw: dict[str, Any]) -> str:
    """A TLS client's certificate settings as Celery's Redis backend reads them from a
    ``rediss://`` URL (it refuses one without ``ssl_cert_reqs``)."""
    reqs = kw.get("ssl_cert_reqs", "required")  # redis-py's default
    params = {"ssl_cert_reqs": "none" if reqs is None else _CERT_REQS.get(reqs, reqs)}
    params.update({k: kw[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if kw.get(k)})
    return "?" + urlencode(params)


def masked_url(client: AnyClient) -> str:
    """The client's address with any password hidden, for error messages."""
    pool = getattr(client, "connection_pool", None)
    kwargs = _kwargs(client)
    auth = ":***@" if kwargs.get("password") else ""
    if isinstance(pool, _SENTINEL_POOLS):
        hosts = ",".join(f"{host}:{port}" for host, port in _sentinel_hosts(pool))
        return f"redis+sentinel://{auth}{hosts}/{pool.service_name}/{kwargs.get('db', 0)}"
    if isinstance(client, _CLUSTERS):
        hosts = ",".join(f"{n.host}:{n.port}" for n in client.get_primaries())
        return f"redis+cluster://{auth}{hosts}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if is_tls(client) else "redis"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    return f"{scheme}://{auth}{host}:{port}/{db}"


def mask(url: str) -> str:
    """A URL with its password hidden."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


@contextmanager
def redis_errors(client: AnyClient) -> Iterator[None]:
    """Turn redis-py connection failures into :class:`RedisUnavailable` (and wait out a
    Sentinel failover under way first)."""
    follower = _followers.get(id(getattr(client, "connection_pool", None)))
    if follower is not None:
        follower.wait()
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(f"kickq cannot reach Redis at {masked_url(client)}: {exc}") from exc


def redis_now(client: Client, key: str | None = None) -> float:
    """The Redis server's clock, in epoch seconds (on a cluster, of the node holding ``key``)."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key) if key else client.get_default_node()
        seconds, micros = client.time(target_nodes=node)
    else:
        seconds, micros = client.time()
    return float(seconds + micros / 1e6)
