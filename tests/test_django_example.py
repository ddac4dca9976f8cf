"""examples/django_project: kickq settings from Django settings, jobs created by a view.

Django settings are process-global, so every Django bit runs in a subprocess
inside examples/django_project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django", reason="Django is in the dev extra")

from kickq_celery.testing import stop_process_group, wait_for  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

PROJECT = ROOT / "examples" / "django_project"

# What a view creates, seen from outside: run with `manage.py shell -c`.
CREATE_FROM_VIEW = """
import json
from django.test import Client
response = Client().post("/signup/", {"email": "eve@example.com", "fail_first": True},
                         content_type="application/json")
print("RESPONSE", response.status_code, json.dumps(response.json()))
"""


def _env(namespace: str, redis_url: str) -> dict[str, str]:
    env = {**os.environ, "KICKQ_NAMESPACE": namespace, "KICKQ_REDIS_URL": redis_url,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(PROJECT)])}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("CELERY_BROKER_URL", None)
    return env


def _namespace_keys(kickq) -> list[bytes]:
    """Records, stats and results ({ns}:...), queues (ns.<name>) and kombu's bindings."""
    ns = kickq.options["redis_namespace"]
    return [key for pattern in ("*{" + ns + "}*", f"*{ns}.*") for key in kickq.redis.scan_iter(match=pattern)]


def test_manage_py_test_runs_the_apps_kickq_tests(kickq, kickq_namespace, kickq_redis_url):
    """jobs/tests.py: settings mapping, a view-created job run by an in-process worker, retries."""
    out = subprocess.run([sys.executable, "manage.py", "test", "jobs", "-v", "2"], cwd=PROJECT,
                         env=_env(kickq_namespace, kickq_redis_url), capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Ran 5 tests" in out.stderr and "\nOK" in out.stderr, out.stderr[-4000:]
    for test in ("test_kickq_options_come_from_django_settings",
                 "test_signup_view_creates_a_job_that_a_worker_runs",
                 "test_failed_run_is_retried_per_settings_job_flags"):
        assert f"{test} (jobs.tests.WelcomeEmailTests.{test}) ... ok" in out.stderr
    # the jobs were made in the namespace from CELERY_KICKQ_REDIS_NAMESPACE, then purged
    assert _namespace_keys(kickq) == []


def test_celery_worker_of_the_project_runs_a_job_created_by_a_view(kickq, kickq_namespace,
                                                                     kickq_redis_url, tmp_path: Path):
    """The deployment shape: `celery -A proj worker` + a Django process creating jobs."""
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

        wait_for(lambda: b"ready." in log.read_bytes() or worker.poll() is not None, 30, 0.1, "the worker")
        assert worker.poll() is None, log.read_text()[-3000:]
        # the worker consumes the job's queue, named from CELERY_KICKQ_REDIS_NAMESPACE
        assert f"{kickq_namespace}.welcome_email" in log.read_text()

        record = wait_for(lambda: (r := kickq.get(job_id)).complete and r, 20, message="the job")
        assert record.state == "success", (record, log.read_text()[-3000:])
        assert [run.state for run in record.runs] == ["fail", "success"]  # retry from CELERY_KICKQ_JOB_FLAGS
        assert (record.flags["retry_count"], record.flags["retry_interval"]) == (2, 0.2)
        assert record.result == "welcome email sent to eve@example.com (run 2)"
    finally:
        stop_process_group(worker)
