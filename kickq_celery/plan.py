"""Planning a create, with no I/O: validate it, resolve its flags, and say what to write.

A :class:`CreatePlan` holds everything a client then does with Redis and the
broker: the create script's call, the messages to publish, and the jobs to
hand back. Bad input raises here, before anything is written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import options as opts
from . import scripts
from .exceptions import InvalidJobData, InvalidJobOptions
from .records import Job, from_timestamp

if TYPE_CHECKING:
    from .promise import Promise

MAX_NAME_LENGTH = 200


def check_name(name: Any) -> str:
    """A job name: a non-empty str of at most 200 characters, else InvalidJobOptions."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidJobOptions(
            f"a job name must be a non-empty str of at most {MAX_NAME_LENGTH} characters, got {name!r}")
    return name


def dumps(value: Any, what: str) -> str:
    """Compact JSON of ``value``, else InvalidJobData naming ``what``."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidJobData(f"{what} is not JSON-serializable: {exc}") from None


def horizon(options: Mapping[str, Any], conf: Any) -> float:
    """Delays up to this many seconds are Celery countdowns; longer ones wait in Redis.

    Kept under a quarter of a Redis transport's visibility_timeout, so no message
    waits in a worker long enough to be redelivered.
    """
    value = float(options["delay_horizon"])
    broker = conf.broker_url or ""
    if isinstance(broker, str) and broker.startswith(("redis", "sentinel")):
        transport = conf.broker_transport_options or {}
        value = min(value, float(transport.get("visibility_timeout", 3600)) / 4)
    return value


def job_flags(options: Mapping[str, Any], name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved flags of a job of ``name``; a callable retry_interval is evaluated now."""
    resolved = opts.resolve_flags(options, name, given)
    interval = resolved["retry_interval"]
    if callable(interval):
        # the worker may not have the callable: store its value for each retry
        try:
            resolved["retry_interval"] = [
                opts.seconds(interval(n)) for n in range(1, resolved["retry_count"] + 1)
            ] or [0.0]
        except (TypeError, ValueError) as exc:
            raise InvalidJobOptions(f"retry_interval callable: {exc}") from None
    return resolved


#: how much of a job's data its message shows (Flower, celery inspect)
SHOWN_DATA = 100


def shown(name: str, data_json: str) -> str:
    """How a job's message shows its args: the job name and the start of its data."""
    data = data_json if len(data_json) <= SHOWN_DATA else data_json[:SHOWN_DATA] + "..."
    return f"({name!r}, {data})"


@dataclass(frozen=True)
class Message:
    """One job's wake-up call: run ``attempt`` of ``job_id`` after ``countdown`` seconds.

    ``label`` is how the message shows its args (see :func:`shown`).
    """

    job_id: str
    attempt: int
    countdown: float = 0.0
    label: str = ""


@dataclass(frozen=True)
class CreatePlan:
    """A validated create of jobs of one name with the same flags."""

    name: str
    flags: dict[str, Any]
    jobs: list[tuple[str, str]]  # (job id, data as JSON)
    park: bool  # wait in Redis for a promoter (no message now)

    @property
    def ids(self) -> list[str]:
        return [job_id for job_id, _ in self.jobs]

    @property
    def delay(self) -> float:
        return float(self.flags["delay"] or 0.0)

    @property
    def tombstone(self) -> bool:
        return bool(self.flags["tombstone"])

    @property
    def process_timeout(self) -> float | None:
        return self.flags["process_timeout"]  # type: ignore[no-any-return]

    @property
    def call(self) -> scripts.Call[float]:
        """The create script's call (it replies the creation time)."""
        return scripts.create(self.name, json.dumps(self.flags), self.process_timeout, self.tombstone,
                              self.delay, self.park, self.jobs)

    def call_with(self, queue: str, envelopes: Sequence[str]) -> scripts.Call[float]:
        """The create script's call that also pushes each job's message (``envelopes``, one per
        job, as the broker keeps them) onto ``queue``, on a broker that is the same Redis."""
        return scripts.create(self.name, json.dumps(self.flags), self.process_timeout, self.tombstone,
                              self.delay, self.park, self.jobs, queue, envelopes)

    def tick_call(self, schedule_key: str, tick_at: float) -> scripts.Call[bool]:
        """The call that claims a cron tick and creates this (one) job with it."""
        return scripts.tick(schedule_key, tick_at, self.name, json.dumps(self.flags), self.process_timeout,
                            self.tombstone, self.jobs[0])

    @property
    def messages(self) -> list[Message]:
        """The messages to publish now (none when parked)."""
        if self.park:
            return []
        return [Message(job_id, 1, self.delay, shown(self.name, data)) for job_id, data in self.jobs]

    def created(self, created_at: float,
                promise: Callable[[str, str, float], Promise]) -> list[Job]:
        """The jobs to hand back; ``promise(job_id, name, deadline)`` makes a tombstone's promise.

        ``created_at`` is the create script's reply (the Redis clock, as on the records); each
        job's ``data`` is its stored JSON decoded, as ``get()`` and the handler see it.
        """
        state = "delayed" if self.delay > 0 else "queued"
        deadline = created_at + float(self.flags["tombstone_timeout"])
        at = from_timestamp(created_at)
        return [Job(job_id, self.name, state,
                    promise(job_id, self.name, deadline) if self.tombstone else None,
                    data=json.loads(data_json), created_at=at, created=True)
                for job_id, data_json in self.jobs]


def plan_create(options: Mapping[str, Any], horizon_seconds: float, name: Any, items: Sequence[Any],
                given: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> CreatePlan:
    """Validate a create (name, flags, every item's data) and plan it; raises on bad input."""
    check_name(name)
    merged = {**opts.validate_flags(given or {}), **opts.validate_flags(flags)}
    resolved = job_flags(options, name, merged)
    payloads = [dumps(item, "job data") for item in items]
    delay = float(resolved["delay"] or 0.0)
    return CreatePlan(name, resolved, [(str(uuid.uuid4()), payload) for payload in payloads],
                      park=delay > horizon_seconds)
