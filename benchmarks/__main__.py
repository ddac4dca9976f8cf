"""Run every benchmark: kickq_celery and raw Celery, same Redis, same worker settings.

Usage: python -m benchmarks [--quick] [--json PATH]

Prints a table of both figures and their ratio, and writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis

from benchmarks.asyncio_bench import bench_acreate, bench_await
from benchmarks.replicas import bench_wait_replicas
from benchmarks.scale import measure as measure_scale
from kickq_celery.testing import stop_process_group

ROOT = Path(__file__).resolve().parent.parent


def _purge(client: redis.Redis, namespace: str) -> None:
    """Remove the run's keys, and the messages its stopped workers left unacknowledged
    (kombu's `unacked` hash would otherwise hand them back to the next worker that starts)."""
    for pattern in ("\\{" + namespace + "\\}:*", f"{namespace}*", f"_kombu.binding.{namespace}*",
                    f"_kombu.binding_permanent.{namespace}*"):
        keys = list(client.scan_iter(match=pattern, count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i:i + 5000])
    ours = [tag for tag, message in client.hscan_iter("unacked", count=5000)
            if f'"routing_key": "{namespace}'.encode() in message]
    for i in range(0, len(ours), 5000):
        client.hdel("unacked", *ours[i:i + 5000])
        client.zrem("unacked_index", *ours[i:i + 5000])


@contextmanager
def celery_worker(env: dict[str, str], concurrency: int = 2,
                  queues: str | None = None) -> Iterator[psutil.Process]:
    """A prefork `celery worker` for benchmarks/benchapp.py; yields its main process."""
    cmd = [sys.executable, "-m", "celery", "-A", "benchmarks.benchapp", "worker", "--loglevel",
           "WARNING", "--pool", "prefork", "--concurrency", str(concurrency), "--without-mingle",
           "--without-gossip", "--without-heartbeat"]
    if queues:
        cmd += ["-Q", queues]
    # its log in a file (a pipe nobody reads would stall a worker that logs much), shown on failure
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            main = psutil.Process(proc.pid)
            deadline = time.monotonic() + 60
            while len(main.children()) < concurrency:  # pool children forked: ready enough
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("worker did not start")
                time.sleep(0.1)
            time.sleep(1.0)  # let it connect and start consuming
            yield main
        except BaseException:
            log.seek(0)
            print(f"--- the worker's log ---\n{log.read().decode(errors='replace')[-4000:]}", file=sys.stderr)
            raise
        finally:
            stop_process_group(proc, 30)


def rss_mb(process: psutil.Process) -> float:
    """Resident memory of a worker: its main process and pool children."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def wait_counter(client: redis.Redis, key: str, target: int, timeout: float) -> float:
    start = time.monotonic()
    while int(client.get(key) or 0) < target:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"only {int(client.get(key) or 0)} of {target} ran in {timeout}s")
        time.sleep(0.02)
    return time.monotonic()


def rate(n: int, fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def alternating(n: int, sides: dict[str, Callable[[], Any]], client: redis.Redis, namespace: str,
                repeats: int = 5) -> dict[str, Any]:
    """The median rate of each side over `repeats` runs, the sides in turn (the queues emptied
    between runs, so each starts from the same Redis)."""
    samples: dict[str, list[float]] = {side: [] for side in sides}
    names = list(sides)
    for repeat in range(repeats):
        for side in names[repeat % len(names):] + names[:repeat % len(names)]:
            samples[side].append(rate(n, sides[side]))
            _purge(client, namespace)
    return {**{side: statistics.median(values) for side, values in samples.items()}, "samples": samples}


def bench_create(n: int, client: redis.Redis, namespace: str) -> dict[str, Any]:
    from benchmarks.benchapp import kq, raw_noop

    return alternating(n, {"raw": lambda: [raw_noop.apply_async((i,)) for i in range(n)],
                           "kickq": lambda: [kq.create("noop", i) for i in range(n)]}, client, namespace)


def bench_create_many(n: int, client: redis.Redis, namespace: str) -> dict[str, Any]:
    from benchmarks.benchapp import app, kq, raw_noop

    def raw_batch() -> None:
        with app.producer_or_acquire() as producer, producer.batch():
            for i in range(n):
                raw_noop.apply_async((i,), producer=producer)

    return alternating(n, {"raw": raw_batch, "kickq": lambda: kq.create_many("noop", range(n))},
                       client, namespace)


def bench_processing(n: int, env: dict[str, str], client: redis.Redis,
                     repeats: int = 5) -> dict[str, Any]:
    """Drain rate of n queued no-op jobs; the median of `repeats` runs per side, in turn: raw Celery
    storing each result ("raw"), raw Celery with ignore_result=True ("raw_fire"), and kickq."""
    from benchmarks.benchapp import COUNTER, RAW_QUEUE, app, kq, raw_fire, raw_noop

    sides = ("raw", "raw_fire", "kickq")
    samples: dict[str, list[float]] = {side: [] for side in sides}
    # CPU per job of the worker's main process, its pool processes and Redis (when local)
    cpu: dict[str, dict[str, list[float]]] = {side: {"main": [], "pool": [], "redis": []}
                                              for side in samples}
    redis_server = local_process(client)
    for repeat in range(repeats):
        for side in sides[repeat % 3:] + sides[:repeat % 3]:
            client.delete(COUNTER)
            if side in ("raw", "raw_fire"):
                task = raw_noop if side == "raw" else raw_fire
                with app.producer_or_acquire() as producer, producer.batch():
                    for i in range(n):
                        task.apply_async((i,), producer=producer)
                queues = RAW_QUEUE
            else:
                kq.create_many("noop", range(n))
                queues = kq.task_name("noop")
            with celery_worker(env, concurrency=2, queues=queues) as main:
                processes = {"main": [main], "pool": main.children()}
                if redis_server is not None:
                    processes["redis"] = [redis_server]
                before = {part: cpu_seconds(procs) for part, procs in processes.items()}
                start, done_before = time.monotonic(), int(client.get(COUNTER) or 0)
                end = wait_counter(client, COUNTER, n, timeout=600)
                for part, procs in processes.items():
                    used = cpu_seconds(procs) - before[part]
                    cpu[side][part].append(used / (n - done_before) * 1e6)
            samples[side].append((n - done_before) / (end - start))
    return {**{side: statistics.median(values) for side, values in samples.items()},
            "samples": samples,
            "cpu_us_per_job": {side: {part: round(statistics.median(values), 1)
                                      for part, values in parts.items() if values}
                               for side, parts in cpu.items()}}


def bench_limits(n: int, env: dict[str, str], client: redis.Redis, repeats: int = 5) -> dict[str, Any]:
    """Drain rate of n queued no-op jobs with no limit ("raw") and with max_jobs_num, rate_limit and
    max_jobs_per_key all configured (and not binding: each job has one of ten keys); the median of
    `repeats` runs per side, alternating."""
    from benchmarks.benchapp import COUNTER, kq

    samples: dict[str, list[float]] = {"none": [], "all": []}
    for repeat in range(repeats):
        for side in ("none", "all") if repeat % 2 == 0 else ("all", "none"):
            client.delete(COUNTER)
            if side == "none":
                kq.create_many("noop", range(n))
                queues = kq.task_name("noop")
            else:
                for key in range(10):
                    kq.create_many("limited_noop", range(n // 10), concurrency_key=f"k{key}")
                queues = kq.task_name("limited_noop")
            with celery_worker(env, concurrency=2, queues=queues):
                start, done_before = time.monotonic(), int(client.get(COUNTER) or 0)
                end = wait_counter(client, COUNTER, n, timeout=600)
            samples[side].append((n - done_before) / (end - start))
    return {"raw": statistics.median(samples["none"]), "kickq": statistics.median(samples["all"]),
            "samples": samples}


def bench_chunks(n: int, env: dict[str, str], client: redis.Redis, repeats: int = 5) -> dict[str, Any]:
    """Drain rate of n queued no-op jobs: raw Celery with ignore_result=True ("raw"), kickq with
    chunk_size jobs per message from create_many ("kickq"), and the same jobs parked first (a
    delay of 1 s) and published by the promoter as they come due ("promoted"); the median of
    `repeats` runs per side, in turn."""
    from benchmarks.benchapp import CHUNK_SIZE, COUNTER, RAW_QUEUE, app, kq, raw_fire

    sides = ("raw", "kickq", "promoted")
    samples: dict[str, list[float]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in sides[repeat % 3:] + sides[:repeat % 3]:
            client.delete(COUNTER)
            if side == "raw":
                with app.producer_or_acquire() as producer, producer.batch():
                    for i in range(n):
                        raw_fire.apply_async((i,), producer=producer)
                queues = RAW_QUEUE
            else:
                for i in range(0, n, 1000):
                    kq.create_many("chunked_noop", range(i, min(n, i + 1000)),
                                   delay=1.0 if side == "promoted" else None)
                queues = kq.task_name("chunked_noop")
            with celery_worker(env, concurrency=2, queues=queues):
                start, done_before = time.monotonic(), int(client.get(COUNTER) or 0)
                end = wait_counter(client, COUNTER, n, timeout=600)
            samples[side].append((n - done_before) / (end - start))
    return {**{side: statistics.median(values) for side, values in samples.items()},
            "chunk_size": CHUNK_SIZE, "samples": samples}


def local_process(client: redis.Redis) -> psutil.Process | None:
    """The redis-server process behind ``client`` when it runs on this machine."""
    try:
        process = psutil.Process(int(client.info("server")["process_id"]))
        return process if process.name().startswith("redis") else None
    except (psutil.Error, KeyError):
        return None


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU time of processes."""
    return sum(times.user + times.system for times in (p.cpu_times() for p in processes))


def bench_tombstone(n: int, env: dict[str, str]) -> dict[str, float]:
    from benchmarks.benchapp import RAW_QUEUE, kq, raw_noop

    raw: list[float] = []
    kick: list[float] = []
    with celery_worker(env, concurrency=2, queues=f"{RAW_QUEUE},{kq.task_name('noop')}"):
        raw_noop.delay(0).get(timeout=30)  # warm up both paths
        kq.create("noop", 0, tombstone=True, tombstone_timeout=30).promise.wait()
        for i in range(n):
            t = time.perf_counter()
            raw_noop.delay(i).get(timeout=30)
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            kq.create("noop", i, tombstone=True, tombstone_timeout=30).promise.wait()
            kick.append(time.perf_counter() - t)

    def pct(samples: list[float], p: float) -> float:
        return statistics.quantiles(samples, n=100)[int(p) - 1] * 1000

    return {"raw_p50_ms": pct(raw, 50), "kickq_p50_ms": pct(kick, 50),
            "raw_p99_ms": pct(raw, 99), "kickq_p99_ms": pct(kick, 99)}


def bench_memory(n: int, env: dict[str, str], client: redis.Redis) -> dict[str, float]:
    from benchmarks.benchapp import RAW_QUEUE, app, kq, raw_noop

    results = {}
    for side in ("raw", "kickq"):
        queues = RAW_QUEUE if side == "raw" else kq.task_name("noop")
        with celery_worker(env, concurrency=2, queues=queues) as worker:
            before = rss_mb(worker)
            if side == "raw":
                with app.producer_or_acquire() as producer, producer.batch():
                    for i in range(n):
                        raw_noop.apply_async((i,), countdown=3600, producer=producer)
                # the worker reserves countdown tasks in memory: wait until it takes no more
                deadline, last, still = time.monotonic() + 600, -1, 0
                while client.llen(RAW_QUEUE) and time.monotonic() < deadline and still < 20:
                    left = client.llen(RAW_QUEUE)
                    still = still + 1 if left == last else 0
                    last = left
                    time.sleep(0.5)
                results["raw_held"] = n - client.llen(RAW_QUEUE)
            else:
                for start in range(0, n, 10000):
                    kq.create_many("noop", range(start, min(n, start + 10000)), delay=3600)
            time.sleep(5)  # several promoter passes over the parked jobs
            results[side] = rss_mb(worker) - before
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        ("create (jobs/s)", results["create"]["raw"], results["create"]["kickq"], "apply_async"),
        ("create_many (jobs/s)", results["create_many"]["raw"], results["create_many"]["kickq"],
         "apply_async in producer.batch()"),
        ("processing (jobs/s)", results["processing"]["raw"], results["processing"]["kickq"],
         "prefork -c 2, no-op, storing results"),
        ("processing (jobs/s), fire and forget", results["processing"]["raw_fire"],
         results["processing"]["kickq"], "prefork -c 2, no-op, ignore_result=True"),
        ("tombstone p50 (ms)", results["tombstone"]["raw_p50_ms"], results["tombstone"]["kickq_p50_ms"],
         "delay().get()"),
        ("tombstone p99 (ms)", results["tombstone"]["raw_p99_ms"], results["tombstone"]["kickq_p99_ms"],
         "delay().get()"),
        (f"worker RSS growth, {results['counts']['memory']:,} delayed 1 h (MB)"
         f" (Celery held {results['memory'].get('raw_held', 0):,})",
         results["memory"]["raw"], results["memory"]["kickq"], "countdown=3600"),
    ]
    if "acreate" in results:
        a = results["acreate"]
        rows.append(("acreate one by one (jobs/s; 'raw' = create one by one)", a["create"], a["acreate"],
                     "kickq sync vs asyncio"))
        rows.append(("acreate, 100 concurrent tasks (jobs/s; 'raw' = create one by one)", a["create"],
                     a["acreate_100"], "kickq sync vs asyncio"))
    if "await" in results:
        w = results["await"]
        rows.append(("await promise p50 (ms; 'raw' = promise.wait())", w["wait_p50_ms"], w["await_p50_ms"],
                     "create + wait vs acreate + await"))
        rows.append(("await promise p99 (ms; 'raw' = promise.wait())", w["wait_p99_ms"], w["await_p99_ms"],
                     "create + wait vs acreate + await"))
    if "limits" in results:
        rows.append(("processing with every limit configured (jobs/s; 'raw' = kickq with none)",
                     results["limits"]["raw"], results["limits"]["kickq"],
                     "kickq, max_jobs_num + rate_limit + max_jobs_per_key"))
    if "chunks" in results:
        c = results["chunks"]
        rows.append((f"processing, {c['chunk_size']} jobs per message from create_many (jobs/s)", c["raw"],
                     c["kickq"], "prefork -c 2, no-op, ignore_result=True"))
        rows.append((f"processing, {c['chunk_size']} jobs per message from the promoter (jobs/s)", c["raw"],
                     c["promoted"], "prefork -c 2, no-op, ignore_result=True"))
    if "redis_memory" in results:
        m = results["redis_memory"]
        for label, key in (("all", "bytes_per_job"), ("the message", "message_bytes_per_job"),
                           ("record + indexes", "record_and_index_bytes_per_job")):
            rows.append((f"Redis bytes per queued job ({m['jobs']:,}): {label} ('raw' = 1.5 KB)", 1536,
                         m[key], "kickq only"))
    if "wait_replicas" in results:
        waited = results["wait_replicas"]
        rows.append(("create with redis_wait_replicas=1 (jobs/s; 'raw' = kickq without)",
                     waited["wait_0"], waited["wait_1"], "kickq, one replica"))
    cpu = results["processing"].get("cpu_us_per_job", {})
    for part in cpu.get("kickq", {}):
        rows.append((f"processing CPU per job: {part} (us)", cpu["raw"][part], cpu["kickq"][part],
                     "the same runs, storing results"))
        rows.append((f"processing CPU per job: {part} (us), fire and forget", cpu["raw_fire"][part],
                     cpu["kickq"][part], "the same runs, ignore_result=True"))
    lines = ["| benchmark | raw Celery | kickq_celery | kickq / Celery | Celery side |",
             "|---|---:|---:|---:|---|"]
    for label, raw, kick, what in rows:
        ratio = kick / raw if raw else float("nan")
        lines.append(f"| {label} | {raw:,.1f} | {kick:,.1f} | {ratio:.2f}x | {what} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (and skip the table)")
    args = parser.parse_args()
    counts = ({"create": 500, "create_many": 2000, "processing": 1000, "tombstone": 50, "memory": 5000}
              if args.quick else
              {"create": 3000, "create_many": 20000, "processing": 10000, "tombstone": 300,
               "memory": 100000})
    namespace = f"kqbench{os.getpid()}"
    os.environ["KICKQ_BENCH_NS"] = namespace
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    from benchmarks.benchapp import REDIS_URL

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    results: dict[str, Any] = {"counts": counts, "python": sys.version.split()[0],
                               "cpus": os.cpu_count()}
    try:
        for name, run in (
            ("create", lambda: bench_create(counts["create"], client, namespace)),
            ("create_many", lambda: bench_create_many(counts["create_many"], client, namespace)),
            # The waits for outcomes come before the tens of thousands of raw Celery tasks that
            # processing sends with stored results: Celery subscribes this process to each one's
            # result channel (and unsubscribes as its AsyncResult goes), and its result consumer
            # then reads the backlog of those replies one per poll; a wait after them timed out
            # in two full runs (raw Celery's and kickq's, which waits on Celery's backend too).
            ("tombstone", lambda: bench_tombstone(counts["tombstone"], env)),
            ("await", lambda: bench_await(counts["tombstone"], env, celery_worker)),
            ("processing", lambda: bench_processing(counts["processing"], env, client)),
            ("limits", lambda: bench_limits(counts["processing"], env, client)),
            ("chunks", lambda: bench_chunks(counts["processing"], env, client)),
            ("memory", lambda: bench_memory(counts["memory"], env, client)),
            ("redis_memory", lambda: measure_scale(counts["memory"])),
            ("wait_replicas", lambda: bench_wait_replicas(counts["create"])),
            ("acreate", lambda: bench_acreate(counts["create"])),
        ):
            if args.only and name not in args.only:
                continue
            _purge(client, namespace)
            print(f"running {name} ...", flush=True)
            results[name] = run()
            print(f"  {results[name]}", flush=True)
    finally:
        _purge(client, namespace)
    import celery

    results["celery"] = celery.__version__
    if args.only:
        return
    print()
    print(table(results))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
