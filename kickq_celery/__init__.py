"""kickq_celery: kickq job-queue semantics for existing Celery projects."""

from __future__ import annotations

from typing import Any

from .client import Kickq
from .exceptions import (
    ConfigError,
    InvalidJobData,
    InvalidJobOptions,
    JobDeleted,
    JobFailed,
    JobNotFound,
    KickqError,
    RedisUnavailable,
    TombstoneTimeout,
)
from .promise import Promise, Response
from .records import Job, JobRecord, Run
from .stats import Stats
from .tasks import KickqResult, KickqTaskFunction

__version__ = "0.1.0"


def config(*args: Any, **kwargs: Any) -> None:
    """Alias of :meth:`Kickq.config`."""
    Kickq.config(*args, **kwargs)


def reset() -> None:
    """Alias of :meth:`Kickq.reset`."""
    Kickq.reset()


__all__ = [
    "Kickq", "Job", "JobRecord", "Run", "Promise", "Response", "Stats", "KickqResult", "KickqTaskFunction",
    "KickqError", "ConfigError", "InvalidJobOptions", "InvalidJobData",
    "JobNotFound", "JobFailed", "JobDeleted", "TombstoneTimeout", "RedisUnavailable",
    "config", "reset", "__version__",
]
