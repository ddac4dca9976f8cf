"""What ``redis_wait_replicas`` costs: kickq creates on a primary with one replica, without
and with waiting for the replica (Redis ``WAIT``), in the same run.

Both servers are private (free ports, nothing on disk) and stopped afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from celery import Celery

from kickq_celery import Kickq


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def primary_with_replica() -> Iterator[str]:
    """A primary URL whose one replica is in sync."""
    ports = [_free_port(), _free_port()]
    # (a directory of their own: the replica writes the synced data to a dump.rdb there)
    workdir = tempfile.mkdtemp(prefix="kickq-bench-replicas-")
    procs = [subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--dir", workdir,
                               *(["--replicaof", "127.0.0.1", str(ports[0])] if i else [])],
                              stdout=subprocess.DEVNULL) for i, port in enumerate(ports)]
    try:
        primary = redis.Redis(port=ports[0])
        deadline = time.monotonic() + 20
        while True:
            try:
                if primary.info("replication").get("connected_slaves") == 1 and primary.wait(1, 1000) == 1:
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not come in sync")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_wait_replicas(n: int) -> dict[str, float]:
    """create() one by one (jobs/s) with redis_wait_replicas 0 and 1."""
    with primary_with_replica() as url:
        app = Celery("bench-replicas", broker=url, set_as_current=False)
        results = {}
        for wait in (0, 1):
            kq = Kickq(app, redis=url, redis_namespace=f"kqbenchwait{wait}", redis_wait_replicas=wait)
            kq.create("noop", 0)  # connect and load the scripts
            start = time.perf_counter()
            for i in range(n):
                kq.create("noop", i)
            results["wait_0" if wait == 0 else "wait_1"] = n / (time.perf_counter() - start)
        app.close()
        Kickq.reset()
    return results
