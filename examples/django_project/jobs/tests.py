"""Testing kickq jobs in a Django project: `python manage.py test jobs`.

A view creates the job; an in-process Celery worker (kickq_celery.testing.worker)
runs it. No database and no server are needed.
"""

from __future__ import annotations

from django.conf import settings
from django.test import SimpleTestCase
from proj.celery import app

from kickq_celery.testing import purge_namespace, wait_for, worker

from .tasks import kq


class WelcomeEmailTests(SimpleTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.worker = worker(app, pool="threads", concurrency=2)
        cls.worker.__enter__()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.worker.__exit__(None, None, None)
        purge_namespace(kq)
        super().tearDownClass()

    def status(self, job_id: str) -> dict:
        response = self.client.get(f"/jobs/{job_id}/")
        self.assertEqual(response.status_code, 200)
        return response.json()

    def test_kickq_options_come_from_django_settings(self) -> None:
        self.assertEqual(app.conf.kickq_redis_namespace, settings.CELERY_KICKQ_REDIS_NAMESPACE)
        self.assertEqual(kq.options["redis_namespace"], settings.CELERY_KICKQ_REDIS_NAMESPACE)
        self.assertEqual(kq.options["job_flags"]["welcome_email"]["retry_count"], 2)
        self.assertEqual(kq.options["poll_interval"], 0.2)
        namespace = settings.CELERY_KICKQ_REDIS_NAMESPACE
        self.assertEqual(kq.task_name("welcome_email"), f"{namespace}.welcome_email")

    def test_signup_view_creates_a_job_that_a_worker_runs(self) -> None:
        response = self.client.post("/signup/", {"email": "ada@example.com"}, content_type="application/json")
        self.assertEqual(response.status_code, 202)
        job_id = response.json()["job_id"]
        record = wait_for(lambda: (r := self.status(job_id))["complete"] and r, 15, message="the job")
        self.assertEqual(record["state"], "success")
        self.assertEqual(record["result"], "welcome email sent to ada@example.com (run 1)")
        self.assertEqual(record["flags"]["retry"], True)  # from CELERY_KICKQ_JOB_FLAGS

    def test_failed_run_is_retried_per_settings_job_flags(self) -> None:
        response = self.client.post("/signup/", {"email": "bob@example.com", "fail_first": True},
                                    content_type="application/json")
        job_id = response.json()["job_id"]
        record = wait_for(lambda: (r := self.status(job_id))["complete"] and r, 15, message="the retry")
        self.assertEqual(record["state"], "success")
        self.assertEqual([run["state"] for run in record["runs"]], ["fail", "success"])
        self.assertEqual(record["result"], "welcome email sent to bob@example.com (run 2)")

    def test_bad_request_creates_no_job(self) -> None:
        before = kq.stats().total.created
        response = self.client.post("/signup/", {"email": "nope"}, content_type="application/json")
        self.assertEqual(response.status_code, 400)
        self.assertEqual(kq.stats().total.created, before)

    def test_unknown_job_is_404(self) -> None:
        self.assertEqual(self.client.get("/jobs/no-such-id/").status_code, 404)
