"""The fault and production-Redis harness itself (tests/servers.py, tests/faultproxy.py),
against real servers: a reply dropped after Redis applied the command, a server that never
answers, TLS with the right and a wrong CA, a Sentinel failover and a Cluster failover and
slot migration."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ConnectionError, MovedError
from redis.retry import Retry

from tests.faultproxy import FaultProxy, SilentServer
from tests.servers import ClusterSetup, RedisServer, SentinelSetup, TLSFiles, make_tls_files, wait_for


def retrying(port: int, **kwargs: object) -> redis.Redis:
    """A client that retries a command up to 3 times on a dropped connection, at once."""
    return redis.Redis(port=port, retry=Retry(NoBackoff(), 3), retry_on_error=[ConnectionError],
                       decode_responses=True, **kwargs)  # type: ignore[arg-type]


def test_proxy_drops_one_reply_after_redis_applied_the_command(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server, FaultProxy("127.0.0.1", server.port) as proxy:
        client = retrying(proxy.port)
        assert client.ping()
        proxy.drop_reply_once(lambda data: b"INCR" in data.upper())
        assert client.incr("k") == 2  # applied, reply dropped, sent again on a new connection
        assert proxy.dropped == 1 and not proxy.armed
        assert client.incr("k") == 3  # disarmed: once only
        with server.client() as direct:
            assert direct.get("k") == "3"
        client.close()
    assert proxy.threads() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]


def test_proxy_drops_a_transaction_and_a_script_reply(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server, FaultProxy("127.0.0.1", server.port) as proxy:
        client = retrying(proxy.port)
        proxy.drop_reply_once(lambda data: b"EXEC" in data.upper())
        with client.pipeline(transaction=True) as pipe:
            assert pipe.incr("tx").incr("tx").execute() == [3, 4]  # MULTI INCR INCR EXEC, twice
        assert proxy.dropped == 1

        script = client.register_script("return redis.call('INCR', KEYS[1])")
        proxy.drop_reply_once(lambda data: b"EVALSHA" in data.upper())
        # EVALSHA -> NOSCRIPT (passed on), SCRIPT LOAD, EVALSHA (applied, dropped), EVALSHA again
        assert script(keys=["sc"]) == 2
        assert proxy.dropped == 2 and proxy.errors == []
        client.close()


def test_silent_server_and_paused_proxy_time_out(tmp_path: Path) -> None:
    with SilentServer() as silent:
        client = redis.Redis(port=silent.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 1.5
        assert silent.connections == 1
        client.close()

    with RedisServer(tmp_path) as server, FaultProxy("127.0.0.1", server.port) as proxy:
        client = redis.Redis(port=proxy.port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
        assert client.ping()
        proxy.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        proxy.resume()
        assert client.ping()
        client.close()


def test_tls_server_verifies_with_the_right_ca_only(tmp_path: Path) -> None:
    tls: TLSFiles = make_tls_files(tmp_path / "tls")
    with RedisServer(tmp_path, tls=tls) as server:
        assert server.url.startswith("rediss://127.0.0.1:")
        good = redis.Redis.from_url(server.url, ssl_ca_certs=str(tls.ca_cert))
        assert good.ping()
        good.close()
        wrong = redis.Redis.from_url(server.url, ssl_ca_certs=str(tls.other_ca_cert),
                                     retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            wrong.ping()
        wrong.close()


def write(client: redis.Redis, key: str, value: str) -> bool:
    try:
        return bool(client.set(key, value))
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def test_sentinel_client_follows_failover_and_primary_crash(tmp_path: Path) -> None:
    with SentinelSetup(tmp_path) as setup:
        assert setup.sentinel_url == "redis+sentinel://" + ",".join(
            f"127.0.0.1:{s.port}" for s in setup.sentinels) + "/mymaster/0"
        master = setup.sentinel(socket_timeout=1).master_for(setup.service, socket_timeout=1,
                                                             retry=Retry(NoBackoff(), 0))
        assert master.set("before", "1")
        old = setup.primary_addr()

        new = setup.failover()
        assert new != old
        assert setup.server_at(new[1]).role() == "master" and setup.server_at(old[1]).role() == "slave"
        wait_for(lambda: write(master, "after-failover", "2"), 10, 0.1, "a write after the failover")
        with setup.server_at(new[1]).client() as direct:
            assert direct.get("before") == "1" and direct.get("after-failover") == "2"

        killed = setup.kill_primary()
        assert killed.addr == new and setup.primary_addr() == old
        wait_for(lambda: write(master, "after-crash", "3"), 10, 0.1, "a write after the crash")
        setup.restart(killed)
        assert killed.role() == "slave"
        with killed.client() as direct:
            wait_for(lambda: direct.get("after-crash") == "3", 5, 0.05, "the restarted replica to sync")
        master.close()


def test_cluster_failover_and_slot_migration(tmp_path: Path) -> None:
    with ClusterSetup(tmp_path) as cluster:
        client = cluster.client()
        keys = [f"key:{i}" for i in range(30)]
        for key in keys:
            client.set(key, key)
        assert {cluster.node_for_key(key)[1] for key in keys} == set(cluster.primaries())
        assert len(cluster.primaries()) == 3

        primary = cluster.node_for_key(keys[0])[1]
        replica = cluster.replica_of(primary)
        cluster.failover(replica)
        assert cluster.node_for_key(keys[0]) == ("127.0.0.1", replica)
        assert cluster.node(primary).role() == "slave"
        assert [client.get(key) for key in keys] == keys

        slot = cluster.slot_of(keys[1])
        source = cluster.owner_of_slot(slot)
        target = next(p for p in cluster.primaries() if p != source)
        cluster.begin_migration(slot, target)
        assert cluster.move_keys(slot, target, [keys[1]]) == 1
        with pytest.raises(AskError):
            cluster.node(source).call("GET", keys[1])
        assert client.get(keys[1]) == keys[1]  # follows the ASK to the importing node
        cluster.finish_migration(slot, target)
        assert cluster.node_for_key(keys[1]) == ("127.0.0.1", target)
        with pytest.raises(MovedError):
            cluster.node(source).call("GET", keys[1])
        assert [client.get(key) for key in keys] == keys  # MOVED for the slot, then the new map
        client.close()
