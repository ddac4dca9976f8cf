"""examples/fastapi_app.py: a real `uvicorn` server and a real `celery worker`, driven over HTTP.

Both run as subprocesses of the module's tests (started once), on the test Redis and a
namespace of their own, which is purged afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="fastapi, uvicorn and httpx are in the dev extra")
pytest.importorskip("fastapi", reason="fastapi, uvicorn and httpx are in the dev extra")
pytest.importorskip("uvicorn", reason="fastapi, uvicorn and httpx are in the dev extra")

from kickq_celery import Kickq  # noqa: E402
from kickq_celery.testing import (  # noqa: E402
    DEFAULT_TEST_REDIS_URL,
    make_app,
    purge_namespace,
    stop_process_group,
    wait_for,
)
from tests.conftest import ROOT, free_port  # noqa: E402

IMAGE = {"width": 640, "height": 480}
HALVED = {"width": 320, "height": 240}


@pytest.fixture(scope="module")
def kickq_redis_url() -> str:
    """The plugin's fixture (same variable, same default), at module scope: the servers are
    started once for the module's tests."""
    return os.environ.get("KICKQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)


@dataclass
class Example:
    http: httpx.Client
    base_url: str
    namespace: str
    logs: Path

    def tail(self) -> str:
        """The end of both logs, for assertion messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
                         for log in sorted(self.logs.glob("*.log")))

    def record(self, job_id: str) -> dict[str, Any]:
        got = self.http.get(f"/jobs/{job_id}")
        assert got.status_code == 200, got.text
        return got.json()

    def stats(self, name: str) -> dict[str, Any]:
        got = self.http.get("/stats", params={"name": name})
        assert got.status_code == 200, got.text
        return got.json()["names"].get(name, {})


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/stats").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, kickq_redis_url: str) -> Iterator[Example]:
    namespace = f"fastapi{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("fastapi-example")
    env = {**os.environ, "KICKQ_REDIS_URL": kickq_redis_url, "KICKQ_NAMESPACE": namespace,
           "PYTHONPATH": str(ROOT)}
    base_url = f"http://127.0.0.1:{free_port()}"
    http = httpx.Client(base_url=base_url, timeout=15)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        worker = _spawn([sys.executable, "-m", "celery", "-A", "examples.fastapi_app", "worker",
                         "--pool", "threads", "--concurrency", "4", "--loglevel", "INFO",
                         "--without-mingle", "--without-gossip", "--hostname", f"{namespace}@%h"],
                        logs / "worker.log", env)
        procs.append(worker)
        server = _spawn([sys.executable, "-m", "uvicorn", "examples.fastapi_app:api",
                         "--host", "127.0.0.1", "--port", base_url.rsplit(":", 1)[1]],
                        logs / "uvicorn.log", env)
        procs.append(server)
        started = Example(http, base_url, namespace, logs)
        wait_for(lambda: server.poll() is not None or _answers(http), 20, 0.1, "uvicorn to answer")
        assert server.poll() is None, started.tail()
        wait_for(lambda: worker.poll() is not None or b"ready." in (logs / "worker.log").read_bytes(),
                 30, 0.1, "the worker to start")
        assert worker.poll() is None, started.tail()
        yield started
    finally:
        http.close()
        for proc in reversed(procs):
            stop_process_group(proc)
        app = make_app(kickq_redis_url)
        purge_namespace(Kickq(app, redis=kickq_redis_url, redis_namespace=namespace))
        app.close()


def test_a_created_job_is_run_by_the_worker_and_its_record_reads_back(example: Example) -> None:
    created = example.http.post("/jobs/resize", json=IMAGE)
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["state"] == "queued" and isinstance(body["id"], str)

    record = wait_for(lambda: (r := example.record(body["id"]))["complete"] and r, 15, 0.05,
                      f"job {body['id']} to finish\n{example.tail()}")
    assert record["state"] == "success", record
    assert (record["id"], record["name"], record["data"], record["result"]) == (body["id"], "resize", IMAGE,
                                                                                HALVED)
    assert [run["state"] for run in record["runs"]] == ["success"]


def test_wait_answers_with_the_result(example: Example) -> None:
    began = time.monotonic()
    waited = example.http.post("/jobs/resize/wait", params={"timeout": 5}, json={"width": 100, "height": 51})
    elapsed = time.monotonic() - began
    assert waited.status_code == 200, f"{waited.text}\n{example.tail()}"
    body = waited.json()
    assert (body["name"], body["state"], body["result"]) == ("resize", "success", {"width": 50, "height": 25})
    assert elapsed < 4, elapsed
    assert example.record(body["id"])["state"] == "success"


def test_many_concurrent_waits_all_get_their_own_result(example: Example) -> None:
    async def wait_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=example.base_url, timeout=15) as http:
            return await asyncio.gather(*(
                http.post("/jobs/resize/wait", params={"timeout": 10}, json={"width": 2 * n, "height": n})
                for n in range(30)))

    began = time.monotonic()
    answers = asyncio.run(wait_all())
    elapsed = time.monotonic() - began
    assert [a.status_code for a in answers] == [200] * 30, [a.text for a in answers if a.status_code != 200]
    assert [a.json()["result"] for a in answers] == [{"width": n, "height": n // 2} for n in range(30)]
    assert len({a.json()["id"] for a in answers}) == 30
    assert elapsed < 8, elapsed


def test_wait_on_a_failing_job_answers_with_its_error(example: Example) -> None:
    waited = example.http.post("/jobs/fail/wait", params={"timeout": 5}, json={"image": "x.png"})
    assert waited.status_code == 502, f"{waited.text}\n{example.tail()}"
    body = waited.json()
    assert body["state"] == "fail"
    assert body["error"] == "RuntimeError: cannot process {'image': 'x.png'}"
    record = example.record(body["id"])
    assert (record["state"], record["last_error"]) == ("fail", body["error"])


def test_wait_times_out_with_504_when_no_worker_handles_the_name(example: Example) -> None:
    began = time.monotonic()
    waited = example.http.post("/jobs/nobody/wait", params={"timeout": 0.5}, json=IMAGE)
    elapsed = time.monotonic() - began
    assert waited.status_code == 504, waited.text
    assert "tombstone_timeout" in waited.json()["error"]
    assert 0.5 <= elapsed < 3, elapsed
    # the job is not cancelled by the timeout: it waits for a worker of its name
    assert example.record(waited.json()["id"])["state"] == "queued"


def test_delete_removes_the_job_then_404s(example: Example) -> None:
    job_id = example.http.post("/jobs/nobody", json=IMAGE).json()["id"]
    assert example.record(job_id)["state"] == "queued"

    deleted = example.http.delete(f"/jobs/{job_id}")
    assert (deleted.status_code, deleted.content) == (204, b"")
    got = example.http.get(f"/jobs/{job_id}")
    assert got.status_code == 404 and job_id in got.json()["error"], got.text
    again = example.http.delete(f"/jobs/{job_id}")
    assert again.status_code == 404, again.text
    assert example.http.get("/jobs/no-such-job").status_code == 404


def test_bad_job_data_or_options_are_400_and_create_nothing(example: Example) -> None:
    before = example.stats("resize").get("created", 0)
    nan = example.http.post("/jobs/resize", content=b'{"width": NaN, "height": 1}',
                            headers={"content-type": "application/json"})
    assert nan.status_code == 400 and "not JSON-serializable" in nan.json()["error"], nan.text
    long_name = example.http.post(f"/jobs/{'x' * 201}", json=IMAGE)
    assert long_name.status_code == 400, long_name.text
    for path, params in [("/jobs/resize/wait", {"timeout": 0}), ("/jobs/resize/wait", {"timeout": 61}),
                         ("/jobs/resize", {"delay": -1})]:
        answer = example.http.post(path, params=params, json=IMAGE)
        assert answer.status_code == 400, (path, params, answer.text)
        assert json.loads(answer.text)["error"], answer.text
    assert example.stats("resize").get("created", 0) == before


def test_stats_count_the_jobs_and_their_workers(example: Example) -> None:
    before = {name: example.stats(name) for name in ("resize", "fail")}
    unhandled = f"nobody-{uuid.uuid4().hex[:6]}"
    for _ in range(2):
        assert example.http.post("/jobs/resize/wait", json=IMAGE).status_code == 200
    assert example.http.post("/jobs/fail/wait", json=IMAGE).status_code == 502
    assert example.http.post(f"/jobs/{unhandled}", json=IMAGE).status_code == 202

    def counted() -> dict[str, dict[str, Any]] | None:
        now = {name: example.stats(name) for name in ("resize", "fail", unhandled)}
        done = (now["resize"]["succeeded"] - before["resize"].get("succeeded", 0) == 2
                and now["fail"]["failed"] - before["fail"].get("failed", 0) == 1)
        return now if done else None

    now = wait_for(counted, 5, 0.05, "the stats to count the finished jobs")
    assert now["resize"]["created"] - before["resize"].get("created", 0) == 2
    assert now["fail"]["created"] - before["fail"].get("created", 0) == 1
    assert (now["resize"]["workers"], now["fail"]["workers"]) == (1, 1)
    assert (now[unhandled]["queued"], now[unhandled]["created"], now[unhandled]["workers"]) == (1, 1, 0)
    total = example.http.get("/stats").json()
    assert {"resize", "fail", unhandled} <= set(total["names"])
    assert total["total"]["created"] == sum(s["created"] for s in total["names"].values())
