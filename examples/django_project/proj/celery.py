"""The project's Celery app, configured from Django settings (the ``CELERY_`` ones).

kickq_celery reads its options from this app as ``kickq_<option>``, so in
settings.py they are written ``CELERY_KICKQ_<OPTION>``.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
# imports jobs/tasks.py, where the kickq handlers are registered
app.autodiscover_tasks()
