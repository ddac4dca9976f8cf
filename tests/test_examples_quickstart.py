"""examples/quickstart.py (what `make demo` runs) works with and without a Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port


@pytest.mark.parametrize("redis_up", [True, False], ids=["redis", "embedded"])
def test_quickstart_prints_processed_jobs(redis_up: bool, kickq_redis_url: str) -> None:
    url = kickq_redis_url if redis_up else f"redis://127.0.0.1:{free_port()}/0"
    out = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, timeout=90,
                         env={**os.environ, "KICKQ_REDIS_URL": url}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("embedded Redis" in out.stdout) is not redis_up
    assert "tombstone says: hello, world" in out.stdout
    assert "flaky failed for good: RuntimeError: run 2 failed on purpose" in out.stdout
    assert "result='hello, delayed world'" in out.stdout
    assert "processed: 2 succeeded, 1 failed, 1 retried" in out.stdout
