"""``await job.promise`` without a thread: one pub/sub listener per event loop (kickq_celery.waiters)
settles success, failure, deletion and the tombstone timeout as ``wait()`` does, sees an outcome
stored before the await, and holds ten thousand awaits on two connections and no extra thread."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

from kickq_celery import JobDeleted, JobFailed, Kickq, Promise, Response, TombstoneTimeout, testing, waiters
from kickq_celery.testing import DEFAULT_TEST_REDIS_URL, make_app, purge_namespace, wait_for
from kickq_celery.tombstones import ensure_result_backend
from tests.servers import RedisServer, SentinelSetup, free_port, make_tls_files

T = TypeVar("T")


def _is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


#: asyncio resolves a host name (not an IP address) in the default executor when it connects
NUMERIC_HOST = _is_ip(urlsplit(os.environ.get("KICKQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)).hostname)


@pytest.fixture
def release():
    """An event that lets blocked handlers return, so the worker stops quickly."""
    event = threading.Event()
    yield event
    event.set()


def run_threadless(main: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(main())``, checking that nothing ran in the loop's default executor and
    that the loop's listener is gone (its connections closed) once no one waited for
    ``waiters.LINGER`` seconds."""

    async def checked() -> T:
        loop = asyncio.get_running_loop()
        result = await main()
        if NUMERIC_HOST:
            assert loop._default_executor is None, "something ran in the default executor"
        deadline = loop.time() + waiters.LINGER + 2
        while waiters._listeners.get(loop) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert not waiters._listeners.get(loop), "the listener outlived its waiters"
        return result

    return asyncio.run(checked())


def redis_connections(url: str) -> set[int]:
    """The local ports of this process's open TCP connections to the Redis server at ``url``."""
    parts = urlsplit(url)
    peers = {info[4][:2] for info in socket.getaddrinfo(parts.hostname, parts.port or 6379,
                                                         type=socket.SOCK_STREAM)}
    fds = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    ports = set()
    for name in os.listdir(fds):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[:2] in peers:
                ports.add(sock.getsockname()[1])
        except OSError:
            pass
        finally:
            sock.close()
    return ports


def fresh_promise(kq: Any, promise: Promise) -> Promise:
    """A new promise of the same job, to compare with what ``wait()`` makes of its outcome."""
    return Promise(promise.job_id, promise.job_name, kq.app.AsyncResult(promise.job_id), promise.deadline)


def test_await_settles_success_and_failure_as_wait_does(kickq, kickq_worker, monkeypatch):
    @kickq.process("double")
    def double(job):
        return job.data * 2

    @kickq.process("fails")
    def fails(job):
        raise ValueError("bad input")

    kickq_worker(pool="threads", concurrency=4)
    ok = kickq.create("double", 21, tombstone=True, tombstone_timeout=10)
    bad = kickq.create("fails", tombstone=True, tombstone_timeout=10)

    async def main():
        response = await ok.promise
        with pytest.raises(JobFailed) as info:
            await bad.promise
        return response, info.value

    response, exc = run_threadless(main)
    assert response == Response(ok.id, "double", True, "success", 42)
    assert type(exc) is JobFailed and not exc.has_timeout
    assert (exc.job_id, exc.error) == (bad.id, "ValueError: bad input")
    with pytest.raises(JobFailed) as sync:
        fresh_promise(kickq, bad.promise).wait()
    assert (type(sync.value), str(sync.value), sync.value.error) == (type(exc), str(exc), exc.error)

    # settled once: wait() and another await return the same outcome, without I/O
    def no_io(*args, **kwargs):
        raise AssertionError("a settled promise read the backend again")

    monkeypatch.setattr(waiters, "listener_for", no_io)
    monkeypatch.setattr(ok.promise.async_result, "get", no_io)
    assert ok.promise.wait() is response
    assert run_threadless(lambda: ok.promise) is response
    with pytest.raises(JobFailed) as again:
        bad.promise.wait()
    assert again.value is exc


def test_await_a_job_deleted_while_delayed(kickq, kickq_worker):
    @kickq.process("later")
    def later(job):
        return "ran"

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("later", tombstone=True, tombstone_timeout=10, delay=3)
    deleted = []

    async def main():
        asyncio.get_running_loop().call_later(0.3, lambda: deleted.append(kickq.delete(job.id)))
        started = time.monotonic()
        with pytest.raises(JobDeleted) as info:
            await job.promise
        return time.monotonic() - started, info.value

    elapsed, exc = run_threadless(main)
    assert deleted == [True]
    assert elapsed < 2.5  # settled by the delete, not by the delay or the timeout
    assert (exc.job_id, exc.has_timeout) == (job.id, False)
    with pytest.raises(JobDeleted) as sync:
        fresh_promise(kickq, job.promise).wait()
    assert (str(sync.value), sync.value.error) == (str(exc), exc.error)


def test_await_times_out_at_the_tombstone_deadline(kickq, kickq_worker, release):
    @kickq.process("slow")
    def slow(job):
        release.wait(10)
        return "too late"

    kickq_worker(pool="threads", concurrency=4)
    started = time.monotonic()
    job = kickq.create("slow", tombstone=True, tombstone_timeout=1)

    async def main():
        with pytest.raises(TombstoneTimeout) as info:
            await job.promise
        return time.monotonic() - started, info.value

    elapsed, exc = run_threadless(main)
    print(f"\nTombstoneTimeout after {elapsed:.3f} s (tombstone_timeout=1)")
    assert 0.9 <= elapsed < 1.5  # the deadline counts from creation
    assert isinstance(exc, TimeoutError) and exc.has_timeout and exc.job_id == job.id
    # settled once: the timeout stays the outcome, even when the run then finishes
    release.set()
    wait_for(lambda: kickq.app.AsyncResult(job.id).ready(), 10, 0.02, "the outcome to be stored")
    with pytest.raises(TombstoneTimeout):
        job.promise.wait()


def test_a_job_finished_before_the_await_settles_it(kickq, kickq_worker):
    @kickq.process("quick")
    def quick(job):
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    past = kickq.create("quick", 7, tombstone=True, tombstone_timeout=1)
    recent = kickq.create("quick", 8, tombstone=True, tombstone_timeout=10)
    for job in (past, recent):
        wait_for(lambda job=job: kickq.app.AsyncResult(job.id).ready(), 10, 0.02, "the outcome")
    time.sleep(1.2)  # past's tombstone deadline has passed: its stored outcome still wins

    async def main():
        started = time.monotonic()
        responses = await asyncio.gather(past.promise, recent.promise)
        return time.monotonic() - started, responses

    elapsed, responses = run_threadless(main)
    assert [response.result for response in responses] == [7, 8]
    assert elapsed < 0.5


def test_many_awaits_of_one_job_share_its_key_and_then_is_awaitable(kickq, kickq_worker, r):
    @kickq.process("gated")
    def gated(job):
        wait_for(lambda: r.exists(f"test:{kickq.options['redis_namespace']}:go"), 10, 0.01, "the go")
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("gated", "x", tombstone=True, tombstone_timeout=10)
    twin = fresh_promise(kickq, job.promise)  # another promise of the same job
    key = kickq.app.backend.get_key_for_task(job.id)

    async def main():
        waits = asyncio.gather(job.promise, job.promise, twin)
        await asyncio.sleep(0.3)
        subscribers = r.pubsub_numsub(key)[0][1]
        # then()'s promise is awaited on its callback thread's future, not in the executor; a
        # cancelled await of it leaves it be
        derived = job.promise.then(lambda response: response.result * 2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(derived, 0.1)
        r.set(f"test:{kickq.options['redis_namespace']}:go", 1)
        first, second, other = await waits
        return subscribers, (first, second, other, await derived)

    subscribers, (first, second, other, doubled) = run_threadless(main)
    assert subscribers == 1  # one subscription however many wait
    assert first is second and first == other == Response(job.id, "gated", True, "success", "x")
    assert doubled.result == "xx"


def test_a_key_no_one_waits_for_is_unsubscribed(kickq, kickq_worker, release, r):
    @kickq.process("slow")
    def slow(job):
        release.wait(10)
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    short = kickq.create("slow", 1, tombstone=True, tombstone_timeout=0.5)
    long = kickq.create("slow", 2, tombstone=True, tombstone_timeout=10)
    keys = [kickq.app.backend.get_key_for_task(job.id) for job in (short, long)]

    def subscribed() -> list[int]:
        return [count for _, count in r.pubsub_numsub(*keys)]

    async def main():
        with pytest.raises(asyncio.TimeoutError):  # a cancelled await settles nothing
            await asyncio.wait_for(long.promise, 0.2)
        assert long.promise._outcome is None
        later = asyncio.ensure_future(long.promise)
        with pytest.raises(TombstoneTimeout):
            await short.promise
        await asyncio.sleep(0.2)
        during = subscribed()  # the timed-out key is dropped, the other still listened to
        release.set()
        response = await later
        return during, response

    during, response = run_threadless(main)
    assert during == [0, 1]
    assert response.result == 2
    assert subscribed() == [0, 0]


def test_each_event_loop_has_its_own_listener(kickq, kickq_worker, r):
    go = f"test:{kickq.options['redis_namespace']}:go"

    @kickq.process("gated")
    def gated(job):
        wait_for(lambda: r.exists(go), 10, 0.01, "the go")
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("gated", "both", tombstone=True, tombstone_timeout=10)
    seen: dict[str, Any] = {}
    ready = threading.Barrier(3, timeout=10)

    def in_a_thread(name: str) -> None:
        async def main():
            loop = asyncio.get_running_loop()
            waiting = asyncio.ensure_future(fresh_promise(kickq, job.promise))
            await asyncio.sleep(0.2)
            [listener] = waiters._listeners[loop].values()
            seen[name] = listener
            await loop.run_in_executor(None, ready.wait)  # (this test's own thread, not the await's)
            seen[name + " response"] = await waiting

        asyncio.run(main())

    threads = [threading.Thread(target=in_a_thread, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    ready.wait()
    r.set(go, 1)
    for thread in threads:
        thread.join(10)
    assert seen["a"] is not seen["b"]
    assert seen["a"].loop is not seen["b"].loop
    assert seen["a response"].result == seen["b response"].result == "both"


def test_the_listener_rides_out_a_dropped_connection(kickq, kickq_redis_url, r):
    # no worker: the outcome is stored as the worker stores it (tombstones.settle: mark_as_done)
    ensure_result_backend(kickq.app, kickq.redis, kickq.keys)
    job_id = str(uuid.uuid4())
    promise = Promise(job_id, "dropped", kickq.app.AsyncResult(job_id), time.time() + 10)
    before = redis_connections(kickq_redis_url)

    async def main():
        waiting = asyncio.ensure_future(promise)
        await asyncio.sleep(0.3)  # subscribed, key read: nothing there yet
        ours = redis_connections(kickq_redis_url) - before
        clients = [c for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ours]
        for client in clients:
            r.client_kill_filter(_id=client["id"])
        # stored while the listener is cut off: the PUBLISH reaches no one, the re-read finds it
        kickq.app.backend.mark_as_done(job_id, "after the drop")
        started = time.monotonic()
        response = await asyncio.wait_for(waiting, 10)
        return len(clients), time.monotonic() - started, response

    killed, elapsed, response = run_threadless(main)
    print(f"\nkilled the listener's {killed} connections; settled {elapsed:.3f} s later")
    assert killed == 2
    assert response == Response(job_id, "dropped", True, "success", "after the drop")


def await_twenty(broker_url: str, records_url: str) -> tuple[str, list[Response]]:
    """(the result backend kickq supplied, the responses of 20 tombstoned jobs awaited together),
    for records on ``records_url`` (and the results with them), the broker on ``broker_url``."""
    Kickq.reset()
    app = make_app(broker_url)
    kq = Kickq(app, redis=records_url, redis_namespace=f"t{uuid.uuid4().hex[:10]}", poll_interval=0.1,
               lock_timeout=2)

    @kq.process("echo")
    def echo(job):
        return job.data

    try:
        with testing.worker(app):
            jobs = [kq.create("echo", n, tombstone=True, tombstone_timeout=10) for n in range(20)]

            async def main():
                return await asyncio.gather(*(job.promise for job in jobs))

            responses = run_threadless(main)
        return str(app.conf.result_backend), responses
    finally:
        purge_namespace(kq)
        app.close()
        Kickq.reset()


def test_await_over_a_sentinel_result_backend(tmp_path, kickq_redis_url):
    with SentinelSetup(tmp_path) as setup:
        backend, responses = await_twenty(kickq_redis_url, setup.sentinel_url)
    assert backend.startswith("sentinel://")
    assert [response.result for response in responses] == list(range(20))


def test_await_over_a_tls_result_backend(tmp_path, kickq_redis_url):
    tls = make_tls_files(tmp_path / "tls")
    with RedisServer(tmp_path / "redis", tls=tls) as server:
        backend, responses = await_twenty(
            kickq_redis_url, f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={tls.ca_cert}")
    assert backend.startswith("rediss://")
    assert [response.result for response in responses] == list(range(20))


def test_an_unreachable_result_backend_still_ends_at_the_deadline(kickq_app):
    kickq_app.conf.result_backend = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    promise = Promise("nowhere", "lost", kickq_app.AsyncResult("nowhere"), time.time() + 0.5)

    async def main():
        started = time.monotonic()
        with pytest.raises(TombstoneTimeout):
            await promise
        return time.monotonic() - started

    elapsed = run_threadless(main)
    # the deadline, plus the grace that the key's first read (never answered) gets
    assert 0.4 <= elapsed < 0.5 + waiters.READ_GRACE + 0.5


def test_another_result_backend_falls_back_to_the_executor(kickq, kickq_app, kickq_worker, tmp_path):
    kickq_app.conf.result_backend = f"file://{tmp_path}"
    kickq_app._backend_cache = None
    kickq_app._local.__dict__.pop("backend", None)

    @kickq.process("echo")
    def echo(job):
        return job.data

    kickq_worker(pool="threads", concurrency=4)
    job = kickq.create("echo", "filed", tombstone=True, tombstone_timeout=10)

    async def main():
        loop = asyncio.get_running_loop()
        response = await job.promise
        return response, loop._default_executor is not None

    response, used_executor = asyncio.run(main())
    assert response.result == "filed"
    assert used_executor  # the documented fallback: wait() in the default executor


def test_ten_thousand_awaits_hold_no_thread_and_two_connections(kickq, kickq_redis_url, worker_process):
    worker_process(concurrency=2, pool="prefork")
    count = 10_000
    started = time.monotonic()
    jobs = kickq.create_many("record", range(count), tombstone=True, tombstone_timeout=120)
    created = time.monotonic() - started
    base_threads, base_ports = threading.active_count(), redis_connections(kickq_redis_url)
    samples: list[tuple[int, set[int]]] = []

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append((threading.active_count(), redis_connections(kickq_redis_url)))
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    async def main():
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample(stop))
        begun = time.monotonic()
        responses = await asyncio.wait_for(asyncio.gather(*(job.promise for job in jobs)), 90)
        awaited = time.monotonic() - begun
        stop.set()
        await sampler
        return responses, awaited

    responses, awaited = run_threadless(main)
    threads = max(t for t, _ in samples)
    connections = max(len(ports) for _, ports in samples)
    opened = max(len(ports - base_ports) for _, ports in samples)
    print(f"\n{count} awaits: created in {created:.2f} s, all settled {awaited:.2f} s after the gather; "
          f"threads {base_threads} before, at most {threads} during; this process's Redis connections "
          f"{len(base_ports)} before (kickq's client and earlier tests'), at most {connections} during, "
          f"of which at most {opened} opened by the awaits ({len(samples)} samples)")
    assert [response.result for response in responses] == list(range(count))
    assert all(response.state == "success" for response in responses)
    assert threads <= base_threads + 5
    assert opened <= 2  # the listener's pub/sub and command connections
    assert connections <= len(base_ports) + 2
    pooled = [t.name for t in threading.enumerate() if t.name.startswith(("ThreadPoolExecutor", "asyncio_"))]
    assert not pooled
    assert not redis_connections(kickq_redis_url) - base_ports  # the listener closed its own
