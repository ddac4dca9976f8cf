# Load the Celery app whenever Django starts, so that views creating jobs use it.
from .celery import app as celery_app

__all__ = ("celery_app",)
