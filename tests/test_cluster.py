"""kickq on a Redis Cluster (three primaries, three replicas: tests/servers.py).

Every script declares the namespace prefix ``{ns}:`` as its key, so each namespace lives in
one hash slot, on one primary. The Celery broker is never a Cluster: the shared plain Redis
of the tests is the broker here, and the handlers record their runs there too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import redis
from celery import Celery

from kickq_celery import ConfigError, Job, JobNotFound, Kickq, RedisUnavailable
from kickq_celery.testing import make_app, wait_for, worker
from tests.servers import ClusterSetup

FAST = {"poll_interval": 0.1, "lock_timeout": 5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    with ClusterSetup(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


@pytest.fixture
def shared(kickq_redis_url: str) -> Iterator[redis.Redis]:
    """The plain Redis of the tests (the broker), decoding replies."""
    client = redis.Redis.from_url(kickq_redis_url, decode_responses=True)
    Kickq.reset()
    yield client
    Kickq.reset()
    client.close()


@pytest.fixture
def made(shared: redis.Redis) -> Iterator[list[str]]:
    """The namespaces of the test; their queues and run lists on the broker go afterwards
    (the cluster goes with the module)."""
    namespaces: list[str] = []
    yield namespaces
    for ns in namespaces:
        patterns = [f"test:{ns}:*", f"{ns}.*", f"_kombu.binding.{ns}.*", f"_kombu.binding_permanent.{ns}.*"]
        keys = [key for pattern in patterns for key in shared.scan_iter(match=pattern, count=1000)]
        if keys:
            shared.delete(*keys)


@pytest.fixture
def app(kickq_redis_url: str) -> Iterator[Celery]:
    celery_app = make_app(kickq_redis_url)
    yield celery_app
    celery_app.close()


def namespace_on(cluster: ClusterSetup, port: int, made: list[str]) -> str:
    """A fresh namespace whose slot (that of "{ns}:") is on the primary ``port``."""
    for _ in range(1000):
        ns = f"kqc{uuid.uuid4().hex[:8]}"
        if cluster.owner_of_slot(cluster.slot_of("{" + ns + "}:")) == port:
            made.append(ns)
            return ns
    raise AssertionError(f"no namespace found on {port}")


def runs(shared: redis.Redis, ns: str, name: str = "runs") -> list[str]:
    return shared.lrange(f"test:{ns}:{name}", 0, -1)


def keys_by_primary(cluster: ClusterSetup, ns: str) -> dict[int, list[str]]:
    """The keys of ``ns`` on each primary that holds any (scanning every primary)."""
    found = {}
    for port in cluster.primaries():
        with cluster.node(port).admin() as client:
            keys = sorted(client.scan_iter(match="*{" + ns + "}*", count=1000))
        if keys:
            found[port] = keys
    return found


def state(kq: Kickq, job_id: str) -> str | None:
    try:
        return kq.get(job_id).state
    except JobNotFound:
        return None


class Tracebacks(logging.Handler):
    """The records of the ``kickq_celery`` logger at ERROR or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def report(self) -> str:
        return "\n".join(f"{r.levelname} {r.getMessage()}: {r.exc_info and r.exc_info[1]!r}"
                         for r in self.records[:10])


@contextmanager
def tracebacks() -> Iterator[Tracebacks]:
    handler = Tracebacks()
    logger = logging.getLogger("kickq_celery")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@dataclass
class Side:
    """One namespace of the two-namespace test, and what it created."""

    ns: str
    port: int
    kq: Kickq
    doomed: Job | None = None
    later: Job | None = None
    plain: list[Job] = field(default_factory=list)
    tombstoned: str = ""
    schedule: str = ""


def test_two_namespaces_on_two_primaries(
        cluster: ClusterSetup, app: Celery, shared: redis.Redis, made: list[str]) -> None:
    sides = []
    for port in cluster.primaries()[:2]:
        ns = namespace_on(cluster, port, made)
        sides.append(Side(ns, port, Kickq(app, redis=cluster.url, redis_namespace=ns, **FAST)))
    for side in sides:
        def echo(job: Job, ns: str = side.ns) -> object:
            shared.rpush(f"test:{ns}:runs", job.id)
            return job.data

        def tick(job: Job, ns: str = side.ns) -> None:
            shared.rpush(f"test:{ns}:ticks", job.id)

        side.kq.process("echo", echo)
        side.kq.process("tick", tick)

    # before any worker: a deleted queued job (its message stays in the queue), a parked one
    for side in sides:
        kq = side.kq
        side.doomed = kq.create("echo", "doomed")
        assert kq.delete(side.doomed.id) is True
        assert state(kq, side.doomed.id) is None
        side.later = later = kq.create("echo", "later", delay=1)
        assert later is not None and later.state == "delayed" and kq.get(later.id).state == "delayed"
        # past the horizon (0 by default): parked in Redis, no broker message yet
        assert kq.redis.zscore(kq.keys.delayed, later.id) is not None
        assert kq.stats("echo")["echo"].delayed == 1
    scheduled_at = time.time()
    for side in sides:
        side.schedule = side.kq.schedule("tick", "* * * * * */1")

    with tracebacks() as logged, worker(app, concurrency=4):
        for side in sides:
            side.plain = [side.kq.create("echo", {"n": i, "ns": side.ns}) for i in range(5)]
        for side in sides:
            tombstoned = side.kq.create("echo", {"tombstone": side.ns}, tombstone=True)
            assert tombstoned is not None and tombstoned.promise is not None
            response = tombstoned.promise.wait()
            assert response.state == "success" and response.result == {"tombstone": side.ns}
            side.tombstoned = tombstoned.id
        for side in sides:
            wait_for(lambda side=side: all(state(side.kq, j.id) == "success"
                                           for j in [*side.plain, side.later]), 15, 0.05,
                     f"the jobs of {side.ns} to run")
            wait_for(lambda side=side: len(runs(shared, side.ns, "ticks")) >= 2, 10, 0.05,
                     f"two cron ticks of {side.ns}")
        for side in sides:
            assert side.kq.unschedule(side.schedule) is True
        unscheduled_at = time.time()
        for side in sides:
            # a tick claimed just before unschedule() still runs its job
            wait_for(lambda side=side: (s := side.kq.stats("tick")["tick"]).succeeded == s.created, 10, 0.05,
                     f"the cron jobs of {side.ns} to run")
    assert logged.records == [], logged.report()

    for side in sides:
        kq, ns, port, later, doomed = side.kq, side.ns, side.port, side.later, side.doomed
        assert later is not None and doomed is not None
        ran = runs(shared, ns)
        expected = [j.id for j in side.plain] + [later.id, side.tombstoned]
        # each job ran once, in its own namespace; the deleted one never ran, though its
        # message was consumed (the run guard dropped it)
        assert Counter(ran) == Counter(expected)
        assert doomed.id not in ran and shared.llen(kq.queue("echo").name) == 0
        for i, job in enumerate(side.plain):
            record = kq.get(job.id)
            assert (record.state, record.result, record.complete, record.success) == (
                "success", {"n": i, "ns": ns}, True, True)
            assert len(record.runs) == 1
        record = kq.get(later.id)
        # parked, promoted when due, and started no sooner
        assert (record.state, record.result) == ("success", "later")
        assert record.created_at is not None and record.scheduled_for is not None
        assert (record.scheduled_for - record.created_at).total_seconds() == pytest.approx(1.0, abs=0.01)
        assert record.runs[0].started_at is not None and record.runs[0].started_at >= record.scheduled_for
        with pytest.raises(JobNotFound):
            kq.get(doomed.id)

        # cron: it fired, each job ran once, and no tick made two jobs
        ticks = runs(shared, ns, "ticks")
        assert len(ticks) == len(set(ticks)) >= 2
        assert len(ticks) <= (unscheduled_at - scheduled_at) + 2, ticks
        created = sorted(kq.get(t).created_at.timestamp() for t in ticks)
        gaps = [b - a for a, b in zip(created, created[1:], strict=False)]
        # ticks are 1 s apart (less a late poll); two jobs of one tick would be one poll (0.1 s) apart
        assert all(gap >= 0.3 for gap in gaps), gaps

        s = kq.stats("echo")["echo"]
        assert (s.created, s.succeeded, s.failed, s.deleted, s.ghosts) == (8, 7, 0, 1, 0)
        assert (s.queued, s.delayed, s.processing) == (0, 0, 0)
        total = kq.stats()
        assert set(total.names) == {"echo", "tick"}
        assert total.total.succeeded == 7 + len(ticks)
        assert total["tick"].created == total["tick"].succeeded == len(ticks)

        listed = kq.jobs(state="success", name="echo", limit=100)
        assert sorted(r.id for r in listed) == sorted(expected)
        assert {r.id for r in kq.jobs(limit=200)} == set(expected) | set(ticks)
        assert kq.jobs(state="queued") == [] and kq.jobs(state="delayed") == []
        # the other namespace's jobs are not seen here
        other = next(o for o in sides if o is not side)
        with pytest.raises(JobNotFound):
            kq.get(other.tombstoned)

        # every key of the namespace is on the primary that owns its slot, and only there
        assert cluster.node_for_key("{" + ns + "}:") == ("127.0.0.1", port)
        placed = keys_by_primary(cluster, ns)
        assert list(placed) == [port], {p: keys[:5] for p, keys in placed.items()}
        assert kq.keys.job(later.id) in placed[port]


def test_a_cluster_client_object_as_the_redis_option(
        cluster: ClusterSetup, app: Celery, shared: redis.Redis, made: list[str]) -> None:
    port = cluster.primaries()[2]
    ns = namespace_on(cluster, port, made)
    client = cluster.client()  # the user's own client, and one that decodes replies
    try:
        kq = Kickq(app, redis=client, redis_namespace=ns, **FAST)
        assert kq.redis is client

        @kq.process("echo")
        def echo(job: Job) -> object:
            shared.rpush(f"test:{ns}:runs", job.id)
            return job.data

        doomed = kq.create("echo", "doomed")
        assert kq.delete(doomed.id) is True
        with worker(app, concurrency=2):
            jobs = [kq.create("echo", i) for i in range(3)]
            later = kq.create("echo", "later", delay=1)
            assert kq.create("echo", "t", tombstone=True).promise.wait().result == "t"
            wait_for(lambda: all(state(kq, j.id) == "success" for j in [*jobs, later]), 15, 0.05,
                     "the jobs to run")
        assert [kq.get(j.id).result for j in jobs] == [0, 1, 2]
        assert kq.get(later.id).result == "later"
        assert doomed.id not in runs(shared, ns) and len(runs(shared, ns)) == 5
        s = kq.stats("echo")["echo"]
        assert (s.created, s.succeeded, s.deleted, s.queued, s.delayed, s.processing) == (6, 5, 1, 0, 0, 0)
        assert len(kq.jobs(state="success")) == 5
        assert list(keys_by_primary(cluster, ns)) == [port]
    finally:
        client.close()


def test_a_namespace_on_a_node_other_than_the_default_one(
        cluster: ClusterSetup, app: Celery, shared: redis.Redis, made: list[str]) -> None:
    # the shared client of this URL (a Kickq of another app: the worker serves one namespace)
    probe_app = make_app(app.conf.broker_url)
    default = Kickq(probe_app, redis=cluster.url, redis_namespace="probe").redis.get_default_node().port
    probe_app.close()
    port = next(p for p in cluster.primaries() if p != default)
    ns = namespace_on(cluster, port, made)
    kq = Kickq(app, redis=cluster.url, redis_namespace=ns, **FAST)
    assert kq.redis.get_default_node().port != cluster.node_for_key(kq.keys.prefix)[1]

    @kq.process("echo", max_jobs_num=2)  # the worker sets the limit at start
    def echo(job: Job) -> object:
        shared.rpush(f"test:{ns}:runs", job.id)
        return job.data

    created: list[str] = []
    with tracebacks() as logged, worker(app, concurrency=2):
        kq.schedule("echo", "* * * * * */1", data="cron")
        for round_ in range(3):  # the worker keeps going, round after round
            jobs = [kq.create("echo", i) for i in range(3)] + [kq.create("echo", "later", delay=0.5)]
            created += [j.id for j in jobs]
            wait_for(lambda jobs=jobs: all(state(kq, j.id) == "success" for j in jobs), 10, 0.05,
                     f"round {round_} to run")
            time.sleep(0.5)
        wait_for(lambda: sum(kq.get(r).data == "cron" for r in runs(shared, ns)) >= 2, 10, 0.05,
                 "two cron ticks")
        assert [t.name for t in threading.enumerate()].count("kickq-worker-loops") == 1
    assert logged.records == [], logged.report()
    ran = runs(shared, ns)
    assert set(created) <= set(ran) and len(ran) == len(set(ran))
    assert list(keys_by_primary(cluster, ns)) == [port]


def test_replica_promoted_while_jobs_are_created_and_run(
        cluster: ClusterSetup, app: Celery, shared: redis.Redis, made: list[str]) -> None:
    primary = cluster.primaries()[0]
    ns = namespace_on(cluster, primary, made)
    # a heartbeat lock that outlasts the switch: no run is taken for a dead worker's
    kq = Kickq(app, redis=cluster.url, redis_namespace=ns, poll_interval=0.1, lock_timeout=10)

    @kq.process("work")
    def work(job: Job) -> object:
        shared.rpush(f"test:{ns}:runs", job.id)
        time.sleep(0.02)
        return job.data

    acked: list[str] = []
    unavailable: list[str] = []
    other_errors: list[Exception] = []
    stop = threading.Event()

    def create() -> None:
        i = 0
        while not stop.is_set():
            try:
                # one in four parked (delay past the horizon), for the promoter to publish
                acked.append(kq.create("work", i, delay=1 if i % 4 == 0 else None).id)
            except RedisUnavailable as exc:  # not acknowledged: it may or may not exist
                unavailable.append(str(exc))
            except Exception as exc:  # reported below
                other_errors.append(exc)
            i += 1
            time.sleep(0.01)

    with worker(app, concurrency=4):
        creator = threading.Thread(target=create, name="creator", daemon=True)
        creator.start()
        try:
            wait_for(lambda: len(acked) >= 40, 10, 0.02, "jobs created before the failover")
            before = kq.stats("work")["work"]
            replica = cluster.replica_of(primary)
            cluster.failover(replica)
            created_by_failover = len(acked)
            wait_for(lambda: len(acked) >= created_by_failover + 40, 10, 0.02, "jobs created after it")
        finally:
            stop.set()
            creator.join(10)
        assert other_errors == []
        assert cluster.node_for_key(kq.keys.prefix) == ("127.0.0.1", replica)
        assert cluster.node(primary).role() == "slave"
        # mid-flow: jobs were waiting (parked ones at least) when the switch began
        assert before.created > before.succeeded and before.delayed > 0, before

        wait_for(lambda: kq.stats("work")["work"].succeeded >= len(acked), 30, 0.1,
                 "every acknowledged job to run")
        wait_for(lambda: (s := kq.stats("work")["work"]).queued + s.delayed + s.processing == 0, 10, 0.1,
                 f"nothing left waiting or running ({len(unavailable)} creates failed: {unavailable[:3]})")

    ran = Counter(runs(shared, ns))
    assert [job_id for job_id, n in ran.items() if n > 1] == []
    assert set(acked) <= set(ran), f"{len(set(acked) - set(ran))} acknowledged jobs never ran"
    for job_id in acked:
        record = kq.get(job_id)
        assert record.state == "success" and len(record.runs) == 1, record
    records = kq.jobs(limit=10000)
    assert {r.id for r in records} == set(ran)  # a run is a job of the namespace, and every job ran
    s = kq.stats("work")["work"]
    assert s.created == s.succeeded == len(ran) and len(ran) <= len(acked) + len(unavailable)
    assert (s.failed, s.ghosts, s.retried) == (0, 0, 0)
    # the records are on the promoted replica now
    assert list(keys_by_primary(cluster, ns)) == [replica]


def test_wait_replicas_on_a_cluster_is_refused_before_anything_is_written(cluster, app, made):
    ns = namespace_on(cluster, cluster.primaries()[0], made)
    kq = Kickq(app, redis=cluster.url, redis_namespace=ns, redis_wait_replicas=1)
    with pytest.raises(ConfigError, match="redis_wait_replicas"):
        kq.create("plain", 1)
    assert keys_by_primary(cluster, ns) == {}


def redirects(cluster: ClusterSetup) -> Counter[str]:
    """The ASK, MOVED and TRYAGAIN replies each primary has sent so far (INFO errorstats),
    as "<port> <error>" counts."""
    seen: Counter[str] = Counter()
    for port in cluster.primaries():
        with cluster.node(port).admin() as client:
            for stat, value in client.info("errorstats").items():
                error = stat.removeprefix("errorstat_")
                if error in ("ASK", "MOVED", "TRYAGAIN"):
                    seen[f"{port} {error}"] = int(value["count"])
    return seen


def test_slot_migrated_between_runs_is_followed(
        cluster: ClusterSetup, app: Celery, shared: redis.Redis, made: list[str]) -> None:
    """A namespace's slot moved to another primary (while no kickq call is in flight: a live
    namespace must not be resharded, see the README) with jobs queued and parked in it: the
    clients follow MOVED, and every job runs once on the new owner."""
    source, target = cluster.primaries()[1:3]
    ns = namespace_on(cluster, source, made)
    slot = cluster.slot_of("{" + ns + "}:")
    kq = Kickq(app, redis=cluster.url, redis_namespace=ns, poll_interval=0.1, lock_timeout=10)

    @kq.process("work")
    def work(job: Job) -> object:
        shared.rpush(f"test:{ns}:runs", job.id)
        return job.data

    before = redirects(cluster)
    with tracebacks() as logged:
        with worker(app, concurrency=4):
            ran_before = [kq.create("work", i).id for i in range(10)]
            wait_for(lambda: all(state(kq, j) == "success" for j in ran_before), 10, 0.05, "the first jobs")
        # left in the namespace: queued ones, and parked ones due after the move
        waiting = [kq.create("work", i).id for i in range(10)]
        waiting += [kq.create("work", i, delay=1.5).id for i in range(10)]
        cluster.migrate_slot(slot, target)
        assert cluster.owner_of_slot(slot) == target
        with worker(app, concurrency=4):  # the same clients, with the old slot map
            after = [kq.create("work", i, delay=0.3 if i % 2 else None).id for i in range(10)]
            everything = ran_before + waiting + after
            wait_for(lambda: all(state(kq, j) == "success" for j in everything), 20, 0.1, "every job")
    assert logged.records == [], logged.report()
    assert (redirects(cluster) - before)[f"{source} MOVED"] > 0
    ran = runs(shared, ns)
    assert sorted(ran) == sorted(everything)  # each once
    for job_id in everything:
        record = kq.get(job_id)
        assert record.state == "success" and len(record.runs) == 1, record
    s = kq.stats("work")["work"]
    assert s.created == s.succeeded == len(everything)
    assert (s.queued, s.delayed, s.processing, s.ghosts) == (0, 0, 0, 0)
    assert list(keys_by_primary(cluster, ns)) == [target]
