"""kickq's records on a Redis that only speaks TLS (``rediss://``), with a CA the test makes.

The broker stays the plain shared Redis of the tests. Certificates are verified by default:
without the CA (or with another one) kickq raises RedisUnavailable, says why, and shows the
URL without its password.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from kickq_celery import Job, Kickq, RedisUnavailable
from kickq_celery.testing import make_app, worker
from tests.servers import RedisServer, TLSFiles, make_tls_files

PASSWORD = "secret"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[RedisServer]:
    """A redis-server listening with TLS only (``--port 0 --tls-port``), password protected.
    (The password is set once it runs: the harness checks readiness with a PING without one.)"""
    with RedisServer(tmp_path_factory.mktemp("redis-tls"), tls=tls) as tls_server:
        tls_server.call("CONFIG", "SET", "requirepass", PASSWORD)
        yield tls_server


@pytest.fixture
def app(kickq_redis_url: str) -> Iterator[Celery]:
    Kickq.reset()
    celery_app = make_app(kickq_redis_url)
    yield celery_app
    celery_app.close()
    Kickq.reset()


@pytest.fixture
def ns(server: RedisServer, kickq_redis_url: str) -> Iterator[str]:
    """A fresh namespace; its keys on the TLS server and its queues on the broker go afterwards."""
    namespace = f"kqtls{uuid.uuid4().hex[:8]}"
    yield namespace
    with server.client(password=PASSWORD) as direct:
        keys = direct.keys("{" + namespace + "}:*")
        if keys:
            direct.delete(*keys)
    with redis.Redis.from_url(kickq_redis_url) as broker:
        patterns = [f"{namespace}.*", f"_kombu.binding*.{namespace}.*"]
        keys = [key for pattern in patterns for key in broker.scan_iter(match=pattern, count=1000)]
        if keys:
            broker.delete(*keys)


def url(server: RedisServer, query: str = "") -> str:
    return f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0" + (f"?{query}" if query else "")


def test_records_over_tls(server: RedisServer, tls: TLSFiles, app: Celery, ns: str) -> None:
    kq = Kickq(app, redis=url(server, f"ssl_ca_certs={tls.ca_cert}"), redis_namespace=ns)
    assert issubclass(kq.redis.connection_pool.connection_class, redis.SSLConnection)
    job = kq.create("resize", {"width": 640})
    assert job is not None
    record = kq.get(job.id)
    assert (record.id, record.name, record.state, record.data) == (job.id, "resize", "queued", {"width": 640})
    assert kq.stats("resize")["resize"].created == 1
    # the record is on the TLS server (the only port it listens on)
    with server.client(password=PASSWORD) as direct:
        assert direct.hget(kq.keys.job(job.id), "name") == "resize"


@pytest.mark.parametrize("other_ca", [False, True], ids=["no-ca", "other-ca"])
def test_the_certificate_is_verified_by_default(server: RedisServer, tls: TLSFiles, app: Celery, ns: str,
                                                other_ca: bool) -> None:
    # without ssl_ca_certs: the system's CAs, which do not know the test's
    setting = url(server, f"ssl_ca_certs={tls.other_ca_cert}" if other_ca else "")
    kq = Kickq(app, redis=setting, redis_namespace=ns, redis_timeout=2)
    with pytest.raises(RedisUnavailable) as info:
        kq.create("resize", {"width": 640})
    message = str(info.value)
    assert "certificate verify failed" in message, message
    assert f"rediss://:***@127.0.0.1:{server.port}/0" in message, message
    for text in (message, repr(info.value), str(info.value.__cause__)):
        assert PASSWORD not in text, text
    # nothing was written
    with server.client(password=PASSWORD) as direct:
        assert direct.keys("{" + ns + "}:*") == []


def test_a_tombstone_over_tls(server: RedisServer, tls: TLSFiles, app: Celery, ns: str) -> None:
    """The result backend kickq supplies (the app has none) is its TLS Redis, verified with
    the same CA."""
    kq = Kickq(app, redis=url(server, f"ssl_ca_certs={tls.ca_cert}"), redis_namespace=ns, poll_interval=0.1)

    @kq.process("resize")
    def resize(job: Job) -> int:
        return int(job.data["width"]) // 2

    with worker(app, concurrency=1):
        job = kq.create("resize", {"width": 640}, tombstone=True, tombstone_timeout=5)
        assert job is not None and job.promise is not None
        assert job.promise.wait().result == 320
    assert str(app.conf.result_backend).startswith("rediss://")
    assert kq.get(job.id).state == "success"
    with server.client(password=PASSWORD) as direct:
        assert direct.keys("{" + ns + "}:result:*") == ["{" + ns + "}:result:celery-task-meta-" + job.id]
