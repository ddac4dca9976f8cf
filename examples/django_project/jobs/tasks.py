"""The kickq handlers of the app; `celery -A proj worker` imports this module
(``app.autodiscover_tasks()``) and runs them."""

from __future__ import annotations

from proj.celery import app

from kickq_celery import Kickq

# Options come from Django settings (CELERY_KICKQ_*); none are given here.
kq = Kickq(app)


@kq.process("welcome_email", max_jobs_num=5)
def welcome_email(job):
    """Pretend to send a welcome email; the first attempt fails when asked to,
    to show the retry flags from settings.CELERY_KICKQ_JOB_FLAGS at work."""
    if job.data.get("fail_first") and job.run == 1:
        raise RuntimeError("mail server busy")
    return f"welcome email sent to {job.data['email']} (run {job.run})"
