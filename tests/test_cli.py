"""The command line, run for real: `python -m kickq_celery.cli` and `celery -A tests.workerapp kickq`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import datetime
from urllib.parse import urlsplit

import pytest

from kickq_celery import JobFailed, JobNotFound
from kickq_celery.connection import masked_url
from kickq_celery.testing import wait_for
from tests.conftest import ROOT, free_port


@pytest.fixture
def run(kickq, kickq_redis_url, kickq_namespace):
    """Run `kickq --redis URL --namespace NS <args>`; returns the CompletedProcess."""
    def run(*args, redis_url=kickq_redis_url, namespace=kickq_namespace, env=None):
        cmd = [sys.executable, "-m", "kickq_celery.cli"]
        if redis_url is not None:
            cmd += ["--redis", redis_url]
        if namespace is not None:
            cmd += ["--namespace", namespace]
        return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(env or {})})
    return run


@pytest.fixture
def jobs(kickq, kickq_worker):
    """Two queued "alpha" jobs, a delayed "beta" one, and a "gamma" one that ran (and failed once)."""
    @kickq.process("gamma")
    def gamma(job):
        if job.run == 1:
            raise ValueError("first run fails")
        return {"run": job.run}

    kickq_worker(pool="threads", concurrency=2)
    done = kickq.create("gamma", {"n": 1}, tombstone=True, retry=True, retry_count=1, retry_interval=0)
    done.promise.wait()
    alphas = kickq.create_many("alpha", [{"i": 1}, {"i": 2}])
    beta = kickq.create("beta", "later", delay=60)
    return {"alpha": [j.id for j in alphas], "beta": beta.id, "gamma": done.id}


def _ok(out):
    assert out.returncode == 0, out.stderr
    return out.stdout


def _error_line(out):
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_stats_table_and_json(run, jobs):
    table = _ok(run("stats"))
    header, rule, *rows = table.splitlines()
    assert header.split()[:5] == ["NAME", "QUEUED", "DELAYED", "PROCESSING", "CREATED"]
    assert set(rule) <= {"-", " "}
    by_name = {row.split()[0]: row.split() for row in rows}
    assert set(by_name) == {"alpha", "beta", "gamma", "(total)"}
    assert by_name["alpha"][1:5] == ["2", "0", "0", "2"]     # queued, delayed, processing, created
    assert by_name["(total)"][4] == "4"

    data = json.loads(_ok(run("stats", "--json")))
    assert data["names"]["alpha"]["queued"] == 2
    assert data["names"]["beta"]["delayed"] == 1
    gamma = data["names"]["gamma"]
    assert (gamma["succeeded"], gamma["retried"], gamma["completed_last_minute"]) == (1, 1, 1)
    assert gamma["process_time"]["max"] is not None
    assert data["total"]["created"] == 4

    one = json.loads(_ok(run("stats", "gamma", "--json")))
    assert set(one["names"]) == {"gamma"}


def test_jobs_by_state_and_name_paged(run, jobs, kickq):
    listed = json.loads(_ok(run("jobs", "--state", "queued", "--name", "alpha", "--json")))
    # oldest first; create_many gives its jobs one creation time, so they come in id order
    assert [j["id"] for j in listed] == sorted(jobs["alpha"])
    assert all(j["state"] == "queued" and j["name"] == "alpha" for j in listed)
    datetime.fromisoformat(listed[0]["created_at"])

    everything = json.loads(_ok(run("jobs", "--json")))
    assert {j["id"]: j["state"] for j in everything} == {
        **{job_id: "queued" for job_id in jobs["alpha"]}, jobs["beta"]: "delayed", jobs["gamma"]: "success"}
    page = json.loads(_ok(run("jobs", "--name", "alpha", "--offset", "1", "--limit", "1", "--json")))
    assert [j["id"] for j in page] == sorted(jobs["alpha"])[1:]

    table = _ok(run("jobs", "--state", "queued"))
    assert table.splitlines()[0].split() == ["ID", "NAME", "STATE", "CREATED", "RUNS", "LAST_ERROR"]
    assert all(job_id in table for job_id in jobs["alpha"])
    assert jobs["beta"] not in table

    bad = run("jobs", "--state", "sleeping")
    line = _error_line(bad)
    assert bad.returncode == 1
    assert line.startswith("Error: unknown state 'sleeping' for --state; one of queued, delayed, "), line
    assert "success, fail (or succeeded = success, failed = fail)" in line, line


def test_state_aliases_failed_and_succeeded(run, kickq, kickq_worker):
    @kickq.process("delta")
    def delta(job):
        if job.data == "bad":
            raise ValueError("bad data")
        return "ok"

    kickq_worker(pool="threads", concurrency=2)
    good = kickq.create("delta", "good", tombstone=True)
    bad = kickq.create("delta", "bad", tombstone=True)
    good.promise.wait()
    with pytest.raises(JobFailed):
        bad.promise.wait()
    for alias, state, job in (("failed", "fail", bad), ("succeeded", "success", good)):
        listed = json.loads(_ok(run("jobs", "--state", alias, "--json")))
        assert [j["id"] for j in listed] == [job.id], alias
        assert listed == json.loads(_ok(run("jobs", "--state", state, "--json")))
        assert job.id in _ok(run("jobs", "--state", alias))


def test_json_before_the_command(run, jobs):
    for command in (["stats"], ["stats", "gamma"], ["jobs", "--name", "alpha"], ["get", jobs["gamma"]],
                    ["schedules"]):
        before, after = run("--json", *command), run(*command, "--json")
        assert json.loads(_ok(before)) == json.loads(_ok(after)), command
        assert before.stderr == after.stderr, command
    assert json.loads(_ok(run("--json", "stats")))["names"]["alpha"]["queued"] == 2
    assert json.loads(_ok(run("--json", "delete", jobs["beta"]))) == {"id": jobs["beta"], "deleted": True}
    # errors stay one line with --json before the command
    line = _error_line(run("--json", "get", "no-such-id"))
    assert line.startswith("Error: JobNotFound: ")


def test_empty_listings_say_where_they_looked(run, kickq, kickq_namespace):
    where = f"in namespace {kickq_namespace!r} at {masked_url(kickq.redis)}"
    for args, what in ((["jobs"], "jobs"), (["schedules"], "schedules"), (["stats"], "jobs"),
                       (["jobs", "--state", "failed", "--name", "x", "--offset", "2"],
                        "jobs named 'x' in state 'fail' after the first 2")):
        out = run(*args)
        assert _ok(out) == f"no {what} {where}\n", args
        assert out.stderr == ""
        for json_args in ([*args, "--json"], ["--json", *args]):
            out = run(*json_args)
            value = json.loads(_ok(out))  # stdout stays JSON; the line goes to stderr
            if args[0] == "stats":
                assert value["names"] == {} and value["total"]["created"] == 0
            else:
                assert value == [], json_args
            assert out.stderr == f"no {what} {where}\n", json_args
    # a listing with something in it says nothing more
    kickq.create("alpha", 1)
    for args in (["jobs"], ["stats"], ["jobs", "--json"], ["stats", "--json"]):
        out = run(*args)
        assert "no jobs" not in _ok(out) and out.stderr == "", args


def test_empty_listing_masks_the_redis_password(run, kickq_redis_url, kickq_namespace):
    parts = urlsplit(kickq_redis_url)
    # the test Redis lets the default user in with any password (unless it has one of its own)
    url = (kickq_redis_url if parts.password
           else parts._replace(netloc=f"default:s3cret-pw@{parts.netloc}").geturl())
    out = run("schedules", redis_url=url)
    text = _ok(out)
    assert text.startswith(f"no schedules in namespace {kickq_namespace!r} at "), text
    assert ":***@" in text and urlsplit(url).password not in text + out.stderr, text


def test_get_table_and_json(run, jobs, kickq):
    record = json.loads(_ok(run("get", jobs["gamma"], "--json")))
    assert record == json.loads(json.dumps(kickq.get(jobs["gamma"]).to_dict()))
    assert record["state"] == "success" and record["result"] == {"run": 2}
    assert [r["state"] for r in record["runs"]] == ["fail", "success"]
    datetime.fromisoformat(record["finished_at"])

    table = _ok(run("get", jobs["gamma"]))
    fields = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[-1] for line in table.splitlines() if line}
    assert fields["id"] == jobs["gamma"]
    assert fields["state"] == "success"
    assert fields["last_error"] == "ValueError: first run fails"
    assert "RUN" in fields and "DURATION_S" in fields["RUN"]


def test_delete_and_unknown_ids(run, jobs, kickq):
    assert _ok(run("delete", jobs["beta"])).strip() == f"deleted {jobs['beta']}"
    with pytest.raises(JobNotFound):
        kickq.get(jobs["beta"])
    assert json.loads(_ok(run("delete", jobs["alpha"][0], "--json"))) == {"id": jobs["alpha"][0],
                                                                          "deleted": True}
    assert kickq.stats("alpha")["alpha"].deleted == 1

    for args in (["delete", jobs["beta"]], ["get", "no-such-id", "--json"]):
        line = _error_line(run(*args))
        assert line.startswith("Error: JobNotFound: ") and repr(args[1]) in line, line


def test_schedules(run, kickq):
    assert _ok(run("schedules", "--json")).strip() == "[]"
    key = kickq.schedule("report", "*/5 * * * *", tz="Europe/Paris")
    listed = json.loads(_ok(run("schedules", "--json")))
    assert [(s["key"], s["name"], s["cron"], s["tz"], s["last_run"]) for s in listed] == [
        (key, "report", "*/5 * * * *", "Europe/Paris", None)]
    assert datetime.fromisoformat(listed[0]["next_run"]).minute % 5 == 0
    table = _ok(run("schedules"))
    assert table.splitlines()[0].split() == ["KEY", "NAME", "CRON", "TZ", "NEXT_RUN", "LAST_RUN"]
    assert key in table and "Europe/Paris" in table


def test_environment_variables_select_redis_and_namespace(run, jobs, kickq_redis_url, kickq_namespace):
    out = run("stats", "--json", redis_url=None, namespace=None,
              env={"KICKQ_REDIS": kickq_redis_url, "KICKQ_NAMESPACE": kickq_namespace})
    assert json.loads(_ok(out))["total"]["created"] == 4
    # the default namespace is "kickq", not this test's
    out = run("jobs", "--name", "alpha", "--json", namespace=None)
    assert not {j["id"] for j in json.loads(_ok(out))} & set(jobs["alpha"])


def test_unreachable_redis_is_a_one_line_error(run):
    out = run("stats", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    line = _error_line(out)
    assert line.startswith("Error: RedisUnavailable: kickq cannot reach Redis at redis://127.0.0.1:"), line


def test_celery_plugin_uses_the_apps_kickq(jobs, kickq_redis_url, kickq_namespace):
    env = {**os.environ, "KICKQ_TEST_NS": kickq_namespace, "KICKQ_TEST_REDIS_URL": kickq_redis_url,
           "PYTHONPATH": str(ROOT)}

    def celery(*args):
        return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.workerapp", "kickq", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    data = json.loads(_ok(celery("stats", "--json")))
    assert data["names"]["alpha"]["created"] == 2 and data["total"]["created"] == 4
    assert json.loads(_ok(celery("--json", "stats"))) == data
    succeeded = json.loads(_ok(celery("--json", "jobs", "--state", "succeeded")))
    assert [j["id"] for j in succeeded] == [jobs["gamma"]]
    empty = celery("--json", "jobs", "--name", "nobody")
    assert json.loads(_ok(empty)) == []
    assert empty.stderr.startswith(f"no jobs named 'nobody' in namespace {kickq_namespace!r} at redis")
    assert json.loads(_ok(celery("get", jobs["gamma"], "--json")))["state"] == "success"
    line = _error_line(celery("get", "no-such-id"))
    assert "JobNotFound" in line and kickq_namespace in line


def test_metrics_serves_prometheus_text(jobs, kickq_redis_url, kickq_namespace):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kickq_celery.cli", "--redis", kickq_redis_url, "--namespace", kickq_namespace,
         "metrics", "--port", str(port), "--addr", "127.0.0.1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def scrape():
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return None

    try:
        text = wait_for(scrape, 20, 0.1, "the metrics endpoint")
    finally:
        proc.terminate()
        proc.wait(10)
    labels = f'name="alpha",namespace="{kickq_namespace}"'
    assert f"kickq_jobs_created_total{{{labels}}} 2.0" in text
    assert f'kickq_jobs{{{labels},state="queued"}} 2.0' in text
    assert f'kickq_up{{namespace="{kickq_namespace}"}} 1.0' in text
    assert "# TYPE kickq_jobs_succeeded_total counter" in text
    assert 'kickq_process_seconds{name="gamma"' in text


def test_collector_registers_with_prometheus_client(kickq, jobs):
    from prometheus_client import CollectorRegistry, generate_latest

    from kickq_celery.prometheus import KickqCollector

    registry = CollectorRegistry()
    registry.register(KickqCollector(kickq))
    text = generate_latest(registry).decode()
    ns = kickq.options["redis_namespace"]
    assert f'kickq_jobs_retried_total{{name="gamma",namespace="{ns}"}} 1.0' in text
    assert f'kickq_jobs_completed_recently{{name="gamma",namespace="{ns}",window="1m"}} 1.0' in text
    assert registry.get_sample_value("kickq_jobs", {"namespace": ns, "name": "beta", "state": "delayed"}) == 1


def test_collector_reports_down_when_redis_is_unreachable(kickq_app):
    from prometheus_client import CollectorRegistry, generate_latest

    from kickq_celery import Kickq
    from kickq_celery.prometheus import KickqCollector

    kq = Kickq(kickq_app, redis=f"redis://127.0.0.1:{free_port()}/0", redis_namespace="down")
    registry = CollectorRegistry()
    registry.register(KickqCollector(kq))  # registering reads nothing
    assert 'kickq_up{namespace="down"} 0.0' in generate_latest(registry).decode()


def test_metrics_without_the_extra_is_a_clear_error(kickq_redis_url):
    # simulate an install without the `prometheus` extra: importing prometheus_client fails
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from kickq_celery.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "--redis", kickq_redis_url, "metrics", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    line = _error_line(out)
    assert "prometheus" in line and "pip install" in line, line
