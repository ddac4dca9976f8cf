"""examples/django_project: kickq settings from Django settings, jobs created by a view when
its transaction commits (``on_commit=True``).

Django settings are process-global, so every Django bit runs in a subprocess
inside examples/django_project.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django", reason="Django is in the dev extra")

from kickq_celery.testing import stop_process_group, wait_for  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

PROJECT = ROOT / "examples" / "django_project"

# What a view creates, seen from outside: run with `manage.py shell -c` (on an in-memory
# database, so migrated first). Then a job asked for in a transaction that rolls back.
CREATE_FROM_VIEW = """
import json
from django.core.management import call_command
from django.db import transaction
from django.test import Client
from jobs.tasks import kq
from kickq_celery import JobNotFound

call_command("migrate", verbosity=0)
response = Client().post("/signup/", {"email": "eve@example.com", "fail_first": True},
                         content_type="application/json")
print("RESPONSE", response.status_code, json.dumps(response.json()))
try:
    with transaction.atomic():
        job = kq.create("welcome_email", {"email": "mallory@example.com"}, on_commit=True)
        try:
            kq.get(job.id)
            seen = "found"
        except JobNotFound:
            seen = "not-found"
        raise RuntimeError("roll back")
except RuntimeError:
    pass
print("ROLLED_BACK", job.id, seen)
"""

# on_commit=True where Django cannot be imported
WITHOUT_DJANGO = """
import sys
sys.modules["django"] = None  # import django raises ImportError
from celery import Celery
from kickq_celery import ConfigError, Kickq
url, ns = sys.argv[1:3]
kq = Kickq(Celery("nodjango", broker=url, set_as_current=False), redis=url, redis_namespace=ns)
try:
    kq.create("welcome_email", {"email": "x@example.com"}, on_commit=True)
except ConfigError as exc:
    print("CONFIG_ERROR", exc)
seen = []
kq.create("welcome_email", 1, on_commit=True, callback=lambda err, job_id, promise: seen.append(
    (type(err).__name__, job_id, promise)))
print("CALLBACK", seen)
"""


def _env(namespace: str, redis_url: str) -> dict[str, str]:
    env = {**os.environ, "KICKQ_NAMESPACE": namespace, "KICKQ_REDIS_URL": redis_url,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(PROJECT)])}
    env["KICKQ_EXAMPLE_DB"] = ":memory:"  # never the project's db.sqlite3
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("CELERY_BROKER_URL", None)
    return env


def _namespace_keys(kickq) -> list[bytes]:
    """Records, stats and results ({ns}:...), queues (ns.<name>) and kombu's bindings."""
    ns = kickq.options["redis_namespace"]
    return [key for pattern in ("*{" + ns + "}*", f"*{ns}.*") for key in kickq.redis.scan_iter(match=pattern)]


def test_manage_py_test_runs_the_apps_kickq_tests(kickq, kickq_namespace, kickq_redis_url):
    """jobs/tests.py: settings mapping, a view-created job run by an in-process worker, retries,
    jobs created when their transaction commits and never when it rolls back."""
    out = subprocess.run([sys.executable, "manage.py", "test", "jobs", "-v", "2"], cwd=PROJECT,
                         env=_env(kickq_namespace, kickq_redis_url), capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Ran 10 tests" in out.stderr and "\nOK" in out.stderr, out.stderr[-4000:]
    for test in ("test_kickq_options_come_from_django_settings",
                 "test_signup_view_creates_a_job_that_a_worker_runs",
                 "test_failed_run_is_retried_per_settings_job_flags",
                 "test_the_job_is_created_when_the_transaction_commits",
                 "test_no_job_when_the_transaction_rolls_back",
                 "test_a_rolled_back_savepoint_drops_its_job_only",
                 "test_on_commit_outside_a_transaction_creates_the_job_at_once",
                 "test_signing_up_twice_rolls_back_and_creates_no_second_job"):
        # a request's log line (say "Not Found: /jobs/...") may come between the name and "ok"
        assert re.search(rf"{test} \(jobs\.tests\.WelcomeEmailTests\.{test}\) \.\.\. (?:.*\n){{0,3}}?ok\n",
                         out.stderr), test
    # the jobs were made in the namespace from CELERY_KICKQ_REDIS_NAMESPACE, then purged
    assert _namespace_keys(kickq) == []


def test_celery_worker_of_the_project_runs_a_job_created_by_a_view(kickq, kickq_namespace,
                                                                     kickq_redis_url, tmp_path: Path):
    """The deployment shape: `celery -A proj worker` + a Django process creating jobs (the view's
    when its transaction commits; none for a transaction that rolls back)."""
    env = _env(kickq_namespace, kickq_redis_url)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "proj", "worker", "--pool", "threads",
             "--concurrency", "2", "--loglevel", "INFO", "--without-mingle", "--without-gossip",
             "--hostname", f"django-{kickq_namespace}@%h"],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        created = subprocess.run([sys.executable, "manage.py", "shell", "-c", CREATE_FROM_VIEW],
                                 cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr[-3000:]
        line = next(ln for ln in created.stdout.splitlines() if ln.startswith("RESPONSE "))
        _, status, body = line.split(" ", 2)
        assert status == "202"
        job_id = json.loads(body)["job_id"]
        _, rolled_back, seen = next(ln for ln in created.stdout.splitlines()
                                    if ln.startswith("ROLLED_BACK ")).split()
        assert seen == "not-found"  # the id was known before the commit, the job was not

        wait_for(lambda: b"ready." in log.read_bytes() or worker.poll() is not None, 30, 0.1, "the worker")
        assert worker.poll() is None, log.read_text()[-3000:]
        # the worker consumes the job's queue, named from CELERY_KICKQ_REDIS_NAMESPACE
        assert f"{kickq_namespace}.welcome_email" in log.read_text()

        record = wait_for(lambda: (r := kickq.get(job_id)).complete and r, 20, message="the job")
        assert record.state == "success", (record, log.read_text()[-3000:])
        assert [run.state for run in record.runs] == ["fail", "success"]  # retry from CELERY_KICKQ_JOB_FLAGS
        assert (record.flags["retry_count"], record.flags["retry_interval"]) == (2, 0.2)
        assert record.result == "welcome email sent to eve@example.com (run 2)"
        # the rolled-back job: nothing in Redis or the broker, and the worker never saw it
        assert [key for key in kickq.redis.scan_iter(match=f"*{rolled_back}*")] == []
        assert not any(rolled_back.encode() in message
                       for message in kickq.redis.lrange(f"{kickq_namespace}.welcome_email", 0, -1))
        assert kickq.stats("welcome_email").total.created == 1
        assert rolled_back not in log.read_text()
        assert job_id in log.read_text()
    finally:
        stop_process_group(worker)


def test_on_commit_without_django_raises_config_error(kickq, kickq_namespace, kickq_redis_url):
    out = subprocess.run([sys.executable, "-c", WITHOUT_DJANGO, kickq_redis_url, kickq_namespace],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CONFIG_ERROR on_commit=True needs Django" in out.stdout, out.stdout
    assert "CALLBACK [('ConfigError', None, None)]" in out.stdout, out.stdout
    assert _namespace_keys(kickq) == []  # nothing written
