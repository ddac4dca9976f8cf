"""Cost growth with the number of jobs: memory per job, create_many rate, a listing page and
stats at 10k / 100k / 1M queued jobs, each size on a redis-server of its own.

Usage: python -m benchmarks.scale [--sizes 10000 100000 1000000] [--json PATH]
(`make bench-scale`; not part of `make test` or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from kickq_celery import Kickq

ROOT = Path(__file__).resolve().parent.parent
BATCH = 1000  # create_many in batches, as a producer of many jobs would


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The median wall time of ``fn`` in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def measure(n: int) -> dict[str, Any]:
    port, workdir = free_port(), Path(tempfile.mkdtemp(prefix="kickq-scale-"))
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(workdir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        kq = Kickq(Celery("scale", broker=url, set_as_current=False), redis=url, redis_namespace="scale")
        queue = kq.queue("work").name
        before = int(r.info("memory")["used_memory"])
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            kq.create_many("work", range(i, min(n, i + BATCH)))
        rate = n / (time.perf_counter() - start)
        total = int(r.info("memory")["used_memory"]) - before
        messages = int(r.memory_usage(queue, samples=0) or 0)
        kq.create_many("rare", range(10))  # a name with few jobs among many (after the measure)
        sample = kq.jobs(state="queued", limit=1)[0]
        return {
            "jobs": n,
            "create_many_jobs_per_s": round(rate),
            "bytes_per_job": round(total / n),
            "message_bytes_per_job": round(messages / n),
            "record_and_index_bytes_per_job": round((total - messages) / n),
            "record_bytes": int(r.memory_usage(kq.keys.job(sample.id), samples=0) or 0),
            "first_page_ms": round(timed_ms(lambda: kq.jobs(state="queued", limit=50)), 2),
            "middle_page_ms": round(timed_ms(lambda: kq.jobs(state="queued", offset=n // 2, limit=50)), 2),
            "all_states_last_page_ms": round(timed_ms(lambda: kq.jobs(offset=n - 50, limit=50)), 2),
            "name_filter_first_page_ms": round(timed_ms(lambda: kq.jobs(name="work", limit=50)), 2),
            "name_filter_middle_page_ms": round(timed_ms(
                lambda: kq.jobs(name="work", offset=n // 2, limit=50)), 2),
            "rare_name_page_ms": round(timed_ms(lambda: kq.jobs(name="rare", limit=50)), 2),
            "stats_ms": round(timed_ms(lambda: kq.stats()), 2),
        }
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="*", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "scale.json"))
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        print(f"{n:,} jobs ...", flush=True)
        results.append(measure(n))
        print(f"  {results[-1]}", flush=True)
    columns = list(results[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---:|" * len(columns))
    for row in results:
        print("| " + " | ".join(f"{row[c]:,}" for c in columns) + " |")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
