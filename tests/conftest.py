"""Shared fixtures: `celery worker` subprocesses and private Redis servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kickq_celery import JobNotFound
from kickq_celery.testing import stop_process_group, wait_for

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A `celery -A tests.workerapp worker` subprocess (or of another ``app`` module) in its
    own process group."""

    def __init__(self, env: dict[str, str], log: Path, concurrency: int, pool: str, name: str,
                 queues: str | None = None, app: str = "tests.workerapp") -> None:
        self.log = log
        self._out = open(log, "ab")
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker",
               "--loglevel", "INFO", "--pool", pool, "--concurrency", str(concurrency),
               "--without-mingle", "--without-gossip", "--hostname", f"{name}@%h"]
        if queues is not None:
            cmd += ["--queues", queues]  # -Q
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: b"ready." in self.log.read_bytes() or self.proc.poll() is not None,
                 timeout, 0.1, "the worker to start")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()

    def stop(self, timeout: float = 20) -> None:
        stop_process_group(self.proc, timeout)
        self._out.close()


@pytest.fixture
def worker_process(tmp_path: Path, kickq_namespace: str,
                   kickq_redis_url: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `celery worker` subprocesses on the test's namespace; all stopped afterwards.
    ``app``: the module of the Celery app (``tests.workerapp`` by default); ``**env`` become
    ``KICKQ_TEST_<NAME>`` environment variables."""
    started: list[WorkerProcess] = []

    def start(concurrency: int = 2, pool: str = "prefork", wait: bool = True,
              redis_url: str | None = None, queues: str | None = None, app: str = "tests.workerapp",
              **env: Any) -> WorkerProcess:
        environ = {**os.environ, "KICKQ_TEST_NS": kickq_namespace,
                   "KICKQ_TEST_REDIS_URL": redis_url or kickq_redis_url,
                   "PYTHONPATH": str(ROOT)}
        environ.update({f"KICKQ_TEST_{k.upper()}": str(v) for k, v in env.items()})
        name = f"w{len(started)}"
        worker = WorkerProcess(environ, tmp_path / f"{name}.log", concurrency, pool, name, queues, app)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
    client = redis.Redis.from_url(kickq_redis_url)
    keys = list(client.scan_iter(match=f"test:{kickq_namespace}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def r(kickq_redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis that decodes replies."""
    client = redis.Redis.from_url(kickq_redis_url, decode_responses=True)
    yield client
    client.close()


def listed(r: redis.Redis, ns: str, name: str) -> list[str]:
    """A list the workerapp handlers fill (runs, started, concurrency)."""
    return r.lrange(f"test:{ns}:{name}", 0, -1)  # type: ignore[return-value]


def gone(kq: Any, job_id: str) -> bool:
    """Whether job ``job_id``'s record is gone (deleted, purged, never created)."""
    try:
        kq.get(job_id)
    except JobNotFound:
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, on a free port, appendonly on."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, 0.05, "the private redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        time.sleep(0.2)
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
