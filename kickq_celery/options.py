"""The option table: names, kickq aliases, defaults, validators and layering.

Options come, highest first, from: flags given to ``create()`` >
``job_flags[name]`` > ``Kickq(..., **overrides)`` > ``Kickq.config()`` >
``app.conf.kickq_*`` > the defaults below.
"""

from __future__ import annotations

import difflib
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .exceptions import ConfigError, InvalidJobOptions

_MISSING = object()


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


# The longest duration accepted: Redis expirations in milliseconds overflow long before
# a duration could be infinite.
MAX_SECONDS = 100 * 365 * 86400.0


def seconds(value: Any) -> float:
    """A duration (number or timedelta) in seconds; raises TypeError/ValueError."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("expected a number of seconds or a timedelta")
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a finite number of seconds >= 0")
    if value > MAX_SECONDS:
        raise ValueError("expected at most 100 years of seconds")
    return float(value)


def _positive_seconds(value: Any) -> float:
    result = seconds(value)
    if result <= 0:
        raise ValueError("expected a number of seconds > 0")
    return result


def _optional_seconds(value: Any) -> float | None:
    return None if value is None else seconds(value)


def _optional_positive_seconds(value: Any) -> float | None:
    return None if value is None else _positive_seconds(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected True or False")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an int")
    if value < 0:
        raise ValueError("expected an int >= 0")
    return value


def _interval(value: Any) -> float | list[float] | Callable[[int], Any]:
    if callable(value) and not isinstance(value, timedelta):
        return value  # type: ignore[no-any-return]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("expected a non-empty list of seconds")
        return [seconds(item) for item in value]
    return seconds(value)


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an int from 0 to 9")
    if not 0 <= value <= 9:
        raise ValueError("expected an int from 0 to 9")
    return value


#: the most jobs one Celery message carries (see ``chunk_size``): one create call's worth
MAX_CHUNK_SIZE = 50


def _chunk_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int from 1 to {MAX_CHUNK_SIZE}")
    if not 1 <= value <= MAX_CHUNK_SIZE:
        raise ValueError(f"expected an int from 1 to {MAX_CHUNK_SIZE}")
    return value


MAX_KEY_LENGTH = 200


def _concurrency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise TypeError(f"expected a non-empty str of at most {MAX_KEY_LENGTH} characters, or None")
    return value


_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _namespace(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a str")
    if not _NAMESPACE_RE.match(value):
        raise ValueError("expected 1-64 characters of letters, digits, '_', '.' or '-'")
    return value


URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


def _redis(value: Any) -> Any:
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    if isinstance(value, str):
        if not value.startswith(URL_SCHEMES):
            raise ValueError(f"expected a URL starting with {', '.join(URL_SCHEMES)}")
        return value
    import redis
    from redis.cluster import RedisCluster

    if isinstance(value, (redis.Redis, RedisCluster)):
        return value
    raise TypeError("expected a URL, a redis.Redis or RedisCluster client, or a dict of connection kwargs")


def _job_flags(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a mapping of job name to flags")
    result: dict[str, dict[str, Any]] = {}
    for name, flags in value.items():
        if not isinstance(name, str) or not isinstance(flags, Mapping):
            raise TypeError("expected {job_name: {flag: value}}")
        try:
            result[name] = validate_flags(flags)
        except InvalidJobOptions as exc:
            raise ValueError(f"job {name!r}: {exc}") from None
    return result


@dataclass(frozen=True)
class Option:
    """One row of the option table."""

    name: str
    default: Any
    validate: Callable[[Any], Any]
    per_job: bool = False

    @property
    def camel(self) -> str:
        return _camel(self.name)


OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option("redis", None, _redis),
        Option("redis_timeout", 5.0, _positive_seconds),
        Option("redis_wait_replicas", 0, _count),
        Option("redis_namespace", "kickq", _namespace),
        Option("job_flags", {}, _job_flags),
        Option("delay", None, _optional_seconds, per_job=True),
        Option("tombstone", False, _bool, per_job=True),
        Option("tombstone_timeout", 10.0, _positive_seconds, per_job=True),
        Option("retry", False, _bool, per_job=True),
        Option("retry_count", 3, _count, per_job=True),
        Option("retry_interval", 1800.0, _interval, per_job=True),
        Option("process_timeout", None, _optional_positive_seconds, per_job=True),
        Option("ghost_retry", True, _bool, per_job=True),
        Option("ghost_times", 1, _count, per_job=True),
        Option("ghost_interval", 1800.0, seconds, per_job=True),
        Option("priority", 0, _priority, per_job=True),
        Option("concurrency_key", None, _concurrency_key, per_job=True),
        # kickq_celery addition: jobs of a burst per Celery message (create_many, promoter)
        Option("chunk_size", 1, _chunk_size, per_job=True),
        Option("purge_jobs", True, _bool),
        Option("purge_timeout", 86400.0, _positive_seconds),
        # kickq_celery additions (not in kickq for Node): worker timing.
        Option("poll_interval", 0.5, _positive_seconds),
        Option("lock_timeout", 30.0, _positive_seconds),
        Option("delay_horizon", 0.0, seconds),
    )
}
FLAG_NAMES = tuple(name for name, option in OPTIONS.items() if option.per_job)
FLAG_DEFAULTS = {name: OPTIONS[name].default for name in FLAG_NAMES}


def stored_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved flags of a job as its record keeps them: those that differ from their
    defaults (:data:`FLAG_DEFAULTS`; readers fill the rest in), so a record of default flags
    stays small enough for Redis's compact hash encoding."""
    return {name: value for name, value in flags.items() if value != FLAG_DEFAULTS.get(name, _MISSING)}


def read_flags(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved flags of a record's :func:`stored_flags`."""
    return {**FLAG_DEFAULTS, **stored}
_ALIASES = {option.camel: name for name, option in OPTIONS.items()} | {n: n for n in OPTIONS}


def canonical(key: Any, error: type[Exception], allowed: tuple[str, ...] | None = None) -> str:
    """The snake_case name of ``key`` (camelCase or snake_case), or ``error``."""
    name = _ALIASES.get(key) if isinstance(key, str) else None
    if name is None or (allowed is not None and name not in allowed):
        choices = sorted(
            {a for a, n in _ALIASES.items() if allowed is None or n in allowed}
        )
        close = difflib.get_close_matches(str(key), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        kind = "flag" if allowed is FLAG_NAMES else "option"
        raise error(f"unknown {kind} {key!r}{hint}")
    return name


def validate(key: Any, value: Any, error: type[Exception] = ConfigError,
             allowed: tuple[str, ...] | None = None) -> tuple[str, Any]:
    """Validate one option; returns ``(snake_name, normalized_value)``."""
    name = canonical(key, error, allowed)
    try:
        return name, OPTIONS[name].validate(value)
    except (TypeError, ValueError) as exc:
        raise error(f"option {key!r}: {exc} (got {value!r})") from None


def validate_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a mapping of configuration options (raises ConfigError)."""
    return dict(validate(key, value) for key, value in values.items())


def validate_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a mapping of per-job flags (raises InvalidJobOptions)."""
    return dict(validate(k, v, InvalidJobOptions, FLAG_NAMES) for k, v in values.items())


def app_options(app: Any) -> dict[str, Any]:
    """Options set on a Celery app as ``kickq_<snake_name>`` settings.

    A setting that looks like one (``kickq_...``) but names no option raises ConfigError.
    """
    found = {}
    for name in OPTIONS:
        value = app.conf.get(f"kickq_{name}", _MISSING)
        if value is not _MISSING and value is not None:
            found[name] = value
    _check_app_setting_names(app.conf)  # (app.conf is final once read above)
    return validate_options(found)


def _check_app_setting_names(conf: Any) -> None:
    """Raise ConfigError for a ``kickq_*`` Celery setting that is not an option (a typo).

    Celery finds option ``name`` as the key ``kickq_<name>`` and, in an app configured
    with a namespace (Django's ``config_from_object(..., namespace="CELERY")``), as
    ``CELERY_KICKQ_<NAME>`` (the namespace's case). A key of either shape that is not
    exactly one of those would be silently ignored, so it is an error. Not checked: an
    upper-case ``KICKQ_*`` key outside a namespaced app's namespace (a project's own
    Django setting, which Celery does not read), and modules (``import kickq_celery``
    in a config module).
    """
    prefix = getattr(conf, "prefix", None) or ""
    for key in sorted(k for k in conf.keys() if isinstance(k, str)):
        if prefix and key.startswith(prefix):
            namespace, rest = prefix, key[len(prefix):]
        elif prefix and key != key.lower():
            continue
        else:
            namespace, rest = "", key
        if not rest.lower().startswith("kickq_"):
            continue
        wanted = rest.lower()[len("kickq_"):]
        if wanted in OPTIONS and key == _setting_key(wanted, namespace):
            continue
        if isinstance(conf.get(key), types.ModuleType):
            continue
        close = difflib.get_close_matches(wanted.replace("_", ""), _SQUASHED, n=1)
        hint = f"; did you mean {_setting_key(_SQUASHED[close[0]], namespace)!r}?" if close else ""
        raise ConfigError(f"unknown Celery setting {key!r}{hint}")


def _setting_key(name: str, prefix: str) -> str:
    """The key Celery finds option ``name`` under, namespaced like Celery does (in the prefix's case)."""
    if not prefix:
        return f"kickq_{name}"
    key = f"{prefix}kickq_{name}"
    return key.upper() if prefix.isupper() else key.lower()


# Option names without underscores, so ``kickq_redisNamespace`` or ``kickq_retrycount``
# still find theirs.
_SQUASHED = {name.replace("_", ""): name for name in OPTIONS}


@dataclass(frozen=True)
class Limits:
    """The process options of a job name: every limit is enforced across all workers."""

    max_jobs_num: int | None = None
    rate: tuple[int, float] | None = None  # rate_limit: at most n starts per window (seconds)
    max_jobs_per_key: int | None = None

    def __str__(self) -> str:
        parts = []
        if self.max_jobs_num is not None:
            parts.append(f"max_jobs_num {self.max_jobs_num}")
        if self.rate is not None:
            parts.append(f"rate_limit {self.rate[0]}/{self.rate[1]:g}s")
        if self.max_jobs_per_key is not None:
            parts.append(f"max_jobs_per_key {self.max_jobs_per_key}")
        return ", ".join(parts) or "no limits"


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _rate(value: Any) -> tuple[int, float] | None:
    """A rate limit: "N/s", "N/m", "N/h", or a number of starts per second."""
    if value is None:
        return None
    if isinstance(value, str):
        match = _RATE_RE.match(value)
        if not match or int(match.group(1)) < 1:
            raise ValueError('expected "N/s", "N/m" or "N/h" with N >= 1, or a number per second')
        return int(match.group(1)), _RATE_UNITS[match.group(2)]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError('expected "N/s", "N/m" or "N/h" with N >= 1, or a number per second > 0')
    if float(value).is_integer():
        return int(value), 1.0
    return 1, 1.0 / float(value)  # e.g. 0.5: one start per 2 seconds


def _limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected an int >= 1 or None")
    return value


_PROCESS_OPTIONS = {"max_jobs_num": "max_jobs_num", "maxJobsNum": "max_jobs_num",
                    "rate_limit": "rate_limit", "rateLimit": "rate_limit",
                    "max_jobs_per_key": "max_jobs_per_key", "maxJobsPerKey": "max_jobs_per_key"}


def process_limits(given: Mapping[str, Any]) -> Limits:
    """Validate the options of ``Kickq.process()`` (raises ConfigError)."""
    found: dict[str, Any] = {}
    for key, value in given.items():
        name = _PROCESS_OPTIONS.get(key)
        if name is None:
            raise ConfigError(f"unknown process option {key!r}; they are 'max_jobs_num', 'rate_limit' "
                              "and 'max_jobs_per_key'")
        try:
            found[name] = _rate(value) if name == "rate_limit" else _limit(value)
        except ValueError as exc:
            raise ConfigError(f"option {key!r}: {exc} (got {value!r})") from None
    return Limits(found.get("max_jobs_num"), found.get("rate_limit"), found.get("max_jobs_per_key"))


def layer(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge option layers, lowest first; ``job_flags`` merge per name and flag."""
    merged: dict[str, Any] = {name: option.default for name, option in OPTIONS.items()}
    job_flags: dict[str, dict[str, Any]] = {}
    for values in layers:
        for name, value in values.items():
            if name == "job_flags":
                for job, flags in value.items():
                    job_flags.setdefault(job, {}).update(flags)
            else:
                merged[name] = value
    merged["job_flags"] = job_flags
    return merged


def resolve_flags(options: Mapping[str, Any], name: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags of one job: create() flags > job_flags[name] > options."""
    resolved = {flag: options[flag] for flag in FLAG_NAMES}
    resolved.update(options["job_flags"].get(name, {}))
    resolved.update(flags)
    return resolved
