"""Testing kickq jobs in a Django project: `python manage.py test jobs`.

A view saves the signup and creates the job when its transaction commits
(``on_commit=True``); an in-process Celery worker (kickq_celery.testing.worker) runs it.
TransactionTestCase, so that transactions really commit (TestCase wraps each test in one
transaction that never does, so on_commit jobs would never be created). No server is needed.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.test import TransactionTestCase
from proj.celery import app

from kickq_celery import JobNotFound
from kickq_celery.testing import purge_namespace, wait_for, worker

from .models import Signup
from .tasks import kq


class Rollback(Exception):
    pass


class WelcomeEmailTests(TransactionTestCase):
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

    def finished(self, job_id: str) -> dict:
        return wait_for(lambda: (r := self.status(job_id))["complete"] and r, 15, message="the job")

    def assert_nothing_in_redis_for(self, job_id: str) -> None:
        """No record, result or index entry holds the id, and no broker message names it."""
        self.assertEqual(list(kq.redis.scan_iter(match=f"*{job_id}*")), [])
        self.assertNotIn(job_id.encode(), kq.redis.zrange(kq.keys.index("queued"), 0, -1))
        messages = kq.redis.lrange(kq.task_name("welcome_email"), 0, -1) + kq.redis.hvals("unacked")
        self.assertEqual([m for m in messages if job_id.encode() in m], [])

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

    def test_the_job_is_created_when_the_transaction_commits(self) -> None:
        with transaction.atomic():
            Signup.objects.create(email="cy@example.com")
            job = kq.create("welcome_email", {"email": "cy@example.com"}, on_commit=True)
            # the id is known at once; the job is not written until the commit
            self.assertTrue(job.id)
            self.assertEqual((job.state, job.data), ("queued", {"email": "cy@example.com"}))
            with self.assertRaises(JobNotFound):
                kq.get(job.id)
            self.assertEqual(self.client.get(f"/jobs/{job.id}/").status_code, 404)
        self.assertEqual(kq.get(job.id).data, {"email": "cy@example.com"})
        record = self.finished(job.id)
        self.assertEqual(record["result"], "welcome email sent to cy@example.com (run 1)")

    def test_no_job_when_the_transaction_rolls_back(self) -> None:
        before = kq.stats().total.created
        with self.assertRaises(Rollback), transaction.atomic():
            Signup.objects.create(email="dan@example.com")
            job = kq.create("welcome_email", {"email": "dan@example.com"}, on_commit=True)
            raise Rollback("the payment was declined")
        self.assertFalse(Signup.objects.filter(email="dan@example.com").exists())
        with self.assertRaises(JobNotFound):
            kq.get(job.id)
        self.assert_nothing_in_redis_for(job.id)
        self.assertEqual(kq.stats().total.created, before)

    def test_a_rolled_back_savepoint_drops_its_job_only(self) -> None:
        with transaction.atomic():
            kept = kq.create("welcome_email", {"email": "kept@example.com"}, on_commit=True)
            with self.assertRaises(Rollback), transaction.atomic():  # a savepoint
                dropped = kq.create("welcome_email", {"email": "dropped@example.com"}, on_commit=True)
                raise Rollback
            with self.assertRaises(JobNotFound):
                kq.get(kept.id)
        self.assertEqual(self.finished(kept.id)["state"], "success")
        self.assert_nothing_in_redis_for(dropped.id)

    def test_on_commit_outside_a_transaction_creates_the_job_at_once(self) -> None:
        job = kq.create("welcome_email", {"email": "now@example.com"}, on_commit=True)
        self.assertEqual(kq.get(job.id).data, {"email": "now@example.com"})
        self.assertEqual(self.finished(job.id)["state"], "success")

    def test_signing_up_twice_rolls_back_and_creates_no_second_job(self) -> None:
        first = self.client.post("/signup/", {"email": "twice@example.com"}, content_type="application/json")
        self.assertEqual(first.status_code, 202)
        created = kq.stats().total.created
        again = self.client.post("/signup/", {"email": "twice@example.com"}, content_type="application/json")
        self.assertEqual(again.status_code, 409)  # the unique email: the transaction rolled back
        self.assertEqual(kq.stats().total.created, created)
        self.assertEqual(Signup.objects.filter(email="twice@example.com").count(), 1)
        self.assertEqual(self.finished(first.json()["job_id"])["state"], "success")
