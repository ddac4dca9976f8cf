"""Planning a create, with no I/O: validate it, resolve its flags, and say what to write.

A :class:`CreatePlan` holds everything a client then does with Redis and the
broker: the create script's call, the messages to publish, and the jobs to
hand back. Bad input raises here, before anything is written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from . import options as opts
from . import scripts
from .exceptions import InvalidJobData, InvalidJobOptions
from .records import Job, from_timestamp

if TYPE_CHECKING:
    from .promise import Promise

MAX_NAME_LENGTH = 200
MAX_ID_LENGTH = 200


def check_name(name: Any) -> str:
    """A job name: a non-empty str of at most 200 characters, else InvalidJobOptions."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidJobOptions(
            f"a job name must be a non-empty str of at most {MAX_NAME_LENGTH} characters, got {name!r}")
    return name


def check_job_id(job_id: Any) -> str:
    """A caller's job id: a non-empty str of at most 200 characters without whitespace."""
    if (not isinstance(job_id, str) or not job_id or len(job_id) > MAX_ID_LENGTH
            or any(c.isspace() for c in job_id)):
        raise InvalidJobOptions(f"a job_id must be a non-empty str of at most {MAX_ID_LENGTH} characters "
                                f"without whitespace, got {job_id!r}")
    return job_id


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
    if value <= 0:
        return 0.0  # (the default: read on every create, so the broker's settings are not)
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
    """One job's wake-up call: run ``attempt`` of ``job_id`` after ``countdown`` seconds, then
    the ``more`` (id, attempt) jobs of its chunk in turn, each as if it had come alone.

    ``label`` is how the message shows its args (see :func:`shown`).
    """

    job_id: str
    attempt: int
    countdown: float = 0.0
    label: str = ""
    more: tuple[tuple[str, int], ...] = ()

    @property
    def job_ids(self) -> list[str]:
        return [self.job_id, *(job_id for job_id, _ in self.more)]


def chunked(messages: Sequence[Message], size: int) -> list[Message]:
    """Messages of one name with no countdown packed ``size`` jobs to a message (each keeps its
    own record, guard and run); the others as they are."""
    if size <= 1:
        return list(messages)
    due = [m for m in messages if m.countdown <= 0 and not m.more]
    out = [m for m in messages if m.countdown > 0 or m.more]
    for i in range(0, len(due), size):
        first, *rest = due[i:i + size]
        label = first.label + (f" and {len(rest)} more" if rest else "")
        out.append(replace(first, label=label, more=tuple((m.job_id, m.attempt) for m in rest)))
    return out


@dataclass(frozen=True)
class CreatePlan:
    """A validated create of jobs of one name with the same flags."""

    name: str
    flags: dict[str, Any]
    jobs: list[tuple[str, str]]  # (job id, data as JSON)
    park: bool  # wait in Redis for a promoter (no message now)
    chosen_ids: bool = False  # the ids are the caller's: one may exist already
    forget_prefix: str = ""  # the result key prefix whose outcomes new records drop (see scripts.create)

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
    def call(self) -> scripts.Call[scripts.Created]:
        """The create script's call."""
        return self.call_with(None, ())

    @property
    def flags_json(self) -> str:
        """The flags as the records keep them ('' when all are defaults: see options.stored_flags)."""
        stored = opts.stored_flags(self.flags)
        return json.dumps(stored, separators=(",", ":")) if stored else ""

    @property
    def chunk_size(self) -> int:
        """Jobs per message: ``chunk_size`` for jobs due now, else one."""
        return int(self.flags["chunk_size"]) if self.delay <= 0 else 1

    def parts(self) -> list[CreatePlan]:
        """This create in parts of at most scripts.CREATE_CHUNK jobs (whole chunks), one script
        call each."""
        size = scripts.CREATE_CHUNK - scripts.CREATE_CHUNK % self.chunk_size
        return [replace(self, jobs=self.jobs[i:i + size]) for i in range(0, len(self.jobs), size)]

    def call_with(self, queue: str | None, envelopes: Sequence[str]) -> scripts.Call[scripts.Created]:
        """The create script's call that also pushes its messages (``envelopes``, one per message
        of :attr:`messages`, as the broker keeps them) onto ``queue``, on a broker that is the
        same Redis: each message with the records of its jobs."""
        groups = [] if queue is None else [
            (len(m.job_ids), envelope) for m, envelope in zip(self.messages, envelopes, strict=True)]
        return scripts.create(self.name, self.flags_json, self.process_timeout, self.tombstone,
                              self.delay, self.park, self.jobs, queue, groups, self.flags["priority"],
                              self.flags["concurrency_key"], self.chosen_ids, self.forget_prefix)

    def tick_call(self, schedule_key: str, tick_at: float) -> scripts.Call[bool]:
        """The call that claims a cron tick and creates this (one) job with it."""
        return scripts.tick(schedule_key, tick_at, self.name, self.flags_json, self.process_timeout,
                            self.tombstone, self.jobs[0], self.flags["priority"],
                            self.flags["concurrency_key"])

    @cached_property
    def messages(self) -> list[Message]:
        """The messages to publish now (none when parked); made once per plan (its call and its
        publishing both read them)."""
        if self.park:
            return []
        return chunked([Message(job_id, 1, self.delay, shown(self.name, data))
                        for job_id, data in self.jobs], self.chunk_size)

    def existing(self, reply: scripts.Created) -> dict[str, tuple[str, float, str, str]]:
        """The jobs of this create that existed already (only the caller's own ids can: a fresh id
        found existing is this same call, sent again after a lost reply)."""
        return reply.existing if self.chosen_ids else {}

    def created(self, reply: scripts.Created,
                promise: Callable[[str, str, float], Promise]) -> list[Job]:
        """The jobs to hand back; ``promise(job_id, name, deadline)`` makes a tombstone's promise.

        Times are the Redis clock, as on the records; each job's ``data`` is its stored JSON
        decoded, as ``get()`` and the handler see it. A job whose id existed is that job, with
        ``created=False``.
        """
        state = "delayed" if self.delay > 0 else "queued"
        deadline = reply.created_at + float(self.flags["tombstone_timeout"])
        at = from_timestamp(reply.created_at)
        existing = self.existing(reply)
        jobs = []
        for job_id, data_json in self.jobs:
            was = existing.get(job_id)
            if was is None:
                jobs.append(Job(job_id, self.name, state,
                                promise(job_id, self.name, deadline) if self.tombstone else None,
                                data=json.loads(data_json), created_at=at, created=True))
            else:  # that job, of its own name
                name = was[3]
                waiter = promise(job_id, name, deadline) if self.tombstone else None
                jobs.append(Job(job_id, name, was[0], waiter, data=json.loads(was[2]),
                                created_at=from_timestamp(was[1]), created=False))
        return jobs

    def unwritten(self, reply: scripts.Created) -> list[Message]:
        """The messages of the jobs this create wrote (none whose jobs all existed)."""
        existing = self.existing(reply)
        return [m for m in self.messages if not existing.keys() >= set(m.job_ids)]


def plan_create(options: Mapping[str, Any], horizon_seconds: float, name: Any, items: Sequence[Any],
                given: Mapping[str, Any] | None, flags: Mapping[str, Any],
                job_ids: Sequence[Any] | None = None) -> CreatePlan:
    """Validate a create (name, flags, every item's data and id) and plan it; raises on bad input."""
    check_name(name)
    merged = {**opts.validate_flags(given or {}), **opts.validate_flags(flags)}
    resolved = job_flags(options, name, merged)
    payloads = [dumps(item, "job data") for item in items]
    if job_ids is None:
        ids = [str(uuid.uuid4()) for _ in payloads]
    else:
        if isinstance(job_ids, (str, bytes)) or len(job_ids) != len(payloads):
            raise InvalidJobOptions(f"job_ids: expected a list of {len(payloads)} ids, one per item")
        ids = [check_job_id(job_id) for job_id in job_ids]
        if len(set(ids)) != len(ids):
            raise InvalidJobOptions("job_ids: the ids of one create_many must be distinct")
    delay = float(resolved["delay"] or 0.0)
    return CreatePlan(name, resolved, list(zip(ids, payloads, strict=True)), park=delay > horizon_seconds,
                      chosen_ids=job_ids is not None)
