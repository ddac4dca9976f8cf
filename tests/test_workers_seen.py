"""Workers announce the names they handle: `Stats.workers`, `kickq stats`, the Prometheus gauge,
the warning of a create() that no live worker handles, and the worker's start-up lines."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from kickq_celery import Kickq
from kickq_celery.testing import wait_for, worker
from tests.conftest import ROOT

LOCK_TIMEOUT = 1.0  # the workers' lock_timeout: a killed worker drops out within 3 s
# tests/workerapp.py's handlers
NAMES = ["asleep", "fail_first", "record", "sleep", "steady", "stoppable", "limits_rate", "limits_keyed",
         "limits_prio", "control_progress", "control_paused", "control_sleeper", "control_watch",
         "chunked", "chunked_burst"]


def workers(kq: Kickq, name: str) -> int:
    return kq.stats(name)[name].workers


def unhandled_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kickq_celery" and r.levelno == logging.WARNING
            and "no live worker handles" in r.getMessage()]


def test_workers_are_counted_and_drop_out_on_a_warm_shutdown_and_after_a_kill(worker_process, kickq):
    ns = kickq.options["redis_namespace"]
    assert workers(kickq, "record") == 0
    w0 = worker_process(lock_timeout=LOCK_TIMEOUT, max_jobs=3, wait=False)
    w1 = worker_process(lock_timeout=LOCK_TIMEOUT, wait=False)
    w0.wait_ready()
    w1.wait_ready()
    # jobs of two names, so that stats() lists both
    done = kickq.create_many("record", [1, 2])
    kickq.create("sleep", 0)
    wait_for(lambda: workers(kickq, "record") == 2, 10, 0.05, "two live workers of 'record'")
    stats = kickq.stats()
    assert {n: s.workers for n, s in stats.names.items()} == {"record": 2, "sleep": 2}
    assert stats.total.workers == 2  # distinct workers, not one per name
    assert stats.to_dict()["names"]["record"]["workers"] == 2
    wait_for(lambda: all(kickq.get(j.id).state == "success" for j in done), 10, 0.05, "the jobs to run")
    # every name the app has a handler for is announced, a name without one is not
    assert [workers(kickq, n) for n in [*NAMES, "unknown"]] == [2] * len(NAMES) + [0]

    # the start-up line of a worker without -Q: every name, its queue and its limit; no -Q warning
    log = w0.log.read_text()
    [line] = [line for line in log.splitlines() if f"kickq: namespace '{ns}'" in line]
    assert "INFO" in line, line
    for name in NAMES:
        assert f"{name} (queue {ns}.{name}, " in line, line
    assert f"sleep (queue {ns}.sleep, max_jobs_num 3)" in line, line
    assert f"record (queue {ns}.record, no limits)" in line, line
    assert "does not consume its queue" not in log

    w1.stop()  # warm shutdown: out at once, no waiting for the expiry
    assert workers(kickq, "record") == 1
    assert kickq.stats().total.workers == 1

    w0.kill()
    killed = time.monotonic()
    assert workers(kickq, "record") == 1  # a killed worker says nothing: it is counted until it expires
    wait_for(lambda: workers(kickq, "record") == 0, 3 * LOCK_TIMEOUT + 2, 0.05, "the killed worker to expire")
    gone_after = time.monotonic() - killed
    assert gone_after <= 3 * LOCK_TIMEOUT + 0.5, gone_after
    assert kickq.stats().total.workers == 0
    # expired members are dropped when read: the set is gone, not just filtered
    assert not kickq.redis.exists(kickq.keys.workers("record"))


def test_a_worker_with_q_announces_and_lists_only_its_queues_and_warns_of_the_others(
        worker_process, kickq):
    ns = kickq.options["redis_namespace"]
    w = worker_process(lock_timeout=LOCK_TIMEOUT, queues=f"{ns}.record")
    wait_for(lambda: workers(kickq, "record") == 1, 10, 0.05, "the worker of 'record'")
    assert [workers(kickq, n) for n in NAMES if n != "record"] == [0] * (len(NAMES) - 1)

    log = w.log.read_text()
    [line] = [line for line in log.splitlines() if f"kickq: namespace '{ns}'" in line]
    assert "INFO" in line and f"record (queue {ns}.record, no limits)" in line, line
    assert "sleep" not in line, line
    warned = [line for line in log.splitlines() if "does not consume its queue" in line]
    assert sorted(re.search(r"job '(\w+)'", line).group(1) for line in warned) == sorted(  # type: ignore[union-attr]
        n for n in NAMES if n != "record"), warned
    assert all("WARNING" in line and f"namespace '{ns}'" in line for line in warned), warned
    assert any(f"queue {ns}.sleep " in line for line in warned), warned


def test_stats_command_and_prometheus_show_the_workers(kickq, kickq_app, kickq_redis_url, kickq_namespace):
    from prometheus_client import CollectorRegistry, generate_latest

    from kickq_celery.prometheus import KickqCollector

    @kickq.process("seen")
    def seen(job):
        return job.data

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "kickq_celery.cli", "--redis", kickq_redis_url,
                              "--namespace", kickq_namespace, "stats", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ))
        assert out.returncode == 0, out.stderr
        return out.stdout

    registry = CollectorRegistry()
    registry.register(KickqCollector(kickq))
    sample = {"namespace": kickq_namespace, "name": "seen"}
    kickq.create("orphan", 1)  # a name no worker handles
    with worker(kickq_app):
        job = kickq.create("seen", 1, tombstone=True)
        job.promise.wait()
        wait_for(lambda: workers(kickq, "seen") == 1, 10, 0.05, "the in-process worker")

        header, _, *rows = cli().splitlines()
        column = header.split().index("WORKERS")
        by_name = {row.split()[0]: row.split() for row in rows}
        assert {n: r[column] for n, r in by_name.items()} == {"orphan": "0", "seen": "1", "(total)": "1"}
        data = json.loads(cli("--json"))
        assert (data["names"]["seen"]["workers"], data["names"]["orphan"]["workers"],
                data["total"]["workers"]) == (1, 0, 1)

        assert registry.get_sample_value("kickq_workers", sample) == 1
        assert registry.get_sample_value("kickq_workers", {**sample, "name": "orphan"}) == 0
        assert "# TYPE kickq_workers gauge" in generate_latest(registry).decode()
    # the in-process worker stopped warmly: out at once
    assert registry.get_sample_value("kickq_workers", sample) == 0
    assert json.loads(cli("seen", "--json"))["names"]["seen"]["workers"] == 0


def test_create_warns_once_per_name_when_no_live_worker_handles_it(kickq, caplog, monkeypatch):
    ns = kickq.options["redis_namespace"]
    lookups: list[list[str]] = []
    real = kickq.store.live_workers

    def counted(names):
        lookups.append(list(names))
        return real(names)

    monkeypatch.setattr(kickq.store, "live_workers", counted)
    caplog.set_level(logging.WARNING, logger="kickq_celery")
    first = kickq.create("orphan", 1)
    kickq.create("orphan", 2)
    kickq.create_many("orphan", [3, 4])
    kickq.create("stray", delay=60)
    kickq.create("stray")
    assert unhandled_warnings(caplog) == [
        f"kickq: no live worker handles job '{name}' in namespace '{ns}'; it waits in its queue "
        "until one starts" for name in ("orphan", "stray")]
    assert lookups == [["orphan"], ["stray"]]  # only each name's first create looks the workers up
    # the jobs are created all the same
    assert kickq.get(first.id).state == "queued"
    assert kickq.stats("orphan")["orphan"].created == 4
    assert kickq.stats("stray")["stray"].created == 2


def test_create_does_not_warn_when_a_live_worker_handles_the_name(kickq, kickq_worker, caplog):
    @kickq.process("handled")
    def handled(job):
        return job.data * 2

    kickq_worker()
    wait_for(lambda: workers(kickq, "handled") == 1, 10, 0.05, "the in-process worker")
    caplog.set_level(logging.WARNING, logger="kickq_celery")
    job = kickq.create("handled", 21, tombstone=True)
    assert job.promise.wait().result == 42
    assert unhandled_warnings(caplog) == []
    # another name, in the same process, still warns
    kickq.create("unhandled", 1)
    assert len(unhandled_warnings(caplog)) == 1 and "'unhandled'" in unhandled_warnings(caplog)[0]
