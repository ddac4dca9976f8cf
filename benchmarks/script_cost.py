"""What the run guard and the finish cost Redis, per job.

Usage: python -m benchmarks.script_cost [--jobs N] [--callgrind]

Starts a private redis-server, creates N jobs, then starts and finishes each one
through the JobStore (the two Lua calls a worker makes per job) and reports the
server's own time per call from INFO commandstats. Server time is noisy on a
shared machine; with --callgrind the server runs under valgrind and the tool
reports the instructions Redis executed per job, which repeat run to run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery

from kickq_celery import Kickq


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_jobs(kq: Kickq, ids: list[str]) -> None:
    for job_id in ids:
        token = uuid.uuid4().hex
        assert kq.store.start_run(job_id, 1, token, 30).status == "run"
        assert kq.store.finish_run(job_id, token, "success", "null", 600).verdict == "success"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--callgrind", action="store_true", help="count instructions (needs valgrind)")
    args = parser.parse_args()
    if args.callgrind and not shutil.which("valgrind"):
        parser.error("--callgrind needs valgrind")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="kickq-script-cost-"))
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if args.callgrind:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.%p", *cmd]
    server = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(300):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        kq = Kickq(Celery("script_cost", broker=url), redis=url, redis_namespace="cost", purge_timeout=600)
        # a backlog as in a busy queue; the first jobs warm the scripts and indexes up
        ids = [job.id for job in kq.create_many("noop", [None] * (args.jobs + 200))]
        run_jobs(kq, ids[:200])
        pid = client.info("server")["process_id"]
        client.config_resetstat()
        if args.callgrind:
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        run_jobs(kq, ids[200:])
        stats = client.info("commandstats")
        called = stats.get("cmdstat_fcall") or stats["cmdstat_evalsha"]  # (EVALSHA before Redis 7)
        print(f"{args.jobs} jobs: Redis spent {called['usec'] / args.jobs:.1f} us per job "
              f"in the two scripts ({called['usec_per_call']:.1f} us per call)")
        if args.callgrind:
            subprocess.run(["callgrind_control", "-d", "jobs", str(pid)], check=True, capture_output=True)
            [dump] = [p for p in workdir.glob("callgrind.*.*")]
            match = re.search(r"^totals: (\d+)", dump.read_text(), re.M)
            assert match, dump
            print(f"Redis executed {int(match.group(1)) / args.jobs:,.0f} instructions per job")
        Kickq.reset()
    finally:
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        server.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
