"""examples/cron.py: a schedule every two seconds fires from an in-process worker, then is removed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import redis

from tests.conftest import ROOT


def test_cron_example_prints_fired_jobs_and_cleans_up(kickq_redis_url: str) -> None:
    proc = subprocess.Popen([sys.executable, "examples/cron.py"], cwd=ROOT, text=True,
                            env={**os.environ, "KICKQ_REDIS_URL": kickq_redis_url},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert re.search(r"^scheduled tick:[0-9a-f]{12};", stdout, re.M), stdout
    ran = re.findall(r"^  job [0-9a-f]{8} \(created (\d\d:\d\d:\d\d\.\d{3})\) ran with data "
                     r"\{'report': 'heartbeat'\}$", stdout, re.M)
    assert len(ran) >= 3, stdout
    assert len(set(ran)) == len(ran)
    assert re.search(r"^schedule tick:[0-9a-f]{12}: cron '\* \* \* \* \* \*/2' \(UTC\), last run "
                     r"\d\d:\d\d:\d\d, next run \d\d:\d\d:\d\d$", stdout, re.M), stdout
    assert "unscheduled: True" in stdout
    created, succeeded = map(int, re.search(r"^(\d+) jobs created by the schedule, (\d+) succeeded$",
                                            stdout, re.M).groups())
    assert created >= succeeded >= 3
    # the example removes its namespace (named after its pid) on the way out
    leftovers = list(redis.Redis.from_url(kickq_redis_url).scan_iter(match=f"*cron-example-{proc.pid}*"))
    assert leftovers == []
