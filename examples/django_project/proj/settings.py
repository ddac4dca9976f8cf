"""Settings of the example project: one app, SQLite, Celery + kickq settings."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

INSTALLED_APPS = ["jobs"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "proj.urls"
# the signups; kickq keeps its job records in Redis. Jobs created with on_commit=True are written
# when the transaction that asked for them commits (`manage.py test` uses an in-memory database)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("KICKQ_EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

REDIS_URL = os.environ.get("KICKQ_REDIS_URL", "redis://127.0.0.1:6379/0")

# Celery settings: app.config_from_object(..., namespace="CELERY") in proj/celery.py
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# kickq_celery settings: CELERY_KICKQ_<option> is the app's kickq_<option>
CELERY_KICKQ_REDIS = REDIS_URL  # kickq's records (the broker may be RabbitMQ)
CELERY_KICKQ_REDIS_NAMESPACE = os.environ.get("KICKQ_NAMESPACE", "djangoexample")
CELERY_KICKQ_JOB_FLAGS = {
    "welcome_email": {"retry": True, "retry_count": 2, "retry_interval": 0.2},
}
CELERY_KICKQ_POLL_INTERVAL = 0.2
