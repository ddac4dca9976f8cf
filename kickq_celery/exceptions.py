"""The kickq_celery exception tree.

::

    KickqError
    ├── ConfigError            (also ValueError)
    ├── InvalidJobOptions      (also ValueError)
    ├── InvalidJobData         (also TypeError)
    ├── JobNotFound            (also LookupError)
    ├── RedisUnavailable       (also ConnectionError)
    └── JobFailed
        ├── JobDeleted
        └── TombstoneTimeout   (also TimeoutError)
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError


class KickqError(Exception):
    """Root of every error kickq_celery raises."""


class ConfigError(KickqError, ValueError):
    """An unknown configuration key, a wrong type or an out-of-range value."""


class InvalidJobOptions(KickqError, ValueError):
    """A bad job name, flag, cron expression or time zone."""


class InvalidJobData(KickqError, TypeError):
    """Job data that is not JSON-serializable."""


class JobNotFound(KickqError, LookupError):
    """No job with that id in this namespace."""


class RedisUnavailable(KickqError, ConnectionError):
    """kickq's Redis did not answer."""


class JobFailed(KickqError):
    """A tombstoned job ended without success.

    Attributes:
        job_id: the job's id.
        error: the last error text.
        has_timeout: True only for :class:`TombstoneTimeout`.
    """

    has_timeout = False

    def __init__(self, message: str = "", job_id: str | None = None, error: str | None = None) -> None:
        super().__init__(message, job_id, error)
        self.job_id = job_id
        self.error = error if error is not None else message

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.job_id, self.error))


class JobDeleted(JobFailed):
    """The job was deleted before it finished."""


class TombstoneTimeout(JobFailed, TimeoutError, CeleryTimeoutError):  # type: ignore[misc]
    """``tombstone_timeout`` passed before the job finished (also Celery's TimeoutError, so code
    that waits on ``AsyncResult.get(timeout=)`` catches it as before)."""

    has_timeout = True
