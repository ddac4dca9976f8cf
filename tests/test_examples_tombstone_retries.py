"""examples/tombstone.py and examples/retries.py run as a user would run them."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent


def run_example(script: str, redis_url: str) -> tuple[list[str], str]:
    # a namespace of this run's own, so parallel test runs never share queues or records
    namespace = f"example-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KICKQ_REDIS_URL": redis_url, "KICKQ_NAMESPACE": namespace,
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, f"examples/{script}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the example purged its namespace at the end
    assert list(redis.Redis.from_url(redis_url).scan_iter(match="\\{" + namespace + "\\}:*")) == []
    return proc.stdout.splitlines(), namespace


@pytest.mark.timeout(90)
def test_tombstone_example(kickq_redis_url):
    lines, _ = run_example("tombstone.py", kickq_redis_url)
    expected = [
        "wait: resize success -> {'img': 7, 'size': [320, 240]}",
        "then: on_complete got {'img': 8, 'size': [10, 5]}",
        "then: derived promise -> thumbnail ready",
        "then: on_failed got JobFailed",
        "then: derived promise -> no thumbnail",
        "await: sizes [[50, 25], [100, 50], [150, 75]]",
        "callback: err=None promise=yes",
        "callback: result {'img': 10, 'size': [4, 4]}",
        "failed: JobFailed error='ValueError: cannot read image 11' has_timeout=False",
        "timeout: TombstoneTimeout has_timeout=True",
        "deleted: JobDeleted has_timeout=False",
        "celery: AsyncResult says {'img': 7, 'size': [320, 240]}",
        "done",
    ]
    assert lines == expected


@pytest.mark.timeout(90)
def test_retries_example(kickq_redis_url):
    lines, _ = run_example("retries.py", kickq_redis_url)
    text = "\n".join(lines)
    assert "fetch: state is retry while it waits for a retry" in lines
    assert "fetch: promise -> {'fetched': 'https://example.com', 'runs': 3}" in lines
    assert re.search(r"^fetch: success after 3 runs \[1:fail, 2:fail, 3:success\]", text, re.M)
    assert "broken: JobFailed error='RuntimeError: run 4 failed'" in lines
    assert re.search(r"^broken: fail after 4 runs \[1:fail, 2:fail, 3:fail, 4:fail\]", text, re.M)
    assert re.search(r"^broken: fail after 3 runs \[1:fail, 2:fail, 3:fail\]", text, re.M)
    assert re.search(r"^stuck: fail after 2 runs \[1:ghost, 2:ghost\]", text, re.M)
    assert "stuck: last error 'heartbeat lock expired: the worker died or process_timeout passed'" in lines
    assert "stats: 7 retried, 2 ghosts, 1 succeeded, 3 failed" in lines
    assert lines[-1] == "done"
    # gaps between run starts follow the intervals (printed rounded to 0.1 s)
    gaps = {line.split(" runs ")[0]: ast.literal_eval(line.split("gaps=")[1])
            for line in lines if "gaps=" in line}
    fetch, listed, called = (gaps["fetch: success after 3"], gaps["broken: fail after 4"],
                             gaps["broken: fail after 3"])
    assert all(gap >= 0.5 for gap in fetch)
    assert listed[0] >= 0.2 and listed[1] >= 0.4 and listed[2] >= 0.4
    assert called[0] >= 0.2 and called[1] >= 0.4
