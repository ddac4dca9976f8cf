"""`celery inspect` (what Flower reads too) shows kickq jobs as ordinary, readable Celery tasks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from kickq_celery.testing import wait_for
from tests.conftest import ROOT


def inspect(command: str, node: str, namespace: str, redis_url: str) -> dict:
    """`celery -A tests.workerapp inspect <command>` against one worker, parsed from --json."""
    env = {**os.environ, "KICKQ_TEST_NS": namespace, "KICKQ_TEST_REDIS_URL": redis_url,
           "KICKQ_TEST_CONTROL_EXCHANGE": namespace, "PYTHONPATH": str(ROOT)}
    # -d: no waiting out the timeout once our worker has answered
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.workerapp", "inspect", command,
                          "-d", node, "--timeout", "10", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inspect_registered_and_active_show_job_names_and_ids(kickq, kickq_namespace, kickq_redis_url,
                                                              worker_process):
    # its own control exchange: the other tests' workers share the broker (and the name w0@host)
    worker = worker_process(concurrency=2, control_exchange=kickq_namespace)
    node = f"w0@{socket.gethostname()}"
    job = kickq.create("sleep", 8)  # runs while `inspect active` looks (killed after)

    registered = inspect("registered", node, kickq_namespace, kickq_redis_url)
    assert {f"{kickq_namespace}.record", f"{kickq_namespace}.sleep"} <= set(registered[node])

    started = f"test:{kickq_namespace}:started"
    wait_for(lambda: job.id.encode() in kickq.redis.lrange(started, 0, -1), 20, message="the job to start")
    active = inspect("active", node, kickq_namespace, kickq_redis_url)[node]
    assert len(active) == 1, active
    task = active[0]
    assert task["name"] == f"{kickq_namespace}.sleep"
    assert task["id"] == job.id  # the Celery task id is the job id
    assert task["args"] == [job.id, 1]  # the args are (job_id, attempt)
    # shown (Flower, `inspect active` with safe=True) as the job's name and data, id and attempt
    kickq.app.conf.control_exchange = kickq_namespace
    [shown] = kickq.app.control.inspect(destination=[node], timeout=10).active(safe=True)[node]
    assert shown["args"] == "('sleep', 8)"
    assert shown["kwargs"] == repr({"job_id": job.id, "attempt": 1})
    assert task["delivery_info"]["routing_key"] == f"{kickq_namespace}.sleep"  # its own queue
    worker.kill()  # no need to wait for the sleep to end
